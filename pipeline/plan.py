"""What to load, resolved before anything loads: the model's family, the adapter's file and spec, and checks.

Inputs are checked first (references, subject, adapter name) so errors come fast; then the model family,
adapter checkpoint and encoders are resolved (downloaded if needed). The command line and the web page both
call these. torch and the model libraries are imported inside functions only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointMismatchError, LookalikeError, MissingFileError

if TYPE_CHECKING:  # pragma: no cover
    from ..adapters.spec import AdapterSpec
    from .personalizer import Personalizer
    from .subject import Subject

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_ADAPTER = "plus"
DEMO = "demo"
#: The demo's architecture with random (seeded) weights built in code: for tests and smoke runs.
RANDOM_DEMO = "tiny-random"
DEMOS = (DEMO, RANDOM_DEMO)
PATH_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")

# -- checks made before anything is loaded -----------------------------------------------------------------


def check_references(references: Sequence[str]) -> list[Path]:
    """Every reference photo, opened and decoded once so that a bad file fails before any model loads."""
    from ..encoders.prepare import load_reference
    from .subject import MAX_SUBJECT_IMAGES

    if len(references) > MAX_SUBJECT_IMAGES:
        raise LookalikeError(f"{len(references)} reference photos were given, above the limit of {MAX_SUBJECT_IMAGES} "
                             f"per subject; pick the {MAX_SUBJECT_IMAGES} best photos")
    paths = [Path(r).expanduser() for r in references]
    for path in paths:
        load_reference(path)
    return paths


def check_transfer(p: Personalizer, transfer: str) -> None:
    """--transfer names SD1.5/SDXL blocks: refuse a UNet of another layout (the demo's) in one line."""
    if transfer == "all":
        return
    from ..adapters.attach import expand_block_scale
    from ..adapters.transfer import transfer_scale

    try:
        scale = transfer_scale(transfer, p.base)
        assert isinstance(scale, dict)
        expand_block_scale(p.pipe.unet, scale)
    except LookalikeError as exc:
        raise LookalikeError(f"--transfer {transfer} picks blocks of the {p.base} UNet, and this model's UNet is laid "
                             f"out otherwise ({exc}); use --transfer all with it") from None


def load_subject(text: str) -> Subject:
    """A subject file, read before any model loads."""
    from .subject import Subject

    return Subject.load(text)


def adapter_choice(adapter: str | None, subject: Subject | None, model: str | None = None) -> str:
    """The adapter to load: --adapter, else the subject's, else the default (the trained demo: its own)."""
    from ..adapters.spec import REGISTRY

    if adapter is not None:
        return adapter
    if subject is None:
        if model in DEMOS:
            from .demo_files import demo_adapters

            offered = demo_adapters(model)
            return DEFAULT_ADAPTER if DEFAULT_ADAPTER in offered else offered[0]
        return DEFAULT_ADAPTER
    if subject.adapter not in REGISTRY:
        raise LookalikeError(f"the subject was encoded for the adapter {subject.adapter!r}, which is not in the "
                             f"registry; pass its checkpoint file with --adapter")
    return subject.adapter


def _check_adapter_known(adapter: str) -> None:
    """Fail at once on an adapter that is neither a registry name, an existing file nor a hub path."""
    from ..adapters.spec import REGISTRY
    from ..weights.hub import CHECKPOINT_SUFFIXES, resolve_adapter_source

    if adapter in REGISTRY or any(s.short_name == adapter for s in REGISTRY.values()):
        return
    if Path(adapter).expanduser().exists():
        return
    parts = adapter.split("/")
    if len(parts) >= 3 and not adapter.startswith(PATH_PREFIXES) and Path(adapter).suffix in CHECKPOINT_SUFFIXES:
        return
    resolve_adapter_source(adapter)  # raises the registry's own sentence for what is left


def check_subject_fits(subject: Subject | None, spec: AdapterSpec) -> None:
    """Fail at once when a subject was encoded for another adapter than the one chosen."""
    if subject is not None and subject.adapter != spec.name:
        raise CheckpointMismatchError(
            f"the subject was encoded for {subject.adapter} but the adapter is {spec.name}; drop --adapter, "
            f"or encode the photos again with `lookalike encode --adapter {spec.short_name or spec.name}`")


# -- the model and adapter: resolved (and downloaded if needed) before loading -----------------------------


@dataclass
class Plan:
    """What to load: the model, its base family, the adapter checkpoint (None: a demo adapter) and its spec."""

    model: str
    base: str
    demo: bool
    spec: AdapterSpec
    checkpoint: Path | None


def split_variant(adapter: str) -> tuple[str | None, str]:
    """``--adapter NAME=FILE`` -> (registry NAME, FILE): the variant of a checkpoint whose shapes do not settle
    it; anything else (an existing path included) -> (None, adapter)."""
    if "=" not in adapter or Path(adapter).expanduser().exists():
        return None, adapter
    from ..adapters.spec import get_spec

    name, _, source = adapter.partition("=")
    if name not in _short_names():
        get_spec(name)  # an unknown name: the registry's own sentence
    if not source:
        raise LookalikeError(f"--adapter {adapter}: give the checkpoint after '=', e.g. --adapter {name}=my.bin")
    return name, source


def _short_names() -> set[str]:
    from ..adapters.spec import REGISTRY

    return {s.short_name for s in REGISTRY.values() if s.short_name}


def make_plan(model: str, adapter: str, *, with_encoder: bool, base: str | None = None) -> Plan:
    """Resolve the model's base family (unless given) and the adapter's file and spec, fetching small files."""
    variant, adapter = split_variant(adapter)
    _check_adapter_known(adapter)
    if model in DEMOS:
        return _demo_plan(adapter, model, variant)
    from ..adapters.spec import get_spec
    from ..weights.hub import resolve_adapter_source
    from ..weights.io import detect_spec, read_checkpoint

    base = base or model_base(model)
    path, spec = resolve_adapter_source(adapter, base=base)  # type: ignore[arg-type]
    if variant is not None:
        spec = get_spec(variant, base)  # type: ignore[arg-type]
    if spec is None:
        spec = detect_spec(*read_checkpoint(path), str(path))
    if spec.base != base:
        raise CheckpointMismatchError(f"the adapter {spec.name} is for {spec.base} models but --model {model} is "
                                      f"{base}; pick a {base} adapter")
    if with_encoder and not (Path(model).expanduser() / "image_encoder" / "config.json").is_file():
        _fetch_encoders(spec)  # a local pipeline folder with its own image encoder uses that one
    return Plan(model, base, False, spec, Path(path))


def _fetch_encoders(spec: AdapterSpec) -> None:
    """Make sure the adapter's CLIP image encoder(s) are cached (insightface's face models are not on the hub)."""
    from ..adapters.spec import encoder_of
    from ..weights.hub import resolve_encoder_dir

    for encoder in encoder_of(spec):
        if encoder.repo_id is not None:
            resolve_encoder_dir(encoder)


def encode_plan(model: str, adapter: str) -> Plan:
    """What ``encode`` needs: the spec and its encoder(s); a registry adapter's checkpoint is not fetched."""
    from ..adapters.spec import REGISTRY, get_spec

    short = any(s.short_name == adapter for s in REGISTRY.values())
    if model in DEMOS or not (adapter in REGISTRY or short):
        return make_plan(model, adapter, with_encoder=True, base=_encode_base(model, adapter))
    spec = get_spec(adapter, _encode_base(model, adapter) or model_base(model))  # type: ignore[arg-type]
    _fetch_encoders(spec)
    return Plan(model, spec.base, False, spec, None)


def _demo_plan(adapter: str, model: str = DEMO, variant: str | None = None) -> Plan:
    """The trained demo model takes its shipped adapter or a checkpoint file made for it; the random one
    (and the demo when no trained weights ship) takes the adapters :func:`demo_adapters` names."""
    from ..adapters.spec import get_spec
    from ..weights.io import detect_spec, read_checkpoint

    local = Path(adapter).expanduser()
    if local.is_file():
        spec = get_spec(variant, "sd15") if variant else detect_spec(*read_checkpoint(local), str(local))
        return Plan(model, "sd15", True, spec, local)
    from .demo_files import DEMO_TRAINED, check_demo_adapter, shipped_adapter_spec

    check_demo_adapter(model, adapter)
    spec = get_spec(adapter, "sd15")
    if DEMO_TRAINED and model == DEMO:
        return Plan(model, "sd15", True, shipped_adapter_spec(), None)
    return Plan(model, "sd15", True, spec, None)


def _encode_base(model: str, adapter: str) -> str | None:
    """The base family when encoding, without the model's files where the adapter or model tells it."""
    from ..adapters.spec import REGISTRY

    if adapter in REGISTRY:
        return REGISTRY[adapter].base
    return "sd15" if model == DEFAULT_MODEL else None


def model_base(model: str) -> str:
    """sd15, sdxl, flux or sd3, from the model's unet/ or transformer/config.json (local, cache or hub)."""
    local = Path(model).expanduser()
    if local.is_dir():
        config = local / "unet" / "config.json"
        if not config.is_file() and (local / "transformer" / "config.json").is_file():
            config = local / "transformer" / "config.json"
        if not config.is_file():
            raise LookalikeError(f"--model {model} is not a diffusers pipeline folder (it has no unet/ or "
                                 f"transformer/config.json); pass a folder written by save_pretrained, a hub id, or demo")
    elif local.exists():
        raise LookalikeError(f"--model {model} is a file; pass a diffusers pipeline folder, a hub id, or demo "
                             f"(single-file checkpoints are not supported)")
    elif model.startswith(PATH_PREFIXES) or model.count("/") > 1:
        raise MissingFileError(f"no such model folder: {local}; check the path, or pass a hub id or demo")
    else:
        config = _hub_unet_config(model)
    try:
        data = json.loads(config.read_text())
        transformer = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}.get(data.get("_class_name"))
        cross = None if transformer else data["cross_attention_dim"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LookalikeError(f"cannot read {config} ({exc}); the model's files are damaged, download it again") from exc
    sdxl = cross == 2048 or data.get("addition_embed_type") == "text_time"  # SDXL's size/crop conditioning
    return transformer or ("sdxl" if sdxl else "sd15")


def _hub_unet_config(model: str) -> Path:
    """The model's unet/config.json from the Hugging Face cache or hub, each failure as one sentence."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    fetch = f"run `hf download {model}` on a machine with network access, pass a local folder, or try --model demo"
    try:
        for sub in ("unet", "transformer"):  # UNet models, then FLUX / SD3 transformers
            cached = huggingface_hub.try_to_load_from_cache(model, f"{sub}/config.json")
            if isinstance(cached, str):
                return Path(cached)
        try:
            return Path(huggingface_hub.hf_hub_download(model, "config.json", subfolder="unet"))
        except EntryNotFoundError:
            return Path(huggingface_hub.hf_hub_download(model, "config.json", subfolder="transformer"))
    except HFValidationError as exc:
        raise LookalikeError(f"--model {model!r} is neither a folder nor a valid hub id; pass a diffusers "
                             f"folder, an id like org/name, or demo") from exc
    except GatedRepoError as exc:
        raise MissingFileError(f"the model {model} is gated; accept its terms at https://huggingface.co/{model} "
                               f"and log in with `hf auth login`") from exc
    except RepositoryNotFoundError as exc:
        raise MissingFileError(f"the hub has no model {model} (or it is private); check the id, or log in with "
                               f"`hf auth login`") from exc
    except LocalEntryNotFoundError as exc:
        why = ("downloads are switched off (HF_HUB_OFFLINE=1)" if constants.is_offline_mode()
               else "the hub cannot be reached")
        raise MissingFileError(f"the model {model} is not in the Hugging Face cache and {why}; {fetch}") from exc
    except EntryNotFoundError as exc:
        raise LookalikeError(f"the hub repo {model} has no unet/ or transformer/config.json, so it is not a diffusers "
                             f"text-to-image pipeline; pass an SD1.5, SDXL, FLUX.1 or SD3.5 pipeline") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise MissingFileError(f"cannot fetch the model {model} ({str(exc).splitlines()[0]}); {fetch}") from exc

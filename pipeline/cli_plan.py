"""What the ``lookalike`` command checks and resolves before loading anything, and how it loads models.

Inputs are checked first (output path, references, subject, adapter name) so errors come fast; then the
model family, adapter checkpoint and encoders are resolved (downloaded if needed); then models load.
torch and the model libraries are imported inside functions only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointMismatchError, LookalikeError, MissingFileError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..adapters.spec import AdapterSpec
    from .personalizer import Personalizer
    from .subject import Subject

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_ADAPTER = "plus"
DEMO = "demo"
#: The demo's architecture with random (seeded) weights built in code: for tests and smoke runs.
RANDOM_DEMO = "tiny-random"
DEMOS = (DEMO, RANDOM_DEMO)
DEBUG_ENV = "LOOKALIKE_DEBUG"
PATH_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")


def debug() -> bool:
    """Whether LOOKALIKE_DEBUG asks for tracebacks and library warnings."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


# -- checks made before anything is loaded -----------------------------------------------------------------


def check_output(text: str, suffix: str, what: str) -> Path:
    """The output path, checked: the right suffix, not a folder, inside a folder that can be written."""
    path = Path(text).expanduser()
    if path.suffix.lower() != suffix:
        raise LookalikeError(f"--out {text} must end in {suffix} ({what}); rename it, e.g. {path.stem}{suffix}")
    if path.is_dir():
        raise LookalikeError(f"--out {text} is a folder; give a file name inside it, e.g. {path / ('out' + suffix)}")
    folder = path.parent.absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise LookalikeError(f"cannot write {text}: {existing} is a file, not a folder; pick another --out")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise LookalikeError(f"cannot write {text}: the folder {existing} is not writable ({exc.strerror}); "
                             f"pick another --out") from None
    return path


def check_references(references: Sequence[str]) -> list[Path]:
    """Every reference photo, opened and decoded once so that a bad file fails before any model loads."""
    from ..encoders.prepare import load_reference

    paths = [Path(r).expanduser() for r in references]
    for path in paths:
        load_reference(path)
    return paths


def check_combination(args: argparse.Namespace, count: int) -> None:
    """--combine, --reference-weight and --negative-reference fit the --reference photos (before any model
    loads)."""
    from .encode import resolve_combine

    if count == 0:
        given = [flag for flag, value in (("--reference-weight", args.reference_weights), ("--combine", args.combine),
                                          ("--negative-reference", args.negative_references)) if value]
        if given:
            flag = given[0]
            raise LookalikeError(f"{flag} applies to --reference photos, and a --subject file is already encoded: "
                                 f"give {flag} to `lookalike encode` when making the subject")
        return
    resolve_combine(args.combine, args.reference_weights, count)


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
        if model == DEMO:
            from .demo import DEMO_TRAINED, shipped_adapter_spec

            if DEMO_TRAINED:
                return shipped_adapter_spec().short_name or DEFAULT_ADAPTER
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


def make_plan(model: str, adapter: str, *, with_encoder: bool, base: str | None = None) -> Plan:
    """Resolve the model's base family (unless given) and the adapter's file and spec, fetching small files."""
    _check_adapter_known(adapter)
    if model in DEMOS:
        return _demo_plan(adapter, model)
    from ..weights.hub import resolve_adapter_source
    from ..weights.io import detect_spec, read_checkpoint

    base = base or _model_base(model)
    path, spec = resolve_adapter_source(adapter, base=base)  # type: ignore[arg-type]
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
    spec = get_spec(adapter, _encode_base(model, adapter) or _model_base(model))  # type: ignore[arg-type]
    _fetch_encoders(spec)
    return Plan(model, spec.base, False, spec, None)


def _demo_plan(adapter: str, model: str = DEMO) -> Plan:
    """The trained demo model takes its shipped adapter or a checkpoint file made for it; the random one
    (and the demo when no trained weights ship) takes the basic and plus adapters."""
    from ..adapters.spec import get_spec
    from ..weights.io import detect_spec, read_checkpoint

    local = Path(adapter).expanduser()
    if local.is_file():
        return Plan(model, "sd15", True, detect_spec(*read_checkpoint(local), str(local)), local)
    spec = get_spec(adapter, "sd15")
    from .demo import DEMO_TRAINED, shipped_adapter_spec

    if DEMO_TRAINED and model == DEMO:
        trained = shipped_adapter_spec()
        if spec.projector != trained.projector:
            raise LookalikeError(f"the trained demo model ships the {trained.short_name or trained.name} adapter, "
                                 f"not {adapter!r}; use --adapter {trained.short_name or trained.name} with --model demo")
        return Plan(model, "sd15", True, trained, None)
    if spec.base != "sd15" or spec.projector not in ("linear", "resampler"):
        raise LookalikeError(f"the demo model offers the basic and plus adapters, not {adapter!r}; "
                             f"use --adapter plus or --adapter basic with --model demo")
    return Plan(model, "sd15", True, spec, None)


def _encode_base(model: str, adapter: str) -> str | None:
    """The base family when encoding, without the model's files where the adapter or model tells it."""
    from ..adapters.spec import REGISTRY

    if adapter in REGISTRY:
        return REGISTRY[adapter].base
    return "sd15" if model == DEFAULT_MODEL else None


def _model_base(model: str) -> str:
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
    return transformer or ("sdxl" if cross == 2048 else "sd15")


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


# -- loading -----------------------------------------------------------------------------------------------


def device_and_dtype(model: str, device: str | None, dtype: str | None
                      ) -> tuple[torch.device | None, torch.dtype | None]:
    """--device and --dtype with their defaults: cuda + float16 when available, else cpu + float32 (demo: None)."""
    import torch

    if model in DEMOS:
        return None, None

    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise LookalikeError(f"unknown --device {device!r}; use cuda, cuda:N, mps or cpu") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LookalikeError(f"--device {device} was asked for but torch sees no CUDA GPU; use --device cpu")
    name = dtype or ("float16" if dev.type == "cuda" else "float32")
    return dev, getattr(torch, name)


@contextmanager
def quiet_hub() -> Iterator[None]:
    """Silence huggingface_hub's retry warnings (kept with LOOKALIKE_DEBUG=1): a failure is one sentence."""
    if debug():
        yield
        return
    from huggingface_hub.utils import logging as hub_logging

    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(level)


def _stderr_is_terminal() -> bool:
    """Whether stderr is a terminal (progress bars are shown only there)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence diffusers' and transformers' warnings, and their loading bars off a terminal (LOOKALIKE_DEBUG keeps them)."""
    if debug():
        yield
        return
    import warnings

    from diffusers.utils import logging as dl
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as tl

    saved = (dl.get_verbosity(), tl.get_verbosity(), dl.is_progress_bar_enabled(), tl.is_progress_bar_enabled(),
             hub_utils.are_progress_bars_disabled())
    dl.set_verbosity_error()
    tl.set_verbosity_error()
    if not _stderr_is_terminal():
        dl.disable_progress_bar()
        tl.disable_progress_bar()  # and huggingface_hub's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            yield
        finally:
            warnings.simplefilter("ignore", UserWarning)  # HF_HUB_DISABLE_PROGRESS_BARS refusing a change
            dl.set_verbosity(saved[0])
            tl.set_verbosity(saved[1])
            if saved[2]:
                dl.enable_progress_bar()
            if saved[3]:
                tl.enable_progress_bar()
            if saved[4]:
                hub_utils.disable_progress_bars()


def face_options(args: argparse.Namespace) -> dict[str, Any]:
    """FaceEncoder.from_folder arguments from --face-models, --face-detector and --yunet-model."""
    options: dict[str, Any] = {}
    if getattr(args, "face_models", None):
        options["model_dir"] = args.face_models
    if getattr(args, "face_detector", None):
        options["detector"] = args.face_detector
    if getattr(args, "yunet_model", None):
        options["yunet_model"] = args.yunet_model
    return options


def load_personalizer(plan: Plan, device: torch.device | None, dtype: torch.dtype | None,
                      faces: dict[str, Any] | None = None) -> tuple[Personalizer, str]:
    """The model with the adapter loaded (the demo: on the cpu in float32); returns it and the adapter's name."""
    if plan.demo:
        from .demo import DEMO_TRAINED, demo_personalizer, trained_demo_personalizer

        if DEMO_TRAINED and plan.model == DEMO:
            p = trained_demo_personalizer(adapter=plan.checkpoint is None)
        else:
            p = demo_personalizer(plan.spec.name if plan.checkpoint is None else None)
        p.encoders.face_options = dict(faces or {})
        if plan.checkpoint is None:
            return p, p.adapters[0].name
        return p, p.load_adapter(plan.checkpoint, spec=plan.spec)
    from .personalizer import Personalizer

    assert plan.checkpoint is not None and device is not None and dtype is not None
    p = Personalizer.from_pretrained(plan.model, dtype=dtype, device=device)
    p.encoders.face_options = dict(faces or {})
    return p, p.load_adapter(plan.checkpoint, spec=plan.spec)


def encode_references(plan: Plan, references: list[Path], args: argparse.Namespace,
                       device: torch.device | None, dtype: torch.dtype | None) -> Subject:
    """Run only the image encoder(s) the adapter needs (the text-to-image model is not loaded)."""
    if plan.demo:
        p, name = load_personalizer(plan, None, None, face_options(args))
        return p.encode(references, adapter=name, combine=args.combine, crop=args.crop, face_index=args.face_index,
                        weights=args.reference_weights, negative_images=args.negative_references)
    import torch

    from .encode import EncoderSet, encode_subject

    assert device is not None and dtype is not None
    with torch.no_grad():
        return encode_subject(EncoderSet(device, dtype, face_options(args)), plan.spec, references,
                              combine=args.combine, crop=args.crop, face_index=args.face_index,
                              weights=args.reference_weights, negative_images=args.negative_references)

"""Read and write adapter checkpoints in the official IP-Adapter layout.

Read: ``.bin``/``.pt`` (``torch.load(weights_only=True)`` only) and ``.safetensors``, nested
(``{"image_proj": {...}, "ip_adapter": {...}}``) or flat (``image_proj.*`` / ``ip_adapter.*``) keys.
Write: flat safetensors with the spec as JSON in the metadata, which diffusers' ``load_ip_adapter`` reads.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..adapters.module import IPAdapter, attention_layers
from ..adapters.spec import REGISTRY, AdapterSpec, Base
from ..errors import CheckpointMismatchError, LookalikeError, UnsafeCheckpointError
from ..fileio import write_atomic
from .dit_formats import detect_dit_spec, dit_base_of, published_to_flat

SPEC_KEY = "lookalike.spec"
SECTIONS = ("image_proj", "ip_adapter")
StateDict = dict[str, torch.Tensor]


def _flatten(nested: Mapping, path: Path) -> StateDict:
    """Nested or flat official dict -> flat ``section.key`` tensors (published DiT layouts renamed)."""
    nested = published_to_flat(nested)
    flat: StateDict = {}
    for section, value in nested.items():
        if isinstance(value, Mapping):
            flat.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            flat[section] = value
    bad = [k for k, v in flat.items() if not torch.is_tensor(v)]
    if bad:
        raise LookalikeError(f"{path} holds non-tensor entries ({bad[0]!r}); it is not an adapter checkpoint")
    if not any(k.split(".", 1)[0] in SECTIONS for k in flat):
        raise LookalikeError(f"{path} has no 'image_proj' or 'ip_adapter' weights; it is not an IP-Adapter "
                             f"checkpoint (found keys like {next(iter(flat), 'none')!r})")
    return flat


def read_safetensors(path: Path, what: str = "") -> tuple[StateDict, dict[str, str]]:
    """All tensors (on the CPU) and the metadata of a safetensors file; a damaged file is one sentence."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise LookalikeError(f"cannot read {what}{path}: not a valid safetensors file ({exc}); "
                             f"re-create or re-download it") from exc


def read_checkpoint(path: str | os.PathLike) -> tuple[StateDict, dict[str, str]]:
    """A checkpoint file -> (flat state dict on the CPU, metadata). Pickled code is refused, never run."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LookalikeError(f"no such checkpoint file: {path}")
    if path.suffix == ".safetensors":
        tensors, metadata = read_safetensors(path)
        return _flatten(tensors, path), metadata
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"refused to load {path}: it is not a plain tensor checkpoint (it is damaged, or holds pickled objects "
            f"that could run code); re-download it from its official source or convert it to .safetensors "
            f"with a trusted tool") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise LookalikeError(f"cannot read {path}: the file is damaged or not a torch checkpoint; "
                             f"re-download it") from exc
    if not isinstance(loaded, Mapping):
        raise LookalikeError(f"{path} does not hold a dict of tensors; it is not an adapter checkpoint")
    return _flatten(loaded, path), {}


def section(sd: Mapping[str, torch.Tensor], name: str) -> StateDict:
    """The keys of one section (``image_proj`` or ``ip_adapter``) without their prefix."""
    prefix = name + "."
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _count_layers(proj: StateDict, prefix: str = "layers.") -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in proj if k.startswith(prefix)})


def _base_of(cross: int) -> Base:
    return {768: "sd15", 2048: "sdxl"}.get(cross, "sd15" if cross < 2048 else "sdxl")  # type: ignore[return-value]


def spec_from_shapes(sd: Mapping[str, torch.Tensor], name: str = "custom") -> AdapterSpec:
    """Infer the architecture of a checkpoint from its keys and shapes."""
    p = section(sd, "image_proj")
    ip = section(sd, "ip_adapter")
    lora = [v for k, v in ip.items() if k.endswith("to_q_lora.down.weight")]
    rank = lora[0].shape[0] if lora else 0
    if "latents" in p:
        _, tokens, dim = p["latents"].shape
        cross = p["proj_out.weight"].shape[0]
        kwargs = {"dim": dim, "depth": _count_layers(p), "dim_head": 64,
                  "heads": p["layers.0.0.to_q.weight"].shape[0] // 64, "ff_mult": 4}
        return AdapterSpec(name, _base_of(cross), "resampler", ("patch",), "clip-vit-h-14", tokens,
                           p["proj_in.weight"].shape[1], cross, kwargs, lora_rank=rank)
    if "perceiver_resampler.proj_in.weight" in p:
        cross = p["norm.weight"].shape[0]
        id_dim = p["proj.0.weight"].shape[1]
        kwargs = {"mult": p["proj.0.weight"].shape[0] // id_dim,
                  "depth": _count_layers(p, "perceiver_resampler.layers."), "dim_head": 64,
                  "heads": p["perceiver_resampler.layers.0.0.to_q.weight"].shape[0] // 64, "ff_mult": 4,
                  "clip_dim": p["perceiver_resampler.proj_in.weight"].shape[1]}
        return AdapterSpec(name, _base_of(cross), "faceid_plus", ("face_id", "patch"),
                           "insightface-buffalo_l+clip-vit-h-14", p["proj.2.weight"].shape[0] // cross, id_dim,
                           cross, kwargs, lora_rank=rank)
    if "proj.3.weight" in p:
        cross = p["proj.3.weight"].shape[0]
        return AdapterSpec(name, _base_of(cross), "mlp", ("patch",), "clip-vit-h-14", 257,
                           p["proj.0.weight"].shape[1], cross, {}, lora_rank=rank)
    if "proj.0.weight" in p and "norm.weight" in p:
        cross = p["norm.weight"].shape[0]
        id_dim = p["proj.0.weight"].shape[1]
        return AdapterSpec(name, _base_of(cross), "faceid", ("face_id",), "insightface-buffalo_l",
                           p["proj.2.weight"].shape[0] // cross, id_dim, cross,
                           {"mult": p["proj.0.weight"].shape[0] // id_dim}, lora_rank=rank)
    if "proj.weight" in p and "norm.weight" in p:
        cross = p["norm.weight"].shape[0]
        embed = p["proj.weight"].shape[1]
        encoder = "clip-vit-bigg-14" if embed == 1280 else "clip-vit-h-14"
        return AdapterSpec(name, _base_of(cross), "linear", ("pooled",), encoder,
                           p["proj.weight"].shape[0] // cross, embed, cross, {}, lora_rank=rank)
    raise LookalikeError(f"cannot tell which adapter variant checkpoint {name!r} is from its keys "
                         f"({', '.join(sorted(p)[:4])}...); pass the variant name explicitly")


def _same_architecture(a: AdapterSpec, b: AdapterSpec) -> bool:
    keys = ("projector", "features", "num_tokens", "embed_dim", "cross_attention_dim")
    if any(getattr(a, k) != getattr(b, k) for k in keys) or bool(a.lora_rank) != bool(b.lora_rank):
        return False
    shared = set(a.projector_kwargs) & set(b.projector_kwargs)
    return all(a.projector_kwargs[k] == b.projector_kwargs[k] for k in shared)


def detect_spec(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                filename: str | None = None) -> AdapterSpec:
    """The spec of a checkpoint: from its metadata, else its shapes matched to the registry.

    A registry entry whose file name matches wins among entries of the same shapes (``plus`` and
    ``plus-face`` share shapes); otherwise the first registry match, else a custom spec named after the file.
    """
    if metadata and SPEC_KEY in metadata:
        return AdapterSpec.from_json(metadata[SPEC_KEY])
    if dit_base_of(sd):  # FLUX / SD3.5 layouts: their own shape rules
        return detect_dit_spec(sd, metadata, dit_base_of(sd))  # type: ignore[return-value]
    stem = Path(filename).name.split(".")[0] if filename else "custom"
    shaped = spec_from_shapes(sd, stem)
    matches = [s for s in REGISTRY.values() if _same_architecture(s, shaped)]
    for s in matches:
        if s.filename and s.filename.split(".")[0] == stem:
            return s
    if matches:
        return matches[0].with_(name=stem if filename else matches[0].name, lora_rank=shaped.lora_rank)
    return shaped


def check_fits(spec: AdapterSpec, sd: Mapping[str, torch.Tensor], adapter: IPAdapter) -> None:
    """Compare a checkpoint with the adapter built for a UNet; raise one sentence on the first mismatch."""
    expected = adapter.state_dict()
    for key, tensor in sd.items():
        if key not in expected:
            if key.startswith("ip_adapter.") and key.split(".")[1] not in adapter.ip_adapter:
                raise CheckpointMismatchError(
                    f"{spec.name} has weights for attention layer {key.split('.')[1]} but this UNet has "
                    f"{len(adapter.ip_adapter)} adapter layers; it was made for another base model")
            raise CheckpointMismatchError(f"{spec.name} has an unexpected weight {key!r}; it does not match the "
                                          f"{spec.projector} projector of this variant")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointMismatchError(
                f"{spec.name}: weight {key} has shape {tuple(tensor.shape)} but this model needs "
                f"{tuple(expected[key].shape)}; the checkpoint was made for another base model or encoder")
    missing = [k for k in expected if k not in sd]
    if missing:
        raise CheckpointMismatchError(f"{spec.name} lacks {len(missing)} weights (first: {missing[0]!r}); "
                                      f"the file is incomplete or for another model")


def check_encoder(spec: AdapterSpec, dims: Mapping[str, int], encoder_name: str = "the encoder") -> None:
    """Fail with a sentence when the image encoder's feature widths do not fit the adapter."""
    widths = {"face_id": spec.embed_dim, "pooled": spec.embed_dim,
              "patch": spec.projector_kwargs.get("clip_dim", spec.embed_dim)}
    for feature in spec.features:
        given = dims.get(feature)
        if given is not None and given != widths[feature]:
            kind = {"patch": "encoder tokens", "pooled": "pooled embeddings", "face_id": "face embeddings"}
            raise CheckpointMismatchError(
                f"{spec.name} expects {widths[feature]}-d {kind[feature]}; {encoder_name} gives {given}-d; "
                f"use the image encoder the adapter was trained with ({spec.encoder})")


def adapter_from_state_dict(sd: Mapping[str, torch.Tensor], unet: torch.nn.Module, spec: AdapterSpec, *,
                            device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> IPAdapter:
    """Build an adapter for ``unet``, check the checkpoint fits, then load it (strict)."""
    has_lora = any("_lora." in k for k in sd)
    adapter = IPAdapter(spec, attention_layers(unet), lora=has_lora)
    check_fits(spec, sd, adapter)
    adapter.load_state_dict(dict(sd), strict=True)
    return adapter.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_adapter(path: str | os.PathLike, unet: torch.nn.Module, *, spec: AdapterSpec | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> IPAdapter:
    """Read a checkpoint file and return an :class:`IPAdapter` for ``unet``."""
    sd, metadata = read_checkpoint(path)
    spec = spec or detect_spec(sd, metadata, str(path))
    return adapter_from_state_dict(sd, unet, spec, device=device, dtype=dtype)


def official_state_dict(adapter: IPAdapter) -> dict[str, StateDict]:
    """The nested official dict ``{"image_proj": {...}, "ip_adapter": {...}}`` (what ``.bin`` files hold)."""
    sd = adapter.state_dict()
    return {name: section(sd, name) for name in SECTIONS}


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                      metadata: Mapping[str, str]) -> Path:
    """Write safetensors atomically (temporary file, then rename)."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return write_atomic(path, lambda tmp: save_file(cpu, tmp, metadata=dict(metadata)))


def save_adapter(adapter: IPAdapter, path: str | os.PathLike, extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Write flat official-layout safetensors with the spec in the metadata, atomically."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise LookalikeError(f"adapters are written as .safetensors; rename {path.name} to end in .safetensors")
    metadata = {SPEC_KEY: adapter.spec.to_json(), "format": "pt", **(extra_metadata or {})}
    return write_safetensors(adapter.state_dict(), path, metadata)

"""Read and write adapter checkpoints in the official IP-Adapter layout.

Read: ``.bin``/``.pt`` (``torch.load(weights_only=True)`` only) and ``.safetensors``, nested
(``{"image_proj": {...}, "ip_adapter": {...}}``) or flat (``image_proj.*`` / ``ip_adapter.*``) keys.
Write: flat safetensors with the spec as JSON in the metadata, which diffusers' ``load_ip_adapter`` reads.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..adapters.module import IPAdapter, attention_layers
from ..adapters.spec import REGISTRY, AdapterSpec, Base
from ..errors import CheckpointMismatchError, LookalikeError, UnsafeCheckpointError
from ..fileio import write_atomic
from .dit_formats import detect_dit_spec, dit_base_of, published_to_flat
from .header import SPEC_KEY, GiB, read_header

SECTIONS = ("image_proj", "ip_adapter")
StateDict = dict[str, torch.Tensor]


def _flatten(nested: Mapping, path: Path) -> StateDict:
    """Nested or flat official dict -> flat ``section.key`` tensors (published DiT layouts renamed)."""
    nested = published_to_flat(nested)
    flat: StateDict = {}
    for section, value in nested.items():
        if isinstance(value, Mapping):
            flat.update({f"{section}.{k}" if isinstance(k, str) else k: v for k, v in value.items()})
        else:
            flat[section] = value
    bad = [k for k, v in flat.items() if not torch.is_tensor(v) or not isinstance(k, str)]
    if bad:
        raise LookalikeError(f"{path} holds non-tensor entries ({bad[0]!r}); it is not an adapter checkpoint")
    if not any(k.split(".", 1)[0] in SECTIONS for k in flat):
        raise LookalikeError(f"{path} has no 'image_proj' or 'ip_adapter' weights; it is not an IP-Adapter "
                             f"checkpoint (found keys like {next(iter(flat), 'none')!r})")
    return flat


def check_finite(tensors: Mapping[str, torch.Tensor], what: str, floating: bool = False) -> None:
    """Refuse NaN or Inf in floating tensors, naming the first such tensor (they become black images);
    with ``floating``, refuse tensors of other dtypes too (adapter weights are floats)."""
    for key, t in tensors.items():
        if floating and not t.is_floating_point():
            raise LookalikeError(f"{what}: tensor {key!r} is {str(t.dtype).removeprefix('torch.')}, but adapter "
                                 f"weights are floating-point numbers; the file is not an adapter checkpoint")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            kind = "NaN" if bool(torch.isnan(t).any()) else "infinite"
            raise LookalikeError(f"{what}: tensor {key!r} holds {kind} values, which would give black images; "
                                 f"the file is damaged (or was saved after training diverged): re-create or "
                                 f"re-download it")


def read_safetensors(path: Path, what: str = "", max_bytes: int = 8 * GiB) -> tuple[StateDict, dict[str, str]]:
    """All tensors (on the CPU) and the metadata of a safetensors file; a damaged file is one sentence.

    The header is checked against the file (:func:`~lookalike.weights.header.read_header`) before any
    tensor is read, and every floating tensor must be finite.
    """
    header = read_header(path, what, max_bytes)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in header.tensors}
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise LookalikeError(f"cannot read {what}{path}: not a valid safetensors file ({exc}); "
                             f"re-create or re-download it") from exc
    check_finite(tensors, f"{what}{path}")
    return tensors, header.metadata


def _check_torch_zip(path: Path) -> None:
    """Before torch reads it: a zip-format torch file (not a raw pickle or torch's legacy format, whose
    storages are allocated at sizes the pickle claims) with uncompressed members that fit in the file."""
    why = None
    if not zipfile.is_zipfile(path):
        why = "it is not a zip-format torch checkpoint (a raw pickle or torch's pre-1.6 legacy format)"
    else:
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise LookalikeError(f"cannot read {path}: the file is damaged or not a torch checkpoint ({exc}); "
                                 f"re-download it") from exc
        size = path.stat().st_size
        if len(infos) > 100_000 or sum(i.file_size for i in infos) > size:
            why = "its zip members claim more bytes than the file holds"
        elif any(i.compress_type != zipfile.ZIP_STORED for i in infos):
            why = "it holds compressed members, which torch never writes"
        elif not any(i.filename.endswith("data.pkl") for i in infos):
            why = "it has no data.pkl, so it is not a torch checkpoint"
    if why:
        raise UnsafeCheckpointError(f"refused to load {path}: it is not a plain tensor checkpoint ({why}); "
                                    f"re-download it from its official source or convert it to .safetensors with "
                                    f"a trusted tool")


def read_checkpoint(path: str | os.PathLike, max_bytes: int = 8 * GiB) -> tuple[StateDict, dict[str, str]]:
    """A checkpoint file -> (flat state dict on the CPU, metadata). Pickled code is refused, never run.

    ``.safetensors`` headers are checked against the file before reading; ``.bin``/``.pt`` files must be
    zip-format torch files and are read with ``torch.load(weights_only=True)``. Tensors must be finite.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise LookalikeError(f"no such checkpoint file: {path}")
    if path.suffix == ".safetensors":
        tensors, metadata = read_safetensors(path, max_bytes=max_bytes)
        check_finite(tensors, str(path), floating=True)
        return _flatten(tensors, path), metadata
    if path.stat().st_size > max_bytes:
        raise LookalikeError(f"refused to load {path}: it is {path.stat().st_size:,} bytes, above the limit of "
                             f"{max_bytes:,} bytes for an adapter checkpoint")
    _check_torch_zip(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"refused to load {path}: it is not a plain tensor checkpoint (it is damaged, or holds pickled objects "
            f"that could run code); re-download it from its official source or convert it to .safetensors "
            f"with a trusted tool") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, UnicodeDecodeError, MemoryError, struct.error) as exc:
        raise LookalikeError(f"cannot read {path}: the file is damaged or not a torch checkpoint; "
                             f"re-download it") from exc
    if not isinstance(loaded, Mapping):
        raise LookalikeError(f"{path} does not hold a dict of tensors; it is not an adapter checkpoint")
    flat = _flatten(loaded, path)
    check_finite(flat, str(path), floating=True)
    return flat, {}


def section(sd: Mapping[str, torch.Tensor], name: str) -> StateDict:
    """The keys of one section (``image_proj`` or ``ip_adapter``) without their prefix."""
    prefix = name + "."
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _count_layers(proj: StateDict, prefix: str = "layers.") -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in proj if k.startswith(prefix)})


def _base_of(cross: int) -> Base:
    return {768: "sd15", 2048: "sdxl"}.get(cross, "sd15" if cross < 2048 else "sdxl")  # type: ignore[return-value]


class _Shapes:
    """Read dimensions of named tensors; a missing tensor or a wrong rank is a sentence naming it."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str) -> None:
        self.tensors, self.name = tensors, name

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def dim(self, key: str, ndim: int, axis: int) -> int:
        t = self.tensors.get(key)
        if t is None or t.ndim != ndim or t.shape[axis] == 0:
            found = "missing" if t is None else f"of shape {tuple(t.shape)}"
            raise LookalikeError(f"cannot tell which adapter variant checkpoint {self.name!r} is: image_proj.{key} "
                                 f"is {found}, expected a {ndim}-d tensor; the file is damaged or not an IP-Adapter")
        return int(t.shape[axis])


def spec_from_shapes(sd: Mapping[str, torch.Tensor], name: str = "custom") -> AdapterSpec:
    """Infer the architecture of a checkpoint from its keys and shapes."""
    p = _Shapes(section(sd, "image_proj"), name)
    ip = section(sd, "ip_adapter")
    lora = [v for k, v in ip.items() if k.endswith("to_q_lora.down.weight") and v.ndim == 2]
    rank = int(lora[0].shape[0]) if lora else 0
    if "latents" in p:
        tokens, dim = p.dim("latents", 3, 1), p.dim("latents", 3, 2)
        cross = p.dim("proj_out.weight", 2, 0)
        kwargs = {"dim": dim, "depth": _count_layers(p.tensors), "dim_head": 64,
                  "heads": max(1, p.dim("layers.0.0.to_q.weight", 2, 0) // 64), "ff_mult": 4}
        embed = p.dim("proj_in.weight", 2, 1)
        if embed == 512:  # a Resampler over the ArcFace embedding (InstantID), not over CLIP patch tokens
            return AdapterSpec(name, _base_of(cross), "id_resampler", ("face_id",), "insightface-antelopev2",
                               tokens, embed, cross, kwargs, lora_rank=rank, face_normed=False)
        return AdapterSpec(name, _base_of(cross), "resampler", ("patch",), "clip-vit-h-14", tokens,
                           embed, cross, kwargs, lora_rank=rank)
    if "perceiver_resampler.proj_in.weight" in p:
        cross = p.dim("norm.weight", 1, 0)
        id_dim = p.dim("proj.0.weight", 2, 1)
        kwargs = {"mult": max(1, p.dim("proj.0.weight", 2, 0) // id_dim),
                  "depth": _count_layers(p.tensors, "perceiver_resampler.layers."), "dim_head": 64,
                  "heads": max(1, p.dim("perceiver_resampler.layers.0.0.to_q.weight", 2, 0) // 64), "ff_mult": 4,
                  "clip_dim": p.dim("perceiver_resampler.proj_in.weight", 2, 1)}
        return AdapterSpec(name, _base_of(cross), "faceid_plus", ("face_id", "patch"),
                           "insightface-buffalo_l+clip-vit-h-14", max(1, p.dim("proj.2.weight", 2, 0) // cross),
                           id_dim, cross, kwargs, lora_rank=rank)
    if "proj.3.weight" in p:
        cross = p.dim("proj.3.weight", 1, 0)
        return AdapterSpec(name, _base_of(cross), "mlp", ("patch",), "clip-vit-h-14", 257,
                           p.dim("proj.0.weight", 2, 1), cross, {}, lora_rank=rank)
    if "proj.0.weight" in p and "norm.weight" in p:
        cross = p.dim("norm.weight", 1, 0)
        id_dim = p.dim("proj.0.weight", 2, 1)
        return AdapterSpec(name, _base_of(cross), "faceid", ("face_id",), "insightface-buffalo_l",
                           max(1, p.dim("proj.2.weight", 2, 0) // cross), id_dim, cross,
                           {"mult": max(1, p.dim("proj.0.weight", 2, 0) // id_dim)}, lora_rank=rank)
    if "proj.weight" in p and "norm.weight" in p:
        cross = p.dim("norm.weight", 1, 0)
        embed = p.dim("proj.weight", 2, 1)
        encoder = "clip-vit-bigg-14" if embed == 1280 else "clip-vit-h-14"
        return AdapterSpec(name, _base_of(cross), "linear", ("pooled",), encoder,
                           max(1, p.dim("proj.weight", 2, 0) // cross), embed, cross, {}, lora_rank=rank)
    raise LookalikeError(f"cannot tell which adapter variant checkpoint {name!r} is from its keys "
                         f"({', '.join(sorted(p.tensors)[:4])}...); pass the variant name explicitly")


def _same_architecture(a: AdapterSpec, b: AdapterSpec) -> bool:
    keys = ("projector", "features", "num_tokens", "embed_dim", "cross_attention_dim")
    if any(getattr(a, k) != getattr(b, k) for k in keys) or bool(a.lora_rank) != bool(b.lora_rank):
        return False
    shared = set(a.projector_kwargs) & set(b.projector_kwargs)
    return all(a.projector_kwargs[k] == b.projector_kwargs[k] for k in shared)


#: Spec fields that only label a variant; specs equal in every other field behave the same.
_LABELS = ("name", "filename", "short_name", "description", "repo_id", "subfolder", "lora_rank")


def _differences(specs: list[AdapterSpec]) -> list[str]:
    """The behaviour fields in which registry specs differ (empty: any of them runs the same)."""
    rows = [asdict(s) for s in specs]
    return sorted(k for k in rows[0] if k not in _LABELS and any(r[k] != rows[0][k] for r in rows))


def detect_spec(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                filename: str | None = None) -> AdapterSpec:
    """The spec of a checkpoint: from its metadata (checked against the spec schema), else its shapes
    matched to the registry.

    A registry entry whose file name matches wins among entries of the same shapes. Where the shapes fit
    several entries that behave differently (FaceID-Plus v1 and v2 differ only in the shortcut) and the
    file name settles nothing, this refuses to guess: pass ``spec=`` (CLI: ``--adapter NAME=FILE``).
    Entries that only differ in name (``plus`` and ``plus-face``) give a spec named after the file.
    """
    where = Path(filename).name if filename else "the checkpoint"
    if metadata and SPEC_KEY in metadata:
        return AdapterSpec.from_json(metadata[SPEC_KEY], f"{where}'s {SPEC_KEY} metadata")
    if dit_base_of(sd):  # FLUX / SD3.5 layouts: their own shape rules
        return detect_dit_spec(sd, metadata, dit_base_of(sd))  # type: ignore[return-value]
    stem = Path(filename).name.split(".")[0] if filename else "custom"
    shaped = spec_from_shapes(sd, stem)
    matches = [s for s in REGISTRY.values() if _same_architecture(s, shaped)]
    for s in matches:
        if s.filename and s.filename.split(".")[0] == stem:
            return s
    if not matches:
        return shaped
    differ = _differences(matches)
    if differ:
        names = ", ".join(s.name for s in matches)
        raise LookalikeError(
            f"{where} fits several adapter variants that behave differently ({names}: they differ in "
            f"{', '.join(differ)}), and neither its metadata nor its file name says which; name the variant: "
            f"--adapter NAME=FILE on the command line, spec='NAME' from Python, or keep the official file name")
    return matches[0].with_(name=stem if filename else matches[0].name, lora_rank=shaped.lora_rank)


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


def first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def adapter_from_state_dict(sd: Mapping[str, torch.Tensor], unet: torch.nn.Module, spec: AdapterSpec, *,
                            device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> IPAdapter:
    """Build an adapter for ``unet``, check the checkpoint fits, then load it (strict).

    The adapter is built on the meta device and compared with the checkpoint first, so memory is
    allocated only for weights the file holds (a spec claiming absurd sizes costs nothing).
    """
    has_lora = any("_lora." in k for k in sd)
    try:
        with torch.device("meta"):
            adapter = IPAdapter(spec, attention_layers(unet), lora=has_lora)
    except (TypeError, ValueError, RuntimeError) as exc:
        if isinstance(exc, LookalikeError):
            raise
        raise CheckpointMismatchError(f"{spec.name}: its spec does not build a {spec.projector} projector "
                                      f"({first_line(exc)}); the file's spec is damaged") from exc
    check_fits(spec, sd, adapter)
    adapter = adapter.to_empty(device="cpu")
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

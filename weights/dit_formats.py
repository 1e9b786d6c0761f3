"""FLUX.1 and SD3.5 adapter files in their published layouts, read as diffusers' loaders read them.

* XLabs FLUX (``ip_adapter.safetensors``): ``ip_adapter_proj_model.*`` (or ``image_proj.*``) and
  ``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.*`` (or ``ip_adapter.{i}.to_{k,v}_ip.*``),
  as ``FluxIPAdapterMixin.load_ip_adapter`` accepts both;
* InstantX FLUX (``ip-adapter.bin``): ``{"image_proj": MLP, "ip_adapter": 57 blocks}``, lookalike's own layout;
* InstantX SD3.5: the original resampler names (``layers.{i}.0.norm1`` ...) or diffusers' converted ones
  (``layers.{i}.ln0`` ...), as ``SD3Transformer2DLoadersMixin`` maps them.

Every layout becomes lookalike's flat ``image_proj.*`` / ``ip_adapter.{i}.*`` keys; :func:`detect_dit_spec`
reads the variant and its sizes from the shapes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..adapters.spec import DIT_BASES, REGISTRY, AdapterSpec
from ..errors import LookalikeError

SPEC_KEY = "lookalike.spec"

_XLABS_PROJ = "ip_adapter_proj_model."
_XLABS_BLOCK = re.compile(r"^double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_([kv])_proj\.(weight|bias)$")
#: InstantX SD3.5 resampler block names -> diffusers' (``SD3Transformer2DLoadersMixin``), in order.
_SD3_NAMES = (("0.norm1", "ln0"), ("0.norm2", "ln1"), ("0.to_q", "attn.to_q"), ("0.to_kv", "attn.to_kv"),
              ("0.to_out", "attn.to_out.0"), ("1.0", "adaln_norm"), ("1.1", "ff.net.0.proj"), ("1.3", "ff.net.2"),
              ("2.1", "adaln_proj"))
_SD3_BLOCK = re.compile(r"^image_proj\.layers\.(\d+)\.(.+)$")


def published_to_flat(loaded: Mapping) -> dict:
    """A loaded file (flat or nested ``{section: {...}}``) -> lookalike's flat keys, DiT layouts renamed."""
    flat: dict = {}
    for key, value in loaded.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    out: dict = {}
    for key, value in flat.items():
        match = _XLABS_BLOCK.match(key)
        if match:
            key = f"ip_adapter.{match[1]}.to_{match[2]}_ip.{match[3]}"
        elif key.startswith(_XLABS_PROJ):
            key = "image_proj." + key[len(_XLABS_PROJ):]
        out[key] = value
    if "image_proj.time_embedding.linear_1.weight" in out:  # SD3.5: original resampler names -> diffusers'
        out = {_sd3_name(k): v for k, v in out.items()}
    return out


def _sd3_name(key: str) -> str:
    match = _SD3_BLOCK.match(key)
    if not match:
        return key
    rest = match[2]
    for old, new in _SD3_NAMES:
        if rest.startswith(old + "."):
            rest = new + rest[len(old):]
            break
    return f"image_proj.layers.{match[1]}.{rest}"


def sd3_original_names(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' SD3.5 resampler names -> InstantX's original ones (the inverse of the reading map)."""
    out = {}
    for key, value in sd.items():
        match = _SD3_BLOCK.match(key)
        if match:
            rest = match[2]
            for old, new in _SD3_NAMES:
                if rest.startswith(new + "."):
                    rest = old + rest[len(new):]
                    break
            key = f"image_proj.layers.{match[1]}.{rest}"
        out[key] = value
    return out


def xlabs_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lookalike's flat keys of an XLabs FLUX adapter -> XLabs' published names."""
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if key.startswith("image_proj."):
            out[_XLABS_PROJ + key[len("image_proj."):]] = value
        elif parts[0] == "ip_adapter" and parts[2] in ("to_k_ip", "to_v_ip"):
            kv = parts[2][3]
            out[f"double_blocks.{parts[1]}.processor.ip_adapter_double_stream_{kv}_proj.{parts[3]}"] = value
        else:
            raise LookalikeError(f"{key!r} has no place in an XLabs FLUX adapter file")
    return out


def save_published(adapter: torch.nn.Module, path: str | os.PathLike, layout: str) -> Path:
    """Write an adapter in a published DiT layout: ``"xlabs"`` (safetensors), ``"instantx"`` (nested
    ``.bin``) or ``"sd3-original"`` (nested ``.bin``, InstantX's resampler names)."""
    from ..fileio import write_atomic
    from .io import SECTIONS, section, write_safetensors

    sd = {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
    if layout == "xlabs":
        return write_safetensors(xlabs_state_dict(sd), path, {"format": "pt"})
    if layout == "sd3-original":
        sd = sd3_original_names(sd)
    elif layout != "instantx":
        raise LookalikeError(f"unknown DiT adapter layout {layout!r}; use xlabs, instantx or sd3-original")
    nested = {name: section(sd, name) for name in SECTIONS}
    return write_atomic(path, lambda tmp: torch.save(nested, tmp))


def dit_base_of(sd: Mapping[str, torch.Tensor]) -> str | None:
    """``"flux"`` or ``"sd3"`` for a DiT adapter's flat keys, else None.

    A UNet's attention layer 0 is self-attention and never has image keys; DiT adapters start at block 0.
    """
    if "image_proj.time_embedding.linear_1.weight" in sd:
        return "sd3"
    if "ip_adapter.0.to_k_ip.weight" in sd:
        return "flux"
    return None


def detect_dit_spec(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None, base: str,
                    registry_spec: AdapterSpec | None = None) -> AdapterSpec | None:
    """The variant of a FLUX/SD3 adapter file and its sizes, read from its shapes; None for UNet bases."""
    if base not in DIT_BASES:
        return None
    if metadata and SPEC_KEY in metadata:
        return AdapterSpec.from_json(metadata[SPEC_KEY])
    p = {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")}
    bias = any(k.endswith("to_k_ip.bias") for k in sd)
    if base == "flux" and "proj.weight" in p and "norm.weight" in p:
        cross = p["norm.weight"].shape[0]
        tokens = p["proj.weight"].shape[0] // cross
        name = "flux-ip" if tokens == 4 else "flux-ip-v2"
        return REGISTRY[name].with_(num_tokens=tokens, embed_dim=p["proj.weight"].shape[1],
                                    cross_attention_dim=cross, ip_bias=bias)
    if base == "flux" and "proj.0.weight" in p and "norm.weight" in p:
        cross = p["norm.weight"].shape[0]
        embed = p["proj.0.weight"].shape[1]
        return REGISTRY["flux-ip-instantx"].with_(
            num_tokens=p["proj.2.weight"].shape[0] // cross, embed_dim=embed, cross_attention_dim=cross,
            projector_kwargs={"mult": p["proj.0.weight"].shape[0] // embed}, ip_bias=bias)
    if base == "sd3" and "latents" in p and "time_embedding.linear_1.weight" in p:
        depth = len({k.split(".")[1] for k in p if k.startswith("layers.")})
        base_kw = REGISTRY["sd35-ip"].projector_kwargs
        kwargs = {**base_kw, "dim": p["proj_in.weight"].shape[0], "depth": depth,
                  "heads": p["layers.0.attn.to_q.weight"].shape[0] // 64,
                  "timestep_in_dim": p["time_embedding.linear_1.weight"].shape[1]}
        return REGISTRY["sd35-ip"].with_(num_tokens=p["latents"].shape[1], embed_dim=p["proj_in.weight"].shape[1],
                                         cross_attention_dim=p["proj_out.weight"].shape[0], projector_kwargs=kwargs)
    if registry_spec is not None:
        return registry_spec
    raise LookalikeError(f"this file is not a {base.upper()} image adapter lookalike knows (XLabs or InstantX); "
                         f"pass the variant name explicitly")

"""One generation's conditioning: each adapter's tokens, scales, window and masks, and what they make per layer.

A :class:`Term` holds one adapter's :class:`AdapterInput` and the image keys and values it adds at each layer,
computed once per generation (with the scale folded into the values: ``scale * Attn(Q, K, V) = Attn(Q, K,
scale * V)``, so a step adds one attention and one add per layer). :mod:`.attach` owns the terms of the
running generation; the processors read them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LookalikeError
from .attention import ip_kv
from .dit_attention import dit_block_scales
from .module import AttnLayer, IPAdapter

#: One adapter's scale: a float, a float per masked image, or diffusers' per-block dict.
Scale = Union[float, Sequence[float], dict]


def expand_block_scale(unet: nn.Module, scale: dict, default: float = 0.0) -> dict[str, Any]:
    """Diffusers' ``set_ip_adapter_scale`` dict -> ``{transformer prefix: value}``; unnamed blocks get 0.

    ``{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}`` names transformer models
    ``down_blocks.2.attentions.{0,1}`` and ``up_blocks.0.attentions.{0,1,2}``; ``"mid"`` is the middle one.
    """
    unknown = set(scale) - {"down", "mid", "up"}
    if unknown:
        raise LookalikeError(f"per-block scale keys must be 'down', 'mid' or 'up', not {sorted(unknown)}")
    out: dict[str, Any] = {}
    mid = scale.get("mid", default)
    if isinstance(mid, (list, tuple)):
        if len(mid) != 1:
            raise LookalikeError(f"the 'mid' scale takes one value, got {len(mid)}")
        mid = mid[0]
    if getattr(unet, "mid_block", None) is not None and hasattr(unet.mid_block, "attentions"):
        out["mid_block.attentions.0"] = mid
    for side, blocks in (("down", unet.down_blocks), ("up", unet.up_blocks)):
        with_attn = {i: len(b.attentions) for i, b in enumerate(blocks) if hasattr(b, "attentions")}
        value = scale.get(side, default)
        per_block = value if isinstance(value, dict) else {f"block_{i}": value for i in with_attn}
        for key in per_block:
            if key.removeprefix("block_") not in {str(i) for i in with_attn}:
                raise LookalikeError(f"per-block scale names {side}.{key}, but that block has no attention; "
                                     f"blocks with attention: {sorted(with_attn)}")
        for i, count in with_attn.items():
            v = per_block.get(f"block_{i}", default)
            values = list(v) if isinstance(v, (list, tuple)) else [v] * count
            if len(values) == 1:
                values = values * count
            if len(values) != count:
                raise LookalikeError(f"{side}.block_{i} has {count} transformer models; give {count} scales")
            for j, val in enumerate(values):
                out[f"{side}_blocks.{i}.attentions.{j}"] = val
    return out


def layer_scales(unet: nn.Module, layers: Sequence[AttnLayer], scale: Scale) -> dict[int, Any]:
    """The scale each cross-attention layer uses: float, or list of floats (one per masked image)."""
    if isinstance(scale, dict) and layers and layers[0].family != "unet":
        return dit_block_scales(layers, scale)
    if isinstance(scale, dict):
        prefixes = expand_block_scale(unet, scale)
        result = {}
        for layer in layers:
            match = [v for p, v in prefixes.items() if layer.name.startswith(p + ".")]
            result[layer.index] = match[0] if match else 0.0
        return result
    value = [float(s) for s in scale] if isinstance(scale, (list, tuple)) else float(scale)
    return {layer.index: value for layer in layers}


def downsample_mask(mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """A ``(1, H, W)`` mask -> ``(1, num_queries, 1)`` at the layer's resolution (diffusers' bicubic rule)."""
    ratio = mask.shape[2] / mask.shape[1]
    mask_h = int(math.sqrt(num_queries / ratio))
    mask_h = int(mask_h) + int((num_queries % int(mask_h)) != 0)
    mask_w = num_queries // mask_h
    small = F.interpolate(mask.unsqueeze(0), size=(mask_h, mask_w), mode="bicubic").squeeze(0)
    small = small.reshape(small.shape[0], -1)  # (1, h*w)
    if small.shape[1] != num_queries:
        warnings.warn("the mask's aspect ratio differs from the image's; pass masks of the output's shape",
                      UserWarning, stacklevel=3)
        small = F.pad(small, (0, max(0, num_queries - small.shape[1])))[:, :num_queries]
    return small.unsqueeze(-1)  # (1, Q, 1)


def in_window(span: tuple[float, float], window: tuple[float, float]) -> bool:
    """Whether a step covering ``span`` of the schedule acts in ``window``: diffusers' ``control_guidance_start/end``
    rule.

    Step ``i`` of ``n`` (span ``(i/n, (i+1)/n)``) is kept unless ``i/n < start`` or ``(i+1)/n > end`` (the ControlNet
    pipelines' ``controlnet_keep``): with 30 steps and ``end=0.75`` steps 0..21 act. A point span (no scheduler
    timesteps known) ``p`` is kept for ``start <= p < end``.
    """
    start, end = window
    lo, hi = span
    if lo == hi:
        return start <= lo < end
    return not (lo < start or hi > end)


@dataclass
class AdapterInput:
    """One adapter's conditioning for one generation.

    ``tokens``/``negative``: projected image tokens ``(B, I, T, C)`` for the conditional and unconditional
    halves. ``window``: the part of the schedule ``(start, end)`` where the adapter acts (diffusers'
    ``control_guidance_start/end`` rounding, :func:`in_window`).
    ``masks``: ``(1 or B, I, H, W)`` regions in [0, 1], one per image, as ``IPAdapterMaskProcessor`` gives.
    """

    tokens: torch.Tensor
    negative: torch.Tensor | None = None
    scale: Scale = 1.0
    window: tuple[float, float] = (0.0, 1.0)
    masks: torch.Tensor | None = None


@dataclass
class Term:
    """An adapter's conditioning for one generation, with its per-layer caches (keys/values, masks).

    ``index`` is its place among the generation's adapters (its gate under ``torch.compile``); ``live`` the
    layers where its scale is not 0 (the only ones it touches).
    """

    adapter: IPAdapter
    input: AdapterInput
    scales: dict[int, Any]
    cache: dict[tuple, Any] = field(default_factory=dict)
    handle: Any = None
    index: int = 0
    live: frozenset = field(init=False)

    def __post_init__(self) -> None:
        self.live = frozenset(i for i, s in self.scales.items()
                              if (any(v != 0 for v in s) if isinstance(s, list) else s != 0))

    def batch_tokens(self, batch: int, uncond: bool = False) -> torch.Tensor:
        """Tokens laid out as the model batch: ``[negative; positive]`` under guidance, else positive.

        Under FLUX's true CFG the two halves are separate calls; ``uncond`` says which one runs.
        """
        key = ("tokens", batch, uncond)
        if key in self.cache:
            return self.cache[key]
        pos, neg = self.input.tokens, self.input.negative
        if uncond and neg is not None:
            pos = neg
        if pos.shape[0] == batch:
            tokens = pos
        elif neg is not None and 2 * pos.shape[0] == batch:
            tokens = torch.cat([neg, pos])  # once per generation, not per layer
        else:
            raise LookalikeError(f"adapter {self.adapter.name!r} was given image features for {pos.shape[0]} "
                                 f"samples but the model runs a batch of {batch}; give one set of features per sample")
        if not torch.compiler.is_compiling():
            self.cache[key] = tokens
        return tokens

    def kv(self, layer: AttnLayer, batch: int, uncond: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This layer's image keys and scaled values ``(B, heads, T, d)``: one pair, or one per masked image."""
        ip_layer = self.adapter.layer(layer.index)
        heads = layer.heads
        head_dim = layer.hidden // heads
        tokens = self.batch_tokens(batch, uncond).to(ip_layer.to_k_ip.weight.device)  # (B, I, T, C)
        scale = self.scales[layer.index]
        if self.input.masks is None:
            k, v = ip_kv(ip_layer, tokens.flatten(1, 2), heads, head_dim)
            return [(k, _scaled(v, scale))]
        scales = scale if isinstance(scale, list) else [scale] * tokens.shape[1]
        pairs = [ip_kv(ip_layer, tokens[:, i], heads, head_dim) for i in range(tokens.shape[1])]
        return [(k, _scaled(v, s)) for (k, v), s in zip(pairs, scales)]

    def prefill(self, layers: Sequence[AttnLayer], batch: int, uncond: bool = False) -> None:
        """Compute every live layer's keys and values for ``batch`` now, before the first model call (so a
        compiled model finds them, and one captured graph serves every step)."""
        for layer in layers:
            if layer.index in self.live:
                self.cache[(layer.index, batch, uncond)] = self.kv(layer, batch, uncond)

    def pieces(self, layer: AttnLayer, batch: int, num_queries: int, dtype: torch.dtype,
               device: torch.device) -> Iterator[tuple]:
        """(k_ip, scale * v_ip, region or None) to add at this layer; keys/values cached per generation and
        moved once to the layer's device and dtype (an offloaded model's layer may move between calls)."""
        uncond = self.handle is not None and self.handle.uncond
        key = (layer.index, batch, uncond)
        kvs = self.cache.get(key)
        if kvs is None:
            kvs = self.kv(layer, batch, uncond)
        if any(k.device != device or k.dtype != dtype for k, _ in kvs):
            kvs = [(k.to(device, dtype), v.to(device, dtype)) for k, v in kvs]
        if not torch.compiler.is_compiling():
            self.cache[key] = kvs
        if self.input.masks is None:
            k, v = kvs[0]
            yield k, v, None
            return
        for i, (k, v) in enumerate(kvs):
            yield k, v, self.region(i, num_queries, batch, dtype, device)

    def step_pieces(self, layer: AttnLayer, heads: int, head_dim: int, batch: int, num_queries: int,
                    dtype: torch.dtype, device: torch.device) -> Iterator[tuple]:
        """(layer weights, k_ip, v_ip, scale, region or None) for tokens made from the timestep (SD3.5).

        ``input.tokens`` holds the features; the resampler runs once per denoising step for all layers
        and each layer's keys/values once per step (they depend on the timestep through ``norm_ip``).
        """
        half = self.handle.uncond
        step_key = ("step", self.handle.step, batch, half)
        if step_key not in self.cache:
            for key in [k for k in self.cache if k[0] in ("step", "kv")]:
                del self.cache[key]
            home = next(self.adapter.image_proj.parameters()).device  # the adapter's weights stay where they are
            feats = self.batch_tokens(batch, half).to(home)  # (B, I, T, H) features
            b, i = feats.shape[:2]
            t = torch.as_tensor(self.handle.timestep, device=home).reshape(-1)
            t = t.repeat_interleave(i) if t.numel() == b else t.reshape(-1)[:1].expand(b * i)
            tokens, temb = self.adapter.image_proj({"patch": feats.flatten(0, 1)}, t)
            self.cache[step_key] = (tokens.reshape((b, i) + tokens.shape[1:]), temb.reshape(b, i, -1))
        tokens, temb = self.cache[step_key]
        ip_layer = self.adapter.layer(layer.index)
        kv_key = ("kv", layer.index, self.handle.step, batch, half)
        if kv_key not in self.cache:
            if self.input.masks is None:
                flat = tokens.flatten(1, 2)  # every image's tokens (one timestep, so one embedding)
                kvs = [ip_layer.kv(flat, temb[:, 0], heads, head_dim)]
            else:
                kvs = [ip_layer.kv(tokens[:, j], temb[:, j], heads, head_dim) for j in range(tokens.shape[1])]
            self.cache[kv_key] = [(k.to(device), v.to(device)) for k, v in kvs]
        scale = self.scales[layer.index]
        kvs = self.cache[kv_key]
        if self.input.masks is None:
            yield ip_layer, kvs[0][0], kvs[0][1], scale, None
            return
        scales = scale if isinstance(scale, list) else [scale] * len(kvs)
        for j, (k, v) in enumerate(kvs):
            yield ip_layer, k, v, scales[j], self.region(j, num_queries, batch, dtype, device)

    def region(self, image: int, num_queries: int, batch: int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
        """Image ``image``'s mask at ``num_queries`` positions, ``(B, Q, 1)`` (cached per resolution)."""
        key = ("mask", image, num_queries, batch)
        if key in self.cache:
            return self.cache[key]
        masks = self.input.masks
        small = torch.cat([downsample_mask(m[image:image + 1], num_queries) for m in masks])  # (M, Q, 1)
        if small.shape[0] < batch:
            small = small.repeat(batch // small.shape[0], 1, 1)
        small = small.to(device=device, dtype=dtype)
        if not torch.compiler.is_compiling():  # compiled: recomputed in the graph (a cache would re-trace)
            self.cache[key] = small
        return small


def _scaled(v: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * v``, folded once per generation (1 leaves ``v`` itself)."""
    return v if scale == 1 else v * scale

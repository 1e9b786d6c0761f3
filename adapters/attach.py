"""Attach adapters to a diffusers UNet or FLUX/SD3 transformer, condition a generation, and detach exactly.

:func:`attach_adapters` swaps the attention processors and returns an :class:`AdapterHandle` that undoes it.
Per generation, :meth:`AdapterHandle.conditioned` holds each adapter's image tokens, scale, timestep window
and masks; image keys/values are computed once per layer and reused at every denoising step (SD3.5's
timestep-conditioned tokens: once per layer and step). One handle serves every model family; only the
processor differs per attention family (:data:`PROCESSORS`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LookalikeError
from .attention import BACKENDS, DecoupledAttnProcessor, ip_kv
from .dit_attention import FluxDoubleProcessor, FluxSingleProcessor, SD3JointProcessor, dit_block_scales
from .module import AttnLayer, IPAdapter, attention_layers, model_family, takes_image

#: The processor of each attention family (:attr:`AttnLayer.family`).
PROCESSORS = {"unet": DecoupledAttnProcessor, "flux_double": FluxDoubleProcessor,
              "flux_single": FluxSingleProcessor, "sd3_joint": SD3JointProcessor}

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
class _Term:
    """An adapter's active conditioning with its per-layer caches (keys/values, masks)."""

    adapter: IPAdapter
    input: AdapterInput
    scales: dict[int, Any]
    cache: dict[tuple, Any] = field(default_factory=dict)
    handle: Any = None

    def batch_tokens(self, batch: int) -> torch.Tensor:
        """Tokens laid out as the model batch: ``[negative; positive]`` under guidance, else positive.

        Under FLUX's true CFG the two halves are separate calls: the handle says which one runs.
        """
        pos, neg = self.input.tokens, self.input.negative
        if self.handle is not None and self.handle.uncond and neg is not None:
            pos = neg
        if pos.shape[0] == batch:
            return pos
        if neg is not None and 2 * pos.shape[0] == batch:
            return torch.cat([neg, pos])
        raise LookalikeError(f"adapter {self.adapter.name!r} was given image features for {pos.shape[0]} samples "
                             f"but the UNet runs a batch of {batch}; give one set of features per sample")

    def pieces(self, layer: AttnLayer, heads: int, head_dim: int, batch: int, num_queries: int,
               dtype: torch.dtype, device: torch.device) -> Iterator[tuple]:
        """(k_ip, v_ip, scale, region or None) to add at this layer; keys/values cached per generation."""
        key = (layer.index, batch, self.handle is not None and self.handle.uncond)
        if key not in self.cache:  # computed where the adapter's weights live, then moved to the layer's device
            ip_layer = self.adapter.layer(layer.index)
            tokens = self.batch_tokens(batch).to(ip_layer.to_k_ip.weight.device)  # (B, I, T, C)
            if self.input.masks is None:
                kvs = [ip_kv(ip_layer, tokens.flatten(1, 2), heads, head_dim)]
            else:
                kvs = [ip_kv(ip_layer, tokens[:, i], heads, head_dim) for i in range(tokens.shape[1])]
            self.cache[key] = [(k.to(device), v.to(device)) for k, v in kvs]
        kvs = self.cache[key]
        scale = self.scales[layer.index]
        if self.input.masks is None:
            k, v = kvs[0]
            yield k, v, scale, None
            return
        scales = scale if isinstance(scale, list) else [scale] * len(kvs)
        for i, (k, v) in enumerate(kvs):
            yield k, v, scales[i], self.region(i, num_queries, batch, dtype, device)

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
            feats = self.batch_tokens(batch).to(home)  # (B, I, T, H) features
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
        key = ("mask", image, num_queries, batch)
        if key not in self.cache:
            masks = self.input.masks
            small = torch.cat([downsample_mask(m[image:image + 1], num_queries) for m in masks])  # (M, Q, 1)
            if small.shape[0] < batch:
                small = small.repeat(batch // small.shape[0], 1, 1)
            self.cache[key] = small.to(device=device, dtype=dtype)
        return self.cache[key]

    def is_silent(self, index: int) -> bool:
        s = self.scales.get(index, 0.0)
        return all(v == 0 for v in s) if isinstance(s, list) else s == 0


class AdapterHandle:
    """Adapters attached to one UNet or FLUX/SD3 transformer. ``detach()`` restores the original processors.

    ``uncond`` is True while the unconditional call of FLUX's true CFG runs (``alternate``: the pipeline
    calls the model twice per step, conditional first); ``step`` counts model calls for per-step caches.
    """

    def __init__(self, unet: nn.Module, backend: str = "sdpa") -> None:
        if backend not in BACKENDS:
            raise LookalikeError(f"unknown attention backend {backend!r}; use one of {', '.join(BACKENDS)}")
        self.unet = self.model = unet
        self.family = model_family(unet)
        self.backend = backend
        self.adapters: list[IPAdapter] = []
        self.layers = attention_layers(unet)
        self.original = dict(unet.attn_processors)
        self.scheduler: Any = None
        self.alternate = False
        self.uncond = False
        self.step = 0
        self.timestep: Any = None
        self.text_len: int | None = None
        self._last_t: float | None = None
        self._terms: list[_Term | None] = []
        self._span: tuple[float, float] = (0.0, 0.0)  # the part of the schedule the current step covers
        self._needs_progress = False
        self._lora_cache: dict[int, list] | None = None
        self._text_kv: dict[int, tuple] | None = None  # per conditioned block: layer -> (context, version, k, v)
        self.recorder: Any = None  # records text attention at some layers (adapters/layout.py LayoutRecorder)
        procs = {x.name: PROCESSORS[x.family](self, x, self.original[x.name], backend) for x in self.layers}
        unet.set_attn_processor(procs)
        self._hook = unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True)
        self.attached = True

    # -- adapters ---------------------------------------------------------------------------------
    def add(self, adapter: IPAdapter) -> None:
        """Stack another adapter; its layers must match this model's."""
        wanted = {str(x.index) for x in self.layers if takes_image(adapter.spec, x)}
        have = {k for k, layer in adapter.ip_adapter.items() if layer.has_ip}
        if have != wanted or not wanted:
            raise LookalikeError(f"adapter {adapter.name!r} has image layers {len(have)} but this model has "
                                 f"{len(wanted)} layers it attaches to; it was built for another model")
        self.adapters.append(adapter)
        self._lora_cache = None

    def remove(self, name: str) -> None:
        self.adapters = [a for a in self.adapters if a.name != name]
        self._lora_cache = None

    def detach(self) -> None:
        """Put back the UNet's original processors and remove the timestep hook."""
        if self.attached:
            self.unet.set_attn_processor(dict(self.original))
            self._hook.remove()
            self.attached = False

    # -- per generation ---------------------------------------------------------------------------
    @contextmanager
    def conditioned(self, inputs: Sequence[AdapterInput | None]) -> Iterator[None]:
        """Condition every UNet call inside the block; ``inputs[i]`` goes to ``adapters[i]`` (None: off)."""
        if len(inputs) != len(self.adapters):
            raise LookalikeError(f"{len(self.adapters)} adapters are loaded but {len(inputs)} inputs were given; "
                                 f"give one entry per adapter (None to leave one out)")
        terms = [None if inp is None else
                 _Term(a, inp, layer_scales(self.unet, [x for x in self.layers if takes_image(a.spec, x)],
                                            inp.scale), handle=self)
                 for a, inp in zip(self.adapters, inputs)]
        for t in terms:
            if t is not None and not 0.0 <= t.input.window[0] <= t.input.window[1] <= 1.0:
                raise LookalikeError(f"timestep window {t.input.window} must satisfy 0 <= start <= end <= 1")
        previous, previous_kv = self._terms, self._text_kv
        self._terms, self._text_kv = terms, {}
        self._needs_progress = any(t is not None and tuple(t.input.window) != (0.0, 1.0) for t in terms)
        self._span = (0.0, 0.0)
        self.uncond, self.step, self._last_t = False, 0, None
        try:
            yield
        finally:
            self._terms, self._text_kv = previous, previous_kv
            self._needs_progress = False
            self.uncond = False

    def checkpoint_function(self) -> Callable[..., Any]:
        """A function for diffusers' ``enable_gradient_checkpointing``: a block recomputed in the backward pass
        (after :meth:`conditioned` has closed) sees the conditioning it saw in the forward pass, and each run of a
        block computes its image keys/values afresh, so the recomputation runs the operations of the forward."""
        from torch.utils.checkpoint import checkpoint

        def run(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            state = self._step_state()

            def call(*inner: Any, **inner_kw: Any) -> Any:
                saved = self._step_state()
                self._set_step_state(state)
                for term in self._terms or []:
                    if term is not None:
                        term.cache.clear()
                try:
                    return module(*inner, **inner_kw)
                finally:
                    self._set_step_state(saved)

            return checkpoint(call, *args, use_reentrant=False, **kwargs)

        return run

    def _step_state(self) -> tuple:
        """What a block reads from the handle at one model call: the terms, the step's span of the schedule,
        the call's timestep, step count and CFG half, and the text length (a recomputed block sees its own)."""
        return self._terms, self._span, self.uncond, self.step, self.timestep, self.text_len

    def _set_step_state(self, state: tuple) -> None:
        self._terms, self._span, self.uncond, self.step, self.timestep, self.text_len = state

    def text_kv(self, index: int, context: torch.Tensor,
                compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s keys and values of the prompt ``context``: computed once per conditioned block.

        Pipelines pass the same prompt tensor at every denoising step; the cache holds that tensor itself
        (so its identity cannot be reused by another) and its version counter (an in-place edit recomputes).
        Nothing is cached while gradients are recorded or under ``torch.compile`` (the graph owns that).
        """
        if self._text_kv is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return compute()
        version = -1 if context.is_inference() else context._version
        hit = self._text_kv.get(index)
        if hit is not None and hit[0] is context and hit[1] == version:
            return hit[2], hit[3]
        key, value = compute()
        self._text_kv[index] = (context, version, key, value)
        return key, value

    def active_at(self, layer: AttnLayer) -> list[_Term]:
        """The terms that add image attention at this layer and this step."""
        if not layer.is_cross or not self._terms:
            return []
        return [t for t in self._terms
                if t is not None and not t.is_silent(layer.index) and in_window(self._span, t.input.window)]

    def loras_at(self, index: int) -> list:
        """(scale, IPLayer) pairs of adapters whose LoRA acts on attention layer ``index``."""
        if self._lora_cache is None:
            self._lora_cache = {}
            for a in self.adapters:
                for key, layer in a.ip_adapter.items():
                    if layer.has_lora:
                        self._lora_cache.setdefault(int(key), []).append((a, layer))
        return [(a.lora_scale, layer) for a, layer in self._lora_cache.get(index, []) if a.lora_scale != 0]

    def _on_unet_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        context = kwargs.get("encoder_hidden_states", args[2 if self.family == "unet" else 1] if len(args) > 2 else None)
        self.text_len = context.shape[1] if torch.is_tensor(context) and context.ndim == 3 else None
        t = kwargs.get("timestep")
        position = 1 if self.family == "unet" else 3
        if t is None and len(args) > position:
            t = args[position]
        if t is None:
            return
        if self.family == "flux":  # FLUX pipelines pass t / 1000; the scheduler's timesteps are t
            t = t * 1000
        self.timestep = t
        if self.alternate or self._needs_progress:
            value = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
            self.uncond = self.alternate and value == self._last_t and not self.uncond
            self._last_t = value
        if self.family == "sd3":  # per-step caches (SD3.5's timestep-conditioned tokens); a counter that changes
            self.step += not self.uncond  # every call would make torch.compile specialise a UNet graph on it
        if self._needs_progress:
            self._span = self.span(t)

    def span(self, timestep: Any) -> tuple[float, float]:
        """The part of the schedule step ``timestep`` covers: ``(i/n, (i+1)/n)`` for step ``i`` of the scheduler's
        ``n`` timesteps; without them the point ``1 - t/T`` (both ends equal)."""
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        steps = getattr(self.scheduler, "timesteps", None)
        if steps is not None and len(steps) > 0:
            index = int(torch.argmin((steps.float().cpu() - t).abs()))
            return index / len(steps), (index + 1) / len(steps)
        total = getattr(getattr(self.scheduler, "config", None), "num_train_timesteps", 1000)
        point = min(max(1.0 - t / total, 0.0), 1.0)
        return point, point


def attach_adapters(unet: nn.Module, adapters: Sequence[IPAdapter] = (), backend: str = "sdpa") -> AdapterHandle:
    """Put the decoupled-attention processor on every attention layer of ``unet``; returns the undo handle."""
    handle = AdapterHandle(unet, backend)
    for adapter in adapters:
        handle.add(adapter)
    return handle

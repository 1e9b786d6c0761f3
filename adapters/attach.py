"""Attach adapters to a diffusers UNet or FLUX/SD3 transformer, condition a generation, and detach exactly.

:func:`attach_adapters` swaps the attention processors and returns an :class:`AdapterHandle` that undoes it.
Per generation, :meth:`AdapterHandle.conditioned` holds each adapter's image tokens, scale, timestep window
and masks; image keys/values are computed once per layer and reused at every denoising step (SD3.5's
timestep-conditioned tokens: once per layer and step). One handle serves every model family; only the
processor differs per attention family (:data:`PROCESSORS`).

Under ``torch.compile`` (``fullgraph=True``, ``mode="reduce-overhead"``) nothing a step reads is a Python value
that changes between steps or generations: keys and values are computed before the first model call, scales
are folded into them, and the timestep window is a gate tensor computed from the timestep in the graph
(:meth:`AdapterHandle.compiled_gates`), so one captured graph serves every step and the next generation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import LookalikeError
from .attention import BACKENDS, DecoupledAttnProcessor
from .dit_attention import FluxDoubleProcessor, FluxSingleProcessor, SD3JointProcessor
from .module import AttnLayer, IPAdapter, attention_layers, model_family, takes_image
from .terms import (  # noqa: F401 - re-exported: the conditioning's public names live here too
    AdapterInput,
    Scale,
    Term,
    downsample_mask,
    expand_block_scale,
    in_window,
    layer_scales,
)

#: The processor of each attention family (:attr:`AttnLayer.family`).
PROCESSORS = {"unet": DecoupledAttnProcessor, "flux_double": FluxDoubleProcessor,
              "flux_single": FluxSingleProcessor, "sd3_joint": SD3JointProcessor}


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
        self._next_uncond = False  # compiled true CFG: the half the next model call runs
        self._terms: list[Term | None] = []
        self._windows: torch.Tensor | None = None  # (adapters, 2) float64: each term's window, for the gates
        self._windows_key: tuple | None = None
        self._gates: torch.Tensor | None = None  # (adapters,) under torch.compile: this step's 0/1 per term
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
                 Term(a, inp, layer_scales(self.unet, [x for x in self.layers if takes_image(a.spec, x)],
                                           inp.scale), handle=self, index=i)
                 for i, (a, inp) in enumerate(zip(self.adapters, inputs))]
        for t in terms:
            if t is not None and not 0.0 <= t.input.window[0] <= t.input.window[1] <= 1.0:
                raise LookalikeError(f"timestep window {t.input.window} must satisfy 0 <= start <= end <= 1")
        previous, previous_kv = self._terms, self._text_kv
        self._terms, self._text_kv = terms, {}
        self._needs_progress = any(t is not None and tuple(t.input.window) != (0.0, 1.0) for t in terms)
        self._windows = self._windows_tensor([(0.0, 1.0) if t is None else tuple(t.input.window) for t in terms])
        self._span = (0.0, 0.0)
        self.uncond, self.step, self._last_t, self._next_uncond = False, 0, None, False
        for t in terms:  # every layer's keys/values now, not inside the first (perhaps compiled) model call;
            if t is not None and t.adapter.spec.projector != "time_resampler" and not _training(t.adapter):
                for batch, uncond in self._expected_batches(t):
                    t.prefill([x for x in self.layers if takes_image(t.adapter.spec, x)], batch, uncond)
        try:
            yield
        finally:
            self._terms, self._text_kv = previous, previous_kv
            self._needs_progress, self._gates = False, None
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

    def _windows_tensor(self, windows: list[tuple[float, float]]) -> torch.Tensor:
        """Each term's window as a ``(terms, 2)`` float64 tensor on the model's device, made again only when the
        windows change."""
        device = next(self.unet.parameters()).device
        if self._windows is None or self._windows_key != (windows, device):
            self._windows = torch.tensor(windows or [(0.0, 1.0)], dtype=torch.float64, device=device)
            self._windows_key = (windows, device)
        return self._windows

    def _expected_batches(self, term: Term) -> list[tuple[int, bool]]:
        """The (batch, unconditional half) the model will run ``term`` with: both halves in one batch under
        classifier-free guidance (UNets, SD3), one call each under FLUX's true CFG, else the positive alone."""
        b = term.input.tokens.shape[0]
        if term.input.negative is None:
            return [(b, False)]
        if self.family != "flux":
            return [(2 * b, False)]
        return [(b, False), (b, True)] if self.alternate else [(b, False)]

    def active_at(self, layer: AttnLayer) -> list[Term]:
        """The terms that add image attention at this layer and this step.

        Under ``torch.compile`` the window is not decided here but by :meth:`gate` (a tensor), so the graph
        does not depend on the step.
        """
        if not layer.is_cross or not self._terms:
            return []
        if torch.compiler.is_compiling():
            return [t for t in self._terms if t is not None and layer.index in t.live]
        return [t for t in self._terms if t is not None and layer.index in t.live
                and (tuple(t.input.window) == (0.0, 1.0) or in_window(self._span, t.input.window))]

    def gate(self, term: Term) -> torch.Tensor | None:
        """``term``'s 0/1 window gate for this step under ``torch.compile``; None in eager mode (decided there)."""
        if self._gates is None or not torch.compiler.is_compiling():
            return None
        return self._gates[term.index]

    def compiled_gates(self, timestep: Any) -> torch.Tensor:
        """Each term's window decision at ``timestep`` as tensor operations (:func:`in_window` on
        :meth:`span`, in float64 like Python's), so a compiled step has no Python branch on the step."""
        windows = self._windows
        t = torch.as_tensor(timestep, device=windows.device).reshape(-1)[:1].to(torch.float64)
        steps = getattr(self.scheduler, "timesteps", None)
        if steps is not None and len(steps) > 0:
            steps = steps.to(device=windows.device, dtype=torch.float64)
            index = (steps - t).abs().argmin().to(torch.float64)
            lo, hi = index / len(steps), (index + 1) / len(steps)
            gates = (lo >= windows[:, 0]) & (hi <= windows[:, 1])
        else:
            total = getattr(getattr(self.scheduler, "config", None), "num_train_timesteps", 1000)
            point = (1.0 - t / total).clamp(0.0, 1.0)
            gates = (windows[:, 0] <= point) & (point < windows[:, 1])
        whole = (windows[:, 0] == 0.0) & (windows[:, 1] == 1.0)  # the whole schedule: every step, as in eager
        return (gates | whole).to(torch.float32)

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
        self.timestep = t
        per = 1000.0 if self.family == "flux" else 1.0  # FLUX pipelines pass t / 1000; the scheduler's are t
        if torch.compiler.is_compiling():  # no Python value of the step: the windows become gate tensors
            self._gates = self.compiled_gates(t * per) if self._windows is not None else None
            if self.alternate:  # FLUX's true CFG calls the model conditional first, then unconditional, each
                self.uncond, self._next_uncond = self._next_uncond, not self._next_uncond  # step: two graphs
            return
        if self.alternate or self._needs_progress:  # Python numbers: no operation is dispatched for them
            value = (float(t.flatten()[0]) if torch.is_tensor(t) else float(t)) * per
            self.uncond = self.alternate and value == self._last_t and not self.uncond
            self._last_t = value
            if self._needs_progress:
                self._span = self.span(value)
        if self.family == "sd3":  # per-step caches (SD3.5's timestep-conditioned tokens); a counter that changes
            self.step += not self.uncond  # every call would make torch.compile specialise a UNet graph on it

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


def _training(adapter: IPAdapter) -> bool:
    """Whether ``adapter`` is being trained (gradients on, weights trainable): then its keys and values are made
    inside each forward pass, where gradient checkpointing and autocast see them, as before."""
    return torch.is_grad_enabled() and any(p.requires_grad for p in adapter.parameters())


def attach_adapters(unet: nn.Module, adapters: Sequence[IPAdapter] = (), backend: str = "sdpa") -> AdapterHandle:
    """Put the decoupled-attention processor on every attention layer of ``unet``; returns the undo handle."""
    handle = AdapterHandle(unet, backend)
    for adapter in adapters:
        handle.add(adapter)
    return handle

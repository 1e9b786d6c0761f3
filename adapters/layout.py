"""Auto layout: each subject's region found from its words' text cross-attention during the generation.

MS-Diffusion (Wang et al. 2024, "auto layout"): average a phrase's text cross-attention probabilities over
heads and over its tokens, accumulate them over steps, min-max normalise, and give each position to the
subject whose map is highest there when that value reaches a threshold (0.5); the rest goes to no subject.
FastComposer (Xiao et al. 2023, "delayed subject conditioning"): the image runs on text alone until a start
step, so the layout comes from the prompt, then the subjects act, each in its region.

:class:`LayoutRecorder` is what the attention processor calls at the recorded layers; it keeps one running
map per phrase (per generated image) at one resolution, never one per step. Regions are pure functions of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LookalikeError

if TYPE_CHECKING:
    from .attach import AdapterHandle
    from .module import AttnLayer


def block_factors(unet: nn.Module) -> dict[str, int]:
    """``{block prefix: latent downsampling factor}`` for every UNet block with attention (down, mid, up)."""
    factors: dict[str, int] = {}
    factor = 1
    for i, block in enumerate(unet.down_blocks):
        factors[f"down_blocks.{i}"] = factor
        if getattr(block, "downsamplers", None) is not None:
            factor *= 2
    factors["mid_block"] = factor
    for i, block in enumerate(unet.up_blocks):
        factors[f"up_blocks.{i}"] = factor
        if getattr(block, "upsamplers", None) is not None:
            factor //= 2
    return factors


def _block_of(name: str) -> str:
    parts = name.split(".")
    return "mid_block" if parts[0] == "mid_block" else ".".join(parts[:2])


def layout_layers(unet: nn.Module, layers: Sequence[AttnLayer]) -> list[AttnLayer]:
    """The cross-attention layers of one resolution, where the maps are recorded.

    The resolution of the coarsest down block with cross-attention, and every layer at it (down, mid and up):
    SD1.5 ``down_blocks.2`` and ``up_blocks.1`` (16x16 at 512 px, 5 layers); SDXL ``down_blocks.2``,
    ``mid_block`` and ``up_blocks.0`` (32x32 at 1024 px, 60 layers); latent/4 in both. The tiny test UNets:
    latent/1 (SD1.5-shaped) and latent/2 (SDXL-shaped).
    """
    factors = block_factors(unet)
    cross = [x for x in layers if x.is_cross and _block_of(x.name) in factors]
    down = [factors[_block_of(x.name)] for x in cross if x.name.startswith("down_blocks.")]
    if not down:
        raise LookalikeError("this UNet has no cross-attention in its down blocks; auto layout needs one")
    level = max(down)
    return [x for x in cross if factors[_block_of(x.name)] == level]


def grid_shape(num_queries: int, height: int, width: int) -> tuple[int, int]:
    """The ``(h, w)`` grid of a layer's queries for an ``height x width`` image (diffusers' mask rule)."""
    ratio = width / height
    h = int(math.sqrt(num_queries / ratio))
    h = h + int(num_queries % h != 0)
    w = num_queries // h
    if h * w != num_queries:
        raise LookalikeError(f"cannot lay {num_queries} attention positions out as a {height}x{width} image")
    return h, w


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each ``(..., Q)`` map to [0, 1]; a constant map becomes zeros."""
    low = maps.amin(dim=-1, keepdim=True)
    span = maps.amax(dim=-1, keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))


def upsample(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(n, P, Q)`` maps on the layer's grid -> ``(n, P, H, W)`` at image resolution (bilinear)."""
    h, w = grid_shape(maps.shape[-1], height, width)
    grid = maps.reshape(maps.shape[0], maps.shape[1], h, w).float()
    return F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)


def assign_regions(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(n, P, H, W)`` normalised maps -> disjoint ``{0, 1}`` regions: each position goes to the phrase whose
    map is highest there (the first on ties) when that value reaches ``threshold``, else to none."""
    best, winner = maps.max(dim=1)  # (n, H, W)
    one_hot = F.one_hot(winner, maps.shape[1]).permute(0, 3, 1, 2).to(maps.dtype)  # (n, P, H, W)
    return one_hot * (best >= threshold).unsqueeze(1).to(maps.dtype)


class LayoutRecorder:
    """Records each phrase's text cross-attention at the layout layers until ``start`` (a schedule fraction).

    The processor calls :meth:`record` with the probabilities of its text attention at those layers before
    ``start`` (computed explicitly there instead of with SDPA: the same FLOPs, plus a ``(B, heads, Q, 77)``
    float32 tensor per call; nothing after ``start`` and nothing at other layers). Under guidance only the
    conditional half counts. ``sums`` is ``(n, P, Q)``: one running map per phrase and generated image.
    At the first UNet call at or past ``start`` :meth:`finish` runs and ``on_finish(self)`` is called.
    """

    def __init__(self, handle: AdapterHandle, positions: Sequence[Sequence[int]], layers: Sequence[AttnLayer],
                 samples: int, start: float, on_finish: Callable[[LayoutRecorder], None] | None = None) -> None:
        if not 0.0 < start < 1.0:
            raise LookalikeError(f"layout_start {start} must lie strictly between 0 and 1 (a schedule fraction)")
        if not positions or any(len(p) == 0 for p in positions):
            raise LookalikeError("every phrase needs at least one token position")
        self.handle = handle
        self.positions = [list(p) for p in positions]
        self.indices = frozenset(x.index for x in layers)
        self.samples = samples
        self.start = start
        self.on_finish = on_finish
        self.recording = True
        self.sums: torch.Tensor | None = None  # (n, P, Q) float32
        self.calls = 0  # record() calls (layers x recorded steps)
        self._weights: torch.Tensor | None = None  # (S, P): averages the phrase's token columns

    def wants(self, layer: AttnLayer) -> bool:
        return self.recording and layer.index in self.indices

    def record(self, layer: AttnLayer, probs: torch.Tensor) -> None:
        """Add ``probs`` ``(B, heads, Q, S)`` averaged over heads and each phrase's tokens to the running maps."""
        batch, n = probs.shape[0], self.samples
        if batch == 2 * n:
            probs = probs[n:]  # [unconditional; conditional]: the conditional half
        elif batch != n:
            raise LookalikeError(f"auto layout expected {n} images (or {2 * n} under guidance) but the UNet "
                                 f"runs a batch of {batch}")
        tokens = probs.shape[-1]
        if self._weights is None or self._weights.shape[0] != tokens:
            if max(max(p) for p in self.positions) >= tokens:
                raise LookalikeError(f"a phrase lies past the {tokens} text tokens the UNet attends to")
            w = torch.zeros(tokens, len(self.positions), device=probs.device)
            for i, p in enumerate(self.positions):
                w[p, i] = 1.0 / len(p)
            self._weights = w
        maps = torch.matmul(probs.float().mean(dim=1), self._weights).transpose(1, 2)  # (n, P, Q)
        if self.sums is None:
            self.sums = maps
        elif self.sums.shape != maps.shape:
            raise LookalikeError(f"layout layers disagree on resolution ({self.sums.shape[-1]} vs "
                                 f"{maps.shape[-1]} positions)")
        else:
            self.sums.add_(maps)
        self.calls += 1

    def finish(self) -> None:
        """Stop recording (the maps are final) and hand over to ``on_finish``."""
        if not self.recording:
            return
        self.recording = False
        if self.on_finish is not None:
            self.on_finish(self)

    def maps(self, height: int, width: int) -> torch.Tensor:
        """The accumulated maps, min-max normalised, at image resolution: ``(n, P, H, W)`` in [0, 1]."""
        if self.sums is None:
            raise LookalikeError("no attention was recorded: the generation ran no step before layout_start")
        if not torch.isfinite(self.sums).all():
            raise LookalikeError("the recorded attention holds NaN or Inf (the model overflowed, e.g. in float16); "
                                 "no regions can be found; try float32 or bfloat16")
        return upsample(normalise(self.sums), height, width)

    def regions(self, height: int, width: int, threshold: float) -> torch.Tensor:
        """Disjoint ``(n, P, H, W)`` regions from :meth:`maps` (see :func:`assign_regions`)."""
        return assign_regions(self.maps(height, width), threshold)

    def nbytes(self) -> int:
        """Bytes the recorder holds across steps (the running maps and the token weights)."""
        return sum(t.numel() * t.element_size() for t in (self.sums, self._weights) if t is not None)

    def _on_unet_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        if self.recording and t is not None and self.handle.span(t)[0] >= self.start:
            self.finish()

    @contextmanager
    def attached(self, unet: nn.Module) -> Iterator[LayoutRecorder]:
        """Record during the block: the handle's processors call this recorder, each UNet call checks ``start``."""
        if self.handle.recorder is not None:
            raise LookalikeError("a layout recording is already running on this pipeline")
        hook = unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True)
        self.handle.recorder = self
        try:
            yield self
        finally:
            self.handle.recorder = None
            hook.remove()


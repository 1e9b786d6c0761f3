"""Image-feature projectors: encoder features -> image tokens in the UNet's cross-attention width.

Every module keeps the official IP-Adapter parameter names, so ``state_dict()`` is the
``image_proj`` part of an official checkpoint with no renaming (Ye et al. 2023, arXiv:2308.06721).
All projectors take ``features: dict[str, Tensor]`` with images flattened into the batch and
return ``(N, T, C)`` tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LookalikeError
from .spec import AdapterSpec

Features = Mapping[str, torch.Tensor]


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """Pre-norm GELU MLP without biases (the Resampler's feed-forward)."""
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class PerceiverAttention(nn.Module):
    """Latents attend to [inputs; latents] (Perceiver, Jaegle et al. 2021), as in IP-Adapter's Resampler."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8) -> None:
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)  # (N, L, D)
        latents = self.norm2(latents)  # (N, Q, D)
        n, q_len, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.reshape(n, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, Q, d)
        return self.to_out(out.transpose(1, 2).reshape(n, q_len, -1))


def perceiver_layers(dim: int, depth: int, dim_head: int, heads: int, ff_mult: int) -> nn.ModuleList:
    """``depth`` blocks of [PerceiverAttention, feed-forward], keyed ``layers.{i}.0`` / ``layers.{i}.1``."""
    return nn.ModuleList(
        nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)]) for _ in range(depth)
    )


def run_perceiver(layers: nn.ModuleList, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Residual perceiver stack over inputs ``x`` starting from ``latents``."""
    for attn, ff in layers:
        latents = attn(x, latents) + latents
        latents = ff(latents) + latents
    return latents


class ImageProjModel(nn.Module):
    """Basic IP-Adapter: pooled embedding -> ``num_tokens`` tokens (linear + LayerNorm)."""

    def __init__(self, embed_dim: int, cross_attention_dim: int, num_tokens: int = 4) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.proj = nn.Linear(embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, features: Features) -> torch.Tensor:
        x = features["pooled"].to(self.proj.weight.dtype)  # (N, E)
        return self.norm(self.proj(x).reshape(-1, self.num_tokens, self.cross_attention_dim))  # (N, T, C)


class Resampler(nn.Module):
    """IP-Adapter Plus: learned queries attend over CLIP patch tokens (a Perceiver resampler)."""

    def __init__(self, embed_dim: int, cross_attention_dim: int, num_tokens: int = 16, dim: int = 768,
                 depth: int = 4, dim_head: int = 64, heads: int = 12, ff_mult: int = 4) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_tokens, dim) / dim**0.5)
        self.proj_in = nn.Linear(embed_dim, dim)
        self.proj_out = nn.Linear(dim, cross_attention_dim)
        self.norm_out = nn.LayerNorm(cross_attention_dim)
        self.layers = perceiver_layers(dim, depth, dim_head, heads, ff_mult)

    def forward(self, features: Features) -> torch.Tensor:
        x = self.proj_in(features["patch"].to(self.proj_in.weight.dtype))  # (N, L, D)
        latents = self.latents.expand(x.shape[0], -1, -1)  # (N, T, D)
        return self.norm_out(self.proj_out(run_perceiver(self.layers, x, latents)))  # (N, T, C)


class IDResampler(Resampler):
    """InstantID's projector: the Resampler over one ArcFace embedding, read as a sequence of one 512-d token."""

    def forward(self, features: Features) -> torch.Tensor:
        x = self.proj_in(features["face_id"].to(self.proj_in.weight.dtype).unsqueeze(1))  # (N, 1, D)
        latents = self.latents.expand(x.shape[0], -1, -1)  # (N, T, D)
        return self.norm_out(self.proj_out(run_perceiver(self.layers, x, latents)))  # (N, T, C)


class MLPProjModel(nn.Module):
    """Full-face IP-Adapter: every CLIP patch token through an MLP + LayerNorm (257 tokens)."""

    def __init__(self, embed_dim: int, cross_attention_dim: int, num_tokens: int = 257) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(),
                                  nn.Linear(embed_dim, cross_attention_dim), nn.LayerNorm(cross_attention_dim))

    def forward(self, features: Features) -> torch.Tensor:
        return self.proj(features["patch"].to(self.proj[0].weight.dtype))  # (N, L, C)


class FaceIDProjModel(nn.Module):
    """IP-Adapter FaceID (and Portrait): ArcFace id embedding -> ``num_tokens`` tokens via a GELU MLP."""

    def __init__(self, embed_dim: int, cross_attention_dim: int, num_tokens: int = 4, mult: int = 2) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.proj = nn.Sequential(nn.Linear(embed_dim, embed_dim * mult), nn.GELU(),
                                  nn.Linear(embed_dim * mult, cross_attention_dim * num_tokens))
        self.norm = nn.LayerNorm(cross_attention_dim)

    def id_tokens(self, face_id: torch.Tensor) -> torch.Tensor:
        """(N, 512) -> normalised id tokens (N, T, C)."""
        x = self.proj(face_id.to(self.proj[0].weight.dtype))
        return self.norm(x.reshape(-1, self.num_tokens, self.cross_attention_dim))

    def forward(self, features: Features) -> torch.Tensor:
        return self.id_tokens(features["face_id"])


class FacePerceiverResampler(nn.Module):
    """FaceID-Plus's resampler: id tokens (as queries) attend over CLIP tokens of the aligned face."""

    def __init__(self, dim: int, clip_dim: int, output_dim: int, depth: int = 4, dim_head: int = 64,
                 heads: int = 12, ff_mult: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(clip_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = perceiver_layers(dim, depth, dim_head, heads, ff_mult)

    def forward(self, latents: torch.Tensor, clip_tokens: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(clip_tokens)  # (N, L, D)
        return self.norm_out(self.proj_out(run_perceiver(self.layers, x, latents)))


class FaceIDPlusProjModel(FaceIDProjModel):
    """IP-Adapter FaceID-Plus (v2 with ``shortcut``): id tokens refined by CLIP features of the face."""

    def __init__(self, embed_dim: int, cross_attention_dim: int, num_tokens: int = 4, mult: int = 2,
                 clip_dim: int = 1280, depth: int = 4, dim_head: int = 64, heads: int = 12,
                 ff_mult: int = 4, shortcut: bool = False, s_scale: float = 1.0) -> None:
        super().__init__(embed_dim, cross_attention_dim, num_tokens, mult)
        self.perceiver_resampler = FacePerceiverResampler(cross_attention_dim, clip_dim, cross_attention_dim,
                                                          depth, dim_head, heads, ff_mult)
        self.shortcut = shortcut
        self.s_scale = s_scale

    def forward(self, features: Features) -> torch.Tensor:
        ids = self.id_tokens(features["face_id"])  # (N, T, C)
        clip = features["patch"].to(ids.dtype)  # (N, L, H)
        out = self.perceiver_resampler(ids, clip)
        return ids + self.s_scale * out if self.shortcut else out


class FluxMLPProjModel(FaceIDProjModel):
    """InstantX FLUX.1-dev IP-Adapter: pooled SigLIP embedding -> 2x-wide GELU MLP -> ``num_tokens`` tokens.

    The same layers as :class:`FaceIDProjModel` (``proj.0``, ``proj.2``, ``norm``) fed the pooled feature.
    """

    def forward(self, features: Features) -> torch.Tensor:
        return self.id_tokens(features["pooled"])


def _time_resampler(*args, **kwargs) -> nn.Module:
    from .dit_layers import TimeResampler

    return TimeResampler(*args, **kwargs)


PROJECTORS: dict[str, Callable[..., nn.Module]] = {
    "linear": ImageProjModel,
    "resampler": Resampler,
    "id_resampler": IDResampler,
    "mlp": MLPProjModel,
    "faceid": FaceIDProjModel,
    "faceid_plus": FaceIDPlusProjModel,
    "flux_mlp": FluxMLPProjModel,
    "time_resampler": _time_resampler,
}


def build_projector(spec: AdapterSpec, *, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> nn.Module:
    """Build the projector a spec names, with random weights."""
    if spec.projector not in PROJECTORS:
        raise LookalikeError(f"adapter {spec.name!r} names an unknown projector {spec.projector!r}; "
                             f"known: {', '.join(PROJECTORS)}")
    kwargs = dict(spec.projector_kwargs)
    if spec.projector != "mlp":
        kwargs["num_tokens"] = spec.num_tokens
    if spec.projector == "faceid_plus":
        kwargs["shortcut"] = spec.shortcut
    module = PROJECTORS[spec.projector](spec.embed_dim, spec.cross_attention_dim, **kwargs)
    return module.to(device=device, dtype=dtype)

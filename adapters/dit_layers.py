"""SD3.5 IP-Adapter's modules: the timestep-conditioned resampler and the per-layer norms (InstantX).

Both keep diffusers' parameter names (``IPAdapterTimeImageProjection``, ``SD3IPAdapterJointAttnProcessor2_0``),
which is the layout of the diffusers-converted checkpoint; :mod:`lookalike.weights.dit_formats` maps the
original InstantX names onto them.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import IPAdapterTimeImageProjection
from diffusers.models.normalization import AdaLayerNorm, RMSNorm
from torch import nn

from ..errors import LookalikeError
from .projectors import Features


class TimeResampler(IPAdapterTimeImageProjection):
    """SigLIP tokens + timestep -> 64 image tokens and the timestep embedding ``norm_ip`` uses.

    Both change every denoising step, so they are computed once per step, never once per generation.
    """

    def __init__(self, embed_dim: int, cross_attention_dim: int, num_tokens: int = 64, dim: int = 1280,
                 depth: int = 4, dim_head: int = 64, heads: int = 20, ff_mult: int = 4, timestep_in_dim: int = 320,
                 timestep_flip_sin_to_cos: bool = True, timestep_freq_shift: int = 0) -> None:
        super().__init__(embed_dim, cross_attention_dim, dim, depth, dim_head, heads, num_tokens, ff_mult,
                         timestep_in_dim, timestep_flip_sin_to_cos, timestep_freq_shift)

    def forward(self, features: Features, timestep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if timestep is None:
            raise LookalikeError("the SD3.5 resampler needs the timestep: its tokens are made once per step")
        x = features["patch"].to(self.proj_in.weight.dtype)  # (N, L, H)
        t = torch.as_tensor(timestep).reshape(-1).to(x.device)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        return super().forward(x, t)  # (N, T, C), (N, D)


class SD3IPLayer(nn.Module):
    """One SD3 joint block's image attention weights: ``norm_ip`` (AdaLayerNorm on the timestep embedding),
    ``to_k_ip``/``to_v_ip`` and the RMS norms of image queries, image keys and image-token keys."""

    has_lora = False
    has_ip = True

    def __init__(self, layer, cross_attention_dim: int, timestep_dim: int) -> None:
        super().__init__()
        head_dim = layer.hidden // layer.heads
        self.norm_ip = AdaLayerNorm(timestep_dim, output_dim=cross_attention_dim * 2, norm_eps=1e-6, chunk_dim=1)
        self.to_k_ip = nn.Linear(cross_attention_dim, layer.hidden, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, layer.hidden, bias=False)
        self.norm_q = RMSNorm(head_dim, 1e-6)
        self.norm_k = RMSNorm(head_dim, 1e-6)
        self.norm_ip_k = RMSNorm(head_dim, 1e-6)

    def kv(self, tokens: torch.Tensor, temb: torch.Tensor, heads: int, head_dim: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``(B, L, C)`` and timestep embedding ``(B, D)`` -> normed keys and values ``(B, heads, L, d)``."""
        b = tokens.shape[0]
        x = self.norm_ip(tokens.to(self.to_k_ip.weight.dtype), temb=temb.to(self.to_k_ip.weight.dtype))
        k = self.to_k_ip(x).view(b, -1, heads, head_dim).transpose(1, 2)
        v = self.to_v_ip(x).view(b, -1, heads, head_dim).transpose(1, 2)
        return self.norm_ip_k(k), v

"""The one decoupled cross-attention processor (IP-Adapter, Ye et al. 2023, eq. 5) and its attention function.

``out = Attn(Q, K_text, V_text) + sum_a scale_a * mask_a * Attn(Q, K_ip_a, V_ip_a)``.
The backend (SDPA or xformers) is an argument of :func:`attention`, never a copy of the processor.
Image keys and values come precomputed from the conditioning (once per generation, not per step), with the
scale folded into the values (``scale * Attn(Q, K, V) = Attn(Q, K, scale * V)``), and each image term is added
to the text attention before the heads are merged: a plain adapter adds two operations per layer and step,
its attention and one add (issue 21: an eager step on a GPU is bound by kernel launches).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .attach import AdapterHandle
    from .module import AttnLayer, IPLayer

BACKENDS = ("sdpa", "xformers")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              backend: str = "sdpa", merge: bool = True) -> torch.Tensor:
    """Multi-head attention on ``(B, heads, L, d)`` tensors; returns ``(B, L, heads * d)``, or with
    ``merge=False`` ``(B, heads, L, d)`` (to add more terms before one :func:`merge_heads`)."""
    if backend == "xformers" and mask is None and q.is_cuda:
        import xformers.ops as xops

        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2)  # (B, heads, L, d) view
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return merge_heads(out, q.dtype) if merge else out


def merge_heads(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, heads, L, d)`` -> ``(B, L, heads * d)`` in ``dtype`` (a view for SDPA's own output layout)."""
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d).to(dtype)


def add_weighted(total: torch.Tensor | None, out: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``total + weight * out`` in one operation (``weight``: a region mask and/or a window gate, or None)."""
    if total is None:
        return out if weight is None else out * weight
    return total + out if weight is None else torch.addcmul(total, out, weight)


def term_weight(region: torch.Tensor | None, gate: torch.Tensor | None) -> torch.Tensor | None:
    """What multiplies an image term: its region, its compiled window gate, both, or nothing."""
    if gate is None:
        return region
    return gate if region is None else region * gate


def attention_with_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention` with ``merge=False`` computed explicitly, also returning ``softmax(QK^T / sqrt(d))``
    ``(B, heads, L, S)``.

    For layers whose probabilities are recorded (auto layout): one attention, not SDPA plus a second one; it
    materialises the probabilities (float32) instead of using a fused kernel.
    """
    d = q.shape[-1]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * d ** -0.5
    if mask is not None:
        scores = scores + mask.float()
    probs = scores.softmax(dim=-1)  # (B, heads, L, S)
    return torch.matmul(probs.to(v.dtype), v), probs


def _with_lora(base: torch.Tensor, x: torch.Tensor, loras: list[tuple[float, torch.nn.Module]]) -> torch.Tensor:
    for scale, lora in loras:
        base = base + scale * lora(x).to(base.dtype)
    return base


class DecoupledAttnProcessor:
    """Attention processor for one layer; reads the adapters and this generation's state from its handle.

    With nothing to add at this layer and step it calls the layer's original processor, so scale 0,
    a closed timestep window or no conditioning give exactly the base model's output.
    """

    def __init__(self, handle: AdapterHandle, layer: AttnLayer, original: object, backend: str = "sdpa") -> None:
        self.handle = handle
        self.layer = layer
        self.original = original
        self.backend = backend

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        loras = self.handle.loras_at(self.layer.index)
        active = self.handle.active_at(self.layer)
        recorder = self.handle.recorder
        record = recorder is not None and recorder.wants(self.layer)
        if not loras and not active and not record:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        lq, lk, lv, lo = ([(s, getattr(layer, n)) for s, layer in loras]
                          for n in ("to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora"))
        query = _with_lora(attn.to_q(hidden_states), hidden_states, lq)  # (B, N, inner)
        head_dim = query.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, N, d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if encoder_hidden_states is None:
            key, value = _text_kv(attn, hidden_states, lk, lv, batch_size, head_dim, cross=False)
        elif lk or lv:
            key, value = _text_kv(attn, encoder_hidden_states, lk, lv, batch_size, head_dim)
        else:  # the prompt's keys and values do not change across denoising steps: once per generation
            context = encoder_hidden_states
            key, value = self.handle.text_kv(
                self.layer.index, context, lambda: _text_kv(attn, context, lk, lv, batch_size, head_dim))
        if record:  # auto layout: this layer's text attention probabilities are recorded (adapters/layout.py)
            out, probs = attention_with_probs(query, key, value, attention_mask)
            recorder.record(self.layer, probs)
        else:
            backend = self.backend if attention_mask is None else "sdpa"
            out = attention(query, key, value, attention_mask, backend, merge=False)  # (B, heads, N, d)

        for term in active:
            gate = self.handle.gate(term)
            for k_ip, v_ip, region in term.pieces(self.layer, batch_size, query.shape[2], query.dtype,
                                                  query.device):  # v_ip carries the scale
                ip_out = attention(query, k_ip, v_ip, None, self.backend, merge=False)
                out = add_weighted(out, ip_out, term_weight(None if region is None else region.unsqueeze(1), gate))
        hidden_states = merge_heads(out, query.dtype)  # (B, N, inner)

        out = _with_lora(attn.to_out[0](hidden_states), hidden_states, lo)
        hidden_states = attn.to_out[1](out)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _text_kv(attn, context: torch.Tensor, lk: list, lv: list, batch_size: int, head_dim: int, cross: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's keys and values of ``context`` as ``(B, heads, L, d)`` (cross-norm and LoRA applied)."""
    if cross and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key = _with_lora(attn.to_k(context), context, lk)
    value = _with_lora(attn.to_v(context), context, lv)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return key, value


def ip_kv(layer: IPLayer, tokens: torch.Tensor, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image tokens ``(B, L, C)`` -> this layer's image keys and values ``(B, heads, L, d)``.

    With ``layer.norm_kv`` both are RMS-normalised per head without weights (InstantX FLUX, eps 1e-5).
    """
    b = tokens.shape[0]
    tokens = tokens.to(layer.to_k_ip.weight.dtype)
    k = layer.to_k_ip(tokens).view(b, -1, heads, head_dim).transpose(1, 2)
    v = layer.to_v_ip(tokens).view(b, -1, heads, head_dim).transpose(1, 2)
    if getattr(layer, "norm_kv", False):
        k, v = F.rms_norm(k, (head_dim,), eps=1e-5), F.rms_norm(v, (head_dim,), eps=1e-5)
    return k, v

"""Image attention on DiT blocks (FLUX.1 double- and single-stream, SD3.5 joint): one short processor each.

Every processor reads the adapters and this generation's state from the :class:`~.attach.AdapterHandle`
and uses the one :func:`~.attention.attention` function. Image keys/values go to the image-stream queries
only; the text stream and RoPE are untouched and image tokens carry no position. With nothing to add at a
layer and step a processor calls the layer's original processor, so scale 0, a closed window or no
conditioning give exactly the base model's output.

Where the image term enters follows each adapter's published code (its spec's ``flavor``):

* XLabs (``flux-ip``; diffusers' ``FluxIPAdapterAttnProcessor``): ``scale * Attn(q_img, K_ip, V_ip)`` with the
  QK-normed, pre-RoPE image queries, added to the block's output after its feed-forward (no out-projection);
* InstantX FLUX (``flux-ip-instantx``; Shakker-Labs' ComfyUI-IPAdapter-Flux): keys and values RMS-normed per
  head, the term added to the attention output before the out-projection (double) or ``proj_out`` (single;
  image part of the joint sequence only);
* InstantX SD3.5 (``sd35-ip``; diffusers' ``SD3IPAdapterJointAttnProcessor2_0``): the image queries attend
  over ``[image keys; image-token keys]`` with the layer's own norms; the tokens and ``norm_ip`` depend on the
  timestep, so keys/values are computed once per layer and step (:meth:`~.attach._Term.step_pieces`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import LookalikeError
from .attention import add_weighted, attention, term_weight

if TYPE_CHECKING:
    from .attach import AdapterHandle
    from .module import AttnLayer


def dit_block_scales(layers: Sequence[AttnLayer], scale: dict) -> dict[int, Any]:
    """``{"double": [...], "single": [...], "joint": [...]}`` (a float or one value per block) -> per layer.

    Families not named get 0. diffusers' FLUX per-block list of 19 is ``{"double": list}``.
    """
    names = {"double": "flux_double", "single": "flux_single", "joint": "sd3_joint"}
    unknown = set(scale) - set(names)
    if unknown:
        raise LookalikeError(f"per-block DiT scale keys are 'double', 'single' or 'joint', not {sorted(unknown)}")
    out: dict[int, Any] = {}
    for key, family in names.items():
        group = [x for x in layers if x.family == family]
        value = scale.get(key, 0.0)
        values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * len(group)
        if len(values) != len(group):
            raise LookalikeError(f"the {key!r} scale needs one value per block: {len(group)} blocks, "
                                 f"{len(values)} values")
        out.update({x.index: v for x, v in zip(group, values)})
    return out


def _qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> tuple:
    """FLUX's projections (fused or not) as ``(B, L, heads, d)``, QK-normed: q, k, v, eq, ek, ev."""
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    q, k, v = (t.unflatten(-1, (attn.heads, -1)) for t in (q, k, v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        eq, ek, ev = (t.unflatten(-1, (attn.heads, -1)) for t in (eq, ek, ev))
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
    return q, k, v, eq, ek, ev


def _joint(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Any, mask: Any, backend: str) -> torch.Tensor:
    """RoPE on ``(B, L, heads, d)`` queries/keys, then the one attention function -> ``(B, L, heads * d)``."""
    if rope is not None:
        from diffusers.models.embeddings import apply_rotary_emb

        q = apply_rotary_emb(q, rope, sequence_dim=1)
        k = apply_rotary_emb(k, rope, sequence_dim=1)
    return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, backend)


class _DitProcessor:
    """What every DiT processor shares: its handle, layer, original processor and backend."""

    def __init__(self, handle: AdapterHandle, layer: AttnLayer, original: object, backend: str = "sdpa") -> None:
        self.handle = handle
        self.layer = layer
        self.original = original
        self.backend = backend

    def image_terms(self, active: list, query: torch.Tensor, flavor: str) -> torch.Tensor | None:
        """Sum of ``scale * mask * Attn(query, K_ip, V_ip)`` over the active terms of one flavor (the scale
        is folded into ``V_ip``: one attention and one add per term)."""
        total = None
        for term in active:
            if term.adapter.spec.flavor != flavor:
                continue
            gate = self.handle.gate(term)
            for k_ip, v_ip, region in term.pieces(self.layer, query.shape[0], query.shape[2], query.dtype,
                                                  query.device):
                out = attention(query, k_ip, v_ip, None, self.backend)
                total = add_weighted(total, out, term_weight(region, gate))
        return total


class FluxDoubleProcessor(_DitProcessor):
    """A FLUX dual-stream block's attention, plus image attention for its image-stream queries."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, **kwargs: Any) -> Any:
        active = self.handle.active_at(self.layer)
        if not active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        q, k, v, eq, ek, ev = _qkv(attn, hidden_states, encoder_hidden_states)
        ip_query = q.transpose(1, 2)  # (B, heads, N, d): QK-normed, before RoPE (image tokens carry no position)
        text = ek.shape[1]
        out = _joint(torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1), image_rotary_emb,
                     attention_mask, self.backend)
        context, image = out[:, :text], out[:, text:]
        instantx = self.image_terms(active, ip_query, "instantx")
        if instantx is not None:
            image = image + instantx
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        context = attn.to_add_out(context.contiguous())
        xlabs = self.image_terms(active, ip_query, "xlabs")
        if xlabs is None:
            return image, context
        return image, context, xlabs  # the block adds the third output after its feed-forward (XLabs)


class FluxSingleProcessor(_DitProcessor):
    """A FLUX single-stream block's attention over ``[text; image]``; image attention for the image part only."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, **kwargs: Any) -> Any:
        active = self.handle.active_at(self.layer)
        text = self.handle.text_len
        if not active or text is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        q, k, v, _, _, _ = _qkv(attn, hidden_states, None)
        out = _joint(q, k, v, image_rotary_emb, attention_mask, self.backend)  # (B, L, C)
        extra = self.image_terms(active, q[:, text:].transpose(1, 2), "instantx")
        if extra is None:
            return out
        return torch.cat([out[:, :text], out[:, text:] + extra], dim=1)


class SD3JointProcessor(_DitProcessor):
    """An SD3 joint block: the image queries also attend over ``[image keys; image-token keys]`` (InstantX)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        active = self.handle.active_at(self.layer)
        if not active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        b, n = hidden_states.shape[:2]
        heads = attn.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # (B, heads, L, d)

        q_raw, k_raw, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        q = attn.norm_q(q_raw) if attn.norm_q is not None else q_raw
        k = attn.norm_k(k_raw) if attn.norm_k is not None else k_raw
        eq, ek, ev = (split(p(encoder_hidden_states)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        out = attention(torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2), None, self.backend)
        image, context = out[:, :n], out[:, n:]
        for term in active:
            for ip, k_ip, v_ip, scale, region in term.step_pieces(self.layer, heads, q.shape[-1], b, n,
                                                                  q.dtype, q.device):
                if ip.norm_q.weight.device != q.device:  # offloaded model: the tiny norms follow the layer
                    ip.norm_q.to(q.device), ip.norm_k.to(q.device)
                keys = torch.cat([ip.norm_k(k_raw), k_ip], 2)
                extra = attention(ip.norm_q(q_raw), keys, torch.cat([v, v_ip], 2), None, self.backend)
                weight = None if region is None else scale * region
                image = image.add(extra, alpha=scale) if weight is None else torch.addcmul(image, extra, weight)
        image = attn.to_out[1](attn.to_out[0](image))
        if attn.context_pre_only:
            return image, context
        return image, attn.to_add_out(context)

"""InstantX's FLUX.1-dev IP-Adapter (not in diffusers): lookalike against a reference written from the published
code's semantics (Shakker-Labs/ComfyUI-IPAdapter-Flux: ``MLPProjModel``, ``IPAFluxAttnProcessor2_0`` and the
patched double/single stream blocks), at the projector and at one double and one single block.

Published semantics: tokens = LayerNorm(Linear(GELU(Linear(pooled)))) reshaped to 128 x 4096; per block
``K = RMS(to_k_ip(tokens))``, ``V = RMS(to_v_ip(tokens))`` per head without weights (eps 1e-5), and
``scale * SDPA(q, K, V)`` with the QK-normed, pre-RoPE queries, added to the attention output before the
out-projection (double) or before ``proj_out`` (single). One documented difference: in single blocks the
published code adds the term to the text queries too; lookalike (issue 16) gives the text part nothing, so the
reference below adds it to the image part only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dit_helpers import flux_kwargs, flux_pipe, gen, pooled, random_dit_adapter

from lookalike import Personalizer
from lookalike.adapters.attach import AdapterInput
from lookalike.weights.dit_formats import save_published
from lookalike.weights.io import read_checkpoint

TOL = 1e-5


def ref_tokens(sd: dict, pooled_embeds: torch.Tensor, tokens: int) -> torch.Tensor:
    """MLPProjModel: Linear(E, 2E), GELU, Linear(2E, C*T), reshape (-1, T, C), LayerNorm(C)."""
    x = F.linear(pooled_embeds, sd["image_proj.proj.0.weight"], sd["image_proj.proj.0.bias"])
    x = F.linear(F.gelu(x), sd["image_proj.proj.2.weight"], sd["image_proj.proj.2.bias"])
    c = sd["image_proj.norm.weight"].shape[0]
    return F.layer_norm(x.reshape(-1, tokens, c), (c,), sd["image_proj.norm.weight"], sd["image_proj.norm.bias"])


def ref_ip(sd: dict, index: int, q: torch.Tensor, tokens: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """IPAFluxAttnProcessor2_0: q (B, H, L, D) -> scale * SDPA(q, RMS(K_ip), RMS(V_ip)) as (B, L, H*D)."""
    b, d = q.shape[0], q.shape[-1]
    k = F.linear(tokens, sd[f"ip_adapter.{index}.to_k_ip.weight"]).view(b, -1, heads, d).transpose(1, 2)
    v = F.linear(tokens, sd[f"ip_adapter.{index}.to_v_ip.weight"]).view(b, -1, heads, d).transpose(1, 2)
    k, v = F.rms_norm(k, (d,), eps=1e-5), F.rms_norm(v, (d,), eps=1e-5)
    out = F.scaled_dot_product_attention(q, k, v)
    return scale * out.transpose(1, 2).reshape(b, -1, heads * d)


def rope_attention(q, k, v, rope):
    """Joint attention with RoPE on (B, L, H, D) tensors -> (B, L, H*D)."""
    from diffusers.models.embeddings import apply_rotary_emb

    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


def heads_of(attn, x, proj):
    return proj(x).unflatten(-1, (attn.heads, -1))


def ref_double(block, sd, index, img, txt, temb, rope, tokens, scale):
    """DoubleStreamBlockIPA on diffusers' FluxTransformerBlock weights."""
    attn = block.attn
    n_img, g_msa, sh_mlp, sc_mlp, g_mlp = block.norm1(img, emb=temb)
    n_txt, c_g_msa, c_sh_mlp, c_sc_mlp, c_g_mlp = block.norm1_context(txt, emb=temb)
    q, k, v = (heads_of(attn, n_img, p) for p in (attn.to_q, attn.to_k, attn.to_v))
    eq, ek, ev = (heads_of(attn, n_txt, p) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    q, k, eq, ek = attn.norm_q(q), attn.norm_k(k), attn.norm_added_q(eq), attn.norm_added_k(ek)
    out = rope_attention(torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1), rope)
    txt_attn, img_attn = out[:, :txt.shape[1]], out[:, txt.shape[1]:]
    img_attn = img_attn + ref_ip(sd, index, q.transpose(1, 2), tokens, attn.heads, scale)
    img = img + g_msa.unsqueeze(1) * attn.to_out[0](img_attn)
    img = img + g_mlp.unsqueeze(1) * block.ff(block.norm2(img) * (1 + sc_mlp[:, None]) + sh_mlp[:, None])
    txt = txt + c_g_msa.unsqueeze(1) * attn.to_add_out(txt_attn)
    txt = txt + c_g_mlp.unsqueeze(1) * block.ff_context(block.norm2_context(txt) * (1 + c_sc_mlp[:, None])
                                                        + c_sh_mlp[:, None])
    return txt, img


def ref_single(block, sd, index, img, txt, temb, rope, tokens, scale):
    """SingleStreamBlockIPA on diffusers' FluxSingleTransformerBlock weights (image part only, see above)."""
    attn, n = block.attn, txt.shape[1]
    x = torch.cat([txt, img], 1)
    normed, gate = block.norm(x, emb=temb)
    mlp = block.act_mlp(block.proj_mlp(normed))
    q, k, v = (heads_of(attn, normed, p) for p in (attn.to_q, attn.to_k, attn.to_v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    out = rope_attention(q, k, v, rope)
    ip = ref_ip(sd, index, q[:, n:].transpose(1, 2), tokens, attn.heads, scale)
    out = torch.cat([out[:, :n], out[:, n:] + ip], 1)
    x = x + gate.unsqueeze(1) * block.proj_out(torch.cat([out, mlp], 2))
    return x[:, :n], x[:, n:]


def block_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = model.inner_dim
    img, txt, temb = (torch.randn(1, n, width, generator=g) for n in (16, 6, 1))
    ids = torch.cat([torch.zeros(6, 3), torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0),
                                                                   torch.arange(4.0), indexing="ij")).reshape(3, -1).T])
    return img, txt, temb[:, 0], model.pos_embed(ids)


def test_instantx_projector_and_blocks_match_the_published_semantics(tmp_path):
    pipe = flux_pipe()
    model = pipe.transformer
    adapter = random_dit_adapter("flux-ip-instantx", pipe, seed=5)
    path = save_published(adapter, tmp_path / "ip-adapter.bin", "instantx")
    sd, _ = read_checkpoint(path)
    p = Personalizer(pipe)
    p.load_adapter(str(path))
    loaded = p.adapters[0]
    assert loaded.spec.name == "flux-ip-instantx" and len(loaded.ip_adapter) == 4  # 2 double + 2 single
    emb = pooled(seed=7)
    tokens = loaded.project({"pooled": emb})  # (1, 1, T, C)
    torch.testing.assert_close(tokens[:, 0], ref_tokens(sd, emb[:, 0], loaded.spec.num_tokens), atol=TOL, rtol=0)

    handle = p.handle
    img, txt, temb, rope = block_inputs(model)
    scale = 0.7
    with torch.no_grad(), handle.conditioned([AdapterInput(tokens, scale=scale)]):
        handle.text_len = txt.shape[1]
        got_d = model.transformer_blocks[1](img, txt, temb, rope)
        got_s = model.single_transformer_blocks[0](img, txt, temb, rope)
        want_d = ref_double(model.transformer_blocks[1], sd, 1, img, txt, temb, rope, tokens[:, 0], scale)
        want_s = ref_single(model.single_transformer_blocks[0], sd, 2, img, txt, temb, rope, tokens[:, 0], scale)
    for got, want in ((got_d, want_d), (got_s, want_s)):
        torch.testing.assert_close(got[0], want[0], atol=TOL, rtol=0)
        torch.testing.assert_close(got[1], want[1], atol=TOL, rtol=0)
    handle.detach()
    with torch.no_grad():
        plain_d = model.transformer_blocks[1](img, txt, temb, rope)
    assert (plain_d[1] - got_d[1]).abs().max() > 1e-3, "the adapter must change the block's image stream"


def test_instantx_moves_the_image_and_scale_zero_is_the_base(tmp_path):
    pipe = flux_pipe()
    adapter = random_dit_adapter("flux-ip-instantx", pipe, seed=6)
    path = save_published(adapter, tmp_path / "ip-adapter.bin", "instantx")
    p = Personalizer(pipe)
    p.load_adapter(str(path))
    plain = flux_pipe()(generator=gen(), **flux_kwargs()).images
    on = p.generate(image_embeds=pooled(), generator=gen(), **flux_kwargs()).images
    off = p.generate(image_embeds=pooled(), scale=0.0, generator=gen(), **flux_kwargs()).images
    assert abs(on - plain).max() > 1e-3
    assert (off == plain).all()

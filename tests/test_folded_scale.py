"""The scale folded into the image values (``Attn(Q, K, s * V)``) equals diffusers' unfolded ``s * Attn(Q, K, V)``."""

from __future__ import annotations

import pytest
import torch

from lookalike.adapters.attach import AdapterInput, attach_adapters
from lookalike.adapters.spec import REGISTRY

from helpers import features_for, fresh_pipe, random_adapter


@pytest.mark.parametrize("scale", [0.37, 1.0, 2.5])
def test_folded_scale_equals_diffusers_unfolded_processor_on_one_layer(scale):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    pipe = fresh_pipe("sd15")
    adapter = random_adapter(REGISTRY["ip-adapter-plus_sd15"], pipe)
    handle = attach_adapters(pipe.unet, [adapter])
    layer = next(x for x in handle.layers if x.is_cross)
    attn = pipe.unet.get_submodule(layer.name.removesuffix(".processor"))
    weights = adapter.layer(layer.index)
    with torch.no_grad():
        tokens = adapter.project(features_for(adapter.spec, seed=1))  # (1, 1, T, C)
        negative = adapter.project(features_for(adapter.spec, seed=2))
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 64, attn.to_q.in_features, generator=g)
    context = torch.randn(2, 7, layer.context_dim, generator=g)
    theirs_proc = IPAdapterAttnProcessor2_0(layer.hidden, layer.context_dim, num_tokens=(tokens.shape[2],),
                                            scale=scale)
    theirs_proc.to_k_ip[0].weight.data.copy_(weights.to_k_ip.weight)
    theirs_proc.to_v_ip[0].weight.data.copy_(weights.to_v_ip.weight)
    with torch.no_grad():
        with handle.conditioned([AdapterInput(tokens, negative, scale=scale)]):
            ours = attn(hidden, encoder_hidden_states=context)
        base = attn(hidden, encoder_hidden_states=context)
        attn.set_processor(theirs_proc)
        theirs = attn(hidden, encoder_hidden_states=(context, [torch.cat([negative, tokens])]))
    assert (ours - theirs).abs().max() <= 1e-6
    assert (ours - base).abs().max() > 1e-3  # the image term is really there

"""The adapter path under torch.compile (no graph breaks) and in reduced precision."""

from __future__ import annotations

import torch

from lookalike.adapters.attach import AdapterInput, attach_adapters
from lookalike.adapters.spec import REGISTRY

from helpers import features_for, fresh_pipe, random_adapter


def test_compiled_unet_has_no_graph_breaks_and_matches_eager_across_generations():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pipe = fresh_pipe("sd15")
    adapter = random_adapter(REGISTRY["ip-adapter-plus_sd15"], pipe)
    handle = attach_adapters(pipe.unet, [adapter])
    compiled = torch.compile(pipe.unet, backend="eager", fullgraph=True)  # fullgraph: a break is an error
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    neg = adapter.project(features_for(adapter.spec, seed=9))
    for generation in range(3):
        tokens = adapter.project(features_for(adapter.spec, seed=generation))
        with torch.no_grad(), handle.conditioned([AdapterInput(tokens, neg, scale=0.7)]):
            for step in range(2):
                t = torch.tensor(100 * step)
                assert torch.allclose(compiled(x, t, ctx).sample, pipe.unet(x, t, ctx).sample, atol=1e-6)
    assert counters["stats"]["unique_graphs"] <= 3  # first call, cached keys/values, new generation: then stable


def test_bfloat16_adapter_path_runs_and_stays_close_to_float32():
    pipe = fresh_pipe("sd15")
    adapter = random_adapter(REGISTRY["ip-adapter_sd15"], pipe)
    feats = features_for(adapter.spec)
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        pipe.unet.to(dtype)
        adapter.to(dtype)
        handle = attach_adapters(pipe.unet, [adapter])
        tokens = adapter.project({k: v.to(dtype) for k, v in feats.items()})
        with torch.no_grad(), handle.conditioned([AdapterInput(tokens, torch.zeros_like(tokens))]):
            outs[dtype] = pipe.unet(x.to(dtype), 10, ctx.to(dtype)).sample.float()
        handle.detach()
    assert outs[torch.bfloat16].isfinite().all()
    rel = (outs[torch.bfloat16] - outs[torch.float32]).norm() / outs[torch.float32].norm()
    assert rel < 0.05

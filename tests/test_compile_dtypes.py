"""The adapter path under torch.compile (no graph breaks) and in reduced precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dit_helpers import flux_kwargs, flux_pipe, gen, pooled, random_dit_adapter

from lookalike import Personalizer
from lookalike.adapters.attach import AdapterInput, attach_adapters, in_window
from lookalike.adapters.spec import REGISTRY

from helpers import features_for, fresh_pipe, random_adapter


def test_compiled_unet_serves_two_generations_with_no_recompile_and_equals_eager():
    """torch.compile(unet, fullgraph=True): two generations with different subjects, scales and windows run
    with no graph break, compile nothing in the second one (the frame and graph counts stay), and equal eager.

    ``aot_eager`` runs dynamo and AOT autograd as ``mode="reduce-overhead"`` does, without inductor's code
    generation (minutes on two CPU cores); bench/gpu.py runs the CUDA-graph mode itself.
    """
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pipe = fresh_pipe("sd15")
    adapter = random_adapter(REGISTRY["ip-adapter-plus_sd15"], pipe)
    p = Personalizer(pipe)
    p.load_adapter(adapter)
    runs = [(0, 0.7, (0.0, 1.0)), (1, 0.4, (0.25, 0.75))]

    def generate(i: int):
        seed, scale, window = runs[i]
        return p.generate("a photo", image_embeds=[features_for(adapter.spec, seed=seed)],
                          negative_image_embeds=[features_for(adapter.spec, seed=99)], scale=scale, window=window,
                          num_inference_steps=4, guidance_scale=5.0, height=32, width=32, output_type="np",
                          generator=torch.Generator().manual_seed(0)).images

    eager = [generate(i) for i in range(2)]
    counter = CompileCounterWithBackend("aot_eager")
    pipe.unet = torch.compile(pipe.unet, backend=counter, fullgraph=True)  # fullgraph: a graph break is an error
    first = generate(0)
    frames, graphs = counter.frame_count, counters["stats"]["unique_graphs"]
    second = generate(1)
    assert counter.frame_count == frames and counters["stats"]["unique_graphs"] == graphs  # nothing recompiled
    assert frames <= 2  # the model call, and its timestep hook (compiled as its own frame)
    assert np.abs(first - eager[0]).max() <= 1e-6 and np.abs(second - eager[1]).max() <= 1e-6
    assert np.abs(eager[0] - eager[1]).max() > 1e-3  # the second generation really differs


def test_compiled_window_gates_decide_as_eager_does():
    """The gate tensors of a compiled step make the same decision as eager's Python window rule at every step."""
    pipe = fresh_pipe("sd15")
    adapter = random_adapter(REGISTRY["ip-adapter_sd15"], pipe)
    handle = attach_adapters(pipe.unet, [adapter, adapter])
    pipe.scheduler.set_timesteps(30)
    handle.scheduler = pipe.scheduler
    tokens = adapter.project(features_for(adapter.spec))
    for windows in [((0.0, 0.75), (0.3, 1.0)), ((0.1, 0.1), (0.0, 1.0)), ((0.5, 0.9), (0.2, 0.4))]:
        with handle.conditioned([AdapterInput(tokens, scale=1.0, window=w) for w in windows]):
            for t in pipe.scheduler.timesteps:
                eager = [w == (0.0, 1.0) or in_window(handle.span(t), w) for w in windows]
                assert handle.compiled_gates(t).tolist() == [float(e) for e in eager]


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


@pytest.mark.parametrize("name", ["flux-ip", "flux-ip-instantx"])
def test_compiled_flux_serves_two_generations_and_true_cfg_with_no_recompile(name):
    """FLUX double and single blocks compiled with fullgraph: new subject, scale and window compile nothing more;
    true CFG (conditional then unconditional call per step) compiles its two halves once."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    pipe = flux_pipe()
    adapter = random_dit_adapter(name, pipe)
    p = Personalizer(pipe)
    p.load_adapter(adapter)
    runs = [dict(image_embeds=pooled(seed=10), scale=0.7),
            dict(image_embeds=pooled(seed=11), scale=0.4, window=(0.25, 0.75)),
            dict(image_embeds=pooled(seed=12), negative_image_embeds=pooled(seed=13), true_cfg_scale=3.0,
                 negative_prompt="blurry"),
            dict(image_embeds=pooled(seed=14), negative_image_embeds=pooled(seed=15), true_cfg_scale=2.0,
                 negative_prompt="blurry", scale=0.5)]
    eager = [p.generate(generator=gen(), **run, **flux_kwargs(steps=4)).images for run in runs]
    counter = CompileCounterWithBackend("eager")
    pipe.transformer = torch.compile(pipe.transformer, backend=counter, fullgraph=True)
    frames = []
    for run, expected in zip(runs, eager):
        out = p.generate(generator=gen(), **run, **flux_kwargs(steps=4)).images
        assert np.abs(out - expected).max() <= 1e-6
        frames.append(counter.frame_count)
    assert frames[1] == frames[0] and frames[3] == frames[2]  # a new generation compiles nothing
    assert np.abs(eager[2] - eager[3]).max() > 1e-3

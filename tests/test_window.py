"""The timestep window rounds as diffusers' ``control_guidance_start/end`` does (issue 15, class 10).

diffusers' ControlNet pipelines keep step ``i`` of ``n`` unless ``i/n < start`` or ``(i+1)/n > end``
(``controlnet_keep`` in ``pipeline_controlnet.py``); the official IP-Adapter pipeline switches the adapter
off the same way. With 30 steps and ``end=0.75`` that keeps steps 0..21.
"""

from __future__ import annotations

import pytest
import torch

from lookalike import Personalizer
from lookalike.adapters.attach import attach_adapters, in_window
from lookalike.adapters.spec import REGISTRY

from helpers import features_for, fresh_pipe, random_adapter


def diffusers_keep(i: int, n: int, start: float, end: float) -> bool:
    """The recipe of diffusers' ControlNet pipelines: ``1.0 - float(i / n < s or (i + 1) / n > e)``."""
    return 1.0 - float(i / n < start or (i + 1) / n > end) == 1.0


WINDOWS = [(0.0, 0.75), (0.2, 0.9), (0.5, 1.0), (0.34, 0.67), (0.0, 0.1), (0.3, 0.3), (0.0, 1.0)]


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 10, 25, 30, 50])
def test_the_steps_where_the_adapter_acts_follow_diffusers_recipe(steps):
    pipe = fresh_pipe("sd15")
    handle = attach_adapters(pipe.unet)
    pipe.scheduler.set_timesteps(steps)
    handle.scheduler = pipe.scheduler
    for start, end in WINDOWS:
        ours = [in_window(handle.span(t), (start, end)) for t in pipe.scheduler.timesteps]
        assert ours == [diffusers_keep(i, steps, start, end) for i in range(steps)], (start, end)


def test_thirty_steps_with_a_window_ending_at_three_quarters_keep_steps_0_to_21():
    pipe = fresh_pipe("sd15")
    handle = attach_adapters(pipe.unet)
    pipe.scheduler.set_timesteps(30)
    handle.scheduler = pipe.scheduler
    kept = [i for i, t in enumerate(pipe.scheduler.timesteps) if in_window(handle.span(t), (0.0, 0.75))]
    assert kept == list(range(22))


@pytest.mark.parametrize("steps, window", [(4, (0.0, 0.75)), (7, (0.2, 0.75)), (10, (0.34, 0.9))])
def test_a_window_equals_diffusers_ip_adapter_switched_on_and_off_by_the_controlnet_recipe(tmp_path, steps, window):
    """End to end: lookalike's window = diffusers' own IP-Adapter whose scale a step callback sets by the recipe."""
    from lookalike.weights.io import save_adapter

    pipe = fresh_pipe("sd15")
    p = Personalizer(pipe)
    adapter = random_adapter(REGISTRY["ip-adapter_sd15"], pipe)
    p.load_adapter(adapter)
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    feats = features_for(adapter.spec)["pooled"]
    kw = dict(prompt="a photo", num_inference_steps=steps, guidance_scale=5.0, height=32, width=32, output_type="np")
    ours = p.generate(image_embeds=[feats], window=window, generator=torch.Generator().manual_seed(0), **kw).images

    theirs = fresh_pipe("sd15")
    theirs.load_ip_adapter(str(tmp_path), subfolder="", weight_name=path.name, image_encoder_folder=None)
    start, end = window
    theirs.set_ip_adapter_scale(float(diffusers_keep(0, steps, start, end)))

    def switch(pipe, i, t, kwargs):  # after step i: the scale of step i + 1
        pipe.set_ip_adapter_scale(float(diffusers_keep(i + 1, steps, start, end)))
        return kwargs

    out = theirs(ip_adapter_image_embeds=[torch.cat([torch.zeros_like(feats), feats])],
                 callback_on_step_end=switch, generator=torch.Generator().manual_seed(0), **kw).images
    full = p.generate(image_embeds=[feats], generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(ours - out).max() <= 1e-5
    assert abs(ours - full).max() > 1e-4  # the window matters

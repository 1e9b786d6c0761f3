"""SD3.5 with InstantX's IP-Adapter: lookalike equals diffusers' SD3IPAdapterMixin (fp32, CPU), and does what
diffusers cannot: a subject per sample in a batch, several adapters, a per-block scale."""

from __future__ import annotations

import pytest
import torch
from dit_helpers import gen, patches, random_dit_adapter, sd3_kwargs, sd3_pipe

from lookalike import Personalizer
from lookalike.weights.dit_formats import save_published
from lookalike.weights.io import save_adapter

TOL = 1e-5


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_sd35_ip_matches_diffusers_in_both_layouts(tmp_path, layout):
    pipe = sd3_pipe()
    adapter = random_dit_adapter("sd35-ip", pipe, seed=1)
    if layout == "original":
        path = save_published(adapter, tmp_path / "ip-adapter.bin", "sd3-original")
    else:
        path = save_adapter(adapter, tmp_path / "ip-adapter.safetensors")
    p = Personalizer(pipe)
    p.load_adapter(str(path))
    assert len(p.adapters[0].ip_adapter) == 2  # every joint block
    emb = patches()
    ours = p.generate(image_embeds=emb, scale=0.8, generator=gen(), **sd3_kwargs()).images

    theirs = sd3_pipe()
    theirs.load_ip_adapter(str(tmp_path), weight_name=path.name, image_encoder_folder=None,
                           low_cpu_mem_usage=False)  # its meta-device path leaves a tensor on "meta"
    theirs.set_ip_adapter_scale(0.8)
    b = theirs(ip_adapter_image_embeds=torch.cat([torch.zeros_like(emb), emb]), generator=gen(),
               **sd3_kwargs()).images
    plain = sd3_pipe()(generator=gen(), **sd3_kwargs()).images
    assert abs(ours - b).max() <= TOL
    assert abs(ours - plain).max() > 1e-3, "the adapter must change the image"


def test_sd3_subject_per_sample_equals_each_sample_alone(tmp_path):
    """diffusers' SD3 crashes on per-sample embeds with batch > 1; lookalike gives each sample its subject."""
    pipe = sd3_pipe()
    p = Personalizer(pipe)
    p.load_adapter(random_dit_adapter("sd35-ip", pipe, seed=2))
    both = p.generate(image_embeds=torch.cat([patches(seed=1), patches(seed=2)]), generator=[gen(0), gen(1)],
                      **sd3_kwargs(prompt=["a photo", "a cat"])).images
    first = p.generate(image_embeds=patches(seed=1), generator=gen(0), **sd3_kwargs(prompt="a photo")).images
    second = p.generate(image_embeds=patches(seed=2), generator=gen(1), **sd3_kwargs(prompt="a cat")).images
    assert abs(both[0] - first[0]).max() <= 1e-4 and abs(both[1] - second[0]).max() <= 1e-4
    swapped = p.generate(image_embeds=patches(seed=2), generator=gen(0), **sd3_kwargs(prompt="a photo")).images
    assert abs(swapped[0] - first[0]).max() > 1e-3


def test_sd3_two_adapters_and_a_per_block_scale(tmp_path):
    pipe = sd3_pipe()
    p = Personalizer(pipe)
    p.load_adapter(random_dit_adapter("sd35-ip", pipe, seed=3))
    p.load_adapter(random_dit_adapter("sd35-ip", pipe, seed=4))
    plain = sd3_pipe()(generator=gen(), **sd3_kwargs()).images
    one = p.generate(image_embeds=[patches(seed=1), None], generator=gen(), **sd3_kwargs()).images
    two = p.generate(image_embeds=[patches(seed=1), patches(seed=2)], generator=gen(), **sd3_kwargs()).images
    off = p.generate(image_embeds=[patches(seed=1), patches(seed=2)], scale=[{"joint": [0.0, 0.0]}, 0.0],
                     generator=gen(), **sd3_kwargs()).images
    assert abs(two - one).max() > 1e-3 and abs(one - plain).max() > 1e-3
    assert (off == plain).all(), "scale 0 on every block must give the base model's exact output"


def test_sd3_masks_and_window(tmp_path):
    pipe = sd3_pipe()
    p = Personalizer(pipe)
    p.load_adapter(random_dit_adapter("sd35-ip", pipe, seed=5))
    emb = patches()
    kw = sd3_kwargs(num_inference_steps=4)
    plain = sd3_pipe()(generator=gen(), **kw).images
    full = p.generate(image_embeds=emb, generator=gen(), **kw).images
    ones = p.generate(image_embeds=emb, masks=torch.ones(1, 1, 32, 32), generator=gen(), **kw).images
    zeros = p.generate(image_embeds=emb, masks=torch.zeros(1, 1, 32, 32), generator=gen(), **kw).images
    assert abs(ones - full).max() <= TOL and abs(zeros - plain).max() <= TOL
    late = p.generate(image_embeds=emb, window=(0.5, 1.0), generator=gen(), **kw).images
    closed = p.generate(image_embeds=emb, window=(0.3, 0.3), generator=gen(), **kw).images
    assert abs(late - full).max() > 1e-4 and abs(late - plain).max() > 1e-4 and (closed == plain).all()

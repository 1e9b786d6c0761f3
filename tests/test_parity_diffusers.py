"""lookalike equals diffusers' own IP-Adapter on the same random official-layout checkpoints (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from lookalike import Personalizer
from lookalike.adapters.spec import REGISTRY
from lookalike.weights.io import save_adapter

from helpers import VARIANTS, features_for, fresh_pipe, random_adapter

TOL = 1e-5
def diffusers_embeds(feats: dict, negative: dict, spec) -> torch.Tensor:
    """diffusers' ip_adapter_image_embeds entry: [negative; positive] of the first feature."""
    key = spec.features[0]
    both = torch.cat([negative[key], feats[key]])
    return both.unsqueeze(-2) if spec.projector == "id_resampler" else both  # InstantID: one 512-d token


def configure_faceid_plus(pipe, index: int, feats: dict, negative: dict, spec) -> None:
    layer = pipe.unet.encoder_hid_proj.image_projection_layers[index]
    layer.clip_embeds = torch.cat([negative["patch"], feats["patch"]])
    layer.shortcut = spec.shortcut
    layer.shortcut_scale = 1.0


def run_both(tmp_path, base, names, scale=1.0, masks=None, seed_offset=0, images=1, steps=2, per_prompt=1):
    """Generate with lookalike and with diffusers from the same checkpoints and inputs; return both images."""
    ours, theirs = fresh_pipe(base), fresh_pipe(base)
    p = Personalizer(ours)
    files, embeds, negs, diff_embeds = [], [], [], []
    for i, name in enumerate(names):
        spec = REGISTRY[name]
        adapter = random_adapter(spec, ours, seed=i + seed_offset)
        path = save_adapter(adapter, tmp_path / f"a{i}.safetensors")
        files.append(path.name)
        p.load_adapter(str(path), identitynet=False)  # InstantID's adapter half alone, as diffusers loads it
        feats = features_for(adapter.spec, images=images, seed=10 + i)
        neg = features_for(adapter.spec, images=images, seed=20 + i)
        embeds.append(feats if len(feats) > 1 else feats[adapter.spec.features[0]])
        negs.append(neg if len(neg) > 1 else neg[adapter.spec.features[0]])
        diff_embeds.append((adapter.spec, feats, neg))
    kwargs = dict(prompt="a photo", num_inference_steps=steps, guidance_scale=5.0, height=32, width=32,
                  output_type="np", num_images_per_prompt=per_prompt)
    a = p.generate(image_embeds=embeds, negative_image_embeds=negs, scale=scale, masks=masks,
                   generator=torch.Generator().manual_seed(0), **kwargs).images

    theirs.load_ip_adapter(str(tmp_path), subfolder="", weight_name=files, image_encoder_folder=None)
    theirs.set_ip_adapter_scale(scale)
    for i, (spec, feats, neg) in enumerate(diff_embeds):
        if spec.projector == "faceid_plus":
            configure_faceid_plus(theirs, i, feats, neg, spec)
    cak = {"ip_adapter_masks": masks} if masks is not None else None
    b = theirs(ip_adapter_image_embeds=[diffusers_embeds(f, n, s) for s, f, n in diff_embeds],
               cross_attention_kwargs=cak, generator=torch.Generator().manual_seed(0), **kwargs).images
    base_img = fresh_pipe(base)(generator=torch.Generator().manual_seed(0), **kwargs).images
    return a, b, base_img


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_generates_the_same_images_as_diffusers(tmp_path, name):
    base = REGISTRY[name].base
    a, b, plain = run_both(tmp_path, base, [name])
    assert abs(a - b).max() <= TOL
    assert abs(a - plain).max() > 1e-3, "the adapter must change the image, or the test proves nothing"


def test_several_images_per_prompt_match_diffusers_with_one_projection_per_subject(tmp_path, monkeypatch):
    from lookalike.adapters.module import IPAdapter

    rows = []
    project = IPAdapter.project
    monkeypatch.setattr(IPAdapter, "project", lambda self, f: rows.append(next(iter(f.values())).shape[0])
                        or project(self, f))
    a, b, plain = run_both(tmp_path, "sd15", ["ip-adapter-plus_sd15"], per_prompt=3)
    assert a.shape[0] == 3 and abs(a - b).max() <= TOL
    assert abs(a - plain).max() > 1e-3
    assert rows == [1, 1]  # the subject and the unconditional input, each projected once for all 3 images


def test_two_adapters_at_once_match_diffusers(tmp_path):
    a, b, plain = run_both(tmp_path, "sd15", ["ip-adapter-plus_sd15", "ip-adapter_sd15"], scale=[0.7, 0.4])
    assert abs(a - b).max() <= TOL
    assert abs(a - plain).max() > 1e-3


@pytest.mark.parametrize("base,name", [("sd15", "ip-adapter_sd15"), ("sdxl", "ip-adapter-plus_sdxl_vit-h")])
def test_per_block_scale_dict_matches_diffusers(tmp_path, base, name):
    scale = {"up": {"block_0": [0.0, 1.0, 0.5]}} if base == "sdxl" else {"up": {"block_1": [0.0, 1.0]}, "mid": 0.5}
    a, b, plain = run_both(tmp_path, base, [name], scale=scale)
    assert abs(a - b).max() <= TOL
    assert abs(a - plain).max() > 1e-4


def test_regional_masks_with_two_images_match_diffusers(tmp_path):
    from diffusers.image_processor import IPAdapterMaskProcessor
    from PIL import Image

    left = Image.new("L", (32, 32), 0)
    left.paste(255, (0, 0, 16, 32))
    right = Image.new("L", (32, 32), 0)
    right.paste(255, (16, 0, 32, 32))
    masks = IPAdapterMaskProcessor().preprocess([left, right], height=32, width=32)  # (2, 1, H, W)
    masks = [masks.reshape(1, 2, 32, 32)]
    a, b, plain = run_both(tmp_path, "sd15", ["ip-adapter-plus_sd15"], scale=[[0.8, 0.6]], masks=masks, images=2)
    assert abs(a - b).max() <= TOL
    assert abs(a - plain).max() > 1e-3

"""FaceID-Plus's official generate() controls (s_scale, shortcut) and the official default prompt.

The official projection (tencent-ailab/IP-Adapter, ProjPlusModel): id tokens = LayerNorm(MLP(id)) reshaped to
T x C; out = perceiver(id tokens as queries, CLIP tokens of the aligned face); with ``shortcut`` the tokens
are ``id tokens + s_scale * out``, else ``out``. diffusers' IPAdapterFaceIDPlusImageProjection has the same
two attributes (``shortcut``, ``shortcut_scale``), so the images are compared with diffusers too.
"""

from __future__ import annotations

import pytest
import torch

from lookalike import Personalizer
from lookalike.adapters.attach import AdapterHandle
from lookalike.adapters.spec import get_spec
from lookalike.errors import LookalikeError
from lookalike.pipeline.personalizer import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT
from lookalike.weights.io import save_adapter

from helpers import features_for, fresh_pipe, random_adapter

TOL = 1e-5
KW = dict(prompt="a photo", num_inference_steps=2, guidance_scale=5.0, height=32, width=32, output_type="np")


@pytest.fixture()
def plus(tmp_path):
    pipe = fresh_pipe("sd15")
    adapter = random_adapter(get_spec("ip-adapter-faceid-plus_sd15"), pipe, seed=2)  # shortcut off by default
    path = save_adapter(adapter, tmp_path / "plus.safetensors")
    p = Personalizer(pipe)
    p.load_adapter(str(path))
    return p, path, features_for(adapter.spec, seed=4), features_for(adapter.spec, seed=5)


def official_tokens(proj, feats: dict, s_scale: float, shortcut: bool) -> torch.Tensor:
    """The official ProjPlusModel forward, written out on the adapter's weights (the oracle)."""
    ids = feats["face_id"][:, 0]
    x = proj.proj[2](proj.proj[1](proj.proj[0](ids)))
    x = proj.norm(x.reshape(-1, proj.num_tokens, proj.cross_attention_dim))
    r = proj.perceiver_resampler
    latents, clip = x, r.proj_in(feats["patch"][:, 0])
    for attn, ff in r.layers:
        latents = attn(clip, latents) + latents
        latents = ff(latents) + latents
    out = r.norm_out(r.proj_out(latents))
    return x + s_scale * out if shortcut else out


def used_tokens(p, monkeypatch, **kw) -> torch.Tensor:
    seen = []
    conditioned = AdapterHandle.conditioned

    def spy(self, inputs):
        seen.append(inputs[0].tokens)
        return conditioned(self, inputs)

    monkeypatch.setattr(AdapterHandle, "conditioned", spy)
    p.generate(generator=torch.Generator().manual_seed(0), **{**KW, "num_inference_steps": 1}, **kw)
    monkeypatch.setattr(AdapterHandle, "conditioned", conditioned)
    return seen[0][0, 0]  # (T, C) of the one image


@pytest.mark.parametrize("s_scale,shortcut", [(1.0, True), (0.3, True), (2.0, False)])
def test_s_scale_and_shortcut_change_the_tokens_as_the_official_projection(plus, monkeypatch, s_scale, shortcut):
    p, _, feats, neg = plus
    tokens = used_tokens(p, monkeypatch, image_embeds=[feats], negative_image_embeds=[neg], s_scale=s_scale,
                         shortcut=shortcut)
    with torch.no_grad():
        expected = official_tokens(p.adapters[0].image_proj, feats, s_scale, shortcut)[0]
    assert abs(tokens - expected).max() <= TOL
    default = used_tokens(p, monkeypatch, image_embeds=[feats], negative_image_embeds=[neg])
    if shortcut:
        assert abs(tokens - default).max() > 1e-3  # the controls move the tokens
    proj = p.adapters[0].image_proj
    assert (proj.s_scale, proj.shortcut) == (1.0, False)  # restored after the call


def test_s_scale_and_shortcut_images_equal_diffusers(plus):
    p, path, feats, neg = plus
    ours = p.generate(image_embeds=[feats], negative_image_embeds=[neg], s_scale=0.6, shortcut=True,
                      generator=torch.Generator().manual_seed(0), **KW).images
    plain = p.generate(image_embeds=[feats], negative_image_embeds=[neg], generator=torch.Generator().manual_seed(0),
                       **KW).images
    theirs = fresh_pipe("sd15")
    theirs.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    layer = theirs.unet.encoder_hid_proj.image_projection_layers[0]
    layer.clip_embeds = torch.cat([neg["patch"], feats["patch"]])
    layer.shortcut, layer.shortcut_scale = True, 0.6
    ref = theirs(ip_adapter_image_embeds=[torch.cat([neg["face_id"], feats["face_id"]])],
                 generator=torch.Generator().manual_seed(0), **KW).images
    assert abs(ours - ref).max() <= TOL
    assert abs(ours - plain).max() > 1e-3


def test_controls_are_refused_without_faceid_plus_and_when_not_finite(plus):
    p, _, feats, neg = plus
    with pytest.raises(LookalikeError, match="finite"):
        p.generate(image_embeds=[feats], s_scale=float("nan"), **KW)
    q = Personalizer(fresh_pipe("sd15"))
    q.load_adapter(random_adapter(get_spec("ip-adapter_sd15"), q.pipe))
    with pytest.raises(LookalikeError, match="FaceID-Plus controls"):
        q.generate(image_embeds=[features_for(q.adapters[0].spec)["pooled"]], shortcut=True, **KW)


def test_no_prompt_uses_the_official_default_prompt(plus):
    p, _, feats, neg = plus
    kw = {k: v for k, v in KW.items() if k != "prompt"}
    none = p.generate(image_embeds=[feats], negative_image_embeds=[neg], generator=torch.Generator().manual_seed(0),
                      **kw).images
    spelled = p.generate(prompt="best quality, high quality",
                         negative_prompt="monochrome, lowres, bad anatomy, worst quality, low quality",
                         image_embeds=[feats], negative_image_embeds=[neg], generator=torch.Generator().manual_seed(0),
                         **kw).images
    assert DEFAULT_PROMPT == "best quality, high quality"
    assert DEFAULT_NEGATIVE_PROMPT.startswith("monochrome")
    assert abs(none - spelled).max() == 0
    other = p.generate(prompt="a drawing", image_embeds=[feats], negative_image_embeds=[neg],
                       generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(none - other).max() > 1e-3

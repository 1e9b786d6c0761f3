"""Subjects: encode once, save/load, generate without encoders; several subjects; pipeline variants."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike.pipeline.demo import demo_personalizer
from lookalike.pipeline.subject import Subject, file_sha256

from helpers import DREAMBENCH

DOG = DREAMBENCH / "dog"
KW = dict(num_inference_steps=2, height=64, width=64, output_type="np")


def photos() -> list[Path]:
    return sorted(DOG.glob("*.jpg"))[:2]


def run(p, **kw):
    return p.generate(generator=torch.Generator().manual_seed(0), **{**KW, **kw}).images


def test_encode_gives_features_per_image_and_the_official_negative():
    p = demo_personalizer("plus")
    s = p.encode(photos())
    enc = p.encoders.by_kind["clip"]
    assert s.features["patch"].shape == (1, 2, 17, 48)
    blank = enc.encode_negative(1)["patch"]
    assert torch.equal(s.negative["patch"][0, 1], blank[0])
    assert s.sources == [file_sha256(f) for f in photos()]


def test_mean_combine_averages_the_reference_features():
    p = demo_personalizer("basic")
    cat, mean = p.encode(photos()), p.encode(photos(), combine="mean")
    assert mean.features["pooled"].shape == (1, 1, 32)
    assert torch.allclose(mean.features["pooled"][0, 0], cat.features["pooled"][0].mean(0))


def test_weighted_mean_weighs_each_reference_and_its_weights_are_saved_with_the_subject(tmp_path):
    p = demo_personalizer("plus")
    cat = p.encode(photos())
    weighted = p.encode(photos(), weights=[3, 1])  # weights alone imply combine="mean"
    assert weighted.combine == "mean" and weighted.weights == [3.0, 1.0]
    for kind in ("features", "negative"):
        per_image = getattr(cat, kind)["patch"][0]
        expected = (3 * per_image[0] + per_image[1]) / 4
        assert torch.allclose(getattr(weighted, kind)["patch"][0, 0], expected, atol=1e-6)
    first_only = p.encode(photos(), combine="mean", weights=[1, 0])
    assert torch.equal(first_only.features["patch"], p.encode(photos()[:1]).features["patch"])
    loaded = Subject.load(weighted.save(tmp_path / "w.safetensors"))
    assert (loaded.combine, loaded.weights) == ("mean", [3.0, 1.0])


@pytest.mark.parametrize("combine, weights, words", [
    ("concat", [1, 2], "combine the images with mean"),
    ("mean", [1], "1 reference weight(s) for 2 reference image(s)"),
    ("mean", [1, float("nan")], "non-negative"),
    ("mean", [0, 0], "positive sum"),
    ("sum", None, "'concat' or 'mean'"),
])
def test_reference_weights_that_do_not_fit_the_images_are_refused(combine, weights, words):
    from lookalike.errors import LookalikeError

    with pytest.raises(LookalikeError, match=re.escape(words)):
        demo_personalizer("basic").encode(photos(), combine=combine, weights=weights)


def test_negative_photos_replace_the_official_negative_and_guidance_moves_away_from_them(tmp_path):
    p = demo_personalizer("plus")
    positive, negative = photos()[:1], photos()[1:]
    s = p.encode(positive, negative_images=negative)
    away = p.encode(negative).features["patch"]
    assert torch.equal(s.negative["patch"], away)
    assert torch.equal(s.features["patch"], p.encode(positive).features["patch"])
    assert s.negative_sources == [file_sha256(negative[0])]
    with_photo = run(p, prompt="a dog", subject=s)
    as_embeds = run(p, prompt="a dog", image_embeds=[s.features["patch"]], negative_image_embeds=[away])
    assert np.array_equal(with_photo, as_embeds)
    assert not np.allclose(with_photo, run(p, prompt="a dog", subject=p.encode(positive)), atol=1e-3)
    assert Subject.load(s.save(tmp_path / "s.safetensors")).negative_sources == s.negative_sources


def test_negative_photos_are_refused_for_faceid_whose_negative_is_zeros():
    from lookalike.errors import LookalikeError

    with pytest.raises(LookalikeError, match="negative reference photos are for CLIP-image adapters"):
        demo_personalizer("basic").encode(photos()[:1], adapter="faceid", negative_images=photos()[1:])


def test_saved_subject_loads_bit_exact_and_generates_without_running_an_encoder(tmp_path):
    p = demo_personalizer("plus")
    s = p.encode(photos())
    direct = run(p, prompt="a dog", subject=s)
    path = s.save(tmp_path / "dog.safetensors")
    loaded = Subject.load(path)
    assert all(torch.equal(loaded.features[k], s.features[k]) for k in s.features)
    assert (loaded.adapter, loaded.encoder, loaded.sources) == (s.adapter, s.encoder, s.sources)

    class Refuse:
        kinds = ("pooled", "patch")

        def encode(self, *a, **k):
            raise AssertionError("an encoder ran")

        encode_negative = encode

    p.set_encoder(Refuse())
    assert (run(p, prompt="a dog", subject=loaded) == direct).all()


def test_generating_from_a_subject_equals_passing_its_features():
    p = demo_personalizer("plus")
    s = p.encode(photos())
    a = run(p, prompt="a dog", subject=s)
    b = run(p, prompt="a dog", image_embeds=[s.features["patch"]], negative_image_embeds=[s.negative["patch"]])
    assert (a == b).all()


def test_prompts_with_a_subject_each_equal_each_alone():
    p = demo_personalizer("basic")
    one = p.encode(photos()[:1])
    two = p.encode(photos()[1:])
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    both = run(p, prompt=["a dog", "a cat"], subject=[one, two], latents=latents)
    alone = [run(p, prompt=t, subject=s, latents=latents[i:i + 1]) for i, (t, s) in
             enumerate([("a dog", one), ("a cat", two)])]
    assert abs(both[0] - alone[0][0]).max() <= 1e-5 and abs(both[1] - alone[1][0]).max() <= 1e-5


def test_two_subjects_in_boxes_equal_the_same_masks_given_by_hand():
    p = demo_personalizer("plus")
    a, b = p.encode(photos()[:1]), p.encode(photos()[1:])
    boxed = run(p, prompt="two dogs", subjects=[a, b], regions=[(0, 0, 0.5, 1), (32, 0, 64, 64)])
    masks = torch.zeros(1, 2, 64, 64)
    masks[0, 0, :, :32] = 1
    masks[0, 1, :, 32:] = 1
    by_hand = run(p, prompt="two dogs", image_embeds=[torch.cat([a.features["patch"], b.features["patch"]], 1)],
                  negative_image_embeds=[torch.cat([a.negative["patch"], b.negative["patch"]], 1)], masks=[masks])
    assert (boxed == by_hand).all()
    single = run(p, prompt="two dogs", subject=a)
    assert abs(boxed - single).max() > 1e-4


def test_subject_for_an_adapter_that_is_not_loaded_is_refused_with_a_sentence():
    from lookalike.errors import LookalikeError

    p = demo_personalizer("plus")
    s = p.encode([Image.new("RGB", (80, 60), (200, 30, 30))])
    s.adapter = "ip-adapter_sd15"
    with pytest.raises(LookalikeError, match="is not loaded"):
        run(p, prompt="x", subject=s)


def _variant_pipe(kind: str, base_pipe):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline

    if kind == "img2img":
        return StableDiffusionImg2ImgPipeline(**base_pipe.components)
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(base_pipe.unet, conditioning_embedding_out_channels=(16, 32))
    return StableDiffusionControlNetPipeline(**base_pipe.components, controlnet=controlnet)


@pytest.mark.parametrize("kind", ["img2img", "controlnet"])
def test_img2img_and_controlnet_pipelines_take_the_adapter_and_controlnet_sees_no_image_tokens(kind):
    from lookalike import Personalizer
    from lookalike.pipeline.demo import demo_adapter, demo_clip_encoder

    base = demo_personalizer(None).pipe
    pipe = _variant_pipe(kind, base)
    p = Personalizer(pipe, image_encoder=demo_clip_encoder())
    p.load_adapter(demo_adapter("plus", pipe.unet))
    s = p.encode([Image.new("RGB", (64, 64), (10, 200, 30))])
    image = Image.new("RGB", (64, 64), (120, 120, 120))
    extra = {"image": image} if kind == "img2img" else {"image": image}
    if kind == "controlnet":
        procs_before = dict(pipe.controlnet.attn_processors)
    with_adapter = run(p, prompt="x", subject=s, **extra)
    off = run(p, prompt="x", subject=s, scale=0.0, **extra)
    assert abs(with_adapter - off).max() > 1e-4
    if kind == "controlnet":
        assert all(pipe.controlnet.attn_processors[k] is v for k, v in procs_before.items())


def test_from_pretrained_loads_a_folder_in_the_dtype_asked_under_either_keyword_without_deprecation(tmp_path):
    import warnings

    from lookalike.errors import LookalikeError
    from lookalike.pipeline.personalizer import Personalizer
    from lookalike.pipeline.tiny import tiny_pipeline

    folder = tmp_path / "tiny-sd15"
    tiny_pipeline("sd15", seed=0).save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*torch_dtype.*")  # diffusers >= 0.40 deprecates the old name
        assert Personalizer.from_pretrained(folder).pipe.unet.dtype == torch.float32
        assert Personalizer.from_pretrained(folder, dtype=torch.bfloat16).pipe.unet.dtype == torch.bfloat16
        assert Personalizer.from_pretrained(folder, torch_dtype=torch.float16).pipe.unet.dtype == torch.float16
    with pytest.raises(LookalikeError, match="pass only dtype"):
        Personalizer.from_pretrained(folder, dtype=torch.float16, torch_dtype=torch.bfloat16)

"""SigLIP behind the ImageEncoder protocol: a tiny random SiglipVisionModel saved and loaded, its features equal to
transformers' own processor + model, and subjects encoded with it drive InstantX FLUX and SD3.5 adapters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dit_helpers import EMBED, flux_kwargs, flux_pipe, gen, random_dit_adapter, sd3_pipe
from PIL import Image

from lookalike import Personalizer
from lookalike.encoders.base import ImageEncoder
from lookalike.encoders.siglip import SiglipImageEncoder
from lookalike.errors import LookalikeError


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=EMBED, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                                image_size=32, patch_size=8)
    folder = tmp_path_factory.mktemp("siglip")
    SiglipVisionModel(config).save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def photo(seed: int = 0, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def test_siglip_features_equal_transformers_processor_and_model(siglip_dir):
    from transformers import SiglipImageProcessor, SiglipVisionModel

    enc = SiglipImageEncoder.from_pretrained(siglip_dir)
    assert isinstance(enc, ImageEncoder) and enc.embed_dims == {"pooled": EMBED, "patch": EMBED}
    feats = enc.encode([photo()], crop="resize")
    assert feats["pooled"].shape == (1, EMBED) and feats["patch"].shape == (1, 16, EMBED)
    pixels = SiglipImageProcessor.from_pretrained(siglip_dir)(images=[photo()], return_tensors="pt").pixel_values
    out = SiglipVisionModel.from_pretrained(siglip_dir)(pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(feats["pooled"], out.pooler_output, atol=1e-4, rtol=0)
    torch.testing.assert_close(feats["patch"], out.hidden_states[-2], atol=1e-4, rtol=0)
    assert (enc.encode_negative(2)["patch"] == 0).all()


def test_siglip_refuses_a_missing_folder(tmp_path):
    with pytest.raises(LookalikeError, match="does not exist"):
        SiglipImageEncoder.from_pretrained(tmp_path / "nothing")


def test_siglip_subjects_drive_instantx_flux_and_sd35(siglip_dir):
    enc = SiglipImageEncoder.from_pretrained(siglip_dir)
    pipe = flux_pipe()
    p = Personalizer(pipe, image_encoder=enc.model)  # a bare SiglipVisionModel is wrapped like a CLIP one
    p.load_adapter(random_dit_adapter("flux-ip-instantx", pipe, seed=1))
    subject = p.encode([photo(1)])
    assert subject.features["pooled"].shape == (1, 1, EMBED)
    plain = flux_pipe()(generator=gen(), **flux_kwargs()).images
    a = p.generate(subject=subject, generator=gen(), **flux_kwargs()).images
    assert abs(a - plain).max() > 1e-3

    sd3 = sd3_pipe()
    q = Personalizer(sd3, image_encoder=enc)
    q.load_adapter(random_dit_adapter("sd35-ip", sd3, seed=2))
    subject = q.encode([photo(2)])
    assert subject.features["patch"].shape == (1, 1, 16, EMBED) and (subject.negative["patch"] == 0).all()
    kw = dict(prompt="a photo", num_inference_steps=2, height=32, width=32, output_type="np", max_sequence_length=16)
    b = q.generate(subject=subject, generator=gen(), **kw).images
    assert abs(b - sd3_pipe()(generator=gen(), **kw).images).max() > 1e-3

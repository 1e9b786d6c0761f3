"""Tests for lookalike.encoders.clip: loading tiny CLIP vision models from disk and encoding with them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    BertConfig,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

from lookalike.encoders.base import ImageEncoder
from lookalike.encoders.clip import ClipImageEncoder
from lookalike.encoders.prepare import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_image, to_clip_pixels
from lookalike.errors import LookalikeError

from helpers import DREAMBENCH

PROCESSOR_MEAN = (0.5, 0.4, 0.3)
PROCESSOR_STD = (0.2, 0.25, 0.3)


def _tiny_vision_config() -> CLIPVisionConfig:
    """A 2-layer CLIP vision config: 32 px images, 8 px patches (16 patches + 1 class token)."""
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )


def _save_processor_config(folder: Path, size: int = 32) -> None:
    """Write a CLIPImageProcessor config (size/crop `size`, non-default mean/std) into folder."""
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor as processor_class
    processor = processor_class(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(PROCESSOR_MEAN),
        image_std=list(PROCESSOR_STD),
    )
    processor.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a seeded tiny CLIPVisionModelWithProjection and its processor config."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(_tiny_vision_config()).save_pretrained(folder)
    _save_processor_config(folder)
    return folder


@pytest.fixture(scope="module")
def encoder(tiny_clip_dir: Path) -> ClipImageEncoder:
    """The tiny model loaded through ClipImageEncoder.from_pretrained."""
    return ClipImageEncoder.from_pretrained(tiny_clip_dir)


def _photos(n: int) -> list[Image.Image]:
    """n seeded random RGB images of different sizes."""
    rng = np.random.default_rng(1)
    return [
        Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 50 - 3 * i, 3), dtype=np.uint8)) for i in range(n)
    ]


def test_from_pretrained_encodes_pooled_and_patch_with_expected_shapes(encoder: ClipImageEncoder) -> None:
    features = encoder.encode(_photos(3))
    assert set(features) == {"pooled", "patch"}
    assert features["pooled"].shape == (3, 16) and features["patch"].shape == (3, 17, 32)
    assert encoder.embed_dims == {"pooled": 16, "patch": 32}
    assert encoder.num_patch_tokens == 17


def test_from_pretrained_reads_size_mean_and_std_from_processor_config(encoder: ClipImageEncoder) -> None:
    assert encoder.image_size == 32
    assert encoder.mean == pytest.approx(PROCESSOR_MEAN) and encoder.std == pytest.approx(PROCESSOR_STD)


def test_patch_equals_the_models_own_penultimate_hidden_states_exactly(encoder: ClipImageEncoder) -> None:
    images = _photos(2)
    pixels = to_clip_pixels(images, 32, PROCESSOR_MEAN, PROCESSOR_STD)  # (N, 3, 32, 32)
    with torch.no_grad():
        out = encoder.model(pixel_values=pixels, output_hidden_states=True)
    features = encoder.encode(images)
    assert torch.equal(features["patch"], out.hidden_states[-2])
    assert torch.equal(features["pooled"], out.image_embeds)


def test_negative_patch_equals_the_model_run_on_zero_pixels(encoder: ClipImageEncoder) -> None:
    with torch.no_grad():
        zero_one = encoder.model(pixel_values=torch.zeros(1, 3, 32, 32), output_hidden_states=True)
        zero_batch = encoder.model(pixel_values=torch.zeros(3, 3, 32, 32), output_hidden_states=True)
    negative = encoder.encode_negative(3)["patch"]  # (3, 17, 32)
    assert negative.shape == (3, 17, 32)
    assert torch.equal(negative, zero_one.hidden_states[-2].expand(3, -1, -1))
    torch.testing.assert_close(negative, zero_batch.hidden_states[-2], rtol=0, atol=1e-5)


def test_negative_pooled_is_zeros(encoder: ClipImageEncoder) -> None:
    pooled = encoder.encode_negative(4)["pooled"]
    assert pooled.shape == (4, 16) and pooled.dtype == torch.float32
    assert not pooled.any()


def test_encode_negative_rejects_a_non_positive_batch_size(encoder: ClipImageEncoder) -> None:
    with pytest.raises(LookalikeError, match="positive integer"):
        encoder.encode_negative(0)


def test_kinds_limits_what_is_computed_and_returned(tiny_clip_dir: Path) -> None:
    patch_only = ClipImageEncoder.from_pretrained(tiny_clip_dir, kinds=("patch",))
    assert set(patch_only.encode(_photos(1))) == {"patch"}
    assert set(patch_only.encode_negative(2)) == {"patch"}
    assert patch_only.embed_dims == {"patch": 32}
    with pytest.raises(LookalikeError, match="face_id"):
        ClipImageEncoder.from_pretrained(tiny_clip_dir, kinds=("face_id",))


def test_encoder_satisfies_the_image_encoder_protocol(encoder: ClipImageEncoder) -> None:
    assert isinstance(encoder, ImageEncoder)
    assert encoder.kinds == ("pooled", "patch")


def test_dtype_argument_sets_model_and_feature_dtype(tiny_clip_dir: Path) -> None:
    encoder64 = ClipImageEncoder.from_pretrained(tiny_clip_dir, device="cpu", dtype=torch.float64)
    assert encoder64.dtype == torch.float64 and encoder64.device == torch.device("cpu")
    features = {
        **encoder64.encode(_photos(1)),
        **{f"neg_{k}": v for k, v in encoder64.encode_negative(1).items()},
    }
    assert all(value.dtype == torch.float64 for value in features.values())


def test_features_can_feed_trainable_layers(encoder: ClipImageEncoder) -> None:
    features = encoder.encode(_photos(2))
    projection = torch.nn.Linear(16, 4)
    projection(features["pooled"]).sum().backward()  # would fail on inference-mode tensors
    assert projection.weight.grad is not None and not features["patch"].requires_grad


def test_crop_modes_give_different_features_for_a_wide_image(encoder: ClipImageEncoder) -> None:
    wide = Image.fromarray(np.random.default_rng(2).integers(0, 256, (30, 90, 3), dtype=np.uint8))
    center, pad = encoder.encode([wide], crop="center"), encoder.encode([wide], crop="pad")
    assert not torch.allclose(center["pooled"], pad["pooled"])
    with pytest.raises(LookalikeError, match="unknown crop mode"):
        encoder.encode([wide], crop="zoom")  # type: ignore[arg-type]


def test_without_processor_config_uses_openai_defaults_and_the_models_image_size(tmp_path: Path) -> None:
    CLIPVisionModelWithProjection(_tiny_vision_config()).save_pretrained(tmp_path)
    encoder = ClipImageEncoder.from_pretrained(tmp_path)
    assert encoder.image_size == 32
    assert encoder.mean == pytest.approx(OPENAI_CLIP_MEAN) and encoder.std == pytest.approx(OPENAI_CLIP_STD)


def test_constructor_wraps_an_in_memory_model_without_loading() -> None:
    model = CLIPVisionModelWithProjection(_tiny_vision_config())
    encoder = ClipImageEncoder(model, image_size=32, mean=PROCESSOR_MEAN, std=PROCESSOR_STD)
    assert encoder.encode(_photos(2))["patch"].shape == (2, 17, 32)
    with pytest.raises(LookalikeError, match="does not match the 32 pixels"):
        ClipImageEncoder(model, image_size=224)


def test_subfolder_loads_the_image_encoder_of_a_repo_folder(tmp_path: Path) -> None:
    CLIPVisionModelWithProjection(_tiny_vision_config()).save_pretrained(tmp_path / "image_encoder")
    encoder = ClipImageEncoder.from_pretrained(tmp_path, subfolder="image_encoder")
    assert encoder.embed_dims == {"pooled": 16, "patch": 32}
    with pytest.raises(LookalikeError, match="subfolder='image_encoder'"):
        ClipImageEncoder.from_pretrained(tmp_path)


def test_full_clip_checkpoint_loads_its_vision_tower(tmp_path: Path) -> None:
    text = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "vocab_size": 99,
    }
    config = CLIPConfig(text_config=text, vision_config=_tiny_vision_config().to_dict(), projection_dim=16)
    torch.manual_seed(0)
    clip = CLIPModel(config).eval()
    clip.save_pretrained(tmp_path)
    encoder = ClipImageEncoder.from_pretrained(tmp_path)
    image = _photos(1)
    pixels = to_clip_pixels(image, 32)  # (1, 3, 32, 32)
    with torch.no_grad():
        expected = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)  # (1, 16)
    torch.testing.assert_close(encoder.encode(image)["pooled"], expected)


def test_missing_folder_raises_lookalike_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(LookalikeError, match=r"no_such_dir'.*does not exist"):
        ClipImageEncoder.from_pretrained(tmp_path / "no_such_dir")


def test_folder_without_config_raises_lookalike_error(tmp_path: Path) -> None:
    with pytest.raises(LookalikeError, match="no config.json"):
        ClipImageEncoder.from_pretrained(tmp_path)


def test_non_clip_model_folder_raises_lookalike_error(tmp_path: Path) -> None:
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(LookalikeError, match="holds a bert model, not a CLIP vision model"):
        ClipImageEncoder.from_pretrained(tmp_path)


def test_vision_model_without_projection_is_refused_for_pooled_but_fine_for_patch(tmp_path: Path) -> None:
    CLIPVisionModel(_tiny_vision_config()).save_pretrained(tmp_path)
    with pytest.raises(LookalikeError, match="visual_projection"):
        ClipImageEncoder.from_pretrained(tmp_path)
    assert ClipImageEncoder.from_pretrained(tmp_path, kinds=("patch",)).encode(_photos(1))["patch"].shape == (
        1,
        17,
        32,
    )


def test_processor_crop_size_that_mismatches_the_model_raises(tmp_path: Path) -> None:
    CLIPVisionModelWithProjection(_tiny_vision_config()).save_pretrained(tmp_path)
    _save_processor_config(tmp_path, size=48)
    with pytest.raises(LookalikeError, match="image size 48 does not match the 32 pixels"):
        ClipImageEncoder.from_pretrained(tmp_path)


def test_corrupt_processor_config_raises_lookalike_error_naming_it(tmp_path: Path) -> None:
    CLIPVisionModelWithProjection(_tiny_vision_config()).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(LookalikeError, match="preprocessor_config.json"):
        ClipImageEncoder.from_pretrained(tmp_path)


def test_real_photo_encodes_in_every_crop_mode(encoder: ClipImageEncoder) -> None:
    photo_path = DREAMBENCH / "dog" / "00.jpg"
    photo = load_image(photo_path)
    for crop in ("center", "pad", "resize"):
        features = encoder.encode([photo], crop=crop)
        assert features["pooled"].shape == (1, 16) and torch.isfinite(features["patch"]).all()


def test_config_json_on_disk_is_what_the_encoder_reports(
    tiny_clip_dir: Path, encoder: ClipImageEncoder
) -> None:
    config = json.loads((tiny_clip_dir / "config.json").read_text())
    assert encoder.embed_dims == {"pooled": config["projection_dim"], "patch": config["hidden_size"]}

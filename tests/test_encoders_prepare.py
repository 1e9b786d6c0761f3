"""Tests for lookalike.encoders.prepare: loading, mode conversion, square fitting, CLIP pixel parity."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike.encoders.prepare import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    fit_square,
    load_image,
    to_clip_pixels,
    to_rgb,
)
from lookalike.errors import LookalikeError

from helpers import DREAMBENCH


def _clip_processor(**kwargs: object):
    """The PIL-backed transformers CLIPImageProcessor (no torchvision), default OpenAI config."""
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers 4.x: CLIPImageProcessor is the PIL/numpy one
        from transformers import CLIPImageProcessor as processor_class
    return processor_class(**kwargs)


def _image_in_mode(mode: str, size: tuple[int, int] = (12, 8)) -> Image.Image:
    """A small image in mode, with non-trivial content (a horizontal ramp)."""
    rgb = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    rgb[..., 0] = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :]
    rgb[..., 2] = 200
    base = Image.fromarray(rgb)
    if mode == "I;16":
        return Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
    if mode == "I":
        return Image.fromarray(np.asarray(base.convert("L")).astype(np.int32) * 1000)
    if mode == "F":
        return Image.fromarray(np.asarray(base.convert("L")).astype(np.float32) / 255.0)
    if mode == "PA":
        return base.convert("P").convert("PA")
    return base.convert(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "La", "PA", "P", "CMYK", "I;16", "I", "F", "L", "1", "YCbCr"])
def test_every_image_mode_converts_to_rgb(mode: str) -> None:
    image = _image_in_mode(mode)
    assert image.mode == mode
    rgb = load_image(image)
    assert rgb.mode == "RGB" and rgb.size == image.size


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [
        ("RGBA", ".png"),
        ("LA", ".png"),
        ("P", ".png"),
        ("I;16", ".png"),
        ("L", ".png"),
        ("1", ".png"),
        ("CMYK", ".tif"),
        ("F", ".tif"),
    ],
)
def test_image_files_in_every_mode_load_as_rgb(tmp_path: Path, mode: str, suffix: str) -> None:
    path = tmp_path / f"image{suffix}"
    _image_in_mode(mode).save(path)
    assert Image.open(path).mode == mode
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (12, 8)


def test_transparent_pixels_are_composited_over_white() -> None:
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # fully transparent red
    rgba[0, 1] = (255, 0, 0, 255)  # opaque red
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black
    out = np.asarray(to_rgb(Image.fromarray(rgba)))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (255, 0, 0)
    assert all(abs(int(v) - 127) <= 1 for v in out[0, 2])


def test_palette_transparency_index_is_composited_over_white() -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((1, 0), 1)  # green; index 0 (black) is the transparent one
    image.info["transparency"] = 0
    out = np.asarray(load_image(image))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (0, 255, 0)


def test_sixteen_bit_greyscale_is_scaled_to_8_bit_not_clipped() -> None:
    image = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert image.mode == "I;16"
    out = np.asarray(to_rgb(image))[0, :, 0]
    assert out.tolist() == [0, 128, 255]  # plain convert("L") would clip 32896 to 255


def test_float_image_in_unit_range_scales_to_full_8_bit_range() -> None:
    out = np.asarray(to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))))[0, :, 0]
    assert out.tolist() == [0, 128, 255]


def test_32_bit_image_beyond_16_bit_range_is_stretched_by_its_own_min_and_max() -> None:
    image = Image.fromarray(np.array([[-100_000, 0, 100_000]], dtype=np.int32))
    assert image.mode == "I"
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 128, 255]


def _jpeg_with_orientation(path: Path, orientation: int) -> None:
    """Write a 40x20 JPEG, left half red and right half blue, tagged with an EXIF orientation."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, quality=95)


def test_exif_orientation_6_is_applied_when_loading_a_file(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    _jpeg_with_orientation(path, 6)
    assert Image.open(path).size == (40, 20)
    image = load_image(path)
    assert image.size == (20, 40)
    top, bottom = np.asarray(image)[5, 10], np.asarray(image)[34, 10]
    assert top[0] > 200 and top[2] < 60  # orientation 6 = rotate 90 degrees clockwise: left (red) goes on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_exif_orientation_is_applied_to_pil_images_too(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    _jpeg_with_orientation(path, 6)
    assert load_image(Image.open(path)).size == (20, 40)


def test_missing_file_raises_lookalike_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(LookalikeError, match=r"nope\.jpg'.*no such file"):
        load_image(tmp_path / "nope.jpg")


def test_directory_raises_lookalike_error_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    with pytest.raises(LookalikeError, match=r"photos'.*directory"):
        load_image(folder)


def test_text_file_raises_lookalike_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a picture\n")
    with pytest.raises(LookalikeError, match=r"notes\.txt'.*not an image file"):
        load_image(str(path))


def test_empty_file_raises_lookalike_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(LookalikeError, match=r"empty\.png'"):
        load_image(path)


def test_truncated_jpeg_raises_lookalike_error_naming_it(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buffer, "JPEG"
    )
    path = tmp_path / "broken.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(LookalikeError, match=r"broken\.jpg'.*truncated or corrupt"):
        load_image(path)


def test_zero_size_pil_image_raises_lookalike_error() -> None:
    with pytest.raises(LookalikeError, match="empty"):
        load_image(Image.new("RGB", (0, 5)))


def test_image_above_max_pixels_raises_lookalike_error(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (20, 20)).save(path)
    with pytest.raises(LookalikeError, match=r"big\.png'.*above the limit of 100 pixels"):
        load_image(path, max_pixels=100)


def test_pillow_decompression_bomb_becomes_lookalike_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bomb.png"
    Image.new("RGB", (30, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow errors above twice this
    with pytest.raises(LookalikeError, match=r"bomb\.png'.*decompression-bomb"):
        load_image(path, max_pixels=None)


def _wide_image_with_coloured_edges() -> Image.Image:
    """A 300x100 grey image with a red left edge and a blue right edge (20 px each)."""
    image = Image.new("RGB", (300, 100), (128, 128, 128))
    image.paste((255, 0, 0), (0, 0, 20, 100))
    image.paste((0, 0, 255), (280, 0, 300, 100))
    return image


def test_pad_mode_keeps_both_edges_while_center_crop_loses_them() -> None:
    image = _wide_image_with_coloured_edges()
    padded = np.asarray(fit_square(image, 64, "pad")).astype(int)
    assert padded.shape == (64, 64, 3)
    assert padded[32, 1].tolist() == pytest.approx([255, 0, 0], abs=40)
    assert padded[32, 62].tolist() == pytest.approx([0, 0, 255], abs=40)
    assert padded[2, 32].tolist() == [0, 0, 0]  # the padding, in the default black fill
    cropped = np.asarray(fit_square(image, 64, "center")).astype(int)
    assert cropped[32, 1].tolist() == pytest.approx([128, 128, 128], abs=2)
    assert cropped[32, 62].tolist() == pytest.approx([128, 128, 128], abs=2)


def test_pad_mode_uses_the_fill_colour() -> None:
    padded = fit_square(_wide_image_with_coloured_edges(), 64, "pad", fill=(255, 255, 255))
    assert padded.getpixel((32, 2)) == (255, 255, 255)


def test_resize_mode_squeezes_the_whole_image_into_the_square() -> None:
    squeezed = np.asarray(fit_square(_wide_image_with_coloured_edges(), 60, "resize")).astype(int)
    assert squeezed.shape == (60, 60, 3)
    for row in (0, 30, 59):  # the edges span every row: nothing padded, nothing cropped
        assert squeezed[row, 0].tolist() == pytest.approx([255, 0, 0], abs=40)
        assert squeezed[row, 59].tolist() == pytest.approx([0, 0, 255], abs=40)


def test_fit_square_rejects_an_unknown_crop_mode() -> None:
    with pytest.raises(LookalikeError, match="unknown crop mode 'squash'"):
        fit_square(Image.new("RGB", (4, 4)), 8, "squash")  # type: ignore[arg-type]


def test_to_clip_pixels_returns_normalised_float32_batch() -> None:
    white = Image.new("RGB", (50, 30), (255, 255, 255))
    pixels = to_clip_pixels([white, white.convert("L")], size=32)
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    expected = (1.0 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    assert torch.allclose(pixels[:, :, 10, 10], expected.expand(2, 3), atol=1e-6)


def test_to_clip_pixels_rejects_an_empty_list() -> None:
    with pytest.raises(LookalikeError, match="at least one image"):
        to_clip_pixels([])


def _max_abs_diff_to_processor(images: list[Image.Image], size: int = 224) -> float:
    """Largest |ours - CLIPImageProcessor| over a batch, default OpenAI config at size."""
    processor = _clip_processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    theirs = torch.as_tensor(np.asarray(processor(images=images, return_tensors="np")["pixel_values"]))
    ours = to_clip_pixels(images, size=size)
    assert ours.shape == theirs.shape
    return float((ours - theirs.float()).abs().max())


def test_center_mode_matches_clip_image_processor_on_random_sized_noise() -> None:
    rng = np.random.default_rng(0)
    sizes = [(301, 157), (157, 301), (224, 224), (97, 500), (640, 223), (50, 40)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    assert _max_abs_diff_to_processor(images) < 1e-2


def test_center_mode_matches_clip_image_processor_on_random_sized_real_photos() -> None:
    photos = sorted(DREAMBENCH.glob("*/00.jpg"))[:4]
    assert len(photos) == 4
    rng = random.Random(0)
    images = []
    for path in photos:
        photo = load_image(path)
        width, height = rng.randint(120, 700), rng.randint(120, 700)  # random aspect, up- and down-scaling
        images.append(photo.resize((width, height), Image.Resampling.BILINEAR))
    assert _max_abs_diff_to_processor(images) < 1e-2

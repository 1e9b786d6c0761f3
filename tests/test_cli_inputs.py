"""The command line on bad and unusual inputs: each gets its one-line error (exit 2) or the right result."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike import cli

from helpers import DREAMBENCH, YUNET, tiny_arcface_pack

DOG = DREAMBENCH / "dog" / "00.jpg"


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (a decompression bomb), with a token of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
                     + chunk(b"IEND", b""))
    return path


def photo(tmp_path: Path) -> Image.Image:
    if DOG.is_file():
        return Image.open(DOG).convert("RGB")
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))


def bad_file(kind: str, tmp_path: Path) -> Path:
    """Write one kind of bad or unusual reference file and return its path."""
    good = photo(tmp_path)
    if kind == "truncated jpeg":
        full = tmp_path / "full.jpg"
        good.save(full, quality=90)
        (tmp_path / "cut.jpg").write_bytes(full.read_bytes()[: full.stat().st_size // 3])
        return tmp_path / "cut.jpg"
    if kind == "zero-byte file":
        (tmp_path / "empty.jpg").write_bytes(b"")
        return tmp_path / "empty.jpg"
    if kind == "text named .png":
        (tmp_path / "notes.png").write_text("not an image at all\n")
        return tmp_path / "notes.png"
    if kind == "1x1 image":
        Image.new("RGB", (1, 1), (255, 0, 0)).save(tmp_path / "dot.png")
        return tmp_path / "dot.png"
    if kind == "20000x20000 header":
        return png_header_only(tmp_path / "bomb.png", 20000, 20000)
    if kind == "cmyk":
        good.convert("CMYK").save(tmp_path / "cmyk.jpg")
        return tmp_path / "cmyk.jpg"
    if kind == "16-bit png":
        grey = (np.asarray(good.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        Image.fromarray(grey).save(tmp_path / "deep.png")
        return tmp_path / "deep.png"
    if kind == "exif-rotated":
        exif = Image.Exif()
        exif[0x0112] = 6
        good.save(tmp_path / "rotated.jpg", exif=exif)
        return tmp_path / "rotated.jpg"
    raise AssertionError(kind)


def run(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = cli.main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


ERRORS = {
    "truncated jpeg": "truncated or corrupt",
    "zero-byte file": "cut.jpg|empty|not an image",
    "text named .png": "not an image file",
    "1x1 image": "only 1x1 pixels",
    "20000x20000 header": "pixels",
}


@pytest.mark.parametrize("kind", list(ERRORS))
def test_bad_reference_exits_2_with_one_error_line_naming_the_file(tmp_path, capsys, kind):
    path = bad_file(kind, tmp_path)
    out = tmp_path / "out.png"
    code, err = run(["generate", "--model", "demo", "--reference", str(path), "--prompt", "x", "--out", str(out),
                     "--steps", "1"], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and path.name in err[0]
    assert not out.exists()


@pytest.mark.parametrize("kind", ["cmyk", "16-bit png", "exif-rotated"])
def test_unusual_but_valid_references_generate_an_image(tmp_path, capsys, kind):
    path = bad_file(kind, tmp_path)
    out = tmp_path / "out.png"
    code, err = run(["generate", "--model", "demo", "--reference", str(path), "--prompt", "x", "--out", str(out),
                     "--steps", "1"], capsys)
    assert code == 0, err
    assert Image.open(out).size == (32, 32)


def test_exif_rotation_changes_what_the_encoder_sees(tmp_path, capsys):
    """The rotated file encodes like the upright pixels turned by the tag, not like the raw pixels."""
    from lookalike.pipeline.demo import demo_personalizer

    path = bad_file("exif-rotated", tmp_path)
    raw = Image.fromarray(np.asarray(Image.open(path).convert("RGB")))  # stored pixels, no orientation tag
    p = demo_personalizer("basic")
    from_file = p.encode([path]).features["pooled"]
    upright = p.encode([raw.transpose(Image.Transpose.ROTATE_270)]).features["pooled"]
    unrotated = p.encode([raw]).features["pooled"]
    assert torch.allclose(from_file, upright, atol=1e-5)
    assert not torch.allclose(from_file, unrotated, atol=1e-3)


def faceid_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A FaceID adapter for the demo model (tiny ArcFace widths) and the tiny ArcFace pack."""
    from lookalike.adapters.module import IPAdapter
    from lookalike.adapters.spec import REGISTRY
    from lookalike.pipeline.demo import demo_personalizer
    from lookalike.weights.io import save_adapter

    pack = tiny_arcface_pack(tmp_path / "faces")
    unet = demo_personalizer(None).pipe.unet
    spec = REGISTRY["ip-adapter-faceid-portrait_sd15"].with_(cross_attention_dim=32)
    torch.manual_seed(0)
    return save_adapter(IPAdapter.for_unet(spec, unet), tmp_path / "faceid.safetensors"), pack


def test_photo_with_no_face_exits_2_naming_it_and_a_face_photo_works(tmp_path, capsys):
    from skimage import data

    ckpt, pack = faceid_checkpoint(tmp_path)
    teapot = DREAMBENCH / "teapot" / "00.jpg"
    face = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(face)
    common = ["--model", "tiny-random", "--adapter", str(ckpt), "--face-models", str(pack), "--face-detector", "yunet",
              "--yunet-model", str(YUNET), "--prompt", "a portrait", "--steps", "1"]
    code, err = run(["generate", "--reference", str(teapot), "--out", str(tmp_path / "no.png"), *common], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: no face found") and "00.jpg" in err[0]
    code, err = run(["generate", "--reference", str(face), "--out", str(tmp_path / "yes.png"), *common], capsys)
    assert code == 0, err
    assert (tmp_path / "yes.png").is_file()


def test_checkpoint_that_does_not_fit_the_demo_model_exits_2(tmp_path, capsys):
    from lookalike.adapters.module import IPAdapter
    from lookalike.adapters.spec import REGISTRY
    from lookalike.pipeline.tiny import tiny_unet
    from lookalike.weights.io import save_adapter

    wide = IPAdapter.for_unet(REGISTRY["ip-adapter_sd15"].with_(cross_attention_dim=64),
                              tiny_unet("sd15", cross_attention_dim=64))
    ckpt = save_adapter(wide, tmp_path / "wide.safetensors")
    ref = tmp_path / "ref.png"
    photo(tmp_path).save(ref)
    code, err = run(["generate", "--model", "tiny-random", "--adapter", str(ckpt), "--reference", str(ref),
                     "--prompt", "x", "--out", str(tmp_path / "o.png"), "--steps", "1"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "64" in err[0]


@pytest.mark.parametrize("mode", ["center", "pad", "resize"])
def test_every_dreambench_photo_goes_through_every_preparation_mode(mode):
    from lookalike.encoders.prepare import load_reference, to_clip_pixels

    listed = json.loads((DREAMBENCH / "prompts.json").read_text())["subjects"]
    files = sorted(DREAMBENCH.glob("*/*.jpg"))
    assert len(files) == sum(len(s["images"]) for s in listed) >= 11  # all 20 subjects, or the 4 shipped
    pixels = to_clip_pixels([load_reference(f) for f in files], size=64, mode=mode)
    assert pixels.shape == (len(files), 3, 64, 64) and torch.isfinite(pixels).all()
    assert pixels.std(dim=(1, 2, 3)).min() > 0.05  # every photo kept visible content

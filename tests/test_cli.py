"""The ``lookalike`` command line, offline, on the built-in ``demo`` model (a few seconds per generation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike import cli
from lookalike.pipeline.demo import DEMO_NOTE, DEMO_TRAINED, demo_adapter, demo_personalizer
from lookalike.pipeline.personalizer import Personalizer
from lookalike.pipeline.subject import Subject, file_sha256
from lookalike.weights.io import official_state_dict, save_adapter

from helpers import DREAMBENCH

DREAMBENCH_DOG = DREAMBENCH / "dog"
FAST = ["--model", "tiny-random", "--steps", "2"]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracebacks off unless a test asks for them."""
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)


@pytest.fixture
def photos() -> list[Path]:
    """Two photos of DreamBench's dog (../shared's, or the copy shipped in tests/data): never in ``tmp_path``,
    so a test may expect its own folder to hold only what it wrote."""
    real = sorted(DREAMBENCH_DOG.glob("0[01].jpg"))
    assert len(real) == 2, f"DreamBench's dog photos are missing from {DREAMBENCH_DOG}"
    return real


def refs(photos: list[Path]) -> list[str]:
    """``--reference`` flags for every photo."""
    return [arg for p in photos for arg in ("--reference", str(p))]


def pixels(path: Path) -> np.ndarray:
    """An image file's pixels."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def error_lines(capsys: pytest.CaptureFixture) -> list[str]:
    """The stderr lines of the last command."""
    return capsys.readouterr().err.strip().splitlines()


def assert_one_error_line(capsys: pytest.CaptureFixture, *words: str) -> str:
    """Exactly one stderr line, starting with ``error:``, containing ``words``; no traceback."""
    lines = error_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def run_python(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """A fresh interpreter running ``args`` in ``tmp_path``."""
    return subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


# -- help and entry points ---------------------------------------------------------------------------------


def test_help_of_every_command_imports_no_torch_diffusers_or_transformers(tmp_path):
    code = (
        "import sys, contextlib, io\n"
        "from lookalike import cli\n"
        "for argv in (['--help'], ['generate', '--help'], ['encode', '--help'], ['info', '--help'],"
        " ['download', '--help'], ['app', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "        assert cli.main(argv) == 0, argv\n"
        "    assert 'usage: lookalike' in out.getvalue(), argv\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'PIL', 'gradio') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = run_python(["-c", code], tmp_path)
    assert result.returncode == 0, result.stderr


def test_python_m_lookalike_help_documents_several_images_naming(tmp_path):
    result = run_python(["-m", "lookalike", "generate", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "<stem>-i.png" in text and "<stem>-grid.png" in text and "--num-images" in text


def test_python_m_lookalike_generate_demo_runs_end_to_end_at_its_native_size(tmp_path, photos):
    out = tmp_path / "dog.png"
    result = run_python(["-m", "lookalike", "generate", *FAST, *refs(photos[:1]), "--prompt", "a dog",
                         "--out", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert pixels(out).shape == (32, 32, 3)  # the demo model's native size
    assert f"wrote {out}" in result.stdout
    assert result.stderr.strip().splitlines() == ([] if DEMO_TRAINED else [f"note: {DEMO_NOTE}"])


def test_argparse_usage_error_exits_2(capsys):
    assert cli.main(["generate", "--model", "tiny-random", "--out", "x.png"]) == 2
    assert "--prompt" in capsys.readouterr().err


# -- generate ----------------------------------------------------------------------------------------------


def test_generate_writes_png_whose_text_chunks_hold_prompt_seed_model_adapter_and_scale(tmp_path, photos):
    out = tmp_path / "sub" / "dog.png"
    code = cli.main(["generate", *FAST, *refs(photos), "--prompt", "a dog on the beach", "--out", str(out),
                     "--seed", "7", "--scale", "0.8", "--window", "0", "0.5", "--negative-prompt", "blurry"])
    assert code == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (32, 32)
        text = dict(image.text)
    assert text["prompt"] == "a dog on the beach"
    assert text["seed"] == "7"
    assert text["model"] == "tiny-random"
    assert text["adapter"] == "ip-adapter-plus_sd15"
    assert float(text["scale"]) == 0.8
    assert text["negative_prompt"] == "blurry" and text["steps"] == "2" and text["size"] == "32x32"
    assert text["window"] == "0.0,0.5" and text["lookalike_version"]
    assert json.loads(text["references"]) == [file_sha256(p) for p in photos]
    assert not [p for p in out.parent.iterdir() if p.name != "dog.png"]  # no temporary files left


def test_generate_num_images_two_writes_stem_0_and_1_plus_a_grid_each_with_its_own_seed(tmp_path, photos):
    out = tmp_path / "dog.png"
    code = cli.main(["generate", *FAST, *refs(photos[:1]), "--prompt", "a dog", "--out", str(out),
                     "--num-images", "2", "--seed", "5"])
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dog-0.png", "dog-1.png", "dog-grid.png"]
    seeds = [Image.open(tmp_path / f"dog-{i}.png").text["seed"] for i in range(2)]
    assert seeds == ["5", "6"]
    first, second, grid = (pixels(tmp_path / n) for n in ("dog-0.png", "dog-1.png", "dog-grid.png"))
    assert not np.array_equal(first, second)
    assert np.array_equal(grid, np.concatenate([first, second], axis=1))


def test_image_i_of_a_batch_is_reproduced_alone_with_seed_plus_i(tmp_path, photos):
    batch, alone = tmp_path / "batch.png", tmp_path / "alone.png"
    args = ["generate", *FAST, *refs(photos[:1]), "--prompt", "a dog"]
    assert cli.main([*args, "--out", str(batch), "--num-images", "2", "--seed", "3"]) == 0
    assert cli.main([*args, "--out", str(alone), "--seed", "4"]) == 0
    assert np.array_equal(pixels(tmp_path / "batch-1.png"), pixels(alone))


def test_encode_then_generate_with_subject_gives_the_same_pixels_as_generate_with_references(tmp_path, photos):
    subject_file = tmp_path / "dog.safetensors"
    assert cli.main(["encode", "--model", "tiny-random", *refs(photos), "--out", str(subject_file)]) == 0
    subject = Subject.load(subject_file)
    assert subject.adapter == "ip-adapter-plus_sd15" and subject.num_images == 2
    args = ["generate", *FAST, "--prompt", "a dog", "--seed", "11"]
    assert cli.main([*args, "--subject", str(subject_file), "--out", str(tmp_path / "a.png")]) == 0
    assert cli.main([*args, *refs(photos), "--out", str(tmp_path / "b.png")]) == 0
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    assert Image.open(tmp_path / "a.png").text["references"] == Image.open(tmp_path / "b.png").text["references"]


def test_reference_weights_of_one_and_zero_draw_the_first_photo_alone_and_are_recorded(tmp_path, photos):
    args = ["generate", *FAST, "--prompt", "a dog", "--seed", "3"]
    weighted = [*refs(photos), "--reference-weight", "1", "--reference-weight", "0"]
    assert cli.main([*args, *weighted, "--out", str(tmp_path / "w.png")]) == 0
    assert cli.main([*args, *refs(photos[:1]), "--out", str(tmp_path / "one.png")]) == 0
    assert np.array_equal(pixels(tmp_path / "w.png"), pixels(tmp_path / "one.png"))
    assert json.loads(Image.open(tmp_path / "w.png").text["reference_weights"]) == [1.0, 0.0]
    assert "reference_weights" not in Image.open(tmp_path / "one.png").text
    subject_file = tmp_path / "w.safetensors"
    assert cli.main(["encode", "--model", "tiny-random", *weighted, "--out", str(subject_file)]) == 0
    assert (Subject.load(subject_file).combine, Subject.load(subject_file).weights) == ("mean", [1.0, 0.0])


def test_negative_reference_changes_the_image_and_is_recorded_in_the_png_and_the_subject(tmp_path, photos):
    args = ["generate", *FAST, "--prompt", "a dog", "--seed", "5", *refs(photos[:1])]
    assert cli.main([*args, "--negative-reference", str(photos[1]), "--out", str(tmp_path / "n.png")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "plain.png")]) == 0
    assert not np.array_equal(pixels(tmp_path / "n.png"), pixels(tmp_path / "plain.png"))
    assert json.loads(Image.open(tmp_path / "n.png").text["negative_references"]) == [file_sha256(photos[1])]
    subject_file = tmp_path / "n.safetensors"
    assert cli.main(["encode", "--model", "tiny-random", *refs(photos[:1]), "--negative-reference", str(photos[1]),
                     "--out", str(subject_file)]) == 0
    assert cli.main(["generate", *FAST, "--prompt", "a dog", "--seed", "5", "--subject", str(subject_file),
                     "--out", str(tmp_path / "s.png")]) == 0
    assert np.array_equal(pixels(tmp_path / "s.png"), pixels(tmp_path / "n.png"))


def test_subject_encoded_for_another_adapter_is_refused_before_generating(tmp_path, photos, capsys):
    subject_file = tmp_path / "basic.safetensors"
    assert cli.main(["encode", "--model", "tiny-random", "--adapter", "basic", *refs(photos[:1]),
                     "--out", str(subject_file)]) == 0
    capsys.readouterr()
    code = cli.main(["generate", *FAST, "--adapter", "plus", "--subject", str(subject_file), "--prompt", "a dog",
                     "--out", str(tmp_path / "x.png")])
    assert code == 2
    assert_one_error_line(capsys, "ip-adapter_sd15", "lookalike encode")


def test_generate_with_a_demo_checkpoint_file_as_adapter(tmp_path, photos):
    checkpoint = save_adapter(demo_adapter("basic", demo_personalizer(None).pipe.unet), tmp_path / "b.safetensors")
    out = tmp_path / "x.png"
    assert cli.main(["generate", *FAST, "--adapter", str(checkpoint), *refs(photos[:1]), "--prompt", "a dog",
                     "--out", str(out)]) == 0
    assert Image.open(out).text["adapter"] == "ip-adapter_sd15"


def test_a_local_diffusers_folder_loads_as_model_and_matches_the_demo_pixel_for_pixel(tmp_path, photos):
    from lookalike.pipeline.tiny import tiny_pipeline

    folder = tmp_path / "tiny-sd15"
    tiny_pipeline("sd15", seed=0).save_pretrained(folder)  # the demo's own pipeline, as a diffusers folder
    checkpoint = save_adapter(demo_adapter("plus", demo_personalizer(None).pipe.unet), tmp_path / "p.safetensors")
    subject = tmp_path / "s.safetensors"
    assert cli.main(["encode", "--model", "tiny-random", *refs(photos[:1]), "--out", str(subject)]) == 0
    args = ["generate", "--steps", "2", "--subject", str(subject), "--prompt", "a dog", "--seed", "2"]
    assert cli.main([*args, "--model", str(folder), "--adapter", str(checkpoint), "--size", "32",
                     "--device", "cpu", "--out", str(tmp_path / "folder.png")]) == 0
    assert cli.main([*args, "--model", "tiny-random", "--out", str(tmp_path / "demo.png")]) == 0
    assert np.array_equal(pixels(tmp_path / "folder.png"), pixels(tmp_path / "demo.png"))
    assert Image.open(tmp_path / "folder.png").text["model"] == str(folder)


def test_encode_with_a_real_model_id_runs_only_the_cached_image_encoder(tmp_path, photos, monkeypatch):
    from huggingface_hub import constants
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cache = tmp_path / "hub"
    snapshot = cache / "models--h94--IP-Adapter" / "snapshots" / ("0" * 40)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16, projection_dim=1024)  # pooled width of ViT-H
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(config).save_pretrained(snapshot / "models" / "image_encoder")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "dog.safetensors"
    assert cli.main(["encode", "--adapter", "basic", "--device", "cpu", *refs(photos), "--out", str(out)]) == 0
    subject = Subject.load(out)
    assert (subject.adapter, subject.encoder) == ("ip-adapter_sd15", "clip-vit-h-14")
    assert subject.features["pooled"].shape == (1, 2, 1024)
    assert subject.sources == [file_sha256(p) for p in photos]


# -- info --------------------------------------------------------------------------------------------------


def info_lines(capsys: pytest.CaptureFixture) -> dict[str, str]:
    """``info``'s output as {label: value}."""
    out = capsys.readouterr().out
    return {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in out.splitlines()}


def test_info_describes_a_safetensors_checkpoint_saved_with_its_spec(tmp_path, capsys):
    adapter = demo_adapter("plus", demo_personalizer(None).pipe.unet)
    path = save_adapter(adapter, tmp_path / "demo-plus.safetensors")
    assert cli.main(["info", str(path)]) == 0
    info = info_lines(capsys)
    assert info["variant"].startswith("ip-adapter-plus_sd15") and "metadata" in info["variant"]
    assert info["base"].startswith("sd15")
    assert info["encoder"].startswith("clip-vit-h-14") and "patch" in info["encoder"]
    assert info["tokens"].startswith("16 ")
    total = sum(p.numel() for p in adapter.parameters())
    assert info["parameters"].startswith(f"{total:,} ")


def test_info_describes_an_official_nested_bin_without_metadata_from_its_shapes(tmp_path, capsys):
    adapter = demo_adapter("basic", demo_personalizer(None).pipe.unet)
    path = tmp_path / "my-adapter.bin"
    torch.save(official_state_dict(adapter), path)
    assert cli.main(["info", str(path)]) == 0
    info = info_lines(capsys)
    assert info["variant"].startswith("my-adapter") and "shapes" in info["variant"]
    assert info["base"].startswith("sd15")
    assert info["encoder"].startswith("clip-vit-h-14") and "pooled" in info["encoder"]
    assert info["tokens"].startswith("4 ")
    assert info["parameters"].startswith(f"{sum(p.numel() for p in adapter.parameters()):,} ")


def test_info_on_an_uncached_registry_name_describes_the_entry_and_says_how_to_download(capsys):
    assert cli.main(["info", "plus", "--base", "sdxl"]) == 0
    info = info_lines(capsys)
    assert info["variant"].startswith("ip-adapter-plus_sdxl_vit-h")
    assert info["base"].startswith("sdxl") and info["tokens"].startswith("16 ")
    assert "lookalike download ip-adapter-plus_sdxl_vit-h" in info["parameters"]


# -- user errors: exit 2, one line ---------------------------------------------------------------------------


def _text_file(tmp_path: Path) -> str:
    path = tmp_path / "notes.txt"
    path.write_text("not a photo\n")
    return str(path)


def _corrupt_subject(tmp_path: Path) -> str:
    path = tmp_path / "subject.safetensors"
    path.write_bytes(b"\x00\x01 definitely not safetensors" * 10)
    return str(path)


@pytest.mark.parametrize("case, words", [
    ("missing reference", ["no-such-photo.jpg", "no such file"]),
    ("text file as reference", ["notes.txt", "not an image"]),
    ("unknown adapter", ["unknown adapter 'nonsense'"]),
    ("corrupt subject", ["subject.safetensors", "not a valid safetensors"]),
    ("output not a png", ["must end in .png"]),
    ("window backwards", ["START must be below END"]),
    ("weights not one per photo", ["1 reference weight(s) for 2 reference image(s)"]),
    ("weights with concat", ["combine the images with mean"]),
    ("weights summing to zero", ["positive sum"]),
    ("weights with a subject", ["--reference-weight applies to --reference photos"]),
    ("negative with a subject", ["--negative-reference applies to --reference photos"]),
    ("missing negative", ["no-such-negative.jpg", "no such file"]),
])
def test_user_errors_exit_2_with_one_error_line_before_loading_any_model(tmp_path, photos, capsys, monkeypatch,
                                                                          case, words):
    monkeypatch.setattr("lookalike.cli.generate.load_personalizer", _must_not_load)
    out = str(tmp_path / "x.png")
    argv = {
        "missing reference": ["--reference", str(tmp_path / "no-such-photo.jpg"), "--out", out],
        "text file as reference": ["--reference", _text_file(tmp_path), "--out", out],
        "unknown adapter": [*refs(photos[:1]), "--adapter", "nonsense", "--out", out],
        "corrupt subject": ["--subject", _corrupt_subject(tmp_path), "--out", out],
        "output not a png": [*refs(photos[:1]), "--out", str(tmp_path / "x.jpg")],
        "window backwards": [*refs(photos[:1]), "--window", "0.8", "0.2", "--out", out],
        "weights not one per photo": [*refs(photos[:2]), "--reference-weight", "1", "--out", out],
        "weights with concat": [*refs(photos[:2]), "--combine", "concat", "--reference-weight", "1",
                                "--reference-weight", "2", "--out", out],
        "weights summing to zero": [*refs(photos[:2]), "--reference-weight", "0", "--reference-weight", "0",
                                    "--out", out],
        "weights with a subject": ["--subject", _corrupt_subject(tmp_path), "--reference-weight", "1", "--out", out],
        "negative with a subject": ["--subject", _corrupt_subject(tmp_path),
                                    "--negative-reference", str(photos[1]), "--out", out],
        "missing negative": [*refs(photos[:1]), "--negative-reference", str(tmp_path / "no-such-negative.jpg"),
                             "--out", out],
    }[case]
    assert cli.main(["generate", *FAST, "--prompt", "a dog", *argv]) == 2
    assert_one_error_line(capsys, *words)
    assert not Path(out).exists()


def _must_not_load(*args: object, **kwargs: object) -> None:
    raise AssertionError("a model was loaded before the inputs were checked")


def test_encode_of_a_non_image_reference_exits_2(tmp_path, capsys):
    code = cli.main(["encode", "--model", "tiny-random", "--reference", _text_file(tmp_path),
                     "--out", str(tmp_path / "s.safetensors")])
    assert code == 2
    assert_one_error_line(capsys, "notes.txt")


def test_checkpoint_that_does_not_fit_the_model_exits_2(tmp_path, photos, capsys):
    from lookalike.adapters.module import IPAdapter
    from lookalike.adapters.spec import REGISTRY
    from lookalike.pipeline.tiny import tiny_unet

    from helpers import tiny_spec

    wide = IPAdapter.for_unet(tiny_spec(REGISTRY["ip-adapter_sd15"], 64), tiny_unet("sd15", cross_attention_dim=64))
    path = save_adapter(wide, tmp_path / "wide.safetensors")
    code = cli.main(["generate", *FAST, "--adapter", str(path), *refs(photos[:1]), "--prompt", "a dog",
                     "--out", str(tmp_path / "x.png")])
    assert code == 2
    assert_one_error_line(capsys, "64-d")


def test_uncached_model_while_offline_exits_2_saying_how_to_get_it(tmp_path, photos, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    code = cli.main(["generate", "--model", "someone/not-cached-model", *refs(photos[:1]), "--prompt", "a dog",
                     "--out", str(tmp_path / "x.png")])
    assert code == 2
    assert_one_error_line(capsys, "someone/not-cached-model", "HF_HUB_OFFLINE", "hf download")


def test_download_offline_with_an_empty_cache_exits_2_naming_the_file_and_lookalike_download(tmp_path):
    result = run_python(["-m", "lookalike", "download", "plus"], tmp_path, HF_HUB_OFFLINE="1",
                        HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "ip-adapter-plus_sd15.safetensors" in lines[0] and "lookalike download" in lines[0]


# -- failures midway -----------------------------------------------------------------------------------------


def _fail_generate(*args: object, **kwargs: object) -> None:
    raise RuntimeError("the UNet exploded")


def test_existing_out_is_left_intact_when_generation_fails_midway(tmp_path, photos, capsys, monkeypatch):
    out = tmp_path / "dog.png"
    out.write_bytes(b"previous image bytes")
    monkeypatch.setattr(Personalizer, "generate", _fail_generate)
    code = cli.main(["generate", *FAST, *refs(photos[:1]), "--prompt", "a dog", "--out", str(out)])
    assert code == 1  # an internal error, not a user error
    line = assert_one_error_line(capsys, "internal error", "the UNet exploded", "LOOKALIKE_DEBUG=1")
    assert "Traceback" not in line
    assert out.read_bytes() == b"previous image bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["dog.png"]


def test_existing_out_is_left_intact_when_writing_the_png_fails_halfway(tmp_path, photos, capsys, monkeypatch):
    out = tmp_path / "dog.png"
    out.write_bytes(b"previous image bytes")
    real_save = Image.Image.save

    def half_save(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        real_save(self, fp, *args, **kwargs)
        with open(fp, "r+b") as f:  # type: ignore[arg-type]
            f.truncate(10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", half_save)
    code = cli.main(["generate", *FAST, *refs(photos[:1]), "--prompt", "a dog", "--out", str(out)])
    assert code == 2
    assert_one_error_line(capsys, "No space left on device", str(out))
    assert out.read_bytes() == b"previous image bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["dog.png"]


def test_internal_error_prints_the_traceback_only_with_lookalike_debug(tmp_path, photos, capsys, monkeypatch):
    monkeypatch.setattr(Personalizer, "generate", _fail_generate)
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    code = cli.main(["generate", *FAST, *refs(photos[:1]), "--prompt", "a dog", "--out", str(tmp_path / "x.png")])
    assert code == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: internal error")


def test_keyboard_interrupt_exits_130_with_one_line(tmp_path, photos, capsys, monkeypatch):
    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Personalizer, "generate", interrupt)
    code = cli.main(["generate", *FAST, *refs(photos[:1]), "--prompt", "a dog", "--out", str(tmp_path / "x.png")])
    assert code == 130
    assert_one_error_line(capsys, "interrupted")

"""The checks behind issue 15's classes, one by one: variant detection that never guesses (9), output size,
seed and step limits (6), help text that matches what the demo presets take (11), bounded memory for a
reference photo (8), never a silent black image (3), and `info` naming what a checkpoint lacks (4)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike import cli
from lookalike.adapters.projectors import build_projector
from lookalike.adapters.spec import REGISTRY, AdapterSpec
from lookalike.errors import LookalikeError
from lookalike.pipeline.checks import MAX_SEED, MAX_SIDE, check_images, check_seeds
from lookalike.weights.io import detect_spec, save_adapter

from helpers import fresh_pipe, randomize, tiny_spec


def _one_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in lines[0], lines
    return lines[0]


# -- 9: variants that shapes cannot tell apart ---------------------------------------------------------------


def _shapes_of(spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors with the official shapes of ``spec``, on the meta device (no memory)."""
    with torch.device("meta"):
        sd = {f"image_proj.{k}": v for k, v in build_projector(spec).state_dict().items()}
        if spec.lora_rank:
            sd["ip_adapter.0.to_q_lora.down.weight"] = torch.empty(spec.lora_rank, 320)
    return sd


def test_faceid_plus_v2_shapes_under_another_file_name_are_refused_not_loaded_as_v1():
    sd = _shapes_of(REGISTRY["ip-adapter-faceid-plusv2_sd15"])
    with pytest.raises(LookalikeError, match="shortcut.*--adapter NAME=FILE.*spec="):
        detect_spec(sd, {}, "/downloads/faceid-v2-renamed.bin")


@pytest.mark.parametrize("name", ["ip-adapter-faceid-plus_sd15", "ip-adapter-faceid-plusv2_sd15",
                                  "ip-adapter-faceid-portrait_sdxl", "ip-adapter-faceid-portrait_sdxl_unnorm"])
def test_official_file_names_still_settle_the_variant(name):
    spec = REGISTRY[name]
    assert detect_spec(_shapes_of(spec), {}, f"/cache/{spec.filename}") == spec


def test_variants_that_differ_only_in_name_load_under_any_file_name():
    found = detect_spec(_shapes_of(REGISTRY["ip-adapter-plus-face_sd15"]), {}, "/x/my-face-adapter.safetensors")
    assert found.name == "my-face-adapter" and found.projector == "resampler"


@pytest.fixture
def twins(monkeypatch, tmp_path):
    """Two tiny registry variants with equal shapes that behave differently (a shortcut, as FaceID-Plus v1/v2),
    and a checkpoint of the second under a neutral name."""
    pipe = fresh_pipe("sd15")
    cross = pipe.unet.config.cross_attention_dim
    v1 = tiny_spec(REGISTRY["ip-adapter-faceid-plus_sd15"], cross).with_(name="twin-v1", filename="twin-v1.bin",
                                                                         short_name=None)
    v2 = v1.with_(name="twin-v2", filename="twin-v2.bin", shortcut=True)
    monkeypatch.setitem(REGISTRY, "twin-v1", v1)
    monkeypatch.setitem(REGISTRY, "twin-v2", v2)
    from lookalike.adapters.module import IPAdapter

    adapter = randomize(IPAdapter.for_unet(v2, pipe.unet))
    path = save_adapter(adapter, tmp_path / "renamed.safetensors")
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(path)), str(path))  # drop the spec metadata, as an official file has none
    return pipe, path


def test_twins_under_a_neutral_name_are_refused_from_the_api_and_named_with_spec(twins):
    from lookalike import Personalizer

    pipe, path = twins
    p = Personalizer(pipe)
    with pytest.raises(LookalikeError, match="twin-v1, twin-v2"):
        p.load_adapter(path)
    assert p.adapters == []
    p.load_adapter(path, spec="twin-v2")
    assert p.adapters[0].spec.shortcut is True


def test_twins_from_the_command_line_say_how_to_name_the_variant(twins, capsys):
    _, path = twins
    assert cli.main(["info", str(path)]) == 2
    line = _one_error(capsys)
    assert "--adapter NAME=FILE" in line and "shortcut" in line


# -- 4: info reports missing, extra and wrong-shape weights ----------------------------------------------------


@pytest.mark.parametrize("edit, words", [
    (lambda sd: sd.pop("image_proj.norm.weight"), "missing image_proj.norm.weight"),
    (lambda sd: sd.update({"image_proj.bonus": torch.zeros(2)}), "unexpected image_proj.bonus"),
    (lambda sd: sd.update({"image_proj.norm.weight": torch.zeros(3)}), "image_proj.norm.weight has shape (3,)"),
    (lambda sd: sd.pop(next(k for k in sd if k.endswith("to_v_ip.weight"))), "missing ip_adapter."),
])
def test_info_names_what_a_checkpoint_lacks_or_has_too_much_of(tmp_path, capsys, edit, words):
    from safetensors.torch import load_file, save_file

    from lookalike.pipeline.demo import demo_adapter, demo_personalizer

    good = save_adapter(demo_adapter("basic", demo_personalizer(None).pipe.unet), tmp_path / "good.safetensors")
    assert cli.main(["info", str(good)]) == 0
    sd = load_file(str(good))
    edit(sd)
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        metadata = f.metadata()
    save_file(sd, str(tmp_path / "bad.safetensors"), metadata=metadata)
    capsys.readouterr()
    assert cli.main(["info", str(tmp_path / "bad.safetensors")]) == 2
    assert words in _one_error(capsys)


# -- 6: size, seed and steps -----------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, words", [
    ("--size", "100000", f"limit of {MAX_SIDE}"),
    ("--size", "4104x512", f"limit of {MAX_SIDE}"),
    ("--seed", str(2**64), str(MAX_SEED)),
    ("--steps", "1" + "0" * 400, "between 1 and 1000"),
    ("--scale", "1e400", "must be"),
])
def test_out_of_range_numbers_exit_2_naming_the_limit(tmp_path, capsys, flag, value, words):
    out = tmp_path / "x.png"
    out.write_bytes(b"old")
    code = cli.main(["generate", "--model", "tiny-random", "--reference", "missing.png", "--prompt", "a",
                     "--out", str(out), flag, value])
    assert code == 2
    assert words in capsys.readouterr().err
    assert out.read_bytes() == b"old"


def test_the_last_seed_of_a_batch_must_be_a_torch_seed_too(tmp_path, capsys):
    code = cli.main(["generate", "--model", "tiny-random", "--reference", "missing.png", "--prompt", "a",
                     "--out", str(tmp_path / "x.png"), "--seed", str(MAX_SEED), "--num-images", "2"])
    assert code == 2
    assert "2**64 - 1" in _one_error(capsys)


def test_the_seed_range_is_exactly_what_torch_accepts():
    torch.Generator().manual_seed(MAX_SEED)
    check_seeds(MAX_SEED)
    with pytest.raises((RuntimeError, ValueError)):
        torch.Generator().manual_seed(MAX_SEED + 1)
    with pytest.raises(LookalikeError):
        check_seeds(MAX_SEED + 1)


def test_an_absurd_size_from_the_api_is_refused_before_any_step():
    from lookalike.pipeline.demo import demo_personalizer

    p = demo_personalizer("basic")
    calls = []
    p.pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(LookalikeError, match=f"limit of {MAX_SIDE}"):
        p.generate("a", image_embeds=[torch.zeros(1, 1, 32)], height=100000, width=512, num_inference_steps=2)
    assert calls == []


def test_a_subject_with_too_many_images_is_refused_when_encoding(tmp_path):
    from lookalike.pipeline.demo import demo_personalizer
    from lookalike.pipeline.subject import MAX_SUBJECT_IMAGES

    p = demo_personalizer("basic")
    photo = Image.new("RGB", (32, 32), (200, 10, 10))
    with pytest.raises(LookalikeError, match=f"limit of {MAX_SUBJECT_IMAGES}"):
        p.encode([photo] * (MAX_SUBJECT_IMAGES + 1))


# -- 11: the help text lists exactly what the demo presets take --------------------------------------------------


@pytest.mark.parametrize("model", ["demo", "tiny-random"])
def test_the_adapters_the_help_offers_are_accepted_and_no_others(model, capsys):
    from lookalike.pipeline.plan import make_plan

    assert cli.main(["generate", "--help"]) == 0
    text = re.sub(r"(\w)- (\w)", r"\1-\2", " ".join(capsys.readouterr().out.split()))  # argparse wraps at hyphens
    offered = re.split(r", | and ", re.search(rf"--model {model} offers ([\w\-, ]+?)[;)]", text).group(1))
    assert offered
    shorts = sorted({s.short_name for s in REGISTRY.values() if s.short_name})
    for name in shorts:
        if name in offered:
            assert make_plan(model, name, with_encoder=False).demo
        else:
            with pytest.raises(LookalikeError, match=f"--model {model} offers"):
                make_plan(model, name, with_encoder=False)


# -- 8: a reference photo decodes in bounded memory ---------------------------------------------------------------


def test_a_16_bit_png_too_large_to_decode_is_refused_from_its_header_with_the_limit(tmp_path):
    import struct
    import zlib

    from lookalike.encoders.prepare import load_reference

    ihdr = struct.pack(">IIBBBBB", 13000, 13000, 16, 0, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(  # noqa: E731
        ">I", zlib.crc32(kind + data))
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)))
    with pytest.raises(LookalikeError, match=r"13000x13000 I;16 .* above the limit of 1 GB \(\d+ megapixels"):
        load_reference(path)


def test_a_large_jpeg_is_reduced_while_decoding_instead_of_refused(tmp_path, monkeypatch):
    from lookalike.encoders import prepare

    path = tmp_path / "big.jpg"
    Image.new("RGB", (1024, 768), (20, 120, 200)).save(path)
    monkeypatch.setattr(prepare, "MAX_DECODE_BYTES", 4 << 20)  # as if the photo were 10x larger on a side
    monkeypatch.setattr(prepare, "JPEG_DRAFT_SIDE", 150)
    image = prepare.load_reference(path)
    assert image.size == (256, 192)  # decoded at 1/4 scale
    path_png = tmp_path / "big.png"
    Image.new("RGB", (1024, 768), (20, 120, 200)).save(path_png)
    with pytest.raises(LookalikeError, match="above the limit"):
        prepare.load_reference(path_png)  # PNG cannot be reduced while decoding: refused


_MEASURE = """
import sys
from PIL import Image
from lookalike.encoders.prepare import decode_bytes, load_reference
kb = lambda key: next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key)) * 1024
with Image.open(sys.argv[1]) as im:
    estimate = decode_bytes(im)
open('/proc/self/clear_refs', 'w').write('5')  # the peak (VmHWM) starts again from the current size
base = kb('VmRSS')
load_reference(sys.argv[1])
print(estimate, kb('VmHWM') - base)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure memory")
@pytest.mark.parametrize("make", [
    lambda n: Image.fromarray((np.arange(n * n) % 65535).astype(np.uint16).reshape(n, n)),
    lambda n: Image.new("RGBA", (n, n), (10, 20, 30, 128)),
    lambda n: Image.new("RGB", (n, n), (10, 20, 30)),
], ids=["16-bit", "rgba", "rgb"])
def test_the_memory_estimate_that_bounds_a_photo_covers_what_decoding_really_takes(tmp_path, make):
    path = tmp_path / "photo.png"
    make(2500).save(path)
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, timeout=120)
    estimate, measured = map(int, result.stdout.split())
    assert measured <= estimate, (measured, estimate)


# -- 3: never a silent black image ------------------------------------------------------------------------------


def test_non_finite_or_blank_decoded_images_are_refused_and_a_safety_blanked_one_is_not():
    good = np.random.default_rng(0).random((2, 8, 8, 3), dtype=np.float32)
    check_images(good)
    bad = good.copy()
    bad[1, 2, 3, 0] = np.nan
    with pytest.raises(LookalikeError, match="NaN or infinite values for image 1"):
        check_images(bad)
    with pytest.raises(LookalikeError, match="float16 and overflowed: use --dtype float32 or bfloat16"):
        check_images(bad, half=True)
    blank = good.copy()
    blank[0] = 0.0
    with pytest.raises(LookalikeError, match="blank image 0"):
        check_images(blank)
    check_images(blank, flagged=[True, False])  # blanked by the safety checker, which the CLI reports


def test_features_that_overflow_give_an_error_not_a_black_image():
    from lookalike.pipeline.demo import demo_personalizer

    p = demo_personalizer("basic")
    with pytest.raises(LookalikeError, match="NaN or infinite values"):
        p.generate("a", image_embeds=[torch.full((1, 1, 32), 3e38)], num_inference_steps=2)
    images = p.generate("a", image_embeds=[torch.randn(1, 1, 32)], num_inference_steps=2).images
    assert isinstance(images[0], Image.Image)  # the default output type is still PIL


def test_pil_output_is_diffusers_own_conversion_of_the_checked_floats():
    from lookalike.pipeline.demo import demo_personalizer

    p = demo_personalizer("basic")
    kw = dict(image_embeds=[torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(1))],
              num_inference_steps=2)
    pil = p.generate("a", generator=torch.Generator().manual_seed(0), **kw).images[0]
    floats = p.generate("a", generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
    assert np.array_equal(np.asarray(pil), (floats[0] * 255).round().astype("uint8"))


def test_nan_weights_are_refused_when_an_adapter_loads_naming_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    from lookalike.pipeline.demo import demo_adapter, demo_personalizer

    p = demo_personalizer(None)
    path = save_adapter(demo_adapter("basic", p.pipe.unet), tmp_path / "a.safetensors")
    sd = load_file(str(path))
    sd["image_proj.proj.weight"][0, 0] = float("nan")
    save_file(sd, str(path), metadata={"format": "pt"})
    with pytest.raises(LookalikeError, match="'image_proj.proj.weight' holds NaN"):
        p.load_adapter(path)


def test_spec_metadata_is_checked_against_its_schema():
    spec = json.loads(REGISTRY["ip-adapter_sd15"].to_json())
    assert AdapterSpec.from_json(json.dumps(spec)) == REGISTRY["ip-adapter_sd15"]
    for field, value in [("num_tokens", "four"), ("num_tokens", 10**15), ("base", "sd99"), ("features", ["aura"]),
                         ("shortcut", "yes"), ("projector_kwargs", {"dim": -1}), ("embed_dim", True)]:
        with pytest.raises(LookalikeError, match=field):
            AdapterSpec.from_json(json.dumps({**spec, field: value}))


def test_adapter_name_equals_file_names_the_variant_on_the_command_line(twins):
    from lookalike.pipeline.plan import make_plan

    _, path = twins
    assert make_plan("tiny-random", f"twin-v2={path}", with_encoder=False).spec.shortcut is True
    with pytest.raises(LookalikeError, match="unknown adapter 'no-such'"):
        make_plan("tiny-random", f"no-such={path}", with_encoder=False)

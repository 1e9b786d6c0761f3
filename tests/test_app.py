"""The web page's engine without a browser: checks, weights, the step callback, errors in their words."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.app.engine import Engine, Photos, Request, check_request, draw_faces, photo_weights
from lookalike.cli import main
from lookalike.errors import LookalikeError
from lookalike.pipeline.subject import file_sha256

from helpers import YUNET


def _reference(path: Path) -> Path:
    from lookalike.world.render import all_identities, random_scene, render

    Image.fromarray(render(all_identities()[2], random_scene(np.random.default_rng(0)), size=48)).save(path)
    return path


def test_equal_weights_keep_every_photo_and_different_weights_average_them() -> None:
    assert photo_weights([1.0, 1.0], 2) == (None, None)
    assert photo_weights([1.0, 0.5], 2) == ("mean", [1.0, 0.5])
    assert photo_weights([0.0, 0.0, 0.5], 3) == ("mean", [0.0, 0.0, 0.5])
    with pytest.raises(LookalikeError, match="reference weights must be non-negative numbers with a positive sum"):
        photo_weights([0.0, 0.0], 2)  # nothing to average


@pytest.mark.parametrize("change, words", [
    ({"prompt": "  "}, "type a prompt"),
    ({"window": (0.8, 0.2)}, "start < end"),
    ({"width": 30}, "multiple of 8"),
    ({"height": 4096}, "multiple of 8"),
    ({"steps": 0}, "steps must be from 1"),
    ({"num_images": 99}, "number of images must be from 1"),
    ({"transfer": "colour"}, "unknown transfer"),
    ({"photos": Photos()}, "upload at least one reference photo"),
    ({"photos": Photos(["x.png"], [1.0], face_index=-2)}, "count faces from 0"),
])
def test_a_request_the_page_cannot_run_is_refused_in_words(change: dict, words: str) -> None:
    fields = {"prompt": "a shape", "photos": Photos(["x.png"], [1.0]), **change}
    with pytest.raises(LookalikeError, match=words):
        check_request(Request(**fields))


def test_generate_reports_every_step_and_writes_the_clis_metadata(tmp_path: Path) -> None:
    reference = _reference(tmp_path / "ref.png")
    engine = Engine("tiny-random", workdir=tmp_path / "work")
    steps: list[tuple[int, int]] = []
    request = Request(prompt="a shape", model="tiny-random", adapter="basic", steps=2, width=32, height=32,
                      num_images=2, seed=4, photos=Photos([str(reference)], [1.0]))
    paths, summary = engine.generate(request, lambda done, total: steps.append((done, total)))
    assert steps == [(i, 4) for i in range(1, 5)]
    assert [p.name for p in paths] == ["lookalike-4.png", "lookalike-5.png"] and "seed 4..5" in summary
    # the command line writes the same fields for the same settings
    out = tmp_path / "cli.png"
    assert main(["generate", "--model", "tiny-random", "--adapter", "basic", "--reference", str(reference),
                 "--prompt", "a shape", "--negative-prompt", "", "--steps", "2", "--seed", "4",
                 "--out", str(out)]) == 0
    page, cli = Image.open(paths[0]), Image.open(out)
    assert page.format == "PNG" and page.text == cli.text
    assert np.array_equal(np.asarray(page), np.asarray(cli))
    assert json.loads(page.text["references"]) == [file_sha256(reference)]


def test_a_text_file_named_png_is_refused_with_its_own_name(tmp_path: Path) -> None:
    bad = tmp_path / "upload-cache" / "notes.png"
    bad.parent.mkdir()
    bad.write_text("not a picture")
    engine = Engine("tiny-random", workdir=tmp_path / "work")
    with pytest.raises(LookalikeError, match="cannot read image 'notes.png': not an image file") as error:
        engine.generate(Request(prompt="a shape", model="tiny-random", adapter="basic", steps=1, width=32,
                                height=32, photos=Photos([str(bad)], [1.0])))
    assert str(bad.parent) not in str(error.value)  # the server's upload folder stays private


def test_saved_subject_generates_without_the_photos(tmp_path: Path) -> None:
    reference = _reference(tmp_path / "ref.png")
    engine = Engine("tiny-random", workdir=tmp_path / "work")
    subject = engine.save_subject(Photos([str(reference)], [1.0]), "tiny-random", "plus")
    reference.unlink()  # the photo is gone: only the subject file can make the image
    paths, summary = engine.generate(Request(prompt="a shape", model="tiny-random", steps=1, width=32, height=32,
                                             subject_file=str(subject)))
    assert "no encoder run" in summary
    meta = Image.open(paths[0]).text
    assert meta["adapter"] == "ip-adapter-plus_sd15" and len(json.loads(meta["references"])) == 1


def test_faces_are_boxed_and_numbered_in_the_order_given() -> None:
    image = Image.new("RGB", (120, 80), (200, 200, 200))
    out = draw_faces(image, [(10, 10, 50, 60), (70, 10, 110, 60)])
    pixels = np.asarray(out)
    assert out.size == image.size and np.asarray(image).min() == 200  # the photo itself is untouched
    assert tuple(pixels[35, 10]) == (255, 40, 40) and tuple(pixels[35, 110]) == (255, 40, 40)
    assert tuple(pixels[35, 60]) == (200, 200, 200)  # between the boxes


def test_shown_errors_carry_the_message_not_a_traceback() -> None:
    gr = pytest.importorskip("gradio")
    from lookalike.app.page import shown_errors

    @shown_errors
    def fails(kind: str) -> None:
        raise LookalikeError("the photo is only 4x4 pixels;\n use a bigger one") if kind == "user" else KeyError("k")

    with pytest.raises(gr.Error) as user:
        fails("user")
    assert user.value.message == "the photo is only 4x4 pixels; use a bigger one"
    with pytest.raises(gr.Error) as internal:
        fails("bug")
    assert internal.value.message == "internal error: KeyError: 'k'"


def test_show_faces_boxes_what_the_configured_detector_finds_and_says_when_there_is_none(tmp_path: Path) -> None:
    pytest.importorskip("cv2")
    from skimage import data

    from lookalike.encoders.face import build_detector, find_faces
    from lookalike.encoders.prepare import load_reference

    face = tmp_path / "astronaut.png"  # a real face (a dog's is found or not depending on the photo's size)
    Image.fromarray(data.astronaut()).save(face)
    engine = Engine("tiny-random", faces={"detector": "yunet", "yunet_model": str(YUNET)}, workdir=tmp_path)
    found = find_faces(build_detector(detector="yunet", yunet_model=YUNET), face)
    shown = np.asarray(engine.show_faces(str(face)))
    photo = np.asarray(load_reference(face))
    assert shown.shape == photo.shape and len(found) >= 1  # YuNet sees the astronaut's face
    x0, y0 = (round(float(v)) for v in found[0].bbox[:2])
    assert tuple(shown[y0 + 2, x0 + 1]) == (255, 40, 40)  # its box (or its number), drawn at the detection
    with pytest.raises(LookalikeError, match="no face found in plain.png"):
        engine.show_faces(str(_reference(tmp_path / "plain.png")))
    with pytest.raises(LookalikeError, match="YuNet model"):
        Engine("tiny-random", faces={"detector": "yunet", "yunet_model": str(tmp_path / "none.onnx")}).show_faces(
            str(face))

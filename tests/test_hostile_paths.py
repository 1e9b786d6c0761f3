"""Paths built from data stay inside their root: subject names, reference file names, records' paths.

Each hostile name is generated from a few escape forms ('..' chains, absolute paths, separators,
symbolic links); the CLI answers one ``error:`` line with exit 2, and nothing appears outside the root.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image
from test_eval_run import FakePersonalizer, subject_dir
from test_train_helpers import run_config, single_thread, write_image, write_json_set

from lookalike.cli import main as lookalike_main
from lookalike.errors import LookalikeError
from lookalike.evaluation.demo import demo_clip_scorer
from lookalike.evaluation.run import evaluate
from lookalike.evaluation.scorers import Scorers
from lookalike.evaluation.store import read_records
from lookalike.fileio import inside, safe_name

from helpers import one_error

SINGLE = (0, 1, lambda: None)


def escapes(depth: int = 3) -> list[str]:
    """Names that lead out of a folder: '..' chains, absolute paths, mixed separators, empty and dot names."""
    names = ["..", ".", "", "a/b", "a\\b", "/abs/escape", "nul\x00name"]
    for d in range(1, depth + 1):
        names += ["/".join([".."] * d) + "/escape", "x/" + "/".join([".."] * (d + 1)) + "/escape",
                  "\\".join([".."] * d) + "\\escape"]
    return names


def snapshot(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def test_inside_refuses_every_escape_and_keeps_plain_paths(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "out_link").symlink_to(tmp_path / "outside")
    (root / "in_link").symlink_to(root / "sub")
    assert inside(root, "sub", "x.png") == root / "sub" / "x.png"
    assert inside(root, "in_link", "x.png") == root / "in_link" / "x.png"
    for name in [n for n in escapes() if ".." in n.split("/") or n.startswith("/") or "\x00" in n]:
        with pytest.raises(LookalikeError):
            inside(root, name)
        if os.path.normpath(os.path.join("images", name)).startswith(("..", "/")) or "\x00" in name:
            with pytest.raises(LookalikeError):
                inside(root, "images", name, "0-0.png")
    with pytest.raises(LookalikeError, match="symbolic link"):
        inside(root, "out_link", "x.png")
    assert inside(root, "out_link", "x.png", links=False) == root / "out_link" / "x.png"  # names alone
    for name in escapes():
        with pytest.raises(LookalikeError):
            safe_name(name, "subject name")


def dreambench(root: Path, name: str, images: list[str] | None = None) -> Path:
    (root / "ok").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (200, 10, 10)).save(root / "ok" / "00.jpg")
    subject = {"name": name, "class": "dog"}
    if images is not None:
        subject["images"] = images
    (root / "prompts.json").write_text(json.dumps({"subjects": [subject], "object_prompts": ["a {0} {1}"],
                                                   "live_subject_prompts": ["a {0} {1}"]}))
    return root


@pytest.mark.parametrize("name", escapes(), ids=repr)
def test_a_hostile_subject_name_is_one_error_line_and_writes_nothing(tmp_path, capsys, name):
    area = tmp_path / "area"
    subjects, out = dreambench(area / "set", name), area / "runs" / "run"
    before = snapshot(tmp_path)
    code = lookalike_main(["eval", "--model", "demo", "--subjects", str(subjects), "--out", str(out),
                           "--steps", "1", "--no-progress"])
    assert code == 2
    assert "subject name" in one_error(capsys)
    assert snapshot(tmp_path) == before, "nothing is written anywhere"


@pytest.mark.parametrize("image", ["../outside.jpg", "ok/../../outside.jpg", "/abs/outside.jpg", "link/00.jpg"])
def test_a_reference_file_outside_the_set_is_one_error_line(tmp_path, capsys, image):
    subjects = dreambench(tmp_path / "set", "dog", images=[image])
    Image.new("RGB", (16, 16)).save(tmp_path / "outside.jpg")
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "elsewhere" / "00.jpg")
    (subjects / "link").symlink_to(tmp_path / "elsewhere")
    code = lookalike_main(["eval", "--model", "demo", "--subjects", str(subjects), "--out", str(tmp_path / "run"),
                           "--steps", "1", "--no-progress"])
    assert code == 2
    assert "leads outside" in one_error(capsys)
    assert not (tmp_path / "run").exists()


def test_a_subject_folder_linked_outside_the_set_is_refused(tmp_path, capsys):
    subjects = dreambench(tmp_path / "set", "ok")
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "elsewhere" / "00.jpg")
    (subjects / "linked").symlink_to(tmp_path / "elsewhere")
    (subjects / "prompts.json").write_text(json.dumps({"subjects": [{"name": "linked"}], "object_prompts": ["a {1}"]}))
    assert lookalike_main(["eval", "--model", "demo", "--subjects", str(subjects), "--out", str(tmp_path / "r")]) == 2
    assert "symbolic link" in one_error(capsys)


def test_a_link_planted_in_the_run_folder_is_not_written_through(tmp_path):
    """images/<subject> of the run folder links elsewhere: evaluate refuses, the other folder stays empty."""
    subjects, out = subject_dir(tmp_path / "s", names=("cup",)), tmp_path / "out"
    (tmp_path / "victim").mkdir()
    (out / "images").mkdir(parents=True)
    (out / "images" / "cup").symlink_to(tmp_path / "victim")
    with pytest.raises(LookalikeError, match="symbolic link"):
        evaluate(FakePersonalizer(), subjects, out, scorers=Scorers(clip=demo_clip_scorer()), metrics=["clip_i"],
                 steps=1, process=SINGLE, progress=False)
    assert list((tmp_path / "victim").iterdir()) == []


def test_records_with_hostile_subjects_or_image_paths_are_ignored(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    good = {"subject": "cup", "prompt_index": 0, "seed": 0, "prompt": "p", "image": "../../../etc/passwd",
            "scores": {"clip_i": 0.5}}
    lines = [json.dumps(good)] + [json.dumps({**good, "subject": name}) for name in escapes()]
    (out / "items.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="damaged"):
        records = read_records(out)
    assert list(records) == [("cup", 0, 0)]
    assert records[("cup", 0, 0)]["image"] == "images/cup/0-0.png"


@pytest.fixture
def _one_thread():
    yield from single_thread()


def test_training_records_outside_the_data_root_are_skipped_unread(tmp_path, _one_thread, monkeypatch):
    from lookalike.training import records as records_module
    from lookalike.training.loop import train

    outside = write_image(tmp_path / "outside.png", seed=5)
    extra = [{"image_file": os.path.relpath(outside, tmp_path / "data"), "text": "up and out"},
             {"image_file": str(outside), "text": "absolute"},
             {"image_file": "img0.png", "text": "a face", "id_embed_file": "../../id.npy"}]
    data = write_json_set(tmp_path / "data", 4, extra=extra)
    opened = []
    real = records_module.load_image

    def spy(ref):
        opened.append(Path(ref).resolve() if not hasattr(ref, "size") else None)
        return real(ref)
    monkeypatch.setattr(records_module, "load_image", spy)
    result = train(run_config(tmp_path, data, steps=4, batch_size=2))
    assert result.skipped.get("path outside the data root", 0) >= 1
    assert outside.resolve() not in opened

"""Evaluation subject sets: the DreamBench layout (prompts.json) and the plain folder-per-subject layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lookalike.errors import LookalikeError
from lookalike.evaluation.subjects import (
    LIVE_PROMPTS,
    OBJECT_PROMPTS,
    class_from_name,
    format_prompt,
    load_subject_set,
)

from helpers import DREAMBENCH


def dreambench() -> Path:
    return DREAMBENCH


def photo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


def test_zero_shot_prompts_drop_the_unique_token_and_use_the_class_word():
    assert format_prompt("a {0} {1} on the beach", "dog") == "a dog on the beach"
    assert format_prompt("a red {0} {1}", "stuffed animal") == "a red stuffed animal"
    assert format_prompt("a photo of a {class}  in snow", "mug") == "a photo of a mug in snow"
    assert format_prompt("a plain prompt", "dog") == "a plain prompt"


def test_class_words_come_from_dreambench_or_the_folder_name():
    assert class_from_name("dog2") == "dog"
    assert class_from_name("bear_plushie") == "stuffed animal"
    assert class_from_name("pink_sunglasses") == "glasses"
    assert class_from_name("my_mug2") == "my mug"


def test_dreambench_layout_reads_classes_prompt_sets_and_images():
    subjects = load_subject_set(dreambench())
    data = json.loads((DREAMBENCH / "prompts.json").read_text())
    assert subjects.layout == "dreambench" and len(subjects.subjects) == len(data["subjects"])
    by_name = {s.name: s for s in subjects.subjects}
    dog, bag = by_name["dog"], by_name["backpack"]  # in the full set and in the shipped one
    assert (dog.class_word, dog.live, bag.class_word, bag.live) == ("dog", True, "backpack", False)
    assert dog.prompts[10] == "a dog wearing a red hat"
    assert bag.prompts[10] == "a backpack with a wheat field in the background"
    assert all(len(s.prompts) == 25 and all(p.is_file() for p in s.references) for s in subjects.subjects)
    assert [len(s.references) for s in subjects.subjects] == [len(s["images"]) for s in data["subjects"]]
    live = {s["name"] for s in data["subjects"] if s["live"]}
    assert {s.name for s in subjects.subjects if s.live} == live and {"cat", "dog"} <= live
    assert not subjects.face


def test_built_in_templates_are_dreambench_verbatim():
    data = json.loads((dreambench() / "prompts.json").read_text())
    assert list(OBJECT_PROMPTS) == data["object_prompts"]
    assert list(LIVE_PROMPTS) == data["live_subject_prompts"]


def test_limits_take_the_first_subjects_and_prompts():
    small = load_subject_set(dreambench()).limited(subjects=2, prompts=3)
    listed = json.loads((DREAMBENCH / "prompts.json").read_text())["subjects"]
    assert [s.name for s in small.subjects] == [s["name"] for s in listed[:2]]
    assert all(len(s.prompts) == 3 for s in small.subjects)
    with pytest.raises(LookalikeError, match="limit-prompts"):
        small.limited(prompts=0)


def test_plain_layout_with_shared_and_own_prompts_and_subjects_json(tmp_path: Path):
    photo(tmp_path / "alice" / "1.jpg")
    photo(tmp_path / "alice" / "2.png")
    photo(tmp_path / "mug2" / "a.webp")
    (tmp_path / "alice" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    (tmp_path / "prompts.txt").write_text("# shared\na {0} {1} in the snow\n\na portrait of a {class}\n")
    (tmp_path / "mug2" / "prompts.txt").write_text("a {1} on a desk\n")
    (tmp_path / "subjects.json").write_text(json.dumps({"alice": {"class": "woman", "face": True}}))
    subjects = load_subject_set(tmp_path)
    assert subjects.layout == "plain" and [s.name for s in subjects.subjects] == ["alice", "mug2"]
    alice, mug = subjects.subjects
    assert [p.name for p in alice.references] == ["1.jpg", "2.png"]
    assert alice.prompts == ("a woman in the snow", "a portrait of a woman") and alice.face and alice.live
    assert mug.prompts == ("a mug on a desk",) and mug.class_word == "mug" and not mug.face
    assert not subjects.face


def test_plain_layout_defaults_to_dreambench_prompts_and_face_sets_flag_every_subject(tmp_path: Path):
    photo(tmp_path / "dog9" / "0.jpg")
    photo(tmp_path / "teapot" / "0.jpg")
    dog, teapot = load_subject_set(tmp_path).subjects
    assert dog.prompts[10] == "a dog wearing a red hat" and teapot.prompts[10].startswith("a teapot with a wheat")
    (tmp_path / "subjects.json").write_text(json.dumps({"face": True}))
    assert load_subject_set(tmp_path).face


def test_bad_subject_folders_are_refused_in_one_sentence(tmp_path: Path):
    with pytest.raises(LookalikeError, match="not a folder"):
        load_subject_set(tmp_path / "absent")
    with pytest.raises(LookalikeError, match="holds no subject"):
        load_subject_set(tmp_path)
    photo(tmp_path / "a" / "0.jpg")
    (tmp_path / "prompts.txt").write_text("# nothing\n\n")
    with pytest.raises(LookalikeError, match="holds no prompt"):
        load_subject_set(tmp_path)
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "prompts.json").write_text(json.dumps({"object_prompts": ["a {1}"], "subjects": [
        {"name": "cup", "class": "cup", "images": ["cup/0.jpg"]}]}))
    with pytest.raises(LookalikeError, match="lacks its reference"):
        load_subject_set(bench)
    (bench / "prompts.json").write_text("{not json")
    with pytest.raises(LookalikeError, match="fix the JSON"):
        load_subject_set(bench)

"""The procedural world of issue 6: its data, its measurement, the one-command rebuild and the shipped demo."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from lookalike import cli
from lookalike.pipeline.demo import DEMO_DIR, DEMO_TRAINED
from lookalike.training.data import ImageSource
from lookalike.training.records import json_records
from lookalike.world.data import POOL_SIZE, make_split, render_bank
from lookalike.world.evaluate import colour_histogram, read_background, read_position
from lookalike.world.render import (
    COLOURS,
    PATTERNS,
    SHAPES,
    Identity,
    Scene,
    all_identities,
    caption,
    random_scene,
    render,
)
from lookalike.world.tokenizer import WORDS, world_tokenizer

trained_only = pytest.mark.skipif(not DEMO_TRAINED, reason="no trained demo model ships in this checkout")
SUMMARY = re.compile(r"^identity top-1: ([\d.]+) \(no adapter: ([\d.]+), references: ([\d.]+)\); background: ([\d.]+)$")


def test_every_world_word_is_one_token_and_other_text_still_tokenizes():
    tok = world_tokenizer()
    for word in WORDS:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    assert len(tok("a dog in the snow", add_special_tokens=False).input_ids) > 5  # characters, never an error


def test_diffusion_captions_name_scene_but_never_identity():
    rng = np.random.default_rng(0)
    identity_words = set(COLOURS) | set(SHAPES) | set(PATTERNS)
    for _ in range(200):
        scene = random_scene(rng)
        words = set(caption(scene).replace(",", " ").split())
        assert scene.background in words and not words & identity_words


def test_renders_are_deterministic_and_partners_sharing_colours_differ():
    scene = Scene("gray", "center", 0.56)
    a, b = Identity("star", "red", "blue", "striped"), Identity("circle", "red", "blue", "checked")
    assert np.array_equal(render(a, scene), render(a, scene))
    assert np.abs(render(a, scene).astype(int) - render(b, scene).astype(int)).sum() > 1000


def test_held_out_pools_pair_subjects_sharing_colours_and_no_training_data_shows_them():
    split = make_split(0)
    assert len(split.pools) == 2 and all(len(pool) == POOL_SIZE for pool in split.pools)
    for pool in split.pools:
        pairs = [(i.primary, i.secondary) for i in pool]
        assert all(pairs.count(p) == 2 for p in pairs)  # every subject has a colour twin in its pool
        assert len(set(pool)) == POOL_SIZE
    assert not set(split.held_out) & set(split.train)
    assert len(split.train) + len(split.held_out) == len(all_identities())
    bank = render_bank(split.train, 300, seed=1)
    assert not set(bank.identities) & set(split.held_out)


def test_pixel_readers_recover_background_and_position_of_true_renders():
    rng = np.random.default_rng(3)
    ids = all_identities()
    hits_bg, hits_pos = [], []
    for _ in range(150):
        identity, scene = ids[rng.integers(len(ids))], random_scene(rng)
        image = render(identity, scene)
        hits_bg.append(read_background(image) == scene.background)
        hits_pos.append(read_position(image) == scene.position)
    assert np.mean(hits_bg) == 1.0 and np.mean(hits_pos) >= 0.97


def test_colour_histogram_ignores_the_background():
    identity = Identity("square", "green", "yellow", "split")
    on_black = colour_histogram(render(identity, Scene("black", "center", 0.56)))
    on_white = colour_histogram(render(identity, Scene("white", "left", 0.56)))
    other = colour_histogram(render(Identity("square", "red", "blue", "split"), Scene("black", "center", 0.56)))
    assert np.abs(on_black - on_white).sum() < 0.3 < np.abs(on_black - other).sum()  # colours, not background


def test_identity_tuning_trains_the_vision_tower_and_leaves_the_text_tower_bit_identical():
    import torch

    from lookalike.world.models import clip_model
    from lookalike.world.pretrain import tune_clip_vision

    torch.manual_seed(0)
    bank = render_bank(make_split(0).train[:12], 48, seed=3)
    clip = clip_model(0)
    text_before = {k: v.clone() for k, v in clip.text_model.state_dict().items()}
    vision_before = {k: v.clone() for k, v in clip.vision_model.state_dict().items()}
    losses = tune_clip_vision(clip, bank, steps=25, seed=1, batch=12, lr=1e-3)
    assert all(torch.equal(v, clip.text_model.state_dict()[k]) for k, v in text_before.items())
    assert any(not torch.equal(v, clip.vision_model.state_dict()[k]) for k, v in vision_before.items())
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # every batch holds the 12 identities: the loss must fall


def test_training_records_feed_the_reference_file_to_the_image_encoder(tmp_path):
    target, reference = tmp_path / "t.png", tmp_path / "r.png"
    identity = Identity("diamond", "blue", "orange", "bordered")
    Image.fromarray(render(identity, Scene("black", "left", 0.56))).save(target)
    Image.fromarray(render(identity, Scene("white", "right", 0.56))).save(reference)
    (tmp_path / "d.json").write_text(json.dumps([{"image_file": "t.png", "text": "x", "reference_file": "r.png"}]))
    records = json_records(tmp_path / "d.json", tmp_path)
    source = ImageSource(records, 32, ("patch",), [world_tokenizer()], clip_size=32)
    sample = source.load(0, crop_u=None)
    seen = (sample["clip_pixels"].permute(1, 2, 0) * 0.27 + 0.45).mean(dim=(0, 1))  # roughly de-normalised
    assert float(seen.mean()) > 0.6  # the white-background reference, not the black-background target


@pytest.mark.slow
def test_quick_rebuild_runs_every_stage_and_its_model_generates_through_the_cli(tmp_path, capsys):
    build = tmp_path / "build"
    assert cli.main(["demo", "--rebuild", str(build), "--quick"]) == 0
    model = build / "model"
    for stage in ("data", "clip", "vae", "base", "adapter", "judge", "model", "evaluate"):
        assert (build / stage / "DONE").is_file(), stage
    figures = json.loads((model / "evaluation.json").read_text())
    assert set(figures) >= {"adapter", "no_adapter", "references"}
    assert SUMMARY.match(capsys.readouterr().out.strip().splitlines()[-2])  # the table, then "rebuilt ..."
    reference = tmp_path / "ref.png"
    Image.fromarray(render(Identity("star", "red", "blue", "striped"), Scene("gray", "center", 0.56))).save(reference)
    out = tmp_path / "x.png"
    assert cli.main(["generate", "--model", str(model), "--adapter", str(model / "adapter.safetensors"),
                     "--reference", str(reference), "--prompt", "a thing on a white background, top left",
                     "--steps", "2", "--size", "32", "--device", "cpu", "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 32)
    before = {stage: (build / stage / "DONE").read_text() for stage in ("base", "adapter")}
    assert cli.main(["demo", "--rebuild", str(build), "--quick"]) == 0  # every stage done: nothing reruns
    assert before == {stage: (build / stage / "DONE").read_text() for stage in ("base", "adapter")}


@trained_only
def test_demo_model_generates_from_a_world_reference_with_the_cli_defaults(tmp_path):
    reference = tmp_path / "ref.png"
    Image.fromarray(render(Identity("cross", "purple", "yellow", "checked"), Scene("teal", "left", 0.56))).save(reference)
    out = tmp_path / "x.png"
    assert cli.main(["generate", "--model", "demo", "--reference", str(reference), "--prompt",
                     "a thing on a white background, center", "--out", str(out)]) == 0
    image = Image.open(out)
    assert image.size == (32, 32) and image.text["model"] == "demo"


@trained_only
def test_demo_out_writes_a_grid_of_references_and_generations(tmp_path):
    assert cli.main(["demo", "--out", str(tmp_path), "--per-subject", "1"]) == 0
    grid = Image.open(tmp_path / "demo_grid.png")
    assert grid.size[0] > 128 * 2 and "captions" in grid.text
    assert len(list(tmp_path.glob("reference_*.png"))) == 10


@pytest.mark.slow
@trained_only
def test_shipped_demo_evaluation_reproduces_its_recorded_figures(capsys):
    recorded = json.loads((DEMO_DIR / "evaluation.json").read_text())
    assert cli.main(["demo", "--evaluate", "--per-subject", str(recorded["per_subject"])]) == 0
    match = SUMMARY.match(capsys.readouterr().out.strip().splitlines()[-1])
    assert match, "the last line is the one-line summary"
    a, b, c, d = (float(x) for x in match.groups())
    assert abs(a - recorded["adapter"]["identity_top1"]) <= 0.05
    assert abs(b - recorded["no_adapter"]["identity_top1"]) <= 0.05
    assert abs(c - recorded["references"]["identity_top1"]) <= 0.05
    assert abs(d - recorded["adapter"]["background"]) <= 0.05

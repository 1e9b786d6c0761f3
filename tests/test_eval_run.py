"""Evaluation runs: items, sharding, resume after a kill, reports, and the end-to-end ``demo`` command."""

from __future__ import annotations

import argparse
import json
import re
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from lookalike.cli.eval import add_eval_parser
from lookalike.errors import LookalikeError
from lookalike.evaluation.demo import demo_clip_scorer, demo_dino_scorer, tiny_clip_model, tiny_dino_model
from lookalike.evaluation.run import evaluate, plan_items
from lookalike.evaluation.scorers import Scorers
from lookalike.evaluation.store import Item, read_records, shard_items
from lookalike.evaluation.subjects import load_subject_set
from lookalike.pipeline.tiny import tiny_tokenizer

from helpers import DREAMBENCH

SINGLE = (0, 1, lambda: None)


class FakePersonalizer:
    """Counts generate calls; images are a colour drawn from (prompt, seed); can die after N calls."""

    def __init__(self, die_after: int | None = None) -> None:
        self.adapters = [SimpleNamespace(name="fake-adapter")]
        pipe = SimpleNamespace(name_or_path="fake-model", unet=SimpleNamespace(config=SimpleNamespace(sample_size=8)),
                               vae_scale_factor=2)
        pipe.__call__ = lambda prompt=None, guidance_scale=7.5: None
        self.pipe = pipe
        self.calls: list[list[str]] = []
        self.die_after = die_after

    def encode(self, images, adapter=None, combine="concat"):
        return ("subject", tuple(images), adapter, combine)

    def generate(self, prompt, subject=None, scale=1.0, generator=None, **kwargs):
        if self.die_after is not None and len(self.calls) >= self.die_after:
            raise KeyboardInterrupt
        self.calls.append(list(prompt))
        images = []
        for text, gen in zip(prompt, generator):
            seed = zlib.crc32(f"{text}|{gen.initial_seed()}".encode())
            rgb = np.random.default_rng(seed).integers(0, 256, (kwargs["height"], kwargs["width"], 3), dtype=np.uint8)
            images.append(Image.fromarray(rgb))
        return SimpleNamespace(images=images)


def subject_dir(root: Path, names=("cup", "dog2"), prompts=("a {1} on a desk", "a red {1}", "a {1} in snow")) -> Path:
    for i, name in enumerate(names):
        for j in range(2):
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (24, 24), (40 * i + 20 * j, 100, 200)).save(root / name / f"{j}.png")
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return root


@pytest.fixture(scope="module")
def scorers() -> Scorers:
    return Scorers(clip=demo_clip_scorer(), dino=demo_dino_scorer())


def run(personalizer, subjects: Path, out: Path, scorers: Scorers, **kw):
    return evaluate(personalizer, subjects, out, scorers=scorers, steps=2, process=SINGLE, progress=False, **kw)


# -- items and sharding ---------------------------------------------------------------------------


def test_items_cover_subject_prompt_seed_and_shards_are_disjoint_and_complete(tmp_path: Path):
    items = plan_items(load_subject_set(subject_dir(tmp_path)), seeds=3)
    assert len(items) == 2 * 3 * 3 and len({i.key for i in items}) == len(items)
    assert items[0] == Item("cup", 0, 0, "a cup on a desk") and items[0].image == "images/cup/0-0.png"
    for world in (1, 2, 3, 4, 7, 25):
        shards = [shard_items(items, r, world) for r in range(world)]
        keys = [i.key for shard in shards for i in shard]
        assert sorted(keys) == sorted(i.key for i in items) and len(keys) == len(set(keys))
        assert shards == [shard_items(items, r, world) for r in range(world)]  # deterministic
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        shard_items(items, 2, 2)


def test_a_run_writes_records_images_and_reports(tmp_path: Path, scorers: Scorers):
    p = FakePersonalizer()
    summary = run(p, subject_dir(tmp_path / "s"), tmp_path / "out", scorers, seeds=2)
    out = tmp_path / "out"
    records = read_records(out)
    assert len(records) == 12 and len(p.calls) == 12 and summary.items == 12 and summary.complete
    assert all((out / r["image"]).is_file() for r in records.values())
    assert set(summary.metrics) == {"clip_i", "clip_t", "dino"} and set(summary.subjects) == {"cup", "dog2"}
    values = [r["scores"]["clip_i"] for r in records.values()]
    assert summary.overall["clip_i"].mean == pytest.approx(np.mean(values))
    saved = json.loads((out / "summary.json").read_text())
    assert saved["overall"]["dino"]["n"] == 12 and saved["settings"]["adapter"] == "fake-adapter"
    assert (out / "report.md").is_file() and (out / "references" / "cup" / "0.jpg").is_file()


def test_resume_after_a_kill_generates_only_the_missing_items(tmp_path: Path, scorers: Scorers):
    subjects, out = subject_dir(tmp_path / "s"), tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(FakePersonalizer(die_after=4), subjects, out, scorers)
    assert len(read_records(out)) == 4
    lines = (out / "items.jsonl").read_bytes().splitlines(keepends=True)
    (out / "items.jsonl").write_bytes(b"".join(lines[:2]) + lines[2][:25])  # lose one line, tear another
    again = FakePersonalizer()
    summary = run(again, subjects, out, scorers)
    assert len(again.calls) == 6 - 2 and summary.items == 6
    assert [c[0] for c in again.calls] == ["a cup in snow", "a dog on a desk", "a red dog", "a dog in snow"]
    text = (out / "items.jsonl").read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())  # the torn line was cut off
    third = FakePersonalizer()
    run(third, subjects, out, scorers)
    assert third.calls == []


def test_batches_give_the_same_images_as_single_calls(tmp_path: Path, scorers: Scorers):
    subjects = subject_dir(tmp_path / "s")
    one, four = FakePersonalizer(), FakePersonalizer()
    run(one, subjects, tmp_path / "a", scorers)
    run(four, subjects, tmp_path / "b", scorers, batch_size=4)
    assert [len(c) for c in four.calls] == [3, 3]  # batches never mix subjects
    a, b = read_records(tmp_path / "a"), read_records(tmp_path / "b")
    flat = lambda recs: {(k, m): v for k, r in recs.items() for m, v in r["scores"].items()}  # noqa: E731
    assert flat(a) == pytest.approx(flat(b))


def test_two_processes_share_the_work_and_rank_zero_merges(tmp_path: Path, scorers: Scorers):
    subjects, out = subject_dir(tmp_path / "s"), tmp_path / "out"
    first, second = FakePersonalizer(), FakePersonalizer()
    evaluate(first, subjects, out, scorers=scorers, steps=2, process=(1, 2, lambda: None), progress=False)
    summary = evaluate(second, subjects, out, scorers=scorers, steps=2, process=(0, 2, lambda: None), progress=False)
    assert len(first.calls) == len(second.calls) == 3 and summary.items == 6
    assert sorted(p.name for p in out.glob("items*.jsonl")) == ["items.rank0.jsonl", "items.rank1.jsonl"]


def test_a_new_metric_rescores_saved_images_without_generating(tmp_path: Path, scorers: Scorers):
    subjects, out = subject_dir(tmp_path / "s"), tmp_path / "out"
    run(FakePersonalizer(), subjects, out, scorers, metrics=["clip_i"])
    again = FakePersonalizer()
    summary = run(again, subjects, out, scorers, metrics=["clip_i", "dino"])
    assert again.calls == [] and summary.overall["dino"].n == 6 and summary.overall["clip_i"].n == 6


def test_changed_settings_are_refused_on_resume(tmp_path: Path, scorers: Scorers):
    subjects, out = subject_dir(tmp_path / "s"), tmp_path / "out"
    run(FakePersonalizer(), subjects, out, scorers, limit_prompts=1)
    with pytest.raises(LookalikeError, match="scale 1.0, not 0.5"):
        run(FakePersonalizer(), subjects, out, scorers, scale=0.5)
    with pytest.raises(LookalikeError, match="unknown metric"):
        run(FakePersonalizer(), subjects, out, scorers, metrics=["fid"])


# -- end to end: `lookalike eval --model demo` over DreamBench -------------------------------------


def eval_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lookalike")
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", *argv])
    return args.run(args)


@pytest.fixture(scope="module")
def metric_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    clip, dino = tmp_path_factory.mktemp("clip"), tmp_path_factory.mktemp("dino")
    tiny_clip_model().save_pretrained(clip)
    tiny_tokenizer().save_pretrained(clip)
    tiny_dino_model().save_pretrained(dino)
    return clip, dino


@pytest.fixture
def accelerate_state():
    """Restore accelerate's process-wide state after a CLI run (other tests build their own Accelerator)."""
    from accelerate.state import AcceleratorState, PartialState

    saved = dict(PartialState._shared_state), dict(AcceleratorState._shared_state)
    yield
    for state, old in zip((PartialState, AcceleratorState), saved):
        state._shared_state.clear()
        state._shared_state.update(old)


def test_demo_eval_over_dreambench_completes_and_its_report_opens(tmp_path: Path, metric_dirs, capsys,
                                                                    accelerate_state):
    clip, dino = metric_dirs
    out = tmp_path / "run"
    argv = ["--model", "demo", "--adapter", "plus", "--subjects", str(DREAMBENCH), "--out", str(out),
            "--limit-prompts", "1", "--limit-subjects", "2", "--seeds", "1", "--steps", "2",
            "--clip-model", str(clip), "--dino-model", str(dino), "--no-progress"]
    assert eval_cli(argv) == 0
    assert "2/2 items: CLIP-I" in capsys.readouterr().out
    page = (out / "report.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert sum(s.startswith("images/") for s in sources) == 2
    first_two = json.loads((DREAMBENCH / "prompts.json").read_text())["subjects"][:2]
    assert sum(s.startswith("references/") for s in sources) == sum(len(s["images"]) for s in first_two)
    assert all((out / s).is_file() for s in sources) and "http" not in page.split("<body>")[1]
    assert all(f"a {s['class']} in the jungle" in page for s in first_two)  # the first object prompt
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items"] == 2 and summary["settings"]["metric_models"]["dino"] == str(dino)
    assert Image.open(out / "images" / "backpack" / "0-0.png").size == (64, 64)


def test_cli_compare_and_user_errors(tmp_path: Path, scorers: Scorers, capsys, accelerate_state):
    subjects = subject_dir(tmp_path / "s")
    run(FakePersonalizer(), subjects, tmp_path / "a", scorers, limit_prompts=1)
    run(FakePersonalizer(), subjects, tmp_path / "b", scorers, limit_prompts=1, scale=0.5)
    assert eval_cli(["--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    table = capsys.readouterr().out
    assert "| overall | CLIP-I |" in table and "scale 0.5" in table
    with pytest.raises(LookalikeError, match="needs --subjects"):
        eval_cli(["--model", "demo"])
    with pytest.raises(LookalikeError, match="basic and plus"):
        eval_cli(["--model", "demo", "--adapter", "faceid", "--subjects", str(subjects), "--out", str(tmp_path / "c")])

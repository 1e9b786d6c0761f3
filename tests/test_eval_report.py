"""Evaluation records and reports: torn lines, merging, summaries, HTML/Markdown, and comparing two runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lookalike.errors import LookalikeError
from lookalike.evaluation.report import compare, write_reports
from lookalike.evaluation.store import RecordLog, check_settings, read_records
from lookalike.evaluation.summary import load_summary, summarize


def make_run(out: Path, scores: dict[tuple[str, int, int], dict], **settings) -> Path:
    """A run folder written by hand: run.json and items.jsonl with the given scores."""
    out.mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"model": "m", "adapter": "plus", "scale": 1.0, **settings}))
    with RecordLog(out / "items.jsonl") as log:
        for (subject, index, seed), s in scores.items():
            log.append({"subject": subject, "prompt_index": index, "seed": seed, "prompt": f"a {subject} <{index}>",
                        "image": f"images/{subject}/{index}-{seed}.png", "scores": s})
    return out


def rows(table: str) -> dict[tuple[str, str], list[str]]:
    """(subject, metric) -> the other cells of a Markdown comparison table."""
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] not in ("subject", "---"):
            out[(cells[0], cells[1])] = cells[2:]
    return out


def test_torn_and_damaged_lines_are_skipped_and_the_tail_is_cut_before_appending(tmp_path: Path):
    out = make_run(tmp_path / "run", {("x", 0, 0): {"clip_i": 0.5}, ("x", 1, 0): {"clip_i": 0.7}})
    path = out / "items.jsonl"
    path.write_bytes(path.read_bytes() + b'{"subject": "x", "prompt_index": 2, "se')
    assert sorted(read_records(out)) == [("x", 0, 0), ("x", 1, 0)]
    with RecordLog(path) as log:
        log.append({"subject": "x", "prompt_index": 2, "seed": 0, "scores": {"clip_i": 0.9}})
    assert [json.loads(line)["prompt_index"] for line in path.read_text().splitlines()] == [0, 1, 2]
    path.write_text("garbage\n" + path.read_text())
    with pytest.warns(UserWarning, match="1 damaged line"):
        assert len(read_records(out)) == 3


def test_later_records_add_to_earlier_scores_of_the_same_item(tmp_path: Path):
    out = make_run(tmp_path / "run", {("x", 0, 0): {"clip_i": 0.5, "dino": 0.1}})
    with RecordLog(out / "items.jsonl") as log:
        log.append({"subject": "x", "prompt_index": 0, "seed": 0, "scores": {"dino": 0.3, "clip_t": 0.2}})
    assert read_records(out)[("x", 0, 0)]["scores"] == {"clip_i": 0.5, "dino": 0.3, "clip_t": 0.2}


def test_summary_per_subject_and_overall_with_face_found(tmp_path: Path):
    scores = {("x", 0, 0): {"clip_i": 0.5, "face": 0.4}, ("x", 1, 0): {"clip_i": 0.7, "face": None},
              ("y", 0, 0): {"clip_i": 0.9, "face": 0.6}}
    out = make_run(tmp_path / "run", scores, metrics=["clip_i", "face"])
    summary = summarize(out, expected=[("x", 0, 0), ("x", 1, 0), ("y", 0, 0), ("y", 1, 0)])
    assert summary.metrics == ("clip_i", "face", "face_found") and (summary.items, summary.expected) == (3, 4)
    assert not summary.complete
    assert summary.subjects["x"]["clip_i"].mean == pytest.approx(0.6)
    assert summary.overall["clip_i"].mean == pytest.approx(0.7) and summary.overall["clip_i"].n == 3
    assert summary.overall["face"].mean == pytest.approx(0.5) and summary.overall["face"].n == 2
    assert summary.overall["face_found"].mean == pytest.approx(2 / 3)


def test_reports_render_with_relative_paths_and_escaped_text(tmp_path: Path):
    out = make_run(tmp_path / "run", {("x", 0, 0): {"clip_i": 0.5}, ("x", 0, 1): {"clip_i": 0.6}})
    (out / "references" / "x").mkdir(parents=True)
    (out / "references" / "x" / "0.jpg").write_bytes(b"")
    summary = write_reports(out)
    page = (out / "report.html").read_text()
    assert "a x &lt;0&gt;" in page and "<0>" not in page.split("<body>")[1]
    assert re.findall(r'src="([^"]+)"', page) == ["references/x/0.jpg", "images/x/0-0.png", "images/x/0-1.png"]
    assert "| x | 0.550 ± 0.635 | 2 |" in (out / "report.md").read_text()
    assert load_summary(out).to_dict() == summary.to_dict()


def test_comparison_of_two_runs_gives_both_means_the_difference_and_a_paired_interval(tmp_path: Path):
    a = make_run(tmp_path / "a", {("x", 0, 0): {"clip_i": 0.5, "dino": 0.2}, ("x", 1, 0): {"clip_i": 0.7, "dino": 0.2},
                                  ("y", 0, 0): {"clip_i": 0.6, "dino": 0.2}})
    b = make_run(tmp_path / "b", {("x", 0, 0): {"clip_i": 0.6}, ("x", 1, 0): {"clip_i": 0.9},
                                  ("y", 0, 0): {"clip_i": 0.6}, ("y", 1, 0): {"clip_i": 0.9}}, scale=0.5)
    table = compare(a, b)
    assert "scale 0.5" in table and "DINO" not in table  # only metrics both runs have
    got = rows(table)
    assert list(got) == [("x", "CLIP-I"), ("y", "CLIP-I"), ("overall", "CLIP-I")]
    assert got[("x", "CLIP-I")] == ["0.600", "0.750", "+0.150", "[-0.485, +0.785]", "2"]
    assert got[("y", "CLIP-I")] == ["0.600", "0.750", "+0.150", "–", "1"]
    assert got[("overall", "CLIP-I")] == ["0.600", "0.750", "+0.150", "[-0.148, +0.348]", "3"]


def test_comparing_or_resuming_the_wrong_folders_is_refused(tmp_path: Path):
    with pytest.raises(LookalikeError, match="not a folder"):
        compare(tmp_path / "nope", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LookalikeError, match="no scored items"):
        compare(tmp_path / "empty", tmp_path / "empty")
    settings = {"model": "m", "adapter": "plus", "scale": 1.0, "metric_models": {"dino": "facebook/dino-vits16"}}
    check_settings(tmp_path, settings)
    check_settings(tmp_path, {**settings, "seeds": 3, "metric_models": {"clip_i": "c"}})
    assert json.loads((tmp_path / "run.json").read_text())["metric_models"] == {"dino": "facebook/dino-vits16",
                                                                                "clip_i": "c"}
    with pytest.raises(LookalikeError, match="dino scores from facebook/dino-vits16"):
        check_settings(tmp_path, {**settings, "metric_models": {"dino": "other"}})
    with pytest.raises(LookalikeError, match="adapter 'plus', not 'basic'"):
        check_settings(tmp_path, {**settings, "adapter": "basic"})

"""A run's summary: per subject and overall, each metric's mean and 95% Student-t interval over items."""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LookalikeError
from .metrics import METRICS, Stat, summarize_scores
from .store import Key, read_records, read_settings

SUMMARY_FILE = "summary.json"
OVERALL = "overall"


@dataclass
class Summary:
    """Per-subject and overall :class:`Stat` per metric, with the run's settings and item counts."""

    settings: dict[str, Any]
    metrics: tuple[str, ...]
    subjects: dict[str, dict[str, Stat]]
    overall: dict[str, Stat]
    items: int
    expected: int | None = None
    seconds_per_image: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Whether every planned item is scored (unknown plans count as complete)."""
        return self.expected is None or self.items >= self.expected

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (summary.json)."""
        table = lambda stats: {m: s.to_dict() for m, s in stats.items()}  # noqa: E731
        return {"settings": self.settings, "metrics": list(self.metrics), "items": self.items,
                "expected": self.expected, "seconds_per_image": self.seconds_per_image,
                OVERALL: table(self.overall), "subjects": {k: table(v) for k, v in self.subjects.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Summary:
        """Inverse of :meth:`to_dict`."""
        table = lambda stats: {m: Stat.from_dict(s) for m, s in stats.items()}  # noqa: E731
        return cls(dict(d.get("settings", {})), tuple(d["metrics"]),
                   {k: table(v) for k, v in d["subjects"].items()}, table(d[OVERALL]), int(d["items"]),
                   d.get("expected"), d.get("seconds_per_image"))


def score_rows(records: Mapping[Key, Mapping[str, Any]], metrics: Collection[str]) -> list[dict[str, Any]]:
    """One row of scores per record, with ``face_found`` (1/0) beside ``face``."""
    rows = []
    for record in records.values():
        scores = dict(record.get("scores", {}))
        if "face" in metrics and "face" in scores:
            scores["face_found"] = 0.0 if scores["face"] is None else 1.0
        rows.append(scores)
    return rows


def run_metrics(settings: Mapping[str, Any], records: Mapping[Key, Mapping[str, Any]]) -> tuple[str, ...]:
    """The metrics of a run in report order (asked in run.json or present in records), face_found last."""
    seen = set(settings.get("metrics", ()))
    for record in records.values():
        seen.update(record.get("scores", {}))
    ordered = tuple(m for m in METRICS if m in seen)
    return ordered + (("face_found",) if "face" in ordered else ())


def summarize_records(records: Mapping[Key, Mapping[str, Any]], settings: Mapping[str, Any],
                      expected: int | None = None) -> Summary:
    """The summary of given records: per subject (name order) and over all items."""
    metrics = run_metrics(settings, records)
    by_subject: dict[str, dict[Key, Mapping[str, Any]]] = {}
    for key in sorted(records):
        by_subject.setdefault(key[0], {})[key] = records[key]
    subjects = {name: summarize_scores(score_rows(recs, metrics), metrics) for name, recs in by_subject.items()}
    times = [float(r["seconds"]) for r in records.values() if r.get("seconds") is not None]
    return Summary(dict(settings), metrics, subjects, summarize_scores(score_rows(records, metrics), metrics),
                   len(records), expected, sum(times) / len(times) if times else None)


def summarize(out_dir: str | os.PathLike[str], expected: Collection[Key] | None = None) -> Summary:
    """Summarise a run folder from its records (only the ``expected`` keys when given)."""
    out = Path(out_dir).expanduser()
    if not out.is_dir():
        raise LookalikeError(f"{out_dir} is not a folder; pass the --out folder of a lookalike eval run")
    records = read_records(out)
    if expected is not None:
        wanted = set(expected)
        records = {k: v for k, v in records.items() if k in wanted}
    return summarize_records(records, read_settings(out), None if expected is None else len(set(expected)))


def load_summary(out_dir: str | os.PathLike[str]) -> Summary:
    """summary.json of a run folder (recomputed from the records when it is missing)."""
    path = Path(out_dir).expanduser() / SUMMARY_FILE
    if not path.is_file():
        return summarize(out_dir)
    try:
        return Summary.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError) as exc:
        raise LookalikeError(f"cannot read {path}: {exc}; delete it to have it recomputed") from exc

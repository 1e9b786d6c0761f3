"""A run folder on disk: items, their JSONL records, images written atomically, and the run's settings.

Layout of ``OUT``::

    run.json                   settings that must not change on resume (model, adapter, scale, ...)
    items.jsonl                one JSON record per scored item (items.rank{r}.jsonl per process when sharded)
    images/<subject>/<prompt_index>-<seed>.png
    references/<subject>/<i>.jpg   reference thumbnails, so the reports stand alone
    summary.json, report.md, report.html

Records are appended, flushed and fsynced one line at a time: a kill loses at most the line being
written, which the reader ignores and the next writer cuts off. A later record for the same key
(subject, prompt index, seed) adds to or replaces an earlier one's scores.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LookalikeError
from ..fileio import inside, safe_name, write_atomic

RUN_FILE = "run.json"
ITEMS_FILE = "items.jsonl"
#: run.json fields a resumed run must share with the original (the rest may change).
FIXED_SETTINGS = ("model", "adapter", "scale", "steps", "guidance", "size", "references", "combine",
                  "negative_prompt")
Key = tuple[str, int, int]


@dataclass(frozen=True)
class Item:
    """One generation: a subject, one of its prompts and a seed."""

    subject: str
    prompt_index: int
    seed: int
    prompt: str

    @property
    def key(self) -> Key:
        return (self.subject, self.prompt_index, self.seed)

    @property
    def image(self) -> str:
        """The image's path relative to the run folder."""
        return f"images/{self.subject}/{self.prompt_index}-{self.seed}.png"

    def image_in(self, out: Path) -> Path:
        """The image's path in the run folder ``out``; an error when the subject's name would lead outside."""
        return inside(out, "images", safe_name(self.subject, "subject name"), f"{self.prompt_index}-{self.seed}.png",
                      what="image")


def shard_items(items: Sequence[Item], rank: int, world: int) -> list[Item]:
    """Process ``rank`` of ``world``'s share: every ``world``-th item from ``rank`` (disjoint, covering)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world} processes")
    return list(items[rank::world])


def items_file(out: Path, rank: int, world: int) -> Path:
    """This process's record file: items.jsonl alone, items.rank{r}.jsonl when sharded."""
    return out / (ITEMS_FILE if world == 1 else f"items.rank{rank}.jsonl")


def record_files(out: Path) -> list[Path]:
    """Every record file of a run (one process's or several)."""
    return sorted(p for p in out.glob("items*.jsonl") if p.is_file())


def _parse_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The complete, valid records of one file (a torn last line and damaged lines are skipped)."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    bad = 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
            key = (safe_name(record["subject"], "subject"), int(record["prompt_index"]), int(record["seed"]))
        except (ValueError, KeyError, TypeError):  # LookalikeError included: a subject that is not a plain name
            bad += i < len(lines) - 1  # the last line may be torn by a kill: expected, not reported
            continue
        record["subject"], record["prompt_index"], record["seed"] = key
        record["image"] = Item(key[0], key[1], key[2], "").image  # never a path taken from the file
        yield record
    if bad:
        warnings.warn(f"{path}: skipped {bad} damaged line(s)", stacklevel=2)


def merge(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A later record over an earlier one of the same key: fields replaced, scores added to."""
    if old is None:
        return dict(new)
    return {**old, **new, "scores": {**old.get("scores", {}), **new.get("scores", {})}}


def read_records(out: Path) -> dict[Key, dict[str, Any]]:
    """All records of a run, merged per key (files in name order, lines in file order)."""
    records: dict[Key, dict[str, Any]] = {}
    for path in record_files(out):
        for record in _parse_lines(path):
            key = (record["subject"], record["prompt_index"], record["seed"])
            records[key] = merge(records.get(key), record)
    return records


def repair_tail(path: Path) -> None:
    """Cut a torn last line (one without its newline) off a record file before appending."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)
        f.flush()
        os.fsync(f.fileno())


class RecordLog:
    """Appends records to one JSONL file, each flushed and fsynced before the next."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(path)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()/__exit__

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line, durably."""
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_text(path: Path, text: str) -> Path:
    """Write a text file atomically (UTF-8)."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def check_settings(out: Path, settings: dict[str, Any], write: bool = True) -> dict[str, Any]:
    """Refuse settings that differ from an existing run.json's fixed ones; write the merged run.json."""
    path = out / RUN_FILE
    if not path.is_file():
        if write:
            write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
        return settings
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LookalikeError(f"cannot read {path}: {exc}; it is not a lookalike eval run folder") from exc
    for name in FIXED_SETTINGS:
        if old.get(name) != settings.get(name):
            raise LookalikeError(f"{out} holds a run made with {name} {old.get(name)!r}, not {settings.get(name)!r}; "
                                 f"pass another --out, or the same settings to resume it")
    models = dict(old.get("metric_models", {}))
    for metric, model in settings.get("metric_models", {}).items():
        if models.get(metric, model) != model:
            raise LookalikeError(f"{out} holds {metric} scores from {models[metric]}, not {model}; pass that model "
                                 f"or another --out")
        models[metric] = model
    merged = {**old, **settings, "metric_models": models}
    if write:
        write_text(path, json.dumps(merged, indent=2, sort_keys=True) + "\n")
    return merged


def read_settings(out: Path) -> dict[str, Any]:
    """run.json of a run folder ({} when absent)."""
    path = out / RUN_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LookalikeError(f"cannot read {path}: {exc}; it is not a lookalike eval run folder") from exc

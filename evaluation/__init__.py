"""lookalike eval: DreamBench and face-identity metrics, resumable runs, reports and run comparison.

``evaluate(personalizer, subjects_dir, out_dir)`` generates every subject x prompt x seed, scores
CLIP-I, CLIP-T, DINO (DreamBooth, Ruiz et al. 2023) and face similarity (ArcFace), and writes
items.jsonl, summary.json, report.md and report.html; ``compare(run_a, run_b)`` puts two runs side by side.
Names are imported lazily, so importing this package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "evaluate": "run", "plan_items": "run", "choose_metrics": "run",
    "load_subject_set": "subjects", "SubjectSet": "subjects", "EvalSubject": "subjects", "format_prompt": "subjects",
    "ClipScorer": "scorers", "DinoScorer": "scorers", "FaceScorer": "scorers", "Scorers": "scorers",
    "load_scorers": "scorers",
    "Summary": "summary", "summarize": "summary", "load_summary": "summary",
    "compare": "report", "write_reports": "report",
    "Item": "store", "shard_items": "store",
    "Stat": "metrics", "mean_ci": "metrics", "cosine": "metrics",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

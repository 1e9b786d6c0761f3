"""``evaluate``: generate every subject x prompt x seed, score it, and write the run's records and reports.

Every image starts from noise seeded with its seed (a CPU generator, so the same on every device): two
runs that differ only in adapter, scale or model see the same noise, and their items pair up. A
re-run skips items already scored, scores saved images for newly asked metrics without generating
them again, and generates the rest. Under ``accelerate launch`` the items are split between processes
by :func:`~lookalike.evaluation.store.shard_items`.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import LookalikeError
from ..fileio import FolderLock, inside, safe_name
from .metrics import DEFAULT_METRICS, METRICS
from .report import write_reports
from .scorers import (
    Scorers,
    default_metric_models,
    embed_references,
    load_references,
    load_scorers,
    score_images,
)
from .store import Item, RecordLog, check_settings, items_file, read_records, shard_items, write_atomic
from .subjects import EvalSubject, SubjectSet, load_subject_set
from .summary import Summary, summarize

DEFAULT_STEPS = 50  # the IP-Adapter paper's inference default (DDIM, 50 steps)
THUMBNAIL = 256


def plan_items(subject_set: SubjectSet, seeds: int) -> list[Item]:
    """Every (subject, prompt index, seed), subject-major, then prompt, then seed (seeds 0..N-1)."""
    if seeds < 1:
        raise LookalikeError(f"--seeds must be at least 1, not {seeds}")
    for s in subject_set.subjects:
        safe_name(s.name, "subject name")  # it names folders of the run
    return [Item(s.name, i, seed, prompt) for s in subject_set.subjects
            for i, prompt in enumerate(s.prompts) for seed in range(seeds)]


def choose_metrics(metrics: Sequence[str] | None, subject_set: SubjectSet) -> tuple[str, ...]:
    """The metrics asked for, in report order; by default CLIP-I, CLIP-T, DINO, and face for face sets."""
    chosen = list(metrics) if metrics else list(DEFAULT_METRICS) + (["face"] if subject_set.face else [])
    unknown = [m for m in chosen if m not in METRICS]
    if unknown:
        raise LookalikeError(f"unknown metric {unknown[0]!r}; use {', '.join(METRICS)}")
    return tuple(m for m in METRICS if m in chosen)


def current_process() -> tuple[int, int, Callable[[], None]]:
    """(rank, world size, barrier) from accelerate's PartialState; one plain process gives (0, 1, no-op)."""
    from accelerate import PartialState

    state = PartialState()
    return state.process_index, state.num_processes, state.wait_for_everyone


def _pipeline_default(personalizer: Any, name: str) -> Any:
    """A keyword's default in the wrapped pipeline's ``__call__`` (None when it has none)."""
    param = inspect.signature(personalizer.pipe.__call__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _resolved_size(personalizer: Any, size: int | None) -> int:
    """The output size: the one given, else the pipeline's default (UNet sample size x VAE factor)."""
    if size is not None:
        if size <= 0 or size % 8:
            raise LookalikeError(f"--size must be a positive multiple of 8, not {size}")
        return int(size)
    pipe = personalizer.pipe
    return int(pipe.unet.config.sample_size * getattr(pipe, "vae_scale_factor", 8))


def _model_name(personalizer: Any) -> str:
    pipe = personalizer.pipe
    return str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path") or type(pipe).__name__)


def _todo(mine: Sequence[Item], done: dict, metrics: Sequence[str], out: Path) -> tuple[list[Item], list[Item]]:
    """This process's items to generate, and those whose saved image only lacks some metric."""
    generate, rescore = [], []
    for item in mine:
        record = done.get(item.key)
        if record is None or not item.image_in(out).is_file():
            generate.append(item)
        elif any(m not in record.get("scores", {}) for m in metrics):
            rescore.append(item)
    return generate, rescore


def _save_thumbnails(out: Path, subject: EvalSubject, images: Sequence[Any]) -> None:
    """Reference thumbnails under references/<subject>/ (written once)."""
    for i, image in enumerate(images):
        path = inside(out, "references", safe_name(subject.name, "subject name"), f"{i}.jpg", what="thumbnail")
        if not path.is_file():
            thumb = image.copy()
            thumb.thumbnail((THUMBNAIL, THUMBNAIL))
            write_atomic(path, lambda tmp, t=thumb: t.save(tmp, format="JPEG", quality=90))


def _check_counts(**counts: int | None) -> None:
    """Refuse counts below 1 (None means "all" and passes)."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise LookalikeError(f"--{name.replace('_', '-')} must be at least 1, not {value}")


def _chunks(items: Sequence[Item], size: int) -> list[list[Item]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def evaluate(personalizer: Any, subject_set: SubjectSet | str | os.PathLike[str], out_dir: str | os.PathLike[str],
             *, adapter: str | None = None, scale: float | dict = 1.0, seeds: int = 1,
             metrics: Sequence[str] | None = None, limit_prompts: int | None = None,
             limit_subjects: int | None = None, scorers: Scorers | None = None,
             steps: int = DEFAULT_STEPS, guidance: float | None = None, size: int | None = None,
             negative_prompt: str | None = None, references: int | None = None, combine: str = "concat",
             batch_size: int = 1, model_name: str | None = None, metric_models: dict[str, str] | None = None,
             process: tuple[int, int, Callable[[], None]] | None = None, progress: bool = True) -> Summary:
    """Generate and score every subject x prompt x seed into ``out_dir``; returns the run's summary.

    ``references``: condition on the first N reference images (None: all; every metric still compares
    with all of them). ``guidance``/``size`` None: the pipeline's defaults. ``scorers``: loaded models
    (default: the conventional ones on the personalizer's device). ``process``: (rank, world, barrier);
    default from accelerate. ``model_name`` and ``metric_models`` label the run in run.json. The summary
    covers this call's items (a ``limit_prompts`` re-run of a full run summarises the subset).
    """
    if isinstance(subject_set, (str, os.PathLike)):
        subject_set = load_subject_set(subject_set)
    subject_set = subject_set.limited(limit_subjects, limit_prompts)
    metrics = choose_metrics(metrics, subject_set)
    _check_counts(seeds=seeds, steps=steps, batch_size=batch_size, references=references)
    if combine not in ("concat", "mean"):
        raise LookalikeError(f"--combine must be concat or mean, not {combine!r}")
    if not personalizer.adapters:
        raise LookalikeError("the personalizer has no adapter loaded; call load_adapter(...) before evaluate")
    adapter = adapter or personalizer.adapters[0].name
    rank, world, barrier = process or current_process()
    items = plan_items(subject_set, seeds)  # checks the subject names before anything is written
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out, "lookalike eval") if rank == 0 else contextlib.nullcontext()  # one run per --out
    with lock:
        if scorers is None:
            scorers = load_scorers(metrics, device=personalizer.pipe.unet.device)
            metric_models = {**default_metric_models(metrics), **(metric_models or {})}
        scorers.check(metrics)
        cfg = _pipeline_default(personalizer, "guidance_scale") if guidance is None else float(guidance)
        settings = {"model": model_name or _model_name(personalizer), "adapter": adapter,
                    "scale": scale if isinstance(scale, dict) else float(scale),  # a dict: per-block scales
                    "steps": int(steps), "size": _resolved_size(personalizer, size), "guidance": cfg,
                    "references": references, "combine": combine, "negative_prompt": negative_prompt or None,
                    "subjects": str(subject_set.root), "layout": subject_set.layout,
                    "seeds": int(seeds), "metrics": list(metrics), "metric_models": dict(metric_models or {})}
        check_settings(out, settings, write=rank == 0)  # every process checks, so none waits on a failed one
        barrier()
        todo_gen, todo_score = _todo(shard_items(items, rank, world), read_records(out), metrics, out)
        run = _Runner(personalizer, scorers, metrics, out, settings, adapter, batch_size)
        with RecordLog(items_file(out, rank, world)) as log:
            run.go(subject_set, todo_gen, todo_score, log, progress=progress, position=rank)
        barrier()
        expected = {i.key for i in items}
        return write_reports(out, expected=expected) if rank == 0 else summarize(out, expected=expected)


class _Runner:
    """The generate-and-score loop of one process."""

    def __init__(self, personalizer: Any, scorers: Scorers, metrics: Sequence[str], out: Path,
                 settings: dict[str, Any], adapter: str, batch_size: int) -> None:
        self.p, self.scorers, self.metrics, self.out = personalizer, scorers, tuple(metrics), out
        self.settings, self.adapter, self.batch_size = settings, adapter, batch_size

    def go(self, subject_set: SubjectSet, generate: list[Item], rescore: list[Item], log: RecordLog, *,
           progress: bool, position: int) -> None:
        """Work through the items subject by subject, with one progress bar and its time estimate."""
        from tqdm.auto import tqdm

        by_name = {s.name: s for s in subject_set.subjects}
        names = [s.name for s in subject_set.subjects]
        with tqdm(total=len(generate) + len(rescore), desc="eval", unit="img", disable=not progress,
                  position=position, dynamic_ncols=True) as bar:
            for name in names:
                gen = [i for i in generate if i.subject == name]
                old = [i for i in rescore if i.subject == name]
                if gen or old:
                    self._subject(by_name[name], gen, old, log, bar)

    def _subject(self, subject: EvalSubject, generate: list[Item], rescore: list[Item], log: RecordLog,
                 bar: Any) -> None:
        """Encode one subject, embed its references, then generate/score its items."""
        from PIL import Image

        images = load_references(subject.references)
        _save_thumbnails(self.out, subject, images)
        refs = embed_references(images, self.scorers, self.metrics, subject.name)
        for chunk in _chunks(rescore, self.batch_size):
            saved = []
            for item in chunk:
                with Image.open(item.image_in(self.out)) as im:
                    saved.append(im.convert("RGB"))
            self._record(chunk, saved, refs, log, seconds=None)
            bar.update(len(chunk))
        if not generate:
            return
        chosen = subject.references[: self.settings["references"] or None]
        encoded = self.p.encode(list(chosen), adapter=self.adapter, combine=self.settings["combine"])
        for chunk in _chunks(generate, self.batch_size):
            start = time.perf_counter()
            generated = self._generate(chunk, encoded)
            seconds = (time.perf_counter() - start) / len(chunk)
            for item, image in zip(chunk, generated):
                write_atomic(item.image_in(self.out), lambda tmp, im=image: im.save(tmp, format="PNG"))
            self._record(chunk, generated, refs, log, seconds=seconds)
            bar.update(len(chunk))

    def _generate(self, chunk: list[Item], encoded: Any) -> list[Any]:
        """One pipeline call for a chunk of items of one subject (one seeded CPU generator per image)."""
        import torch

        s = self.settings
        kwargs: dict[str, Any] = {"num_inference_steps": s["steps"], "height": s["size"], "width": s["size"]}
        if s["guidance"] is not None:
            kwargs["guidance_scale"] = s["guidance"]
        if s["negative_prompt"]:
            kwargs["negative_prompt"] = [s["negative_prompt"]] * len(chunk)
        generators = [torch.Generator("cpu").manual_seed(item.seed) for item in chunk]
        out = self.p.generate([item.prompt for item in chunk], subject=encoded, scale=s["scale"],
                              generator=generators, **kwargs)
        return list(out.images)

    def _record(self, items: list[Item], images: list[Any], refs: Any, log: RecordLog,
                seconds: float | None) -> None:
        """Score images (saved already) and append one record per item."""
        rows = score_images(images, [item.prompt for item in items], refs, self.scorers, self.metrics)
        for item, scores in zip(items, rows):
            record: dict[str, Any] = {"subject": item.subject, "prompt_index": item.prompt_index,
                                      "seed": item.seed, "prompt": item.prompt, "image": item.image,
                                      "scores": scores}
            if seconds is not None:
                record["seconds"] = round(seconds, 4)
            log.append(record)

"""``lookalike eval``: the command-line face of :func:`~lookalike.evaluation.run.evaluate` and ``compare``.

``add_eval_parser(subparsers)`` adds the subcommand (its ``run`` default is :func:`run_eval`). Nothing
heavy is imported until the command runs, so ``lookalike --help`` stays fast. User errors raise
:class:`~lookalike.errors.LookalikeError`; the caller prints ``error: ...`` and exits with code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import LookalikeError
from ..evaluation.metrics import LABELS, METRICS

DEMO = "demo"
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_ADAPTER = "plus"
DTYPES = ("float16", "bfloat16", "float32")
DEMO_SIZE = 64  # the tiny random preset's evaluation size
# Kept equal to scorers.DEFAULT_* (not imported: that module imports torch).
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"
DEFAULT_FACE_MODEL = "buffalo_l"


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "eval", help="measure an adapter on DreamBench or your own subjects (CLIP-I, CLIP-T, DINO, face)",
        description="Generate every subject x prompt x seed, score CLIP-I, CLIP-T and DINO (DreamBench) and "
                    "face similarity (ArcFace), and write items.jsonl, summary.json, report.md and report.html "
                    "into --out. Re-running with the same --out resumes: scored items are skipped.",
        epilog="--subjects takes a DreamBench folder (prompts.json) or a folder with one subfolder of photos per "
               "subject (optional prompts.txt, subjects.json). Prompts are zero-shot: 'a {0} {1} on the beach' "
               "becomes 'a dog on the beach'. Under `accelerate launch` the items are split between processes. "
               "Try offline: lookalike eval --model demo --subjects DIR --out run --limit-prompts 1 --steps 2.")
    p.add_argument("--subjects", metavar="DIR", help="the subject set: a DreamBench folder or one folder per subject")
    p.add_argument("--out", metavar="DIR", help="the run folder (created; reused to resume)")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="print two runs' scores side by side instead of running")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=DEFAULT_MODEL, metavar="ID|FOLDER|demo",
                   help=f"diffusers SD1.5 or SDXL model, or demo (tiny random weights, offline: a smoke run of this "
                        f"evaluation; the trained demo model is measured by `lookalike demo --evaluate`) "
                        f"(default: {DEFAULT_MODEL})")
    m.add_argument("--adapter", default=DEFAULT_ADAPTER, metavar="NAME|FILE",
                   help=f"adapter: registry name, short name or checkpoint file (default: {DEFAULT_ADAPTER})")
    m.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: cuda when available; under "
                                                  "accelerate each process's own GPU)")
    m.add_argument("--dtype", choices=DTYPES, default=None, help="float16 on cuda, float32 on cpu by default")
    g = p.add_argument_group("generation")
    g.add_argument("--scale", type=_non_negative_float, default=1.0, help="adapter scale (default: 1.0)")
    g.add_argument("--seeds", type=_positive_int, default=1, metavar="N", help="seeds 0..N-1 per prompt (default: 1)")
    g.add_argument("--steps", type=_positive_int, default=50, metavar="N", help="denoising steps (default: 50)")
    g.add_argument("--guidance", type=_non_negative_float, default=None, metavar="CFG",
                   help="classifier-free guidance (default: the pipeline's, 7.5 for SD1.5)")
    g.add_argument("--size", type=_positive_int, default=None, metavar="N",
                   help="square image size in pixels (default: the model's, 64 for demo)")
    g.add_argument("--negative-prompt", default="", metavar="TEXT", help="negative prompt (default: none)")
    g.add_argument("--references", type=_positive_int, default=None, metavar="N",
                   help="condition on the first N reference photos of each subject (default: all)")
    g.add_argument("--combine", choices=("concat", "mean"), default="concat",
                   help="how several reference photos are combined (default: concat)")
    g.add_argument("--batch-size", type=_positive_int, default=1, metavar="N", help="images per pipeline call")
    s = p.add_argument_group("metrics")
    s.add_argument("--metrics", nargs="+", choices=METRICS, default=None,
                   help="metrics to compute (default: clip_i clip_t dino, and face for face subject sets)")
    s.add_argument("--clip-model", default=None, metavar="ID|FOLDER",
                   help=f"CLIP for CLIP-I and CLIP-T (default: {DEFAULT_CLIP_MODEL}; demo with --model demo)")
    s.add_argument("--dino-model", default=None, metavar="ID|FOLDER",
                   help=f"DINO ViT for the DINO score (default: {DEFAULT_DINO_MODEL}; demo with --model demo)")
    s.add_argument("--face-model", default=DEFAULT_FACE_MODEL, metavar="PACK|FOLDER",
                   help=f"insightface pack for face similarity (default: {DEFAULT_FACE_MODEL} in ~/.insightface)")
    s.add_argument("--face-detector", choices=("insightface", "yunet"), default="insightface",
                   help="face detector (yunet needs --yunet-model)")
    s.add_argument("--yunet-model", default=None, metavar="FILE", help="YuNet ONNX file for --face-detector yunet")
    q = p.add_argument_group("quick runs")
    q.add_argument("--limit-prompts", type=_positive_int, default=None, metavar="N",
                   help="only the first N prompts of each subject")
    q.add_argument("--limit-subjects", type=_positive_int, default=None, metavar="N", help="only the first N subjects")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_eval)
    return p


def _device_and_dtype(args: argparse.Namespace, state_device: Any) -> tuple[Any, Any]:
    """--device/--dtype with defaults: the process's device (cuda when present), float16 on cuda."""
    import torch

    try:
        device = torch.device(args.device) if args.device else torch.device(state_device)
    except RuntimeError as exc:
        raise LookalikeError(f"unknown --device {args.device!r}; use cuda, cuda:N, mps or cpu") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LookalikeError(f"--device {args.device} was asked for but torch sees no CUDA GPU; use --device cpu")
    return device, getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))


def _load_personalizer(args: argparse.Namespace, device: Any, dtype: Any) -> tuple[Any, str]:
    """The model with the adapter loaded, and the adapter's name."""
    if args.model == DEMO:
        from ..pipeline.demo import demo_personalizer

        if Path(args.adapter).expanduser().is_file():
            p = demo_personalizer(None)
            return p, p.load_adapter(Path(args.adapter).expanduser())
        p = demo_personalizer(args.adapter)
        return p, p.adapters[0].name
    from ..pipeline.personalizer import Personalizer

    p = Personalizer.from_pretrained(args.model, dtype=dtype, device=device)
    p.pipe.set_progress_bar_config(disable=True)
    return p, p.load_adapter(args.adapter)


def _load_scorers(args: argparse.Namespace, metrics: tuple[str, ...], device: Any) -> tuple[Any, dict[str, str]]:
    """The metric models (demo ones where asked), and their names for run.json."""
    from ..evaluation.scorers import Scorers, load_scorers

    demo = args.model == DEMO
    clip = args.clip_model or (DEMO if demo else DEFAULT_CLIP_MODEL)
    dino = args.dino_model or (DEMO if demo else DEFAULT_DINO_MODEL)
    real = [m for m in metrics if not ((m in ("clip_i", "clip_t") and clip == DEMO) or (m == "dino" and dino == DEMO))]
    scorers = load_scorers(real, clip_model=clip, dino_model=dino, face_model=args.face_model, device=device,
                           face_detector=args.face_detector, yunet_model=args.yunet_model) if real else Scorers()
    if clip == DEMO and {"clip_i", "clip_t"} & set(metrics):
        from ..evaluation.demo import demo_clip_scorer

        scorers.clip = demo_clip_scorer()
    if dino == DEMO and "dino" in metrics:
        from ..evaluation.demo import demo_dino_scorer

        scorers.dino = demo_dino_scorer()
    names = {"clip_i": clip, "clip_t": clip, "dino": dino, "face": args.face_model}
    return scorers, {m: names[m] for m in metrics}


def _print_summary(summary: Any, out: Path) -> None:
    """The overall scores and where the reports are."""
    parts = [f"{LABELS.get(m, m)} {s.mean:.3f}" + (f" ± {s.half_width:.3f}" if s.half_width is not None else "")
             for m, s in summary.overall.items()]
    done = f"{summary.items}/{summary.expected}" if summary.expected is not None else str(summary.items)
    print(f"{done} items: " + ", ".join(parts))
    print(f"wrote {out / 'report.html'}, {out / 'report.md'} and {out / 'summary.json'}")


def run_eval(args: argparse.Namespace) -> int:
    """Run ``lookalike eval`` (or ``--compare``); returns the exit code."""
    if args.compare:
        from ..evaluation.report import compare

        print(compare(*args.compare), end="")
        return 0
    if not args.subjects or not args.out:
        raise LookalikeError("lookalike eval needs --subjects DIR and --out DIR (or --compare RUN_A RUN_B)")
    from ..evaluation.run import choose_metrics, current_process, evaluate
    from ..evaluation.subjects import load_subject_set

    subject_set = load_subject_set(args.subjects).limited(args.limit_subjects, args.limit_prompts)
    metrics = choose_metrics(args.metrics, subject_set)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise LookalikeError(f"--out {args.out} is a file; pass a folder for the run")
    from accelerate import PartialState

    state = PartialState(cpu=args.model == DEMO or args.device == "cpu")  # cpu: processes split work over gloo
    device, dtype = ("cpu", None) if args.model == DEMO else _device_and_dtype(args, state.device)
    personalizer, adapter = _load_personalizer(args, device, dtype)
    scorers, models = _load_scorers(args, metrics, device)
    size = args.size or (DEMO_SIZE if args.model == DEMO else None)
    summary = evaluate(personalizer, subject_set, out, adapter=adapter, scale=args.scale, seeds=args.seeds,
                       metrics=metrics, scorers=scorers, steps=args.steps, guidance=args.guidance, size=size,
                       negative_prompt=args.negative_prompt or None, references=args.references,
                       combine=args.combine, batch_size=args.batch_size, model_name=args.model,
                       metric_models=models, process=current_process(), progress=not args.no_progress)
    if state.is_main_process:
        _print_summary(summary, out)
    return 0

"""The command line's argument types and the option groups ``generate`` and ``encode`` share."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from ..errors import LookalikeError
from ..pipeline.checks import MAX_SEED, MAX_STEPS, check_size
from ..pipeline.plan import DEFAULT_ADAPTER, DEFAULT_MODEL, DEMOS

DTYPES = ("float16", "bfloat16", "float32")

# -- argument types ----------------------------------------------------------------------------------------


def _number(cast: Callable[[str], Any], low: float, high: float = math.inf) -> Callable[[str], Any]:
    """An argparse type: ``cast(text)`` (int or float), finite and within [low, high]."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' * (cast is int)}number") from None
        if not (low <= value <= high) or (isinstance(value, float) and not math.isfinite(value)):
            lo, hi = (f"{v:g}" if isinstance(v, float) else str(v) for v in (low, high))
            limit = f"between {lo} and {hi}" if math.isfinite(high) else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"{text} must be {limit}")
        return value

    return parse


_positive_int = _number(int, 1)
_steps = _number(int, 1, MAX_STEPS)
_non_negative_int = _number(int, 0)
_seed = _number(int, 0, MAX_SEED)
_non_negative_float = _number(float, 0.0)
_fraction = _number(float, 0.0, 1.0)


def _size(text: str) -> tuple[int, int]:
    """argparse type: ``N`` or ``WIDTHxHEIGHT`` in pixels, multiples of 8 -> (width, height)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use N (square) or WIDTHxHEIGHT, e.g. 768x512")
    width, height = int(parts[0]), int(parts[-1])
    try:
        check_size(width, height)
    except LookalikeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return width, height


# -- option groups -----------------------------------------------------------------------------------------


def _adapter_help(with_subject: bool) -> str:
    """The --adapter help text, listing the registry's short names and what the demo presets take (from the
    same source as their checks; neither imports torch)."""
    from ..adapters.spec import REGISTRY
    from ..pipeline.demo_files import demo_adapters, said

    shorts = ", ".join(sorted({s.short_name for s in REGISTRY.values() if s.short_name}))
    default = f"{DEFAULT_ADAPTER}; with --subject: the subject's adapter" if with_subject else DEFAULT_ADAPTER
    demos = "; ".join(f"--model {m} offers {said(demo_adapters(m))}" for m in DEMOS)
    return (f"adapter variant: a short name ({shorts}), a full registry name (see `lookalike download "
            f"--help`), a local .safetensors/.bin checkpoint, NAME=FILE (a checkpoint whose variant its shapes "
            f"do not settle), or org/repo/path/file on the hub (default: {default}; {demos})")


def _add_model_options(parser: argparse.ArgumentParser, with_subject: bool) -> None:
    """--model, --adapter, --device and --dtype (generate and encode)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL, metavar="ID|FOLDER|demo",
                       help=f"diffusers text-to-image model, SD1.5 or SDXL: a hub id, a local folder, or `demo` "
                            f"(a tiny built-in model trained on a world of coloured shapes, offline, seconds on a CPU; "
                            f"`tiny-random`: the same shape with random weights, for smoke tests) (default: {DEFAULT_MODEL})")
    group.add_argument("--adapter", default=None, metavar="NAME|FILE", help=_adapter_help(with_subject))
    group.add_argument("--device", default=None, metavar="DEVICE",
                       help="torch device, e.g. cuda, cuda:1, cpu (default: cuda when available, else cpu; "
                            "the demo model always runs on the cpu)")
    group.add_argument("--dtype", choices=DTYPES, default=None,
                       help="weights' precision (default: float16 on cuda, float32 on cpu)")


def _add_reference_options(parser: argparse.ArgumentParser) -> None:
    """--crop, --face-index, --combine, --reference-weight, --negative-reference: how photos are encoded."""
    group = parser.add_argument_group("reference photos")
    group.add_argument("--crop", choices=("center", "pad", "resize"), default="center",
                       help="how a photo is made square for the image encoder (default: center)")
    group.add_argument("--face-index", type=_non_negative_int, default=None, metavar="N",
                       help="FaceID adapters: which face to use, counted left to right from 0 "
                            "(default: the largest face)")
    group.add_argument("--combine", choices=("concat", "mean"), default=None,
                       help="several photos: keep every photo's tokens (concat) or average them (mean) "
                            "(default: concat; mean with --reference-weight)")
    group.add_argument("--reference-weight", action="append", type=_non_negative_float, dest="reference_weights",
                       metavar="W", help="how much a photo counts in the average: repeat once per --reference, "
                                         "in the same order (implies --combine mean)")
    group.add_argument("--negative-reference", action="append", dest="negative_references", metavar="IMG",
                       help="a photo of what the image should move away from (its encoder features replace the "
                            "adapter's blank negative); repeat to average several; not for FaceID adapters")
    group.add_argument("--face-models", metavar="DIR", default=None,
                       help="FaceID and InstantID: the insightface model folder (default: "
                            "~/.insightface/models/buffalo_l; antelopev2 for InstantID). insightface's packs are "
                            "for non-commercial research only; see --face-recognizer")
    group.add_argument("--face-detector", choices=("insightface", "yunet"), default=None,
                       help="FaceID adapters: insightface's detector (default) or OpenCV's YuNet")
    group.add_argument("--yunet-model", metavar="FILE", default=None,
                       help="with --face-detector yunet: the YuNet .onnx file (OpenCV Zoo, MIT)")
    group.add_argument("--face-recognizer", metavar="FILE", default=None,
                       help="an ONNX face recognizer used instead of the pack's (input: one aligned 112x112 RGB "
                            "crop, 1x3x112x112; checked at load); with --face-detector yunet no insightface pack "
                            "is needed, so a recognizer whose licence allows your use replaces the "
                            "non-commercial buffalo_l / antelopev2 models")

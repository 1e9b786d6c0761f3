"""``lookalike generate --subject-for PHRASE=FILE ...``: several subjects placed by their words (auto layout).

Parsing and checking the flags (before any model loads), encoding photos given in place of subject files,
and writing ``--save-regions`` / ``--save-attention`` PNGs beside each image. torch is imported lazily.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LookalikeError
from ..pipeline.output import save_png

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from ..pipeline.personalizer import Personalizer
    from ..pipeline.subject import Subject

SUBJECT_SUFFIX = ".safetensors"


def add_layout_options(parser: argparse.ArgumentParser, source: Any) -> None:
    """--subject-for (in the ``source`` group with --reference/--subject) and the layout flags.

    Their defaults stay None here (the library's, pipeline/layout.py, apply) so that --help imports no torch.
    """
    source.add_argument("--subject-for", action="append", dest="subjects_for", metavar="PHRASE=FILE",
                        help="several subjects in one image, each where its words of --prompt are: a word or "
                             "phrase of the prompt = a subject file or a photo (repeat the phrase for several "
                             "photos); regions come from the prompt's own attention (MS-Diffusion auto layout)")
    g = parser.add_argument_group("several subjects (--subject-for)")
    g.add_argument("--layout-start", type=_open_fraction, default=None, metavar="F",
                   help="the part of the schedule run on text alone while the regions are found (default: 0.2)")
    g.add_argument("--layout-threshold", type=_closed_fraction, default=None, metavar="T",
                   help="a position joins a subject's region where its normalised attention reaches T "
                        "(default: 0.5, MS-Diffusion's)")
    g.add_argument("--save-regions", action="store_true",
                   help="write each subject's region as <image>-region-<phrase>.png beside the image")
    g.add_argument("--save-attention", action="store_true",
                   help="write each phrase's accumulated attention as a heatmap over the image, "
                        "<image>-attention-<phrase>.png")


def _fraction(text: str, low_open: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    ok = (0.0 < value < 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        raise argparse.ArgumentTypeError(f"{text} must lie {'strictly ' * low_open}between 0 and 1")
    return value


def _open_fraction(text: str) -> float:
    return _fraction(text, True)


def _closed_fraction(text: str) -> float:
    return _fraction(text, False)


def read_subjects_for(items: list[str]) -> dict[str, Subject | list[Path]]:
    """``PHRASE=FILE`` flags -> ``{phrase: Subject or [photo, ...]}``, every file read before any model loads."""
    from ..pipeline.plan import check_references, load_subject

    out: dict[str, Any] = {}
    for item in items:
        phrase, sep, file = item.partition("=")
        phrase, file = phrase.strip(), file.strip()
        if not sep or not phrase or not file:
            raise LookalikeError(f"--subject-for {item!r}: write PHRASE=FILE, e.g. --subject-for dog=dog.safetensors")
        if file.lower().endswith(SUBJECT_SUFFIX):
            if phrase in out:
                raise LookalikeError(f"--subject-for gives {phrase!r} twice; a subject file is one subject")
            out[phrase] = load_subject(file)
        else:
            if phrase in out and not isinstance(out[phrase], list):
                raise LookalikeError(f"--subject-for gives {phrase!r} a subject file and a photo; pick one")
            out.setdefault(phrase, []).extend(check_references([file]))
    return out


def check_layout_flags(args: argparse.Namespace) -> None:
    """The layout flags need --subject-for."""
    if not args.subjects_for:
        for flag, value in (("--save-regions", args.save_regions), ("--save-attention", args.save_attention),
                            ("--layout-start", args.layout_start), ("--layout-threshold", args.layout_threshold)):
            if value not in (None, False):
                raise LookalikeError(f"{flag} is about where --subject-for subjects go; give --subject-for "
                                     f"PHRASE=FILE (one subject is enough)")


def layout_settings(args: argparse.Namespace) -> tuple[float, float]:
    """--layout-start and --layout-threshold, the library's defaults where not given."""
    from ..pipeline.layout import LAYOUT_START, LAYOUT_THRESHOLD

    start = LAYOUT_START if args.layout_start is None else args.layout_start
    return start, LAYOUT_THRESHOLD if args.layout_threshold is None else args.layout_threshold


def first_subject(layout: dict[str, Any]) -> Subject | None:
    """The first subject file among the flags (it chooses the adapter when --adapter is not given)."""
    return next((v for v in layout.values() if not isinstance(v, list)), None)


def layout_subjects(layout: dict[str, Any]) -> list[Subject]:
    return [v for v in layout.values() if not isinstance(v, list)]


def needs_encoder(layout: dict[str, Any]) -> bool:
    return any(isinstance(v, list) for v in layout.values())


def encode_layout(p: Personalizer, layout: dict[str, Any], adapter: str, args: argparse.Namespace
                  ) -> dict[str, Subject]:
    """Photos given with --subject-for encoded with the --crop/--face-index options; subject files as they are."""
    return {phrase: p.encode(v, adapter=adapter, crop=args.crop, face_index=args.face_index)
            if isinstance(v, list) else v for phrase, v in layout.items()}


def _slug(phrase: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", phrase.lower()).strip("-")[:40] or "phrase"


def side_paths(image_path: Path, phrases: list[str], kind: str) -> dict[str, Path]:
    """``<stem>-<kind>-<phrase>.png`` beside the image (names made safe and distinct; never another folder)."""
    out, taken = {}, set()
    for i, phrase in enumerate(phrases):
        slug = _slug(phrase)
        if slug in taken:
            slug = f"{slug}-{i}"
        taken.add(slug)
        out[phrase] = image_path.with_name(f"{image_path.stem}-{kind}-{slug}.png")
    return out


def save_layout(result: Any, image: Image.Image, path: Path, args: argparse.Namespace,
                text: dict[str, str]) -> list[Path]:
    """Write the regions and/or attention heatmaps of one generated image beside it."""
    from ..pipeline.layout import attention_overlay, region_image

    written = []
    phrases = list(result.regions)
    if args.save_regions:
        for phrase, target in side_paths(path, phrases, "region").items():
            written.append(save_png(region_image(result.regions[phrase]), target, {**text, "phrase": phrase}))
    if args.save_attention:
        for phrase, target in side_paths(path, phrases, "attention").items():
            overlay = attention_overlay(image, result.attention[phrase])
            written.append(save_png(overlay, target, {**text, "phrase": phrase}))
    return written

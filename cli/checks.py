"""What only the command line checks and reads from its flags: the output path, the flags that go together,
the face options, and encoding without the text-to-image model."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LookalikeError
from ..pipeline.loading import load_personalizer
from ..pipeline.plan import Plan

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..pipeline.subject import Subject


def check_output(text: str, suffix: str, what: str) -> Path:
    """The output path, checked: the right suffix, not a folder, inside a folder that can be written."""
    path = Path(text).expanduser()
    if path.suffix.lower() != suffix:
        raise LookalikeError(f"--out {text} must end in {suffix} ({what}); rename it, e.g. {path.stem}{suffix}")
    if path.is_dir():
        raise LookalikeError(f"--out {text} is a folder; give a file name inside it, e.g. {path / ('out' + suffix)}")
    folder = path.parent.absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise LookalikeError(f"cannot write {text}: {existing} is a file, not a folder; pick another --out")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise LookalikeError(f"cannot write {text}: the folder {existing} is not writable ({exc.strerror}); "
                             f"pick another --out") from None
    return path


def check_combination(args: argparse.Namespace, count: int) -> None:
    """--combine, --reference-weight and --negative-reference fit the --reference photos (before any model
    loads)."""
    from ..pipeline.encode import resolve_combine

    if count == 0:
        given = [flag for flag, value in (("--reference-weight", args.reference_weights), ("--combine", args.combine),
                                          ("--negative-reference", args.negative_references)) if value]
        if given:
            flag = given[0]
            raise LookalikeError(f"{flag} applies to --reference photos, and a --subject file is already encoded: "
                                 f"give {flag} to `lookalike encode` when making the subject")
        return
    resolve_combine(args.combine, args.reference_weights, count)


def face_options(args: argparse.Namespace) -> dict[str, Any]:
    """FaceEncoder.from_folder arguments from --face-models, --face-detector, --yunet-model, --face-recognizer."""
    options: dict[str, Any] = {}
    if getattr(args, "face_models", None):
        options["model_dir"] = args.face_models
    if getattr(args, "face_detector", None):
        options["detector"] = args.face_detector
    if getattr(args, "yunet_model", None):
        options["yunet_model"] = args.yunet_model
    if getattr(args, "face_recognizer", None):
        options["face_recognizer"] = args.face_recognizer
    return options


def encode_references(plan: Plan, references: list[Path], args: argparse.Namespace,
                       device: torch.device | None, dtype: torch.dtype | None) -> Subject:
    """Run only the image encoder(s) the adapter needs (the text-to-image model is not loaded)."""
    if plan.demo:
        p, name = load_personalizer(plan, None, None, face_options(args))
        return p.encode(references, adapter=name, combine=args.combine, crop=args.crop, face_index=args.face_index,
                        weights=args.reference_weights, negative_images=args.negative_references)
    import torch

    from ..pipeline.encode import EncoderSet, encode_subject

    assert device is not None and dtype is not None
    with torch.no_grad():
        return encode_subject(EncoderSet(device, dtype, face_options(args)), plan.spec, references,
                              combine=args.combine, crop=args.crop, face_index=args.face_index,
                              weights=args.reference_weights, negative_images=args.negative_references)

"""``lookalike encode``: reference photos once into a reusable subject file."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import LookalikeError
from ..pipeline.loading import device_and_dtype, quiet_hub, quiet_libraries
from ..pipeline.plan import DEFAULT_ADAPTER, check_references, encode_plan
from .checks import check_combination, check_output, encode_references
from .options import _add_model_options, _add_reference_options


def _add_encode(sub: Any) -> None:
    """The ``encode`` subcommand."""
    p = sub.add_parser(
        "encode", help="encode reference photos once into a reusable subject file",
        description="Run the image encoder(s) an adapter needs on reference photos and save the features, "
                    "so that `lookalike generate --subject FILE` needs no photos and no image encoder.",
        epilog="The subject file records the adapter, the encoder, --combine, the photos' weights and the SHA-256 "
               "of every photo (negative photos included). "
               "Only the image encoder is loaded (not the text-to-image model); --model chooses the base "
               "family that a short --adapter name refers to.",
    )
    p.add_argument("--reference", action="append", dest="references", required=True, metavar="IMG",
                   help="a photo of the subject (JPEG, PNG, WebP); repeat for several photos")
    p.add_argument("--out", required=True, metavar="SUBJECT.safetensors", help="the subject file to write")
    _add_model_options(p, with_subject=False)
    _add_reference_options(p)
    p.set_defaults(run=cmd_encode)


def cmd_encode(args: argparse.Namespace) -> int:
    """``lookalike encode``: reference photos -> a subject file."""
    out = check_output(args.out, ".safetensors", "subjects are saved as safetensors")
    references = check_references(args.references)
    args.negative_references = check_references(args.negative_references) if args.negative_references else None
    check_combination(args, len(references))
    device, dtype = device_and_dtype(args.model, args.device, args.dtype)
    with quiet_hub():
        plan = encode_plan(args.model, args.adapter or DEFAULT_ADAPTER)
    with quiet_hub(), quiet_libraries():
        subject = encode_references(plan, references, args, device, dtype)
    try:
        subject.save(out)
    except OSError as exc:
        raise LookalikeError(f"cannot write {out}: {exc.strerror or exc}; check free space and permissions") from exc
    print(f"wrote {out} ({subject.num_images} image(s) for {subject.adapter}, encoder {subject.encoder})")
    return 0

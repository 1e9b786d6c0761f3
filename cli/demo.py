"""``lookalike demo``: the trained demo model's examples, its evaluation, and the one-command rebuild."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_demo_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="examples, evaluation and rebuild of the trained demo model (a small procedural world)",
        description="The demo model is a tiny text-to-image model and adapter trained from scratch by lookalike "
                    "on a procedural world of coloured, patterned shapes. It knows only that world. "
                    "--out writes held-out references beside what the model drew from them with new captions; "
                    "--evaluate measures identity retrieval (K=10 held-out subjects) and text control; "
                    "--rebuild retrains everything from scratch (about 107 minutes on two CPU cores).",
        epilog="Examples: lookalike demo --out demo/ ; lookalike demo --evaluate ; lookalike demo --rebuild build/ "
               "(add --quick for a minutes-long run of every stage).")
    p.add_argument("--out", metavar="DIR", help="write demo_grid.png (and the references) into DIR")
    p.add_argument("--evaluate", action="store_true", help="print the evaluation table of the demo model")
    p.add_argument("--rebuild", metavar="DIR", help="rebuild the world from scratch in DIR (resumes if stopped)")
    p.add_argument("--quick", action="store_true", help="with --rebuild: tiny budgets, every stage (for CI)")
    p.add_argument("--model-dir", metavar="DIR", help="use this trained demo folder instead of the shipped one "
                   "(e.g. BUILD/model after --rebuild)")
    p.add_argument("--per-subject", type=int, default=4, metavar="N",
                   help="new captions per held-out subject, for --evaluate and --out (default: 4)")
    p.set_defaults(run=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..errors import LookalikeError

    if not (args.out or args.evaluate or args.rebuild):
        raise LookalikeError("say what to do: --out DIR, --evaluate, or --rebuild DIR")
    if args.per_subject < 1:
        raise LookalikeError(f"--per-subject must be 1 or more, not {args.per_subject}")
    model_dir = args.model_dir
    if args.rebuild:
        import logging

        from ..world.build import rebuild

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        model_dir = str(rebuild(args.rebuild, quick=args.quick))
        print(f"rebuilt the demo model in {model_dir}")
    if model_dir is None:
        from ..pipeline.demo import DEMO_DIR, DEMO_TRAINED

        if not DEMO_TRAINED:
            raise LookalikeError(f"no trained demo model in {DEMO_DIR}; rebuild one with `lookalike demo --rebuild DIR`")
    if args.out:
        from ..world.demo import write_grid

        print(f"wrote {write_grid(args.out, model_dir, per_subject=args.per_subject)}")
    if args.evaluate:
        from ..world.demo import evaluate_model

        _, table = evaluate_model(model_dir, per_subject=args.per_subject)
        sys.stdout.write(table + "\n")
    return 0

"""The ``lookalike`` command line: ``generate``, ``encode``, ``info``, ``download``, ``eval``, ``demo`` and ``app``
(one module each in this package; the library below never imports it).

torch, diffusers and transformers are imported inside the commands, never at module level, so that
``lookalike --help`` answers at once. Every input is checked before any model is loaded. Problems the
user can fix (:class:`~lookalike.errors.LookalikeError`) exit with code 2 and one ``error:`` line; an
interruption exits with 130; anything else is an internal error (exit 1, traceback with ``LOOKALIKE_DEBUG=1``).
"""

from __future__ import annotations

import argparse
import sys
import traceback

from .. import __version__
from ..errors import LookalikeError
from ..pipeline.loading import DEBUG_ENV, debug
from .encode import _add_encode
from .generate import _add_generate
from .info import _add_download, _add_info

# -- parser ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its subcommands."""
    from .app import add_app_parser
    from .demo import add_demo_parser
    from .eval import add_eval_parser

    parser = argparse.ArgumentParser(
        prog="lookalike",
        description="Zero-shot personalization of text-to-image models: images of a subject from a few photos.",
        epilog="Try it offline: lookalike generate --model demo --reference photo.jpg --prompt 'a dog' "
               "--out dog.png. Errors exit with code 2; set LOOKALIKE_DEBUG=1 for tracebacks.",
    )
    parser.add_argument("--version", action="version", version=f"lookalike {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_encode(sub)
    _add_info(sub)
    _add_download(sub)
    add_eval_parser(sub)
    add_demo_parser(sub)
    add_app_parser(sub)
    return parser


# -- entry point -------------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    """A message on one line."""
    return " ".join(str(text).split())


def _fail(message: str, code: int) -> int:
    """Print the traceback when debugging, then ``error: message`` on one line; return ``code``."""
    if debug():
        traceback.print_exc()
    print(f"error: {_one_line(message)}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors (code 2)
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
    try:
        return int(args.run(args))
    except LookalikeError as exc:
        return _fail(str(exc), 2)
    except KeyboardInterrupt:
        return _fail("interrupted; every output file written so far is complete", 130)
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError) or (
                isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)):
            return _fail(f"the device ran out of memory ({_one_line(str(exc))[:120]}); lower --size or "
                         f"--num-images, use --dtype float16, or --device cpu", 2)
        detail = _one_line(str(exc))[:300] or "no message"
        return _fail(f"internal error: {type(exc).__name__}: {detail}; rerun with {DEBUG_ENV}=1 for the traceback", 1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The ``lookalike`` command line, a front end on the top floor beside the web page (``app/``).

One module per command (``generate``, ``encode``, ``info``/``download``, ``eval``, ``demo``, ``app``); they call
the library (``pipeline/``, ``evaluation/``, ``world/``), and nothing below imports this package.
"""

from ..pipeline.loading import DEBUG_ENV
from .main import build_parser, main

__all__ = ["DEBUG_ENV", "build_parser", "main"]

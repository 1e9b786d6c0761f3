"""``python -m lookalike``: the command line (``lookalike --help``)."""

from __future__ import annotations

import sys

from lookalike.cli import main

if __name__ == "__main__":
    sys.exit(main())

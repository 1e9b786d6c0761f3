"""Errors lookalike raises for problems a user can fix.

Every message is one sentence that says what was wrong and what to do; the CLI prints it as
``error: <message>`` and exits with code 2.
"""

from __future__ import annotations


class LookalikeError(ValueError):
    """A problem with the user's input, files or set-up, explained in one sentence."""


class CheckpointMismatchError(LookalikeError):
    """A checkpoint does not fit the model or the image encoder it is paired with."""


class UnsafeCheckpointError(LookalikeError):
    """A checkpoint holds pickled objects beyond plain tensors and was refused."""


class MissingFileError(LookalikeError, FileNotFoundError):
    """A weights file is neither on disk, nor cached, nor reachable."""

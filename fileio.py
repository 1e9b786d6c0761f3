"""Atomic file writing: a temporary file in the target's folder, then a rename, so nothing is half-written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import LookalikeError


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, save: Callable[[str], None]) -> Path:
    """Write via ``save(tmp)`` to a temporary file beside ``path``, then rename: never a partial file.

    The file gets the usual permissions (``0o666`` less the umask). An existing file at ``path`` stays
    unchanged when anything fails.
    """
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise LookalikeError(f"cannot write {path}: {exc.strerror or exc}; pick another location") from exc
    try:
        save(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        raise LookalikeError(f"cannot write {path}: {exc.strerror or exc}; check free space and permissions, "
                             f"the previous file (if any) is unchanged") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path

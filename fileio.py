"""Files lookalike writes: atomic writes, paths that stay inside their root, and one-run-per-folder locks.

* :func:`write_atomic` writes a temporary file beside the target (``.NAME.PID-XXXXXXXX.tmp``), then renames
  it: nothing is half-written, and the temporary files of a killed writer are removed by the next write to
  that folder (only when their process is gone and no one holds them).
* :func:`inside` joins a root with parts that come from data (subject names, file names in records) and
  refuses any result outside the root, through ``..``, an absolute path or a symbolic link.
* :class:`FolderLock` lets one run at a time use an output folder; a lock whose process is gone is stale
  and taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import LookalikeError

try:  # POSIX; elsewhere the pid in the lock file alone tells a live holder from a stale one
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: The temporary files write_atomic creates: ``.NAME.PID-XXXXXXXX.tmp`` (mkstemp's 8 random characters).
TMP_PATTERN = re.compile(r"^\..+\.(\d+)-[a-z0-9_]{8}\.tmp$")


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one we may not signal counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def _try_flock(f: IO[Any]) -> bool:
    """Take an exclusive lock on an open file without waiting; True when taken (always True without fcntl)."""
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Remove the temporary files of killed :func:`write_atomic` calls in ``folder``; returns them.

    Only files of write_atomic's own pattern are touched, and only when the process named in the name is
    gone and no process holds the file's lock (so a live writer's file, here or on another host, stays).
    """
    removed = []
    try:
        names = [e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False)]
    except OSError:
        return removed
    for name in names:
        match = TMP_PATTERN.match(name)
        if not match or pid_alive(int(match.group(1))):
            continue
        path = folder / name
        try:
            with open(path, "rb") as f:
                if _try_flock(f):
                    path.unlink()
                    removed.append(path)
        except OSError:
            continue
    return removed


def write_atomic(path: str | os.PathLike, save: Callable[[str], None]) -> Path:
    """Write via ``save(tmp)`` to a temporary file beside ``path``, then rename: never a partial file.

    The file gets the usual permissions (``0o666`` less the umask). An existing file at ``path`` stays
    unchanged when anything fails. Temporary files that killed writers left in the folder are removed.
    """
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise LookalikeError(f"cannot write {path}: {exc.strerror or exc}; pick another location") from exc
    held = os.fdopen(fd, "rb")  # holds the lock that tells other writers this file is in use
    try:
        _try_flock(held)
        save(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        raise LookalikeError(f"cannot write {path}: {exc.strerror or exc}; check free space and permissions, "
                             f"the previous file (if any) is unchanged") from exc
    finally:
        held.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def safe_name(name: str, what: str) -> str:
    """``name`` when it is one plain path component (a subject name, a prompt id); else one-sentence error."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\x00" in name or Path(name).is_absolute() or len(name.encode("utf-8", "replace")) > 200):
        raise LookalikeError(f"{what} {name!r} is not a plain name (no '/', '\\', '..' or empty names); rename it")
    return name


def inside(root: str | os.PathLike, *parts: str | os.PathLike, what: str = "path", links: bool = True) -> Path:
    """``root / parts`` when it stays inside ``root``; else a one-line error.

    For every path built from data: ``inside(out, "images", subject, "0-0.png")``. ``links``: resolve
    symbolic links too (the default; a link that leads out is refused). ``links=False`` checks the names
    alone (no file-system call: for listing millions of training records, whose data may link elsewhere).
    """
    base = Path(root).expanduser()
    joined = base.joinpath(*parts)
    if any("\x00" in str(p) for p in parts):
        raise LookalikeError(f"{what} {joined} holds a NUL character; fix the name")
    if links:
        real_root, real = base.resolve(), joined.resolve()
    else:
        real_root, real = Path(os.path.abspath(base)), Path(os.path.abspath(joined))
    if real != real_root and real_root not in real.parents:
        shown = os.path.join(*[str(p) for p in parts]) if parts else str(joined)
        raise LookalikeError(f"{what} {shown!r} leads outside {base} (through '..', an absolute path or a "
                             f"symbolic link); keep it inside that folder")
    return joined


class FolderLock:
    """One run at a time per folder: ``with FolderLock(out, "lookalike eval"): ...``.

    The lock is ``FOLDER/.lookalike.lock`` holding the owner's pid, host and command, locked with ``flock``
    while the run lives; the kernel drops it when the process ends, even on SIGKILL, so a left-over file
    is stale and taken over. A second run is refused with one sentence naming the owner.
    """

    NAME = ".lookalike.lock"

    def __init__(self, folder: str | os.PathLike, command: str) -> None:
        self.folder, self.command = Path(folder).expanduser(), command
        self.path = self.folder / self.NAME
        self._file: IO[Any] | None = None

    def _owner(self) -> dict[str, Any]:
        try:
            owner = json.loads(self.path.read_text(encoding="utf-8"))
            return owner if isinstance(owner, dict) else {}
        except (OSError, ValueError):
            return {}

    def _busy(self, owner: dict[str, Any]) -> LookalikeError:
        who = f"{owner.get('command', 'another run')} (pid {owner.get('pid', '?')} on {owner.get('host', '?')})"
        return LookalikeError(f"{self.folder} is in use by {who}; wait for it to finish or pass another folder "
                              f"(delete {self.path} only if that run is gone)")

    def acquire(self) -> FolderLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        except OSError as exc:
            raise LookalikeError(f"cannot create the lock {self.path}: {exc.strerror or exc}; check the "
                                 f"folder's permissions") from exc
        if fcntl is not None:
            if not _try_flock(f):
                f.close()
                raise self._busy(self._owner())
        else:  # pragma: no cover - without flock: a live pid on this host holds the lock
            owner = self._owner()
            if owner.get("host") == socket.gethostname() and pid_alive(int(owner.get("pid", 0))) \
                    and owner.get("pid") != os.getpid():
                f.close()
                raise self._busy(owner)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command}) + "\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.seek(0)
                self._file.truncate()
            self._file.close()  # closing drops the flock
            self._file = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

"""One run per output folder (lookalike-train --output, lookalike eval --out), stale locks taken over, and the
temporary files of a writer killed by SIGKILL removed by the next write (a live writer's kept)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_helpers import write_json_set

import lookalike
from lookalike.cli import main as lookalike_main
from lookalike.errors import LookalikeError
from lookalike.fileio import FolderLock, write_atomic
from lookalike.train_encoder import main as train_main

from helpers import one_error

#: The folder holding the ``lookalike`` package under test (symbolic links kept, as in PYTHONPATH).
PACKAGE_PARENT = str(Path(lookalike.__file__).parent.parent)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=PACKAGE_PARENT)
    return env


def _python(code: str) -> subprocess.Popen:
    """A Python process running ``code`` that prints 'ready' once it holds what it should."""
    return subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, text=True)


def _wait_ready(proc: subprocess.Popen) -> None:
    assert proc.stdout.readline().strip() == "ready"


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def holder(folder: Path, command: str) -> subprocess.Popen:
    return _python(f"import time\nfrom lookalike.fileio import FolderLock\n"
                   f"held = FolderLock({str(folder)!r}, {command!r}).acquire()\nprint('ready', flush=True)\ntime.sleep(120)")


def test_a_held_lock_refuses_and_a_dead_holders_lock_is_taken_over(tmp_path):
    proc = holder(tmp_path / "run", "lookalike eval")
    try:
        _wait_ready(proc)
        with pytest.raises(LookalikeError, match=f"in use by lookalike eval \\(pid {proc.pid} "):
            FolderLock(tmp_path / "run", "second").acquire()
    finally:
        _kill(proc)
    assert (tmp_path / "run" / FolderLock.NAME).read_text().strip(), "SIGKILL left the lock file behind"
    with FolderLock(tmp_path / "run", "third"):  # stale: its process is gone
        assert f'"pid": {os.getpid()}' in (tmp_path / "run" / FolderLock.NAME).read_text()


def test_a_second_eval_on_one_out_is_refused_in_one_line(tmp_path, capsys):
    subjects = tmp_path / "set"
    (subjects / "cup").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (16, 16)).save(subjects / "cup" / "0.png")
    out = tmp_path / "run"
    proc = holder(out, "lookalike eval")
    try:
        _wait_ready(proc)
        before = sorted(p.name for p in out.iterdir())
        code = lookalike_main(["eval", "--model", "demo", "--subjects", str(subjects), "--out", str(out),
                               "--steps", "1", "--no-progress", "--metrics", "clip_t"])
        assert code == 2
        assert f"is in use by lookalike eval (pid {proc.pid}" in one_error(capsys)
        assert sorted(p.name for p in out.iterdir()) == before
    finally:
        _kill(proc)


def test_a_second_training_on_one_output_is_refused_in_one_line(tmp_path, capsys):
    data = write_json_set(tmp_path / "data", 4)
    out = tmp_path / "out"
    flags = ["--base", "demo", "--data", str(data), "--output", str(out), "--num-workers", "0",
             "--num-validation", "0", "--batch-size", "1", "--checkpoint-every", "0"]
    first = subprocess.Popen([sys.executable, "-m", "lookalike.train_encoder", *flags, "--steps", "100000"],
                             env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = out / FolderLock.NAME
        deadline = time.time() + 120
        while not (lock.is_file() and lock.read_text().strip()) and time.time() < deadline:
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.1)
        assert train_main([*flags, "--steps", "2"]) == 2
        assert f"is in use by lookalike-train (pid {first.pid}" in one_error(capsys)
        assert first.poll() is None, "the first run goes on"
        assert not (out / "adapter.safetensors").exists()
    finally:
        _kill(first)
    assert train_main([*flags, "--steps", "1"]) == 0, "the killed run's lock is stale"


WRITER = """import sys, time
from lookalike.fileio import write_atomic
def save(tmp):
    open(tmp, "wb").write(b"half a file")
    print("ready", flush=True)
    time.sleep(120)
write_atomic(sys.argv[1], save)
"""


def _tmp_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_sigkilled_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "keep.png").write_bytes(b"old")
    (folder / ".notes.tmp").write_text("not ours")  # another tool's file: never touched
    killed = subprocess.Popen([sys.executable, "-c", WRITER, str(folder / "keep.png")], env=_env(),
                              stdout=subprocess.PIPE, text=True)
    _wait_ready(killed)
    _kill(killed)
    stale = [p for p in _tmp_files(folder) if p.name != ".notes.tmp"]
    assert len(stale) == 1 and stale[0].name.startswith(f".keep.png.{killed.pid}-")
    live = subprocess.Popen([sys.executable, "-c", WRITER, str(folder / "live.png")], env=_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        _wait_ready(live)
        write_atomic(folder / "other.png", lambda tmp: Path(tmp).write_bytes(b"new"))
        left = {p.name for p in _tmp_files(folder)}
        assert stale[0].name not in left, "the killed writer's file is removed"
        assert any(n.startswith(f".live.png.{live.pid}-") for n in left), "a live writer's file stays"
        assert ".notes.tmp" in left
    finally:
        _kill(live)
    assert (folder / "keep.png").read_bytes() == b"old" and (folder / "other.png").read_bytes() == b"new"
    write_atomic(folder / "other.png", lambda tmp: Path(tmp).write_bytes(b"newer"))
    assert {p.name for p in _tmp_files(folder)} == {".notes.tmp"}

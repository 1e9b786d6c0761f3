"""A new user's first contact: the terminal shows lookalike's own output and progress, nothing else."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

from lookalike.compat import TorchvisionFallbackFilter, quiet_torchvision_fallback

from helpers import DREAMBENCH

#: A tqdm bar as it appears on a terminal: "<label>: 50%|#####     | 1/2 [00:01<00:01, 1.2it/s]".
_BAR = re.compile(r"[^\r\n]*\d+%\|[^|\r\n]*\|[^\r\n]*\]")


def _run_with_terminal_stderr(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """Run a command whose stderr is a pseudo-terminal (so progress bars draw); returns (code, stdout, stderr)."""
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    env = {k: v for k, v in os.environ.items() if k != "LOOKALIKE_DEBUG"}
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=child, stdin=subprocess.DEVNULL, env=env)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(parent, 65536)
        except OSError:  # the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    out = proc.stdout.read().decode() if proc.stdout else ""
    code = proc.wait(timeout=300)
    os.close(parent)
    return code, out, b"".join(chunks).decode(errors="replace")


def _without_progress_bars(text: str) -> list[str]:
    """What is left of a terminal's stderr once every progress-bar frame and cursor move is removed."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)  # cursor movement between nested bars
    text = _BAR.sub("", text)
    return [line for line in re.split(r"[\r\n]+", text) if line.strip()]


def test_generate_with_the_demo_model_prints_only_progress_on_stderr(tmp_path: Path):
    out = tmp_path / "out" / "thing.png"
    code, stdout, stderr = _run_with_terminal_stderr(
        [sys.executable, "-m", "lookalike", "generate", "--model", "demo", "--reference", str(DREAMBENCH / "dog" / "00.jpg"),
         "--prompt", "a thing on a white background", "--steps", "2", "--out", str(out)], tmp_path)
    assert code == 0, stderr
    assert out.is_file() and f"wrote {out}" in stdout
    assert _BAR.search(stderr), "the denoising progress is shown on a terminal"
    assert _without_progress_bars(stderr) == []


def test_the_library_drops_transformers_torchvision_fallback_notice_and_nothing_else(tmp_path: Path):
    """Importing lookalike and building a pipeline (whose feature extractor is a CLIP image processor) is quiet."""
    script = (
        "import lookalike\n"
        "from lookalike.pipeline.tiny import tiny_pipeline\n"
        "from transformers import CLIPImageProcessor, SiglipImageProcessor\n"
        "import transformers.utils.import_utils as iu\n"
        "iu.logger.warning('another transformers warning')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torchvision" not in result.stderr
    assert "another transformers warning" in result.stderr  # the filter is narrow: other messages still show


def test_the_filter_keeps_every_other_record_and_is_installed_once():
    logger = logging.getLogger("transformers.utils.import_utils")
    quiet_torchvision_fallback()
    quiet_torchvision_fallback()
    assert sum(isinstance(f, TorchvisionFallbackFilter) for f in logger.filters) == 1
    make = logging.LogRecord
    fallback = make("t", logging.WARNING, "f", 1, "`CLIPImageProcessor` requires torchvision (not installed); "
                    "falling back to `CLIPImageProcessorPil` for backward compatibility.", None, None)
    other = make("t", logging.WARNING, "f", 1, "`Foo` requires torchvision", None, None)
    assert not logger.filter(fallback) and logger.filter(other)

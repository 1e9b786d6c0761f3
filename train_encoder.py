"""``lookalike-train``: one training script for every adapter variant, from one CPU to many GPUs.

    python -m lookalike.train_encoder --base demo --adapter basic --data DATA --output runs/x --steps 100
    accelerate launch --num_processes 8 -m lookalike.train_encoder --base stable-diffusion-v1-5/... ...

Trains the projector and ``to_k_ip``/``to_v_ip`` of an IP-Adapter variant on a frozen SD1.5/SDXL model
(recipe of Ye et al. 2023), with ``--train-lora`` also FaceID's attention LoRA, checkpoints atomically, resumes
bit-identically, exports the official layout.
Flags -> :class:`~lookalike.training.config.TrainConfig` -> :func:`~lookalike.training.loop.train`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from lookalike.errors import LookalikeError
from lookalike.training.config import FlagError, TrainConfig, parse_args


class _Stderr(logging.StreamHandler):
    """A handler writing to ``sys.stderr`` as it is at each message (a caller, or pytest, may replace it after
    the first run; a handler bound to the old stream would write to a closed file)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _setup_logging() -> None:
    log = logging.getLogger("lookalike.train")
    if not log.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def run(config: TrainConfig) -> int:
    """Train as ``config`` says; 0 on success."""
    from lookalike.training.loop import train

    train(config)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: exit code 0, or 2 with one ``error: ...`` line for a fixable problem."""
    try:
        config = parse_args(argv)
        _setup_logging()
        return run(config)
    except (FlagError, LookalikeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Checkpoints: the full training state through accelerate, plus the adapter in the official layout.

``OUTPUT/checkpoint-STEP/`` holds accelerate's state (adapter weights, optimizer, RNG states, the run's
position and counters, EMA) and ``adapter.safetensors`` (official layout, spec in the metadata; EMA weights
when EMA is on). It is written into a temporary folder that is renamed into place once complete, so a run
killed at any moment leaves only complete checkpoints, and ``--resume latest`` picks the newest one.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapters.module import IPAdapter
from ..errors import LookalikeError
from ..weights.io import save_adapter
from .config import TrainConfig

log = logging.getLogger("lookalike.train")
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "train_config.json"
#: Fields a resumed run must share with the run it continues.
MUST_MATCH = ("base", "adapter", "seed", "resolution", "data")


@dataclass
class TrainState:
    """Where the run is: optimizer steps done, sample slots consumed, samples skipped (all processes)."""

    step: int = 0
    consumed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "consumed": self.consumed, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.consumed = int(state["step"]), int(state["consumed"])
        self.skipped = {str(k): int(v) for k, v in state["skipped"].items()}


class EMA:
    """Exponential moving average of the adapter's weights, with the usual warm-up of the decay
    (``min(decay, (1 + n) / (10 + n))`` after ``n`` updates)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self, params: Iterable[torch.nn.Parameter]) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, params):
            s.lerp_(p.detach().float().to(s.device), 1.0 - d)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        self.shadow = [t.to(s.device) for s, t in zip(self.shadow, state["shadow"])]

    def copy_to(self, module: torch.nn.Module) -> None:
        with torch.no_grad():
            for s, p in zip(self.shadow, module.parameters()):
                p.copy_(s.to(p))


def export_adapter(adapter: IPAdapter, ema: EMA | None, path: Path, info: dict[str, Any]) -> Path:
    """Write the adapter (EMA weights when EMA is on) in the official layout with the spec in the metadata."""
    out = copy.deepcopy(adapter).float()
    if ema is not None:
        ema.copy_to(out)
    return save_adapter(out, path, extra_metadata={"lookalike.train": json.dumps(info, sort_keys=True)})


def checkpoints(output: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run folder, oldest first."""
    if not output.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted((s, p) for s, p in found if (p / ADAPTER_FILE).is_file())


def resume_folder(config: TrainConfig) -> Path | None:
    """The checkpoint ``--resume`` names: ``latest`` (None when the run has none yet) or a folder."""
    if not config.resume:
        return None
    if config.resume != "latest":
        return Path(config.resume)
    found = checkpoints(Path(config.output))
    if not found:
        log.info("--resume latest: no checkpoint in %s yet, starting from step 0", config.output)
        return None
    return found[-1][1]


def check_resumable(folder: Path, config: TrainConfig) -> None:
    """Refuse to continue a run that trained something else; warn when its batch layout changed."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise LookalikeError(f"{folder} is not a lookalike-train checkpoint (no {CONFIG_FILE})")
    saved = json.loads(path.read_text())
    for key in MUST_MATCH:
        if saved.get(key) != getattr(config, key):
            raise LookalikeError(f"{folder} was trained with --{key.replace('_', '-')} {saved.get(key)}, this run "
                                 f"has {getattr(config, key)}; use the same value or another --output")
    for key in ("batch_size", "grad_accum", "ema_decay", "cache"):
        if saved.get(key) != getattr(config, key):
            log.warning("resuming with --%s %s (was %s): the run continues but is no longer identical to an "
                        "uninterrupted one", key.replace("_", "-"), getattr(config, key), saved.get(key))


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)


def save_checkpoint(accelerator: Any, config: TrainConfig, state: TrainState, adapter: IPAdapter,
                    ema: EMA | None, info: dict[str, Any]) -> Path:
    """Write ``checkpoint-STEP`` atomically (every process takes part), then keep the newest K."""
    output = Path(config.output)
    final = output / f"checkpoint-{state.step}"
    tmp = output / f".checkpoint-{state.step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        export_adapter(adapter, ema, tmp / ADAPTER_FILE, {**info, "step": state.step})
        (tmp / CONFIG_FILE).write_text(config.to_json())
        _replace_dir(tmp, final)
        for _, old in checkpoints(output)[: -config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final

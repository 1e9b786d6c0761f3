"""Checkpoints: the full training state in safetensors and JSON (nothing pickled), plus the official adapter.

``OUTPUT/checkpoint-STEP/`` holds ``model.safetensors`` (the trained weights), ``state.safetensors`` (the
run's position and skip counts, optimizer, learning-rate schedule, EMA, loss scaler: tensors in the file,
the rest as JSON in its metadata), ``rng-RANK.safetensors`` per process (python, numpy, torch and GPU
generators), ``train_config.json``, ``adapter.safetensors`` (official layout, spec in the metadata; EMA
weights when EMA is on) and, written last, ``checkpoint.json``: every file's size and SHA-256. The folder is
built under a temporary name and renamed into place, so a killed run leaves complete checkpoints only; one
damaged later (a file missing, emptied, truncated or edited) fails its manifest check and is refused with
one sentence, and ``--resume latest`` passes over it to the newest complete one. Reading a checkpoint runs
no code: no pickle is opened (DeepSpeed's engine files, the one exception, are first proven to load with
``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapters.module import IPAdapter
from ..errors import LookalikeError
from ..weights.io import save_adapter
from .config import TrainConfig
from .state import DamagedFile, load_state, rng_states, save_state, set_rng_states

log = logging.getLogger("lookalike.train")
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "train_config.json"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
RNG_FILE = "rng-{rank}.safetensors"
MANIFEST = "checkpoint.json"
ENGINE = "engine"  # DeepSpeed's own files, under DeepSpeed only
FORMAT = 1
#: Fields a resumed run must share with the run it continues.
MUST_MATCH = ("base", "adapter", "seed", "resolution", "data", "train_lora", "lora_rank", "optimizer")


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
        shadow = state["shadow"]
        if not isinstance(shadow, list) or len(shadow) != len(self.shadow) or any(
                not isinstance(t, torch.Tensor) or t.shape != s.shape for s, t in zip(self.shadow, shadow)):
            raise ValueError("the EMA weights do not fit the adapter")
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        self.shadow = [t.to(s.device, s.dtype) for s, t in zip(self.shadow, shadow)]

    def copy_to(self, module: torch.nn.Module) -> None:
        with torch.no_grad():
            for s, p in zip(self.shadow, module.parameters()):
                p.copy_(s.to(p))


def ema_copy(adapter: IPAdapter, ema: EMA | None) -> IPAdapter:
    """A float copy of the adapter holding the EMA weights when EMA is on (what an export writes)."""
    out = copy.deepcopy(adapter).float()
    if ema is not None:
        ema.copy_to(out)
    return out


def export_adapter(adapter: IPAdapter, ema: EMA | None, path: Path, info: dict[str, Any]) -> Path:
    """Write the adapter (EMA weights when EMA is on) in the official layout with the spec in the metadata."""
    out = ema_copy(adapter, ema)
    return save_adapter(out, path, extra_metadata={"lookalike.train": json.dumps(info, sort_keys=True)})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, step: int) -> None:
    """``checkpoint.json``, written last: the step and every file's size and SHA-256."""
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in _files(folder)}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)


def problem(folder: Path, deep: bool = True) -> str | None:
    """Why ``folder`` is not a complete checkpoint (None when it is). ``deep``: check the SHA-256s too."""
    path = folder / MANIFEST
    if not path.is_file():
        if (folder / "custom_checkpoint_0.pkl").exists() or (folder / "random_states_0.pkl").exists():
            return "it is in the pickle format of older lookalike versions, which is not read (it could run code)"
        return f"it has no {MANIFEST} (the save did not finish)"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            return f"its {MANIFEST} is of an unknown format"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST} is not a checkpoint manifest"
    for need in (MODEL_FILE, STATE_FILE, CONFIG_FILE, ADAPTER_FILE, RNG_FILE.format(rank=0)):
        if need not in files:
            return f"its {MANIFEST} does not list {need}"
    for name, entry in files.items():
        if not isinstance(name, str) or not isinstance(entry, dict) or ".." in Path(name).parts \
                or Path(name).is_absolute():
            return f"its {MANIFEST} lists an odd file {name!r}"
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry.get("size"):
            return f"{name} has {file.stat().st_size} bytes, not the {entry.get('size')} written"
        if deep and _sha256(file) != entry.get("sha256"):
            return f"{name} changed after it was written (its SHA-256 differs)"
    return None


def checkpoints(output: Path) -> list[tuple[int, Path]]:
    """The ``checkpoint-STEP`` folders of a run folder (complete or not), oldest first."""
    if not output.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in output.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir())


def _damaged(folder: Path, reason: str) -> LookalikeError:
    return LookalikeError(f"checkpoint {folder} is damaged: {reason}; resume from another checkpoint "
                          f"(--resume latest passes over damaged ones) or start again")


def resume_folder(config: TrainConfig) -> Path | None:
    """The checkpoint ``--resume`` names, checked complete: ``latest`` (the newest complete one, None when
    the run has none yet) or a folder."""
    if not config.resume:
        return None
    if config.resume != "latest":
        folder = Path(config.resume).expanduser()
        reason = problem(folder)
        if reason:
            raise _damaged(folder, reason)
        return folder
    passed = []
    for _, folder in reversed(checkpoints(Path(config.output))):
        reason = problem(folder)
        if reason is None:
            for old, why in passed:
                log.warning("--resume latest: passed over the damaged checkpoint %s (%s)", old, why)
            return folder
        passed.append((folder, reason))
    if passed:
        raise LookalikeError(f"--resume latest: every checkpoint in {config.output} is damaged (newest: "
                             f"{passed[0][0].name}: {passed[0][1]}); delete them to start from step 0")
    log.info("--resume latest: no checkpoint in %s yet, starting from step 0", config.output)
    return None


def check_resumable(folder: Path, config: TrainConfig) -> None:
    """Refuse to continue a run that trained something else; warn when its batch layout changed."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise LookalikeError(f"{folder} is not a lookalike-train checkpoint (no {CONFIG_FILE})")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as exc:
        raise _damaged(folder, f"{CONFIG_FILE} is not a JSON object ({exc})") from exc
    defaults = TrainConfig(data="", output="")  # what a checkpoint of a version without the field ran with
    for key in MUST_MATCH:
        if saved.get(key, getattr(defaults, key)) != getattr(config, key):
            raise LookalikeError(f"{folder} was trained with --{key.replace('_', '-')} {saved.get(key)}, this run "
                                 f"has {getattr(config, key)}; use the same value or another --output")
    if _held_out(saved, defaults) != _held_out(vars(config), defaults):
        log.warning("resuming with other --validate-every/--num-validation: other records are held out, so the "
                    "run continues but is no longer identical to an uninterrupted one")
    for key in ("batch_size", "grad_accum", "ema_decay", "cache"):
        if saved.get(key) != getattr(config, key):
            log.warning("resuming with --%s %s (was %s): the run continues but is no longer identical to an "
                        "uninterrupted one", key.replace("_", "-"), getattr(config, key), saved.get(key))


def _held_out(config: dict[str, Any], defaults: TrainConfig) -> int:
    """How many records a run held out for validation (only with validation on)."""
    on = config.get("validate_every", defaults.validate_every)
    return int(config.get("num_validation", defaults.num_validation)) if on else 0


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)


def remove_leftovers(output: Path) -> None:
    """Remove the half-written checkpoint folders of a killed run (call while holding the output's lock)."""
    if output.is_dir():
        for p in output.iterdir():
            if p.is_dir() and re.match(r"^\.checkpoint-\d+\.(tmp|old)$", p.name):
                shutil.rmtree(p, ignore_errors=True)


def _deepspeed(accelerator: Any) -> bool:
    return str(getattr(accelerator, "distributed_type", "")).endswith("DEEPSPEED")


def _scaler(accelerator: Any) -> Any:
    return getattr(accelerator, "scaler", None)


def save_checkpoint(accelerator: Any, config: TrainConfig, state: TrainState, trainer: Any, optimizer: Any,
                    schedule: Any, ema: EMA | None, info: dict[str, Any]) -> Path:
    """Write ``checkpoint-STEP`` atomically (every process takes part), then keep the newest K complete."""
    from safetensors.torch import save_file

    output = Path(config.output)
    final = output / f"checkpoint-{state.step}"
    tmp = output / f".checkpoint-{state.step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(trainer)
    if _deepspeed(accelerator):  # ZeRO shards the optimizer: DeepSpeed writes it (weights-only tensors)
        accelerator.save_state(str(tmp / ENGINE))
    save_state(tmp / RNG_FILE.format(rank=accelerator.process_index), rng_states())
    if accelerator.is_main_process:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / MODEL_FILE))
        scaler = _scaler(accelerator)
        tree = {"train": state.state_dict(), "scheduler": schedule.state_dict(), "processes":
                accelerator.num_processes, "ema": ema.state_dict() if ema is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "optimizer": None if _deepspeed(accelerator) else optimizer.state_dict()}
        save_state(tmp / STATE_FILE, tree)
        export_adapter(model.adapter, ema, tmp / ADAPTER_FILE, {**info, "step": state.step})
        (tmp / CONFIG_FILE).write_text(config.to_json())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(tmp, state.step)
        _replace_dir(tmp, final)
        complete = [p for _, p in checkpoints(output) if problem(p, deep=False) is None]
        for old in complete[: -config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _check_like(saved: Any, current: Any, where: str) -> None:
    """``saved`` has the layout of ``current``: the same keys, list lengths and value types."""
    if isinstance(current, bool) or current is None:
        ok = isinstance(saved, type(current)) if current is not None else True
    elif isinstance(current, (int, float)):
        ok = isinstance(saved, (int, float)) and not isinstance(saved, bool)
    elif isinstance(current, (list, tuple)):
        ok = isinstance(saved, (list, tuple)) and len(saved) == len(current)
        if ok:
            for i, (a, b) in enumerate(zip(saved, current)):
                _check_like(a, b, f"{where}[{i}]")
    elif isinstance(current, dict):
        ok = isinstance(saved, dict) and set(saved) == set(current)
        if ok:
            for k in current:
                _check_like(saved[k], current[k], f"{where}.{k}")
    else:
        ok = isinstance(saved, type(current))
    if not ok:
        raise ValueError(f"{where} does not fit this run")


def _check_tensors(tensors: dict[str, torch.Tensor], where: str) -> None:
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{where} {k} holds NaN or Inf")


def _load_optimizer(optimizer: Any, saved: Any) -> None:
    """Load an optimizer state after checking its groups and every state tensor's shape."""
    current = optimizer.state_dict()
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
        raise ValueError("the optimizer state is not an optimizer's")
    _check_like(saved["param_groups"], current["param_groups"], "optimizer group")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for pid, entry in saved["state"].items():
        if not isinstance(pid, int) or not 0 <= pid < len(params) or not isinstance(entry, dict):
            raise ValueError("the optimizer state names a parameter the adapter lacks")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                if value.ndim and value.shape != params[pid].shape:
                    raise ValueError(f"optimizer {name} of parameter {pid} has shape {tuple(value.shape)}, "
                                     f"not {tuple(params[pid].shape)}")
                _check_tensors({name: value}, "optimizer")
    optimizer.load_state_dict(saved)


def _scan_pickles(folder: Path) -> None:
    """DeepSpeed's engine files must load with ``weights_only=True`` before DeepSpeed reads them."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".safetensors"):
        if path.suffix not in (".pt", ".bin", ".pkl", ".pth"):
            continue
        try:
            reconstruct = np.zeros(1).__reduce__()[0]  # numpy's array rebuilder, whatever its module
            with torch.serialization.safe_globals([np.ndarray, np.dtype, reconstruct, type(np.dtype(np.uint32))]):
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DamagedFile(f"{path.relative_to(folder.parent)} cannot be read safely "
                              f"({str(exc).splitlines()[0]})") from exc


def load_checkpoint(folder: Path, accelerator: Any, trainer: Any, optimizer: Any, schedule: Any,
                    state: TrainState, ema: EMA | None) -> None:
    """Restore everything :func:`save_checkpoint` wrote (checked by :func:`resume_folder`); a file that
    does not load or fit is one sentence naming the checkpoint."""
    from safetensors.torch import load_file

    try:
        try:
            weights = load_file(str(folder / MODEL_FILE))
        except Exception as exc:  # safetensors' own error types
            raise DamagedFile(f"{MODEL_FILE} is not readable ({str(exc).splitlines()[0]})") from exc
        _check_tensors(weights, MODEL_FILE)
        accelerator.unwrap_model(trainer).load_state_dict(weights, strict=True)
        tree = load_state(folder / STATE_FILE)
        state.load_state_dict(tree["train"])
        _check_like(tree["scheduler"], schedule.state_dict(), "scheduler")
        schedule.load_state_dict(tree["scheduler"])
        if ema is not None:
            if tree["ema"] is None:
                raise ValueError("it was trained without EMA; resume with --ema-decay 0")
            ema.load_state_dict(tree["ema"])
        scaler = _scaler(accelerator)
        if scaler is not None and tree["scaler"]:
            scaler.load_state_dict(tree["scaler"])
        if _deepspeed(accelerator):
            _scan_pickles(folder / ENGINE)
            accelerator.load_state(str(folder / ENGINE))
        else:
            _load_optimizer(optimizer, tree["optimizer"])
        rng = folder / RNG_FILE.format(rank=accelerator.process_index)
        if rng.is_file():
            missing = set_rng_states(load_state(rng))
            if missing:
                log.warning("resuming from %s: it holds no %s generator state; the run continues but is no "
                            "longer identical to an uninterrupted one", folder, "/".join(missing))
        elif int(tree.get("processes", 1)) > accelerator.process_index:
            raise DamagedFile(f"{rng.name} is missing")
        else:
            log.warning("resuming from %s with more processes than it was written by: process %d keeps its "
                        "fresh generators", folder, accelerator.process_index)
    except DamagedFile as exc:
        raise _damaged(folder, str(exc)) from exc
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as exc:
        raise _damaged(folder, f"its state does not fit this run ({str(exc).splitlines()[0] or type(exc).__name__})"
                       ) from exc

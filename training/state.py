"""Training state as safetensors: tensors in the file, everything else as JSON in its metadata; no pickle.

``save_state(path, tree)`` stores a tree of dicts, lists, tuples, numbers, strings, tensors and numpy arrays
(an optimizer's, a scheduler's, the RNG states); ``load_state(path)`` gives it back exactly, or raises
:class:`DamagedFile`. Reading runs no code, whatever the file holds, and checks every tensor reference.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: The metadata key that holds the JSON tree.
TREE = "lookalike.state"
_MARKERS = ("__tensor__", "__ndarray__", "__tuple__", "__items__")


class DamagedFile(Exception):
    """A state file that cannot be read (missing, truncated, not safetensors, inconsistent)."""


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = f"t{len(tensors)}"
        wide = np.int64 if value.dtype.kind in "iub" else np.float64
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value.astype(wide)))
        return {"__ndarray__": key, "dtype": value.dtype.str}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    raise TypeError(f"cannot store a {type(value).__name__} in a training checkpoint")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise DamagedFile(f"unexpected {type(value).__name__} in the state")
    if "__tensor__" in value or "__ndarray__" in value:
        key = value.get("__tensor__", value.get("__ndarray__"))
        if not isinstance(key, str) or key not in tensors:
            raise DamagedFile(f"the state refers to a tensor {key!r} the file does not hold")
        if "__tensor__" in value:
            return tensors[key]
        try:
            return tensors[key].numpy().astype(np.dtype(str(value.get("dtype"))))
        except (TypeError, ValueError) as exc:
            raise DamagedFile(f"array {key} has an unusable dtype {value.get('dtype')!r}") from exc
    if "__tuple__" in value:
        items = value["__tuple__"]
        if not isinstance(items, list):
            raise DamagedFile("a tuple in the state is not a list")
        return tuple(_decode(v, tensors) for v in items)
    if "__items__" in value:
        pairs = value["__items__"]
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise DamagedFile("a mapping in the state is not a list of pairs")
        out = {}
        for k, v in pairs:
            k = _decode(k, tensors)
            if not isinstance(k, (str, int, float, bool, type(None), tuple)):
                raise DamagedFile(f"a mapping key of type {type(k).__name__} in the state")
            out[k] = _decode(v, tensors)
        return out
    return {k: _decode(v, tensors) for k, v in value.items()}


def save_state(path: Path, tree: dict[str, Any]) -> None:
    """Write ``tree`` to ``path`` (safetensors; the non-tensor part as JSON in the metadata)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, tensors)
    save_file(tensors, str(path), metadata={TREE: json.dumps(encoded)})


def load_state(path: Path) -> dict[str, Any]:
    """The tree :func:`save_state` wrote; :class:`DamagedFile` when the file is missing or damaged."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError as exc:
        raise DamagedFile(f"{path.name} is missing") from exc
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise DamagedFile(f"{path.name} is not a readable safetensors file ({str(exc).splitlines()[0]})") from exc
    if TREE not in meta:
        raise DamagedFile(f"{path.name} holds no training state")
    try:
        tree = _decode(json.loads(meta[TREE]), tensors)
    except ValueError as exc:
        raise DamagedFile(f"{path.name}: the state is not JSON ({exc})") from exc
    except DamagedFile as exc:
        raise DamagedFile(f"{path.name}: {exc}") from exc
    if not isinstance(tree, dict):
        raise DamagedFile(f"{path.name}: the state is not a mapping")
    return tree


def _device_modules() -> dict[str, Any]:
    """Accelerator device modules with per-device generators that are present here (cuda, xpu)."""
    mods = {}
    for name in ("cuda", "xpu"):
        mod = getattr(torch, name, None)
        if mod is not None and mod.is_available():
            mods[name] = mod
    return mods


def rng_states() -> dict[str, Any]:
    """Every random generator of this process: python, numpy, torch CPU, and each GPU's."""
    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                              "torch": torch.get_rng_state()}
    for name, mod in _device_modules().items():
        states[name] = mod.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> list[str]:
    """Restore :func:`rng_states`; returns the device generators the states lacked (not restored). Raises
    ``ValueError``/``TypeError``/``KeyError``/``RuntimeError`` when the states do not fit (the caller names
    the file)."""
    version, internal, gauss = states["python"]
    if not isinstance(internal, tuple) or not all(isinstance(x, int) for x in internal):
        raise TypeError("the python generator state is not a tuple of integers")
    random.setstate((int(version), internal, gauss))
    np.random.set_state(states["numpy"])
    if not isinstance(states["torch"], torch.Tensor) or states["torch"].dtype != torch.uint8:
        raise TypeError("the torch generator state is not a uint8 tensor")
    torch.set_rng_state(states["torch"])
    missing = []
    for name, mod in _device_modules().items():
        saved = states.get(name)
        if not isinstance(saved, list) or not saved:
            missing.append(name)
            continue
        for i, state in enumerate(saved[: mod.device_count()]):
            mod.set_rng_state(state, i)
    return missing

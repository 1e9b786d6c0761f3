"""Helpers shared by the training tests (no tests here): tiny data sets written to disk, run configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from lookalike.training.config import TrainConfig


def single_thread():
    """Single-threaded torch for a test (tiny models on a busy 2-core machine run faster and steadier)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_image(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> Path:
    """A seeded image: a colour gradient with a bright square, so images differ in content and layout."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = rng.random(3) * 255
    array = np.stack([(base[c] + (x * (c + 1) + y * (3 - c)) * 2) % 255 for c in range(3)], -1)
    top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
    array[top:top + h // 3, left:left + w // 3] = rng.random(3) * 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def write_face_id(path: Path, seed: int, dim: int = 512) -> Path:
    np.save(path, np.random.default_rng(seed).standard_normal(dim).astype(np.float32))
    return path


def write_json_set(folder: Path, n: int, faces: bool = False, extra: list[dict] | None = None,
                   jsonl: bool = False) -> Path:
    """``n`` images with captions (and ArcFace-like ids) listed in data.json / data.jsonl under ``folder``."""
    records = []
    for i in range(n):
        write_image(folder / f"img{i}.png", seed=i, size=(48 + 8 * (i % 3), 40 + 4 * (i % 2)))
        record: dict[str, Any] = {"image_file": f"img{i}.png", "text": f"a photo of thing {i}"}
        if faces:
            record["id_embed_file"] = write_face_id(folder / f"id{i}.npy", 100 + i).name
        records.append(record)
    records += extra or []
    if jsonl:
        path = folder / "data.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        path = folder / "data.json"
        path.write_text(json.dumps(records))
    return path


def run_config(tmp_path: Path, data: Path | str, out: str = "out", **changes: Any) -> TrainConfig:
    """A quick demo run: 2 steps of 2 samples, no workers, no held-out references, checkpoint at the end."""
    base: dict[str, Any] = dict(data=str(data), output=str(tmp_path / out), base="demo", adapter="basic", steps=2,
                                batch_size=2, num_workers=0, num_validation=0, checkpoint_every=0)
    base.update(changes)
    return TrainConfig(**base)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def train_watched(cfg: TrainConfig, builder: str = "build_adapter") -> tuple[Any, dict[str, Any]]:
    """Run ``train(cfg)`` and record what it built: ``models``, each frozen model's state before training
    (``frozen``), and the adapter's ``spec`` and starting weights (``init``); ``builder`` names the loop's
    adapter constructor (``build_dit_adapter`` for DiT runs)."""
    from lookalike.training import loop
    from lookalike.training.loop import train

    seen: dict[str, Any] = {}
    real_models, real_adapter = loop.load_models, getattr(loop, builder)

    def spy_models(*args: Any, **kwargs: Any) -> Any:
        models, spec = real_models(*args, **kwargs)
        seen["models"] = models
        seen["frozen"] = [{k: v.clone() for k, v in m.state_dict().items()} for m in models.frozen()]
        return models, spec

    def spy_adapter(spec: Any, *args: Any, **kwargs: Any) -> Any:
        adapter = real_adapter(spec, *args, **kwargs)
        seen["spec"], seen["init"] = spec, {k: v.clone() for k, v in adapter.state_dict().items()}
        return adapter

    loop.load_models = spy_models
    setattr(loop, builder, spy_adapter)
    try:
        return train(cfg), seen
    finally:
        loop.load_models = real_models
        setattr(loop, builder, real_adapter)


def interrupted_at(call: int) -> Any:
    """A stand-in for the loop's ``model_inputs`` that raises KeyboardInterrupt at its ``call``-th call (a kill)."""
    from lookalike.training import loop

    real, calls = loop.model_inputs, [0]

    def dies(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return dies

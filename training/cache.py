"""A precomputed cache: VAE posteriors, image features and caption embeddings, encoded once.

Training from the cache runs the UNet and the adapter only: no VAE, text or image encoder is loaded.
Layout: ``shard-wW-rR-NNNNN.safetensors`` (rows of ``index``, ``latent_mean``, ``latent_std``, ``context``,
``pooled_text``, ``time_ids`` and the features), ``constants.safetensors`` (empty caption, negative
features) and ``cache.json``, written last, which marks the cache complete. Each process encodes every
W-th record; a killed build keeps its finished shards. The cache stores centre crops.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from ..errors import LookalikeError
from .data import ImageSource
from .models import Models, encode_clip, encode_latent_dist, encode_text
from .records import SkipSample
from .step import Constants

log = logging.getLogger("lookalike.train")
MANIFEST = "cache.json"
CONSTANTS = "constants.safetensors"
SHARD_ROWS = 1024
ROW_KEYS = ("latent_mean", "latent_std", "context", "pooled_text", "time_ids", "pooled", "patch", "face_id")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


SHARD_NAME = re.compile(r"^shard-w\d+-r\d+-\d{5}\.safetensors$")


def _broken(folder: Path, why: str) -> LookalikeError:
    return LookalikeError(f"the cache in {folder} is damaged: {why}; delete it (or pass another --cache folder) "
                          f"and it is built again")


def _check_manifest(folder: Path, manifest: Any) -> dict[str, Any]:
    """The manifest's fields have the types and values the cache needs (shards are plain names)."""
    if not isinstance(manifest, dict):
        raise _broken(folder, f"{MANIFEST} is not an object")
    records, shards = manifest.get("records"), manifest.get("shards")
    if not isinstance(records, int) or isinstance(records, bool) or not 0 <= records < 2**40:
        raise _broken(folder, f"{MANIFEST} gives no record count")
    if not isinstance(shards, list) or not all(isinstance(n, str) and SHARD_NAME.match(n) for n in shards):
        raise _broken(folder, f"{MANIFEST} lists shards that are not shard-w*-r*-*.safetensors names")
    if not isinstance(manifest.get("scaling_factor"), (int, float)) or not isinstance(manifest.get("fingerprint"),
                                                                                     dict):
        raise _broken(folder, f"{MANIFEST} lacks the scaling factor or the fingerprint")
    return manifest


def read_manifest(folder: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The complete cache's manifest, None when absent; an error when it was built for something else."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = _check_manifest(folder, json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        if isinstance(exc, LookalikeError):
            raise
        raise _broken(folder, f"{MANIFEST} is not JSON ({exc})") from exc
    if manifest.get("fingerprint") != fingerprint:
        diff = [k for k in fingerprint if manifest.get("fingerprint", {}).get(k) != fingerprint[k]]
        raise LookalikeError(f"the cache in {folder} was built with another {', '.join(diff)}; delete it or pass "
                             f"another --cache folder")
    return manifest


class _Build(Dataset):
    """Record index -> loaded tensors, or the reason it was skipped."""

    def __init__(self, source: ImageSource, indices: list[int]) -> None:
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        index = self.indices[i]
        try:
            return index, self.source.load(index, torch.zeros(2))
        except SkipSample as skip:
            return index, skip.reason
        except LookalikeError as exc:  # one sentence, not a worker's traceback
            return index, {"error": str(exc)}


@torch.no_grad()
def _encode_rows(models: Models, loaded: list[dict[str, Any]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Encode a list of loaded samples into cache rows (CPU, ``dtype``)."""
    device = models.unet.device
    pixels = torch.stack([s["pixels"] for s in loaded]).to(device)
    mean, std = encode_latent_dist(models.vae, pixels)
    ids = [torch.stack([s["input_ids"][i] for s in loaded]) for i in range(len(models.tokenizers))]
    context, pooled = encode_text(models, ids)
    rows = {"latent_mean": mean, "latent_std": std, "context": context,
            "time_ids": torch.stack([s["time_ids"] for s in loaded])}
    if pooled is not None:
        rows["pooled_text"] = pooled
    if "clip_pixels" in loaded[0]:
        rows.update(encode_clip(models.image_encoder, torch.stack([s["clip_pixels"] for s in loaded]).to(device)))
    if "face_id" in loaded[0]:
        rows["face_id"] = torch.stack([s["face_id"] for s in loaded])
    return {k: v.to("cpu", dtype if k != "time_ids" else torch.float32) for k, v in rows.items()}


def _build_shard(models: Models, source: ImageSource, indices: list[int], path: Path, batch_size: int,
                 workers: int, dtype: torch.dtype) -> None:
    loader = DataLoader(_Build(source, indices), batch_size=batch_size, num_workers=workers, collate_fn=list)
    rows: list[dict[str, torch.Tensor]] = []
    kept, skipped = [], Counter()
    for items in loader:
        for _, s in items:
            if isinstance(s, dict) and "error" in s:
                raise LookalikeError(s["error"])
        good = [(i, s) for i, s in items if not isinstance(s, str)]
        skipped.update(s for _, s in items if isinstance(s, str))
        if good:
            rows.append(_encode_rows(models, [s for _, s in good], dtype))
            kept.extend(i for i, _ in good)
    tensors = {k: torch.cat([r[k] for r in rows]) for k in rows[0]} if rows else {}
    tensors["index"] = torch.tensor(kept, dtype=torch.int64)
    _atomic_save(tensors, path, {"skipped": json.dumps(dict(skipped))})


def build_cache(accelerator: Any, models: Models, source: ImageSource, consts: Constants, folder: Path,
                fingerprint: dict[str, Any], batch_size: int, workers: int, dtype: torch.dtype) -> dict[str, Any]:
    """Encode every record once into ``folder`` (each process every W-th record); returns the manifest."""
    world, rank = accelerator.num_processes, accelerator.process_index
    folder.mkdir(parents=True, exist_ok=True)
    mine = list(range(rank, len(source), world))
    chunks = [mine[i:i + SHARD_ROWS] for i in range(0, len(mine), SHARD_ROWS)]
    for n, chunk in enumerate(chunks):
        path = folder / f"shard-w{world}-r{rank}-{n:05d}.safetensors"
        if not path.is_file():  # a killed build keeps its finished shards
            _build_shard(models, source, chunk, path, batch_size, workers, dtype)
        if accelerator.is_main_process:
            log.info("cache: shard %d/%d written", n + 1, len(chunks))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_manifest(folder, consts, fingerprint, world, len(source), models)
    accelerator.wait_for_everyone()
    return read_manifest(folder, fingerprint) or {}


def _write_manifest(folder: Path, consts: Constants, fingerprint: dict[str, Any], world: int, count: int,
                    models: Models) -> None:
    shards = sorted(p.name for p in folder.glob(f"shard-w{world}-r*-*.safetensors"))
    skipped: Counter = Counter()
    for name in shards:
        with safe_open(str(folder / name), "pt") as f:
            skipped.update(json.loads((f.metadata() or {}).get("skipped", "{}")))
    tensors = {"empty_context": consts.empty_context, **{f"neg_{k}": v for k, v in consts.negatives.items()}}
    if consts.empty_pooled is not None:
        tensors["empty_pooled"] = consts.empty_pooled
    _atomic_save(tensors, folder / CONSTANTS)
    manifest = {"fingerprint": fingerprint, "scaling_factor": consts.scaling_factor,
                "shift_factor": consts.shift_factor, "records": count,
                "shards": shards, "skipped": dict(skipped)}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)
    log.info("cache complete: %d records in %d shards, %d skipped", count - sum(skipped.values()), len(shards),
             sum(skipped.values()))


def _finite(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise _broken(folder, f"{name} {k} holds NaN or Inf")


def cache_constants(folder: Path, manifest: dict[str, Any]) -> Constants:
    """The run constants stored beside the rows."""
    try:
        t = load_file(str(folder / CONSTANTS))
    except Exception as exc:  # missing, truncated, not safetensors: safetensors' own error types
        raise _broken(folder, f"{CONSTANTS} is not readable ({str(exc).splitlines()[0]})") from exc
    if "empty_context" not in t or t["empty_context"].ndim != 3:
        raise _broken(folder, f"{CONSTANTS} lacks the empty caption's embedding")
    _finite(folder, CONSTANTS, t)
    negatives = {k[4:]: v for k, v in t.items() if k.startswith("neg_")}
    shift = manifest.get("shift_factor", 0.0)
    if not isinstance(shift, (int, float)):
        raise LookalikeError(f"{folder}: the cache manifest's shift_factor is not a number; build the cache again")
    return Constants(float(manifest["scaling_factor"]), t["empty_context"], t.get("empty_pooled"), negatives,
                     float(shift))


def _shard_index(folder: Path, name: str, records: int) -> np.ndarray:
    """A shard's record indices, after checking every row tensor has one row per index (rows are checked
    finite as they are read)."""
    try:
        with safe_open(str(folder / name), "pt") as f:
            keys = set(f.keys())
            if "index" not in keys:
                raise _broken(folder, f"{name} has no index")
            index = f.get_tensor("index")
            rows = {k: f.get_slice(k).get_shape() for k in ROW_KEYS if k in keys}
    except LookalikeError:
        raise
    except Exception as exc:  # missing, truncated, not safetensors
        raise _broken(folder, f"{name} is not readable ({str(exc).splitlines()[0]})") from exc
    if index.dtype != torch.int64 or index.ndim != 1 or (len(index) and not (
            int(index.min()) >= 0 and int(index.max()) < records and len(set(index.tolist())) == len(index))):
        raise _broken(folder, f"{name} indexes records outside 0..{records - 1} or twice")
    for k, shape in rows.items():
        if not shape or shape[0] != len(index):
            raise _broken(folder, f"{name} {k} has {shape[0] if shape else 0} rows, not {len(index)}")
    return index.numpy()


@dataclass
class CacheSource:
    """Cached rows as a :class:`~lookalike.training.data.SampleSource` over the records in ``indices``."""

    folder: Path
    shards: list[str]
    indices: list[int]  # record indices this source serves, in record order
    shard_of: np.ndarray  # record index -> shard number (-1: not cached)
    row_of: np.ndarray

    @classmethod
    def open(cls, folder: Path, manifest: dict[str, Any], wanted: list[int]) -> CacheSource:
        """Serve the ``wanted`` record indices that the cache holds."""
        n = int(manifest["records"])
        shard_of, row_of = np.full(n, -1, np.int32), np.full(n, -1, np.int64)
        for s, name in enumerate(manifest["shards"]):
            index = _shard_index(folder, name, n)
            shard_of[index], row_of[index] = s, np.arange(len(index))
        return cls(folder, list(manifest["shards"]), [i for i in wanted if shard_of[i] >= 0], shard_of, row_of)

    def __len__(self) -> int:
        return len(self.indices)

    def key(self, index: int) -> str:
        return f"record {self.indices[index]}"

    def row(self, record: int) -> dict[str, torch.Tensor]:
        """The cached tensors of one record."""
        handles = self.__dict__.setdefault("_handles", {})  # per worker process; safe_open is not picklable
        s, r = int(self.shard_of[record]), int(self.row_of[record])
        if s not in handles:
            handles[s] = safe_open(str(self.folder / self.shards[s]), "pt")
        f = handles[s]
        row = {k: f.get_slice(k)[r:r + 1][0] for k in ROW_KEYS if k in f.keys()}
        if any(v.is_floating_point() and not torch.isfinite(v).all() for v in row.values()):
            raise SkipSample("non-finite cache row", f"record {record} in {self.shards[s]}")
        return row

    def load(self, index: int, crop_u: torch.Tensor) -> dict[str, Any]:
        return self.row(self.indices[index])

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_handles"}

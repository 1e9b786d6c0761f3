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


def read_manifest(folder: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The complete cache's manifest, None when absent; an error when it was built for something else."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
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
    manifest = {"fingerprint": fingerprint, "scaling_factor": consts.scaling_factor, "records": count,
                "shards": shards, "skipped": dict(skipped)}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)
    log.info("cache complete: %d records in %d shards, %d skipped", count - sum(skipped.values()), len(shards),
             sum(skipped.values()))


def cache_constants(folder: Path, manifest: dict[str, Any]) -> Constants:
    """The run constants stored beside the rows."""
    t = load_file(str(folder / CONSTANTS))
    negatives = {k[4:]: v for k, v in t.items() if k.startswith("neg_")}
    return Constants(float(manifest["scaling_factor"]), t["empty_context"], t.get("empty_pooled"), negatives)


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
            with safe_open(str(folder / name), "pt") as f:
                index = f.get_tensor("index").numpy()
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
        return {k: f.get_slice(k)[r:r + 1][0] for k in ROW_KEYS if k in f.keys()}

    def load(self, index: int, crop_u: torch.Tensor) -> dict[str, Any]:
        return self.row(self.indices[index])

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_handles"}

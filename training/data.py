"""Sample stream: a deterministic order over records and per-sample randomness, independent of the set-up.

Slot ``k`` of the endless stream holds record ``order(seed, k // n)[k % n]``, and every random draw of the
sample (timestep, noise, latent sample, drops, crop) comes from a generator seeded by ``(seed, k)``.
So the batches of one process with batch 2B equal those of two processes with batch B, and a resumed run
continues exactly where it stopped. An unreadable record is replaced by the next readable one and counted.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..encoders.prepare import to_clip_pixels
from ..errors import LookalikeError
from .faces import FaceEmbedder
from .flow import FlowSettings, draw_u
from .records import Record, SkipSample, read_caption, read_face_id, read_image

#: How many records in a row may be unreadable before the run stops (the data is then broken, not noisy).
MAX_CONSECUTIVE_SKIPS = 64


def slot_generator(seed: int, slot: int) -> torch.Generator:
    """The CPU generator of one slot of the sample stream (seeded by ``(seed, slot)`` only)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, slot]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


@dataclass(frozen=True)
class DrawSettings:
    """What each sample draws: latent shape, timestep range, drop rates, noise offset."""

    latent_shape: tuple[int, int, int]  # (C, h, w)
    num_timesteps: int
    drop_image: float = 0.05
    drop_text: float = 0.05
    drop_both: float = 0.05
    noise_offset: float = 0.0
    timestep_bias: str = "none"  # none | later (noisier) | earlier (cleaner), as diffusers' SDXL training script
    timestep_bias_portion: float = 0.25
    timestep_bias_multiplier: float = 1.0
    flow: FlowSettings | None = None  # DiT flow matching: "timestep" is u in [0, 1) drawn by training/flow.py


TIMESTEP_BIASES = ("none", "later", "earlier")


@functools.cache
def timestep_cdf(s: DrawSettings) -> torch.Tensor | None:
    """Cumulative sampling probability of each timestep; None for uniform (``--timestep-bias none``).

    The biased portion (the noisiest timesteps for ``later``, the cleanest for ``earlier``) is drawn
    ``multiplier`` times as often as the rest. An image adapter decides the subject's shape and colours at
    high noise (at low noise the noisy latent already shows them), so ``later`` spends more of the
    budget where the image condition matters.
    """
    if s.timestep_bias == "none" or s.timestep_bias_multiplier == 1.0:
        return None
    weights = torch.ones(s.num_timesteps, dtype=torch.float64)
    count = max(1, round(s.timestep_bias_portion * s.num_timesteps))
    part = slice(s.num_timesteps - count, None) if s.timestep_bias == "later" else slice(0, count)
    weights[part] *= s.timestep_bias_multiplier
    return weights.cumsum(0) / weights.sum()


def draw(seed: int, slot: int, s: DrawSettings) -> dict[str, Any]:
    """One sample's randomness: drops (the official rule), timestep, noise, latent sample noise, crop."""
    g = slot_generator(seed, slot)
    u = float(torch.rand((), generator=g))
    drop_image = u < s.drop_image or s.drop_image + s.drop_text <= u < s.drop_image + s.drop_text + s.drop_both
    drop_text = s.drop_image <= u < s.drop_image + s.drop_text + s.drop_both
    cdf = timestep_cdf(s)
    if s.flow is not None:
        timestep = draw_u(s.flow, g)
    elif cdf is None:
        timestep = torch.randint(0, s.num_timesteps, (), generator=g)
    else:  # inverse CDF
        timestep = torch.searchsorted(cdf, torch.rand((), generator=g, dtype=torch.float64).reshape(1))[0].clamp(
            max=s.num_timesteps - 1)
    noise = torch.randn(s.latent_shape, generator=g)  # (C, h, w)
    latent_eps = torch.randn(s.latent_shape, generator=g)  # samples the VAE posterior
    offset = torch.randn((s.latent_shape[0], 1, 1), generator=g)
    crop = torch.rand(2, generator=g)
    if s.noise_offset:
        noise = noise + s.noise_offset * offset
    return {"drop_image": torch.tensor(drop_image), "drop_text": torch.tensor(drop_text), "timestep": timestep,
            "noise": noise, "latent_eps": latent_eps, "crop_u": crop}


class SampleSource(Protocol):
    """Loads the tensors of one record (pixels and tokens, or cached rows); raises ``SkipSample``."""

    def __len__(self) -> int: ...

    def key(self, index: int) -> str: ...

    def load(self, index: int, crop_u: torch.Tensor) -> dict[str, Any]: ...


def vae_pixels(image: Image.Image, size: int, crop_u: torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
    """Short side to ``size`` (bilinear), then a centre (or drawn) square crop, in [-1, 1].

    Returns the pixels (3, size, size) and SDXL's micro-conditioning ``[orig_h, orig_w, top, left, size, size]``.
    """
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, int(w * scale)), max(size, int(h * scale))
    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    if crop_u is None:
        top, left = (new_h - size) // 2, (new_w - size) // 2
    else:
        top = min(int(float(crop_u[0]) * (new_h - size + 1)), new_h - size)
        left = min(int(float(crop_u[1]) * (new_w - size + 1)), new_w - size)
    array = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32)
    pixels = torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0  # (3, S, S)
    return pixels.contiguous(), [h, w, top, left, size, size]


def tokenize(tokenizers: Sequence[Any], text: str) -> list[torch.Tensor]:
    """Token ids per tokenizer, padded to its ``model_max_length``."""
    return [tok(text, max_length=tok.model_max_length, padding="max_length", truncation=True,
                return_tensors="pt").input_ids[0] for tok in tokenizers]


@dataclass
class ImageSource:
    """Records read from disk: VAE pixels, CLIP pixels of the reference, face id, caption tokens."""

    records: Sequence[Record]
    resolution: int
    features: tuple[str, ...]
    tokenizers: Sequence[Any]
    clip_size: int = 224
    clip_mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073)
    clip_std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711)
    random_crop: bool = False
    face_normed: bool = True
    faces: FaceEmbedder | None = None  # embeds the faces of records without a face-id file

    def __len__(self) -> int:
        return len(self.records)

    def key(self, index: int) -> str:
        return self.records[index].key

    def load(self, index: int, crop_u: torch.Tensor) -> dict[str, Any]:
        record = self.records[index]
        if record.problem:
            raise SkipSample(record.problem, record.key)
        caption = read_caption(record.text)
        out: dict[str, Any] = {}
        embed_here = "face_id" in self.features and record.face_id is None and self.faces is not None
        if "face_id" in self.features and not embed_here:
            out["face_id"] = read_face_id(record.face_id, self.face_normed)  # (512,)
        image = read_image(record.image)
        face_crop = None
        if embed_here:  # no id_embed_file: the largest face of the image, as the official data was made
            out["face_id"], face_crop = self.faces.embed(image, record.key)  # (512,)
        out["pixels"], time_ids = vae_pixels(image, self.resolution, crop_u if self.random_crop else None)
        out["time_ids"] = torch.tensor(time_ids, dtype=torch.float32)
        if "pooled" in self.features or "patch" in self.features:
            reference = read_image(record.face_image) if record.face_image is not None else (
                face_crop if face_crop is not None else image)
            out["clip_pixels"] = to_clip_pixels([reference], self.clip_size, self.clip_mean, self.clip_std)[0]
        out["input_ids"] = tokenize(self.tokenizers, caption)
        return out


class SampleStream(Dataset):
    """Map-style dataset over slots of the endless stream (see the module docstring)."""

    def __init__(self, source: SampleSource, seed: int, settings: DrawSettings) -> None:
        if len(source) == 0:
            raise LookalikeError("the data holds no training records; check --data (and --num-validation)")
        self.source = source
        self.seed = seed
        self.settings = settings
        self._orders: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:  # the stream is endless; one epoch is reported
        return len(self.source)

    def order(self, epoch: int) -> torch.Tensor:
        """The record order of one epoch: a permutation seeded by ``(seed, epoch)``."""
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.source), generator=g)}
        return self._orders[epoch]

    def record_at(self, slot: int) -> int:
        n = len(self.source)
        return int(self.order(slot // n)[slot % n])

    def __getitem__(self, slot: int) -> dict[str, Any]:
        """The sample of one slot; a :class:`LookalikeError` comes back as ``{"error": message}``, so a
        DataLoader worker hands the main process one sentence rather than its traceback."""
        try:
            return self._sample(slot)
        except LookalikeError as exc:
            return {"error": str(exc)}

    def _sample(self, slot: int) -> dict[str, Any]:
        sample = draw(self.seed, slot, self.settings)
        index, skipped = self.record_at(slot), []
        for attempt in range(MAX_CONSECUTIVE_SKIPS):
            i = (index + attempt) % len(self.source)
            try:
                loaded = self.source.load(i, sample["crop_u"])
                break
            except SkipSample as skip:
                skipped.append((skip.reason, self.source.key(i), str(skip)))
        else:
            raise LookalikeError(f"{MAX_CONSECUTIVE_SKIPS} records in a row could not be read (last: "
                                 f"{skipped[-1][2]}); the data is broken, not noisy: fix it")
        sample.update(loaded)
        sample["skipped"] = skipped
        sample["slot"] = slot
        return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of samples; token ids stay one tensor per tokenizer; skip notes are concatenated.
    A sample that failed makes the batch ``{"error": message}``."""
    for sample in samples:
        if "error" in sample:
            return {"error": sample["error"]}
    batch: dict[str, Any] = {"skipped": [s for sample in samples for s in sample["skipped"]],
                             "slot": torch.tensor([s["slot"] for s in samples])}
    for key, value in samples[0].items():
        if key in batch:
            continue
        if key == "input_ids":
            batch[key] = [torch.stack([s[key][i] for s in samples]) for i in range(len(value))]
        elif torch.is_tensor(value):
            batch[key] = torch.stack([s[key] for s in samples])
    return batch


class SlotBatches(Sampler[list[int]]):
    """This process's micro-batches of slots, from ``start`` on: global batch ``m`` holds slots
    ``[start + m*B*W, start + (m+1)*B*W)`` and process ``r`` takes its ``r``-th run of ``B``."""

    def __init__(self, start: int, batch_size: int, rank: int = 0, world: int = 1) -> None:
        self.start, self.batch_size, self.rank, self.world = start, batch_size, rank, world

    def __iter__(self):
        m = 0
        while True:
            first = self.start + m * self.batch_size * self.world + self.rank * self.batch_size
            yield list(range(first, first + self.batch_size))
            m += 1

    def __len__(self) -> int:  # endless; DataLoader only needs a number
        return 2**62


def next_batch(loader: Any) -> dict[str, Any]:
    """The loader's next batch; a failed sample (in any worker) is raised here as one-sentence error."""
    batch = next(loader)
    if "error" in batch:
        raise LookalikeError(batch["error"])
    return batch


def make_loader(stream: SampleStream, start: int, batch_size: int, rank: int, world: int,
                num_workers: int) -> torch.utils.data.DataLoader:
    """An endless DataLoader over this process's slots."""
    return torch.utils.data.DataLoader(stream, batch_sampler=SlotBatches(start, batch_size, rank, world),
                                       collate_fn=collate, num_workers=num_workers,
                                       persistent_workers=False, pin_memory=False)

"""``Subject``: a reference's encoder features and their negative, reusable without running any encoder.

Saved as safetensors (``features.<kind>``, ``negative.<kind>``) with provenance in the metadata: the adapter
variant, the encoder, how images were combined (with their weights) and the SHA-256 of each source image (and of the
negative photos, when the negative was encoded from photos).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LookalikeError
from ..weights.io import read_safetensors, write_safetensors

FORMAT = "lookalike.subject/1"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (the provenance of a reference image)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Subject:
    """Encoder features of one subject: ``features[kind]`` is ``(1, images, ...)``; ``negative`` likewise."""

    features: dict[str, torch.Tensor]
    negative: dict[str, torch.Tensor]
    adapter: str
    encoder: str
    combine: str = "concat"
    sources: list[str] = field(default_factory=list)  # SHA-256 of each source image ("" for in-memory images)
    weights: list[float] = field(default_factory=list)  # each source's weight in a weighted mean ([]: equal)
    negative_sources: list[str] = field(default_factory=list)  # SHA-256 of negative photos ([]: the official negative)
    #: Face subjects: ``kps`` (images, 5, 2) keypoints in source pixels and ``size`` (images, 2) the photos'
    #: (width, height), so InstantID draws IdentityNet's condition without running a detector again.
    landmarks: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return next(iter(self.features.values())).shape[1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Subject:
        """A copy on another device / dtype."""
        move = {k: v.to(device=device, dtype=dtype) for k, v in self.features.items()}
        neg = {k: v.to(device=device, dtype=dtype) for k, v in self.negative.items()}
        return Subject(move, neg, self.adapter, self.encoder, self.combine, list(self.sources), list(self.weights),
                       list(self.negative_sources), {k: v.clone() for k, v in self.landmarks.items()})

    def save(self, path: str | os.PathLike) -> Path:
        """Write the subject atomically (temporary file, then rename)."""
        path = Path(path).expanduser()
        if path.suffix != ".safetensors":
            raise LookalikeError(f"subjects are saved as .safetensors; rename {path.name} to end in .safetensors")
        tensors = {f"features.{k}": v for k, v in self.features.items()}
        tensors.update({f"negative.{k}": v for k, v in self.negative.items()})
        tensors.update({f"landmarks.{k}": v for k, v in self.landmarks.items()})
        meta = {"format": FORMAT, "adapter": self.adapter, "encoder": self.encoder, "combine": self.combine,
                "sources": json.dumps(self.sources), "weights": json.dumps(self.weights),
                "negative_sources": json.dumps(self.negative_sources)}
        return write_safetensors(tensors, path, meta)

    def check(self, where: str = "the subject") -> Subject:
        """Refuse features that cannot condition a generation: unknown or missing kinds, shapes that do not
        agree, more than :data:`MAX_SUBJECT_IMAGES` images, non-float or non-finite values. Returns self."""
        problem = _feature_problem(self.features, self.negative)
        if problem:
            raise LookalikeError(f"{where} is not a usable subject: {problem}; encode the photos again with "
                                 f"`lookalike encode` (or Personalizer.encode)")
        if self.combine not in ("concat", "mean"):
            raise LookalikeError(f"{where} has combine {self.combine!r}; it must be 'concat' or 'mean'")
        for name, tensors in (("features", self.features), ("negative", self.negative)):
            bad = next((k for k, t in tensors.items() if not bool(torch.isfinite(t).all())), None)
            if bad is not None:
                raise LookalikeError(f"{where}: {name}.{bad} holds NaN or infinite values, which would give black "
                                     f"images (an image encoder run in float16 can overflow: use float32 or "
                                     f"bfloat16); encode the photos again")
        return self

    @classmethod
    def load(cls, path: str | os.PathLike) -> Subject:
        """Read a subject written by :meth:`save`; its size, metadata and tensors are checked before use."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise LookalikeError(f"no such subject file: {path}; create one with `lookalike encode`")
        tensors, meta = read_safetensors(path, "subject ", max_bytes=MAX_SUBJECT_BYTES)
        if meta.get("format") != FORMAT:
            raise LookalikeError(f"{path} is not a lookalike subject file; create one with `lookalike encode`")
        fields = _metadata_fields(meta, path)
        unknown = [k for k in tensors if not k.startswith(("features.", "negative.", "landmarks."))]
        if unknown:
            raise LookalikeError(f"subject {path} holds an unexpected tensor {unknown[0]!r}; it was not written by "
                                 f"`lookalike encode`: encode the photos again")
        part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        return cls(part("features."), part("negative."), **fields,
                   landmarks=check_landmarks(part("landmarks."), path)).check(f"subject {path}")


def check_landmarks(landmarks: dict[str, torch.Tensor], path: object) -> dict[str, torch.Tensor]:
    """Refuse stored face landmarks that are not (images, 5, 2) finite keypoints with positive photo sizes."""
    if not landmarks:
        return {}
    kps, size = landmarks.get("kps"), landmarks.get("size")
    ok = (kps is not None and size is not None and set(landmarks) == {"kps", "size"} and kps.ndim == 3
          and tuple(kps.shape[1:]) == (5, 2) and tuple(size.shape) == (kps.shape[0], 2)
          and kps.is_floating_point() and bool(torch.isfinite(kps).all()) and bool((size > 0).all()))
    if not ok:
        raise LookalikeError(f"{path} holds damaged face landmarks (they must be 5 finite keypoints and a positive "
                             f"photo size per image); encode the face again")
    return {"kps": kps.float(), "size": size.long()}


#: Dimensions of each feature kind with the (batch, images) pair in front.
FEATURE_NDIM = {"pooled": 3, "patch": 4, "face_id": 3}
#: Most reference images one subject may hold (more costs memory and time for no gain: combine them).
MAX_SUBJECT_IMAGES = 64
#: Largest subject file read (64 images of 257 x 1664 float32 tokens, with their negatives, fit).
MAX_SUBJECT_BYTES = 512 << 20


def _feature_problem(features: Mapping[str, torch.Tensor], negative: Mapping[str, torch.Tensor]) -> str | None:
    """What is wrong with a subject's feature tensors, or None."""
    if not features:
        return "it holds no features"
    for kind in list(features) + list(negative):
        if kind not in FEATURE_NDIM:
            return f"{kind!r} is not a feature kind (known: {', '.join(FEATURE_NDIM)})"
    if set(negative) != set(features):
        return f"its negative has {sorted(negative)} but its features have {sorted(features)}"
    lead = None
    for kind, t in features.items():
        for name, x in (("features", t), ("negative", negative[kind])):
            if not torch.is_tensor(x) or not x.is_floating_point():
                return f"{name}.{kind} is not a floating-point tensor"
            if x.ndim != FEATURE_NDIM[kind] or 0 in x.shape:
                return (f"{name}.{kind} has shape {tuple(x.shape)}, expected {FEATURE_NDIM[kind]} non-empty "
                        f"dimensions (batch, images, ...)")
        if negative[kind].shape != t.shape:
            return f"negative.{kind} has shape {tuple(negative[kind].shape)} but features.{kind} {tuple(t.shape)}"
        if lead is not None and tuple(t.shape[:2]) != lead:
            return f"features.{kind} is for {tuple(t.shape[:2])} (batch, images), the others for {lead}"
        lead = tuple(t.shape[:2])
    if lead is not None and lead[1] > MAX_SUBJECT_IMAGES:
        return (f"it holds {lead[1]} images, above the limit of {MAX_SUBJECT_IMAGES}; use at most "
                f"{MAX_SUBJECT_IMAGES} photos, or combine them with mean")
    return None


def _json_list(meta: Mapping[str, str], key: str, ok: Callable[[object], bool], path: Path) -> list:
    """A metadata field holding a JSON list whose items pass ``ok``."""
    try:
        value = json.loads(meta.get(key, "[]"))
    except (json.JSONDecodeError, RecursionError):
        value = None
    if not isinstance(value, list) or len(value) > 10_000 or not all(ok(v) for v in value):
        raise LookalikeError(f"subject {path}: its {key!r} metadata is not a JSON list of the right kind; the file "
                             f"is damaged or was edited: encode the photos again")
    return value


def _metadata_fields(meta: Mapping[str, str], path: Path) -> dict:
    """The subject's metadata, checked: adapter and encoder names, combine, sources, weights."""
    for key in ("adapter", "encoder"):
        if not 0 < len(meta.get(key, "")) <= 200:
            raise LookalikeError(f"subject {path} lacks a valid {key!r} field in its metadata; it was not written by "
                                 f"`lookalike encode`: encode the photos again")
    is_hash = lambda v: isinstance(v, str) and len(v) <= 64  # noqa: E731
    is_weight = lambda v: type(v) in (int, float) and math.isfinite(v) and v >= 0  # noqa: E731
    return {"adapter": meta["adapter"], "encoder": meta["encoder"], "combine": meta.get("combine", "concat"),
            "sources": _json_list(meta, "sources", is_hash, path),
            "weights": [float(w) for w in _json_list(meta, "weights", is_weight, path)],
            "negative_sources": _json_list(meta, "negative_sources", is_hash, path)}


def stack_subjects(subjects: Sequence[Subject], dim: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Join subjects' features along the batch (``dim=0``) or the image axis (``dim=1``)."""
    kinds = subjects[0].features.keys()
    for s in subjects:
        if s.features.keys() != kinds:
            raise LookalikeError("subjects encoded for different adapters cannot be combined; encode them "
                                 "with the same adapter")
    if dim == 0 and len({s.num_images for s in subjects}) > 1:
        raise LookalikeError("subjects in one batch need the same number of reference images; encode them with "
                             "combine='mean' or the same number of images")

    def cat(parts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: torch.cat([p[k] for p in parts], dim=dim) for k in kinds}

    return cat([s.features for s in subjects]), cat([s.negative for s in subjects])


def box_mask(box: Sequence[float], height: int, width: int) -> torch.Tensor:
    """A ``(x0, y0, x1, y1)`` box (pixels, or fractions of the image when all are <= 1) -> ``(H, W)`` mask."""
    if len(box) != 4:
        raise LookalikeError(f"a box is (x0, y0, x1, y1), got {tuple(box)}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if max(x0, y0, x1, y1) <= 1.0:
        x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise LookalikeError(f"box {tuple(box)} does not lie inside the {width}x{height} image")
    mask = torch.zeros(height, width)
    mask[round(y0):round(y1), round(x0):round(x1)] = 1.0
    return mask

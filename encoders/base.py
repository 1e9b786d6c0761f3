"""The one interface every image encoder shares, so nothing downstream branches on the encoder's kind.

An encoder turns reference images into a ``Features`` dict whose keys are among:

* ``"pooled"``  (N, E)    one global embedding per image (CLIP ``image_embeds``; IP-Adapter base);
* ``"patch"``   (N, T, H) per-token hidden states of the penultimate layer (IP-Adapter Plus);
* ``"face_id"`` (N, 512)  an identity embedding from a face-recognition model (IP-Adapter FaceID).

``encode_negative(n)`` returns the official unconditional input for the same keys: zeros for
``"pooled"`` and ``"face_id"``; for ``"patch"`` the encoder run on an all-zero *normalised* pixel
tensor (what official IP-Adapter and diffusers do). Features live on the encoder's ``device`` in its
``dtype``; encoders take ``device`` and ``dtype`` arguments (default cpu, float32) and never assume CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import torch
from PIL import Image

from ..errors import LookalikeError
from .prepare import CropMode, to_clip_pixels

FeatureKind = Literal["pooled", "patch", "face_id"]
FEATURE_KINDS: tuple[str, ...] = get_args(FeatureKind)

Features = dict[str, torch.Tensor]  # keys among "pooled" (N, E), "patch" (N, T, H), "face_id" (N, 512)


@runtime_checkable
class ImageEncoder(Protocol):
    """Reference images in, a Features dict out; the unconditional (negative) features on request."""

    kinds: tuple[str, ...]  # the feature keys encode and encode_negative return

    @property
    def embed_dims(self) -> dict[str, int]:
        """Last-dimension size of each feature it produces, e.g. {"pooled": 1024, "patch": 1280}."""
        ...

    @property
    def device(self) -> torch.device:
        """Device the returned features live on."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the returned features."""
        ...

    def encode(self, images: Sequence[Image.Image], *, crop: CropMode = "center") -> Features:
        """Encode N RGB-able images into features for every key in kinds."""
        ...

    def encode_negative(self, n: int) -> Features:
        """The official unconditional features for a batch of n, same keys and shapes as encode."""
        ...


def check_kinds(kinds: Sequence[str], supported: Sequence[str]) -> tuple[str, ...]:
    """Validate requested feature kinds against what an encoder supports; return them as a tuple."""
    requested = tuple(kinds)
    if isinstance(kinds, str) or not requested:
        raise LookalikeError(
            f"kinds must be a non-empty tuple drawn from {', '.join(supported)}; got {kinds!r}"
        )
    unknown = [kind for kind in requested if kind not in supported]
    if unknown or len(set(requested)) != len(requested):
        raise LookalikeError(
            f"this encoder produces only {', '.join(supported)} (each at most once); got {', '.join(requested)}"
        )
    return requested


def check_batch_size(n: int) -> int:
    """Validate the batch size asked of encode_negative."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise LookalikeError(f"the negative batch size must be a positive integer, not {n!r}")
    return n


class VisionTower:
    """What the CLIP and SigLIP encoders share: the frozen vision model, its pixel statistics, device and dtype,
    and ``encode`` as pixels then :meth:`encode_pixels` (each subclass defines that and its negatives)."""

    kinds: tuple[str, ...]

    def __init__(self, model: Any, *, image_size: int, mean: Sequence[float], std: Sequence[float],
                 kinds: Sequence[str], supported: Sequence[str], device: str | torch.device | None,
                 dtype: torch.dtype | None) -> None:
        if dtype is not None and not dtype.is_floating_point:
            raise LookalikeError(f"the image encoder dtype must be a floating type such as float32, not {dtype}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise LookalikeError(f"image mean and std need 3 values each (std > 0); got mean={mean}, std={std}")
        self.kinds = check_kinds(kinds, supported)
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.image_size = int(image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    @property
    def device(self) -> torch.device:
        """Device the model and the returned features live on."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the model and the returned features."""
        return next(self.model.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """Move the model (and so all future features) to device and/or dtype; returns self."""
        self.model.to(device=device, dtype=dtype)
        return self

    def encode(self, images: Sequence[Image.Image], *, crop: CropMode = "center") -> Features:
        """Encode N images into every kind this encoder was built for."""
        pixels = to_clip_pixels(images, self.image_size, self.mean, self.std, mode=crop)  # (N, 3, S, S)
        return self.encode_pixels(pixels, self.kinds)

    def encode_pixels(self, pixels: torch.Tensor, kinds: Sequence[str]) -> Features:
        raise NotImplementedError

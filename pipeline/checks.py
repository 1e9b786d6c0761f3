"""Limits and checks of a generation shared by the library, the command line and any other front end:
output size, seeds, and the decoded images themselves (never a silent black image)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import LookalikeError

#: Largest output side in pixels (SDXL's native size is 1024; 4096 already needs tens of GB to decode).
MAX_SIDE = 4096
#: torch.Generator.manual_seed takes seeds up to 2**64 - 1.
MAX_SEED = 2**64 - 1
#: Most denoising steps (the schedulers' 1000 training timesteps).
MAX_STEPS = 1000


def check_size(width: int, height: int) -> None:
    """Refuse an output size that cannot be generated: not a positive multiple of 8, or above :data:`MAX_SIDE`."""
    for name, value in (("width", width), ("height", height)):
        if type(value) is not int or value < 8 or value % 8:
            raise LookalikeError(f"the image {name} must be a positive multiple of 8 pixels, not {value!r}")
        if value > MAX_SIDE:
            raise LookalikeError(f"an image {name} of {value} pixels is above the limit of {MAX_SIDE}; it would run "
                                 f"out of memory: ask for at most {MAX_SIDE}x{MAX_SIDE} and upscale afterwards")


def check_seeds(seed: int, count: int = 1) -> None:
    """Seeds ``seed .. seed + count - 1`` must all be valid torch seeds (0 .. 2**64 - 1)."""
    if type(seed) is not int or seed < 0 or seed + count - 1 > MAX_SEED:
        last = f" (and the following {count - 1})" if count > 1 else ""
        raise LookalikeError(f"seed {seed}{last} must lie between 0 and {MAX_SEED} (2**64 - 1); pick a smaller seed")


def check_images(images: Any, flagged: Sequence[bool] | None = None, half: bool = False) -> None:
    """Decoded images as floats (``(N, H, W, C)`` numpy or torch, before 8-bit conversion) must be finite and
    not blank (every value the same), except those the safety checker blanked (``flagged``).

    ``half``: the model ran in float16, whose overflow is the usual cause (the hint says so).
    """
    import numpy as np

    array = images.float().cpu().numpy() if hasattr(images, "cpu") else np.asarray(images, dtype=np.float32)
    hint = ("the model ran in float16 and overflowed: use --dtype float32 or bfloat16 (API: dtype=torch.float32 "
            "or torch.bfloat16)" if half else "check the adapter weights, the subject's features and the scale")
    for i, image in enumerate(array):
        if flagged is not None and i < len(flagged) and flagged[i]:
            continue
        if not np.isfinite(image).all():
            raise LookalikeError(f"the model produced NaN or infinite values for image {i}, which would be saved "
                                 f"as a black image; nothing was written: {hint}")
        if image.size and float(image.max()) == float(image.min()):
            raise LookalikeError(f"the model produced a blank image {i} (every pixel {float(image.flat[0]):g}); "
                                 f"nothing was written: {hint}")

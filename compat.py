"""Keyword names that changed across the versions of diffusers and transformers lookalike supports."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _at_least(package: str, version: str) -> bool:
    from importlib.metadata import version as installed

    from packaging.version import Version

    return Version(installed(package)) >= Version(version)


def transformers_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype keyword in transformers: ``dtype`` from 4.56, ``torch_dtype`` before."""
    return {"dtype" if _at_least("transformers", "4.56") else "torch_dtype": dtype}


def diffusers_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype keyword in diffusers: ``dtype`` from 0.40 (``torch_dtype`` is deprecated
    there and goes in 1.0, where it would be ignored, loading fp32), ``torch_dtype`` before (which ignores
    ``dtype``)."""
    return {"dtype" if _at_least("diffusers", "0.40") else "torch_dtype": dtype}


#: The one message silenced by :func:`quiet_torchvision_fallback` (transformers >= 5 without torchvision).
_TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"


class TorchvisionFallbackFilter(logging.Filter):
    """Drops transformers' notice that an image processor falls back to its PIL twin without torchvision."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _TORCHVISION_FALLBACK not in record.getMessage()


def quiet_torchvision_fallback() -> None:
    """Silence transformers' torchvision-fallback notice, once per process.

    lookalike never uses torchvision (its encoders prepare pixels themselves), so the notice, printed once per
    processor class whenever diffusers or transformers imports one, says nothing a user can act on. Only that
    message is dropped, on the one logger that emits it; every other transformers message is untouched.
    """
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(type(f).__name__ == TorchvisionFallbackFilter.__name__ for f in logger.filters):
        logger.addFilter(TorchvisionFallbackFilter())

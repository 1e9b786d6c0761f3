"""Keyword names that changed across the versions of diffusers and transformers lookalike supports."""

from __future__ import annotations

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

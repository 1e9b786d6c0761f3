"""SigLIP image encoder (Zhai et al. 2023) behind the same ``ImageEncoder`` protocol as CLIP and ArcFace.

``"pooled"``: the attention-pooled embedding (``pooler_output``, 1152-d for so400m-patch14-384), which
InstantX's FLUX IP-Adapter projects; ``"patch"``: the penultimate layer's tokens (729 x 1152), which
InstantX's SD3.5 IP-Adapter resamples (diffusers' ``encode_image`` uses ``hidden_states[-2]``).
Pixels: the processor's size and mean/std (0.5/0.5); SigLIP's own processor squashes the image to a
square, which is ``crop="resize"``; the default centre crop keeps the aspect ratio like the CLIP encoder.
Unconditional features are zeros for both kinds (FLUX negatives are zero embeddings; diffusers' SD3.5
pipeline uses ``zeros_like``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..compat import transformers_dtype
from ..errors import LookalikeError
from .base import Features, VisionTower, check_batch_size

SIGLIP_KINDS: tuple[str, ...] = ("pooled", "patch")
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


class SiglipImageEncoder(VisionTower):
    """Wraps a transformers ``SiglipVisionModel``; produces "pooled" and/or "patch" features."""

    family = "siglip"

    def __init__(self, model: Any, *, mean: Sequence[float] = SIGLIP_MEAN, std: Sequence[float] = SIGLIP_STD,
                 kinds: Sequence[str] = SIGLIP_KINDS, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        from transformers import SiglipVisionModel

        if not isinstance(model, SiglipVisionModel):
            raise TypeError(f"SiglipImageEncoder needs a SiglipVisionModel, not {type(model).__name__}")
        super().__init__(model, image_size=int(model.config.image_size), mean=mean, std=std, kinds=kinds,
                         supported=SIGLIP_KINDS, device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, id_or_dir: str | os.PathLike[str], subfolder: str | None = None, *,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        local_files_only: bool | None = None,
                        kinds: Sequence[str] = SIGLIP_KINDS) -> SiglipImageEncoder:
        """Load a SigLIP vision model (a folder or hub id; a full SigLIP checkpoint's vision tower also loads)."""
        from transformers import SiglipVisionModel

        source = str(id_or_dir)
        local = Path(source).expanduser()
        if (source.startswith((".", "/", "~")) or local.exists()) and not (local / (subfolder or "")).is_dir():
            raise LookalikeError(f"image encoder folder '{source}' does not exist; pass a SigLIP folder or hub id")
        hub: dict[str, Any] = {"subfolder": subfolder or ""}
        if local_files_only is not None:
            hub["local_files_only"] = local_files_only
        try:
            model, info = SiglipVisionModel.from_pretrained(source, output_loading_info=True,
                                                            **transformers_dtype(dtype), **hub)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LookalikeError(f"cannot load the SigLIP image encoder '{source}': {first}") from exc
        missing = sorted(info.get("missing_keys", ()))
        if missing:
            raise LookalikeError(f"the SigLIP image encoder '{source}' lacks {len(missing)} weight(s) such as "
                                 f"'{missing[0]}'; pass a complete SigLIP vision checkpoint")
        mean, std = _processor_stats(local / (subfolder or "") / "preprocessor_config.json")
        return cls(model, mean=mean, std=std, kinds=kinds, device=device, dtype=dtype)

    @property
    def embed_dims(self) -> dict[str, int]:
        """Both kinds are ``hidden_size`` wide (SigLIP has no projection head)."""
        return {kind: int(self.model.config.hidden_size) for kind in self.kinds}

    @property
    def num_patch_tokens(self) -> int:
        """Tokens per image in "patch" features: one per patch (SigLIP has no class token)."""
        return (self.image_size // int(self.model.config.patch_size)) ** 2

    def encode_negative(self, n: int) -> Features:
        """Unconditional features: zeros of the same shapes for every kind."""
        n = check_batch_size(n)
        width = int(self.model.config.hidden_size)
        shapes = {"pooled": (n, width), "patch": (n, self.num_patch_tokens, width)}
        return {kind: torch.zeros(shapes[kind], device=self.device, dtype=self.dtype) for kind in self.kinds}

    def encode_pixels(self, pixels: torch.Tensor, kinds: Sequence[str]) -> Features:
        """Run the model once on normalised pixels (N, 3, S, S), returning only the kinds asked."""
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            out = self.model(pixel_values=pixels, output_hidden_states="patch" in kinds)
        features: Features = {}
        if "pooled" in kinds:
            features["pooled"] = out.pooler_output.clone()  # (N, H)
        if "patch" in kinds:
            features["patch"] = out.hidden_states[-2].clone()  # (N, T, H), penultimate layer
        return features

    def __repr__(self) -> str:
        return (f"SiglipImageEncoder(kinds={self.kinds}, embed_dims={self.embed_dims}, image_size={self.image_size}, "
                f"device={self.device}, dtype={self.dtype})")


def _processor_stats(file: Path) -> tuple[Sequence[float], Sequence[float]]:
    """image_mean / image_std from a local preprocessor_config.json; SigLIP's 0.5/0.5 when absent."""
    if not file.is_file():
        return SIGLIP_MEAN, SIGLIP_STD
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LookalikeError(f"cannot read '{file}': {exc}; fix or delete the file") from exc
    if not isinstance(config, dict):
        raise LookalikeError(f"'{file}' does not hold a JSON object; fix or delete the file")
    mean, std = config.get("image_mean", SIGLIP_MEAN), config.get("image_std", SIGLIP_STD)
    mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(v) for v in mean]
    std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(v) for v in std]
    return mean, std

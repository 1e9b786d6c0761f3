"""CLIP image encoder: pooled ``image_embeds`` (IP-Adapter) and penultimate patch tokens (IP-Adapter Plus)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionModelWithProjection

from ..compat import transformers_dtype
from ..errors import LookalikeError
from .base import Features, VisionTower, check_batch_size, check_kinds
from .prepare import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

CLIP_KINDS: tuple[str, ...] = ("pooled", "patch")
_CLIP_MODEL_TYPES = ("clip_vision_model", "clip")
_PROCESSOR_FILE = "preprocessor_config.json"


class ClipImageEncoder(VisionTower):
    """Wraps a transformers ``CLIPVisionModelWithProjection``; produces "pooled" and/or "patch" features."""

    def __init__(
        self,
        model: CLIPVisionModelWithProjection,
        *,
        image_size: int | None = None,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        kinds: Sequence[str] = CLIP_KINDS,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Build from a model; image_size defaults to the model's; device/dtype None keep the model's own."""
        if not isinstance(model, CLIPVisionModelWithProjection):
            raise TypeError(
                f"ClipImageEncoder needs a CLIPVisionModelWithProjection, not {type(model).__name__}"
            )
        model_size = int(model.config.image_size)
        if image_size is not None and int(image_size) != model_size:
            raise LookalikeError(
                f"image size {image_size} does not match the {model_size} pixels the CLIP vision model "
                f"expects; fix crop_size in {_PROCESSOR_FILE} or use the matching model"
            )
        super().__init__(model, image_size=model_size, mean=mean, std=std, kinds=kinds, supported=CLIP_KINDS,
                         device=device, dtype=dtype)
        self._blank_cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @classmethod
    def from_pretrained(
        cls,
        id_or_dir: str | os.PathLike[str],
        subfolder: str | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        local_files_only: bool | None = None,
        kinds: Sequence[str] = CLIP_KINDS,
    ) -> ClipImageEncoder:
        """Load a CLIP vision model (+ its preprocessor_config.json when present) from a folder or hub id."""
        source = str(id_or_dir)
        kinds = check_kinds(kinds, CLIP_KINDS)
        _check_local_folder(source, subfolder)
        hub: dict[str, Any] = {"subfolder": subfolder or ""}
        if local_files_only is not None:
            hub["local_files_only"] = local_files_only
        where = f"'{source}'" + (f" (subfolder '{subfolder}')" if subfolder else "")
        _check_model_type(source, where, hub)
        try:
            model, info = CLIPVisionModelWithProjection.from_pretrained(
                source, output_loading_info=True, **transformers_dtype(dtype), **hub
            )
        except (OSError, ValueError) as exc:
            raise LookalikeError(
                f"cannot load the CLIP image encoder {where}: {_first_line(exc)}; check the id or folder"
            ) from exc
        _check_missing_weights(info.get("missing_keys", ()), where, kinds)
        processor = read_processor_config(source, subfolder, local_files_only)
        image_size, mean, std = _processor_settings(processor)
        return cls(model, image_size=image_size, mean=mean, std=std, kinds=kinds, device=device, dtype=dtype)

    @property
    def embed_dims(self) -> dict[str, int]:
        """Last-dimension size per produced kind: pooled = projection_dim, patch = hidden_size."""
        dims = {"pooled": int(self.model.config.projection_dim), "patch": int(self.model.config.hidden_size)}
        return {kind: dims[kind] for kind in self.kinds}

    @property
    def num_patch_tokens(self) -> int:
        """Tokens per image in "patch" features: one class token plus one per patch."""
        return 1 + (self.image_size // int(self.model.config.patch_size)) ** 2

    def encode_negative(self, n: int) -> Features:
        """Unconditional features: zeros for "pooled"; "patch" = the model run on zero normalised pixels."""
        n = check_batch_size(n)
        features: Features = {}
        if "pooled" in self.kinds:
            dim = int(self.model.config.projection_dim)
            features["pooled"] = torch.zeros(n, dim, device=self.device, dtype=self.dtype)  # (n, E)
        if "patch" in self.kinds:
            features["patch"] = self._blank_patch().repeat(n, 1, 1)  # (n, T, H)
        return {kind: features[kind] for kind in self.kinds}

    def _blank_patch(self) -> torch.Tensor:
        """The model on an all-zero normalised image, computed once per device and dtype (weights are frozen)."""
        key = (self.device, self.dtype)
        if key not in self._blank_cache:
            zeros = torch.zeros(1, 3, self.image_size, self.image_size)  # (1, 3, S, S), already normalised
            self._blank_cache[key] = self.encode_pixels(zeros, ("patch",))["patch"]  # (1, T, H)
        return self._blank_cache[key]

    def encode_pixels(self, pixels: torch.Tensor, kinds: Sequence[str]) -> Features:
        """Run the model once on normalised pixels (N, 3, S, S), returning only the kinds asked."""
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        want_patch = "patch" in kinds
        with torch.inference_mode():
            out = self.model(pixel_values=pixels, output_hidden_states=want_patch)
        # clone() outside inference mode gives ordinary tensors, usable as inputs to trainable layers.
        features: Features = {}
        if "pooled" in kinds:
            features["pooled"] = out.image_embeds.clone()  # (N, E)
        if want_patch:
            # The penultimate layer's tokens, as IP-Adapter Plus uses them.
            features["patch"] = out.hidden_states[-2].clone()  # (N, T, H)
        return features

    def __repr__(self) -> str:
        """Short description: kinds, dims, image size, device and dtype."""
        return (
            f"ClipImageEncoder(kinds={self.kinds}, embed_dims={self.embed_dims}, image_size={self.image_size}, "
            f"device={self.device}, dtype={self.dtype})"
        )


def _looks_like_path(source: str) -> bool:
    """True when source is clearly a filesystem path rather than a hub repo id like 'org/name'."""
    return os.path.isabs(source) or source.startswith((".", "~")) or "\\" in source or source.count("/") > 1


def _check_local_folder(source: str, subfolder: str | None) -> None:
    """Raise a helpful LookalikeError when a local folder is missing or holds no model config."""
    path = Path(source).expanduser()
    if not path.exists():
        if _looks_like_path(source):
            raise LookalikeError(
                f"image encoder folder '{source}' does not exist; pass a folder saved with save_pretrained "
                "or a Hugging Face repo id"
            )
        return  # a hub repo id: transformers resolves it (cache or download)
    if not path.is_dir():
        raise LookalikeError(f"image encoder '{source}' is a file; pass the folder that holds config.json")
    root = path / subfolder if subfolder else path
    if (root / "config.json").is_file():
        return
    if not subfolder and (path / "image_encoder" / "config.json").is_file():
        raise LookalikeError(
            f"'{source}' has no config.json but its image_encoder/ folder does; pass subfolder='image_encoder'"
        )
    raise LookalikeError(
        f"'{root}' holds no config.json, so it is not a saved CLIP vision model; pass the image encoder folder"
    )


def _check_model_type(source: str, where: str, hub: dict[str, Any]) -> None:
    """Refuse configs of other architectures (transformers would load them with random weights)."""
    try:
        config, _ = CLIPVisionModelWithProjection.config_class.get_config_dict(source, **hub)
    except (OSError, ValueError) as exc:
        raise LookalikeError(
            f"cannot load the CLIP image encoder {where}: {_first_line(exc)}; check the id or folder"
        ) from exc
    model_type = config.get("model_type")
    if model_type not in _CLIP_MODEL_TYPES:
        raise LookalikeError(
            f"{where} holds a {model_type or 'unknown'} model, not a CLIP vision model; pass a CLIP image "
            "encoder such as the image_encoder folder of an IP-Adapter repo"
        )


def _check_missing_weights(missing: Any, where: str, kinds: Sequence[str]) -> None:
    """Refuse a checkpoint whose needed weights were absent (transformers would randomly initialise them)."""
    needed = [key for key in sorted(missing) if "pooled" in kinds or not key.startswith("visual_projection")]
    if needed:
        hint = " (a CLIPVisionModel without projection?)" if all("projection" in k for k in needed) else ""
        raise LookalikeError(
            f"the CLIP image encoder {where} lacks {len(needed)} weight(s) such as '{needed[0]}'{hint}; "
            "pass a complete CLIPVisionModelWithProjection checkpoint"
        )


def read_processor_config(
    source: str, subfolder: str | None, local_files_only: bool | None
) -> dict[str, Any]:
    """Read preprocessor_config.json beside the model (local folder or hub cache); {} when absent."""
    local = Path(source).expanduser()
    if local.is_dir():
        file = (local / subfolder if subfolder else local) / _PROCESSOR_FILE
        if not file.is_file():
            return {}
    else:
        from huggingface_hub import hf_hub_download

        try:
            file = Path(
                hf_hub_download(
                    source, _PROCESSOR_FILE, subfolder=subfolder, local_files_only=bool(local_files_only)
                )
            )
        except Exception:  # absent from the repo or unreachable: fall back to OpenAI defaults
            return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LookalikeError(f"cannot read '{file}': {_first_line(exc)}; fix or delete the file") from exc
    if not isinstance(config, dict):
        raise LookalikeError(f"'{file}' does not hold a JSON object; fix or delete the file")
    return config


def _processor_settings(config: dict[str, Any]) -> tuple[int | None, Sequence[float], Sequence[float]]:
    """Crop size, mean and std from a CLIPImageProcessor config dict (None / OpenAI defaults if absent).

    The crop size is used for both the resize and the crop, as in every CLIP config IP-Adapter uses
    (shortest_edge == crop size); a larger shortest_edge is not reproduced.
    """
    crop = config.get("crop_size", config.get("size"))
    if isinstance(crop, dict):
        crop = crop.get("height", crop.get("shortest_edge"))
    return (
        (int(crop) if crop is not None else None),
        _triple(config, "image_mean"),
        _triple(config, "image_std"),
    )


def _triple(config: dict[str, Any], key: str) -> Sequence[float]:
    """A per-channel value from the processor config: a list as is, a scalar repeated, absent = OpenAI."""
    default = OPENAI_CLIP_MEAN if key == "image_mean" else OPENAI_CLIP_STD
    value = config.get(key)
    if value is None:
        return default
    return [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]


def _first_line(exc: BaseException) -> str:
    """First line of an exception message, without a trailing full stop."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.rstrip(".")

"""Reference images -> a :class:`Subject`, running exactly the encoders an adapter's spec names.

Nothing here branches on an encoder's kind beyond the spec's feature list: FaceID-Plus is "face, then CLIP
on the aligned face crop"; every other variant asks one encoder for one feature.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from ..adapters.spec import ENCODERS, AdapterSpec, EncoderSpec, encoder_of
from ..encoders.prepare import CropMode, load_reference
from ..errors import LookalikeError
from ..weights.io import check_encoder
from .subject import MAX_SUBJECT_IMAGES, Subject, file_sha256

ImageSource = str | os.PathLike | Image.Image


class EncoderSet:
    """The image encoders a Personalizer uses, loaded on first need (or given by the caller)."""

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 face_options: Mapping[str, Any] | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.face_options = dict(face_options or {})  # FaceEncoder.from_folder arguments (model_dir, detector...)
        self.by_name: dict[str, Any] = {}
        self.by_kind: dict[str, Any] = {}

    def set(self, encoder: Any, name: str | None = None) -> None:
        """Use ``encoder`` for the encoder ``name`` (a key of ``ENCODERS``), or for every encoder of its kind."""
        encoder = _wrap(encoder)
        kind = "face" if "face_id" in encoder.kinds else getattr(encoder, "family", "clip")
        if name is None:
            self.by_kind[kind] = encoder
        else:
            self.by_name[name] = encoder

    def get(self, spec: EncoderSpec) -> Any:
        """The encoder for ``spec``: one set by name, one set for its kind, else loaded from the cache/hub."""
        found = self.by_name.get(spec.name) or self.by_kind.get(spec.kind)
        if found is None:
            found = self._load(spec)
            self.by_name[spec.name] = found
        return found

    def _load(self, spec: EncoderSpec) -> Any:
        if spec.kind == "face":
            from ..encoders.face import FaceEncoder

            pack = spec.name.removeprefix("insightface-")  # the pack the adapter was trained with, unless told
            return FaceEncoder.from_folder(**{"name": pack, **self.face_options})
        from ..weights.hub import resolve_encoder_dir

        return _IMAGE_ENCODERS[spec.kind]().from_pretrained(resolve_encoder_dir(spec), device=self.device,
                                                            dtype=self.dtype)


def _clip_class() -> Any:
    from ..encoders.clip import ClipImageEncoder

    return ClipImageEncoder


def _siglip_class() -> Any:
    from ..encoders.siglip import SiglipImageEncoder

    return SiglipImageEncoder


#: Image-encoder class per ``EncoderSpec.kind`` (face encoders load from their folder).
_IMAGE_ENCODERS = {"clip": _clip_class, "siglip": _siglip_class}


def _wrap(encoder: Any) -> Any:
    """A transformers vision model (CLIP with projection, SigLIP) -> lookalike's encoder; others as they are."""
    name = encoder.__class__.__name__
    if name.startswith("CLIPVision"):
        return _clip_class()(encoder)
    if name == "SiglipVisionModel":
        return _siglip_class()(encoder)
    return encoder


def _image_encoder(encs: dict[str, Any]) -> Any:
    """The encoder of an adapter that makes image ("pooled"/"patch") features: the one that is not a face model."""
    return next(e for e in encs.values() if "face_id" not in e.kinds)


def _load_all(images: Sequence[ImageSource] | ImageSource) -> tuple[list[Image.Image], list[str]]:
    """Images and their SHA-256 ("" for images given in memory)."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    if len(images) == 0:
        raise LookalikeError("no reference image was given; pass at least one photo of the subject")
    if len(images) > MAX_SUBJECT_IMAGES:
        raise LookalikeError(f"{len(images)} reference images were given, above the limit of {MAX_SUBJECT_IMAGES} "
                             f"per subject; pick the {MAX_SUBJECT_IMAGES} best photos")
    loaded = [load_reference(img) for img in images]
    in_memory = [isinstance(img, Image.Image) for img in images]
    sources = ["" if mem else file_sha256(img) for img, mem in zip(images, in_memory)]
    return loaded, sources


def _face_encode(encoder: Any, sources: list[ImageSource], sizes: list[tuple[int, int]], face_index: int | None,
                 normed: bool) -> tuple[torch.Tensor, list[Image.Image], dict[str, torch.Tensor]]:
    """ArcFace ids (N, 512), the aligned 224 px face crops (for CLIP) and the keypoints, one face per image."""
    faces = encoder.encode_faces(sources, face_index=face_index)
    ids = [torch.as_tensor(f.normed_embedding if normed else f.embedding, dtype=torch.float32) for f in faces]
    kps = torch.stack([torch.as_tensor(f.kps, dtype=torch.float32).reshape(5, 2) for f in faces])  # (N, 5, 2)
    size = torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)  # (N, 2) the upright photos' width, height
    return torch.stack(ids), [f.crop for f in faces], {"kps": kps, "size": size}


def resolve_combine(combine: str | None, weights: Sequence[float] | None,
                    count: int) -> tuple[str, list[float] | None]:
    """How ``count`` reference images are combined: ``concat`` keeps each image's tokens, ``mean`` averages
    the features, weighted by ``weights`` (one non-negative number per image) when given. ``combine=None``
    means ``mean`` with weights and ``concat`` without."""
    if combine is None:
        combine = "concat" if weights is None else "mean"
    if combine not in ("concat", "mean"):
        raise LookalikeError(f"combine must be 'concat' or 'mean', not {combine!r}")
    if weights is None:
        return combine, None
    values = [float(w) for w in weights]
    if len(values) != count:
        raise LookalikeError(f"{len(values)} reference weight(s) for {count} reference image(s); give one weight "
                             f"per image, in the same order")
    if not all(math.isfinite(w) and w >= 0 for w in values) or sum(values) <= 0:
        raise LookalikeError(f"reference weights must be non-negative numbers with a positive sum, got {values}")
    if combine == "concat":
        raise LookalikeError("reference weights set how much each image counts in their average: combine the "
                             "images with mean (with concat every image keeps its own tokens)")
    return combine, values


def combine_images(t: torch.Tensor, combine: str, weights: Sequence[float] | None = None) -> torch.Tensor:
    """One subject's features ``(images, ...)`` -> ``(1, images, ...)`` (concat) or ``(1, 1, ...)`` (mean)."""
    if combine == "concat":
        return t.unsqueeze(0)
    if weights is None:
        return t.mean(0, keepdim=True).unsqueeze(0)
    w = torch.tensor(weights, dtype=torch.float32, device=t.device).view(-1, *([1] * (t.dim() - 1)))
    return ((w * t.float()).sum(0, keepdim=True) / w.sum()).to(t.dtype).unsqueeze(0)


def encode_subject(encoders: EncoderSet, spec: AdapterSpec, images: Sequence[ImageSource] | ImageSource, *,
                   combine: str | None = None, crop: CropMode = "center", face_index: int | None = None,
                   weights: Sequence[float] | None = None,
                   negative_images: Sequence[ImageSource] | ImageSource | None = None) -> Subject:
    """Encode reference images for ``spec``; features come out as ``(1, images, ...)``, or ``(1, 1, ...)``
    averaged (``combine="mean"``, weighted by ``weights`` when given; see :func:`resolve_combine`).

    The negative (guidance's unconditional image input) is the variant's official one, or, with
    ``negative_images``, the encoder's features of those photos (averaged): what the image should move away
    from, as ComfyUI's ``image_negative``. FaceID's face-id negative is always zeros.
    """
    if not isinstance(negative_images, (str, os.PathLike, Image.Image)) and not negative_images:
        negative_images = None  # an empty list: the official negative
    if negative_images is not None and "face_id" in spec.features:
        raise LookalikeError(f"negative reference photos are for CLIP-image adapters; {spec.name}'s unconditional "
                             f"face id stays zeros: drop the negative photos")
    pil, sources = _load_all(images)
    neg_pil, neg_sources = _load_all(negative_images) if negative_images is not None else ([], [])
    combine, weights = resolve_combine(combine, weights, len(pil))
    encs = {e.kind: encoders.get(e) for e in encoder_of(spec)}
    feats: dict[str, torch.Tensor] = {}
    clip_inputs, clip_crop, landmarks = pil, crop, {}
    if "face_id" in spec.features:
        given = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
        feats["face_id"], clip_inputs, landmarks = _face_encode(encs["face"], given, [p.size for p in pil], face_index,
                                                                   spec.face_normed)
        clip_crop = "center"
    clip_kinds = [k for k in spec.features if k in ("pooled", "patch")]
    if clip_kinds:
        out = _image_encoder(encs).encode(clip_inputs, crop=clip_crop)
        feats.update({k: out[k] for k in clip_kinds})
    check_encoder(spec, {k: v.shape[-1] for k, v in feats.items()}, "the image encoder")
    if neg_pil:
        out = _image_encoder(encs).encode(neg_pil, crop=crop)
        negative = {k: out[k].to(t).mean(0, keepdim=True).expand_as(t).clone() for k, t in feats.items()}
    else:
        negative = _negative(encs, spec, feats)
    return Subject({k: combine_images(v, combine, weights) for k, v in feats.items()},
                   {k: combine_images(v, combine, weights) for k, v in negative.items()},
                   adapter=spec.name, encoder=spec.encoder, combine=combine, sources=sources, weights=weights or [],
                   negative_sources=neg_sources, landmarks=landmarks).check("the encoded subject")


def _negative(encs: dict[str, Any], spec: AdapterSpec, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official unconditional features, one row per image (zeros; CLIP of a blank input for patches)."""
    out = {}
    for kind, t in feats.items():
        if spec.negative_rule(kind) == "encode_zeros":
            out[kind] = _image_encoder(encs).encode_negative(1)[kind].to(t).expand_as(t).clone()
        else:
            out[kind] = torch.zeros_like(t)
    return out


def known_encoder(name: str) -> EncoderSpec:
    """An encoder spec by name, with a sentence when unknown."""
    if name not in ENCODERS:
        raise LookalikeError(f"unknown image encoder {name!r}; known: {', '.join(ENCODERS)}")
    return ENCODERS[name]

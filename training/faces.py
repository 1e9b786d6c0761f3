"""Face embeddings on the fly: records without an ``id_embed_file`` get one from the face encoder.

The official FaceID data is prepared with insightface: the largest face of the image, aligned on ArcFace's
5-point template, embedded by ``buffalo_l``'s recognition model (the ``id_embed_file``), and for FaceID-Plus
the aligned crop is what CLIP sees. :class:`FaceEmbedder` does the same while the cache is built or the
batches are read, with lookalike's :class:`~lookalike.encoders.face.FaceEncoder`; an image without a face is
one skipped, counted record. Each process (DataLoader workers included) opens its own ONNX sessions: a
forked worker neither uses nor frees its parent's (freeing them there deadlocks on their thread pools).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .records import SkipSample


@dataclass
class FaceEmbedder:
    """The face encoder of a run, described by ``FaceEncoder.from_folder`` arguments and opened per process."""

    options: dict[str, Any]  # model_dir, detector, yunet_model
    normed: bool = True
    _opened: dict[int, Any] = field(default_factory=dict, repr=False)  # process id -> its FaceEncoder

    def encoder(self) -> Any:
        """This process's :class:`~lookalike.encoders.face.FaceEncoder` (opened on first use)."""
        pid = os.getpid()
        if pid not in self._opened:
            from ..encoders.face import FaceEncoder

            self._opened[pid] = FaceEncoder.from_folder(normed=self.normed, **self.options)
        return self._opened[pid]

    def embed(self, image: Image.Image, label: str) -> tuple[torch.Tensor, Image.Image]:
        """The largest face's ArcFace embedding (D,) (normed as the variant wants) and its aligned RGB crop
        (224 px, FaceID-Plus's CLIP input); :class:`SkipSample` ("no face found") when there is none."""
        faces = self.encoder().detect_and_align(image)  # left to right
        if not faces:
            raise SkipSample("no face found", label)
        face = max(faces, key=lambda f: f.area)  # the largest, the leftmost on ties (as select_face)
        vec = face.normed_embedding if self.normed else face.embedding
        vec = torch.from_numpy(vec.astype("float32")).flatten()
        if not torch.isfinite(vec).all():
            raise SkipSample("bad face embedding", f"{label}: the face encoder gave NaN or Inf")
        return vec, face.crop

    def __getstate__(self) -> dict[str, Any]:  # a spawned worker opens its own sessions
        return {"options": self.options, "normed": self.normed, "_opened": {}}


def face_embedder(face_models: str | None, detector: str, yunet_model: str | None, normed: bool) -> FaceEmbedder | None:
    """The run's embedder (opened once here, so a bad model folder fails before training), or None."""
    if not face_models:
        return None
    options: dict[str, Any] = {"model_dir": face_models, "detector": detector}
    if yunet_model:
        options["yunet_model"] = yunet_model
    embedder = FaceEmbedder(options, normed)
    embedder.encoder()
    return embedder

"""Face encoder: detection, 5-point alignment and the ArcFace identity embedding (IP-Adapter FaceID).

The path is the one official IP-Adapter FaceID uses, on insightface and onnxruntime: a detector gives
boxes and 5 landmarks, ``insightface.utils.face_align.norm_crop`` warps the face onto ArcFace's
5-point template, and the recognition model (``w600k_r50.onnx`` of the ``buffalo_l`` pack) turns
the 112 px crop into a 512-d embedding, L2-normalised unless ``normed=False`` (the ``_unnorm``
portrait variant). The same alignment at 224 px gives the RGB crop FaceID-Plus feeds to CLIP.

Landmark order everywhere (insightface's): the eye on the image's left, the eye on the image's right,
nose tip, mouth corner on the image's left, mouth corner on the image's right. Faces found in one
image are listed left to right (by the box's left edge, then its top edge); ``face_index`` counts in
that order, and without it the face with the largest box is used.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from ..errors import LookalikeError
from .base import Features, check_batch_size
from .face_detect import (
    DEFAULT_PACK,
    DETECTORS,
    Detection,
    DetectorName,
    FaceDetector,
    InsightFaceDetector,
    YuNetDetector,
    default_providers,
    load_pack,
    model_folder,
    select_face,
)
from .prepare import CROP_MODES, CropMode, load_image

FACE_KINDS: tuple[str, ...] = ("face_id",)
ImageSource = Union[str, os.PathLike, Image.Image]  # a file path or a PIL image



@dataclass(frozen=True, eq=False, kw_only=True)
class FaceCrop(Detection):
    """A detected face with its ArcFace embedding and aligned crops (what insightface's ``Face`` holds)."""

    embedding: np.ndarray  # (D,) float32, the raw ArcFace output
    crop: Image.Image  # aligned RGB, crop_size square (224: the CLIP input of FaceID-Plus)
    arcface_crop: Image.Image  # aligned RGB, the recognition model's input size (112)

    @property
    def normed_embedding(self) -> np.ndarray:
        """The embedding divided by its L2 norm, as insightface's ``Face.normed_embedding``."""
        return self.embedding / np.linalg.norm(self.embedding)


class FaceEncoder:
    """Reference photos to ArcFace identity embeddings, "face_id" (N, D), one face per photo."""

    def __init__(
        self,
        detector: FaceDetector,
        recognizer: Any,
        *,
        normed: bool = True,
        crop_size: int = 224,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Build from a detector and an insightface ``ArcFaceONNX``; normed=False keeps the raw embedding."""
        if not dtype.is_floating_point:
            raise LookalikeError(f"the face encoder dtype must be a floating type such as float32, not {dtype}")
        if crop_size <= 0 or (crop_size % 112 and crop_size % 128):
            raise LookalikeError(
                f"the aligned crop size must be a multiple of 112 or 128 (ArcFace's template), not {crop_size}"
            )
        dim = recognizer.output_shape[-1]
        if not isinstance(dim, int) or dim <= 0:
            raise LookalikeError(
                f"the recognition model '{recognizer.model_file}' has no fixed embedding size (output shape "
                f"{recognizer.output_shape}); use an ArcFace model such as buffalo_l's w600k_r50.onnx"
            )
        self.kinds: tuple[str, ...] = FACE_KINDS
        self.detector = detector
        self.recognizer = recognizer
        self.normed = bool(normed)
        self.crop_size = int(crop_size)
        self._dim = dim
        self._device = torch.device(device)
        self._dtype = dtype

    @classmethod
    def from_folder(
        cls,
        model_dir: str | os.PathLike[str] | None = None,
        *,
        name: str = DEFAULT_PACK,
        root: str | os.PathLike[str] | None = None,
        detector: DetectorName = "insightface",
        yunet_model: str | os.PathLike[str] | None = None,
        face_recognizer: str | os.PathLike[str] | None = None,
        providers: Sequence[Any] | None = None,
        ctx_id: int = 0,
        det_size: tuple[int, int] = (640, 640),
        det_thresh: float = 0.5,
        normed: bool = True,
        crop_size: int = 224,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> FaceEncoder:
        """Load an insightface pack (default ``<root>/models/buffalo_l``) with insightface's model zoo.

        Nothing is downloaded. ``detector="yunet"`` uses OpenCV's YuNet from ``yunet_model`` instead of
        the pack's detector, so the folder then needs only the recognition model. ``face_recognizer``: an
        ONNX recognizer file used instead of the pack's (checked at load, see :mod:`.recognizer`); with
        YuNet, no insightface pack is needed at all. ``providers`` default to CUDA (when onnxruntime has
        it) then CPU; ``ctx_id < 0`` forces CPU, as in insightface.
        """
        if detector not in DETECTORS:
            raise LookalikeError(f"unknown face detector {detector!r}; use one of {', '.join(DETECTORS)}")
        if detector == "yunet" and yunet_model is None:
            raise LookalikeError("detector='yunet' needs yunet_model, the path of a YuNet ONNX file")
        folder = model_folder(model_dir, name=name, root=root)
        providers = list(providers) if providers is not None else default_providers()
        models: dict[str, Any] = {}
        if face_recognizer is None or detector == "insightface":
            models = load_pack(folder, name, need_detector=detector == "insightface", providers=providers,
                               need_recognizer=face_recognizer is None)
        if face_recognizer is not None:
            from .recognizer import OnnxRecognizer

            models["recognition"] = OnnxRecognizer(face_recognizer, providers)
        recognizer = models["recognition"]
        recognizer.prepare(ctx_id)
        if detector == "yunet":
            assert yunet_model is not None
            found: FaceDetector = YuNetDetector(yunet_model, det_size=det_size, det_thresh=det_thresh)
        else:
            found = InsightFaceDetector(models["detection"], det_size=det_size, det_thresh=det_thresh, ctx_id=ctx_id)
        return cls(found, recognizer, normed=normed, crop_size=crop_size, device=device, dtype=dtype)

    @property
    def embed_dims(self) -> dict[str, int]:
        """Last-dimension size of "face_id", read from the recognition model's output (512 for buffalo_l)."""
        return {"face_id": self._dim}

    @property
    def device(self) -> torch.device:
        """Device the returned features live on (the ONNX models run where their providers say)."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the returned features."""
        return self._dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> FaceEncoder:
        """Set the device and/or dtype of future features; returns self."""
        if device is not None:
            self._device = torch.device(device)
        if dtype is not None:
            self._dtype = dtype
        return self

    def detect(self, image: ImageSource) -> list[Detection]:
        """All faces in one image (a path or a PIL image), left to right."""
        return self._detect(_to_bgr(image))

    def detect_and_align(self, image: ImageSource) -> list[FaceCrop]:
        """All faces in one image, left to right, each with its embedding and aligned crops."""
        bgr = _to_bgr(image)
        return [self._align(bgr, found) for found in self._detect(bgr)]

    def encode_faces(
        self, images: Sequence[ImageSource], *, face_index: int | Sequence[int | None] | None = None
    ) -> list[FaceCrop]:
        """One face per image: the largest, or the face_index-th from the left (one index or one per image)."""
        images = _as_list(images)
        indices = _per_image(face_index, len(images))
        faces = []
        for i, (image, index) in enumerate(zip(images, indices)):
            bgr, label = _to_bgr(image), _label(image, i)
            faces.append(self._align(bgr, select_face(self._detect(bgr), label, index)))
        return faces

    def encode(
        self,
        images: Sequence[ImageSource],
        *,
        crop: CropMode = "center",
        face_index: int | Sequence[int | None] | None = None,
    ) -> Features:
        """Encode N images into "face_id" (N, D); crop is checked but unused (alignment sets the crop)."""
        _check_crop(crop)
        return {"face_id": self.embeddings(self.encode_faces(images, face_index=face_index))}

    def embeddings(self, faces: Sequence[FaceCrop]) -> torch.Tensor:
        """Stack the faces' embeddings (normed or raw, per ``normed``) into a (N, D) tensor."""
        rows = [face.normed_embedding if self.normed else face.embedding for face in faces]
        stacked = torch.from_numpy(np.stack(rows).astype(np.float32))  # (N, D)
        return stacked.to(device=self.device, dtype=self.dtype)

    def aligned_crops(
        self, images: Sequence[ImageSource], *, face_index: int | Sequence[int | None] | None = None
    ) -> list[Image.Image]:
        """The aligned RGB face crops (crop_size square) FaceID-Plus gives to CLIP, one per image."""
        return [face.crop for face in self.encode_faces(images, face_index=face_index)]

    def encode_negative(self, n: int) -> Features:
        """The official unconditional "face_id": zeros (n, D)."""
        n = check_batch_size(n)
        return {"face_id": torch.zeros(n, self._dim, device=self.device, dtype=self.dtype)}  # (n, D)

    def _detect(self, bgr: np.ndarray) -> list[Detection]:
        """Run the detector and list the faces left to right."""
        return _left_to_right(self.detector, bgr)

    def _align(self, bgr: np.ndarray, found: Detection) -> FaceCrop:
        """Warp the face onto ArcFace's template (insightface's norm_crop) and embed the 112 px crop."""
        from insightface.utils import face_align

        size = int(self.recognizer.input_size[0])
        with warnings.catch_warnings():  # scikit-image >= 0.26 deprecates the estimate() norm_crop calls
            warnings.filterwarnings("ignore", message=".*estimate.*deprecated", category=FutureWarning)
            arcface_bgr = face_align.norm_crop(bgr, landmark=found.kps, image_size=size)  # (S, S, 3) BGR
            clip_bgr = face_align.norm_crop(bgr, landmark=found.kps, image_size=self.crop_size)  # (C, C, 3) BGR
        embedding = np.asarray(self.recognizer.get_feat(arcface_bgr), np.float32).reshape(-1)  # (D,)
        return FaceCrop(
            found.bbox, found.kps, found.det_score, embedding=embedding,
            crop=_bgr_to_pil(clip_bgr), arcface_crop=_bgr_to_pil(arcface_bgr),
        )

    def __repr__(self) -> str:
        """Short description: detector, dims, normed, crop size, device and dtype."""
        return (
            f"FaceEncoder(detector={type(self.detector).__name__}, embed_dims={self.embed_dims}, "
            f"normed={self.normed}, crop_size={self.crop_size}, device={self.device}, dtype={self.dtype})"
        )


def _check_crop(crop: str) -> None:
    """Refuse an unknown crop mode (face encoders take it for the common interface; alignment sets the crop)."""
    if crop not in CROP_MODES:
        raise LookalikeError(f"unknown crop mode {crop!r}; use one of {', '.join(CROP_MODES)}")


def build_detector(
    model_dir: str | os.PathLike[str] | None = None,
    *,
    name: str = DEFAULT_PACK,
    root: str | os.PathLike[str] | None = None,
    detector: DetectorName = "insightface",
    yunet_model: str | os.PathLike[str] | None = None,
    providers: Sequence[Any] | None = None,
    ctx_id: int = 0,
    det_size: tuple[int, int] = (640, 640),
    det_thresh: float = 0.5,
) -> FaceDetector:
    """The detector alone, as :meth:`FaceEncoder.from_folder` picks it (no recognition model is loaded)."""
    if detector not in DETECTORS:
        raise LookalikeError(f"unknown face detector {detector!r}; use one of {', '.join(DETECTORS)}")
    if detector == "yunet":
        if yunet_model is None:
            raise LookalikeError("detector='yunet' needs yunet_model, the path of a YuNet ONNX file")
        return YuNetDetector(yunet_model, det_size=det_size, det_thresh=det_thresh)
    folder = model_folder(model_dir, name=name, root=root)
    providers = list(providers) if providers is not None else default_providers()
    models = load_pack(folder, name, need_detector=True, providers=providers)
    return InsightFaceDetector(models["detection"], det_size=det_size, det_thresh=det_thresh, ctx_id=ctx_id)


def find_faces(detector: FaceDetector, image: ImageSource) -> list[Detection]:
    """Every face the detector finds in one image, left to right (the order ``face_index`` counts)."""
    return _left_to_right(detector, _to_bgr(image))


def _left_to_right(detector: FaceDetector, bgr: np.ndarray) -> list[Detection]:
    """Run the detector on a BGR image and sort its faces by box left edge, then top."""
    boxes, kps = detector.detect(bgr)  # (N, 5), (N, 5, 2)
    found = [Detection(box[:4].copy(), points.copy(), float(box[4])) for box, points in zip(boxes, kps)]
    return sorted(found, key=lambda face: (float(face.bbox[0]), float(face.bbox[1])))


def _to_bgr(image: ImageSource) -> np.ndarray:
    """Load a path or PIL image upright as RGB (prepare.load_image) and return it as BGR uint8 (H, W, 3)."""
    rgb = np.asarray(load_image(image), dtype=np.uint8)  # (H, W, 3) RGB
    return np.ascontiguousarray(rgb[:, :, ::-1])  # (H, W, 3) BGR, as insightface expects


def _bgr_to_pil(bgr: np.ndarray) -> Image.Image:
    """A BGR uint8 array (H, W, 3) as an RGB PIL image."""
    return Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))


def _label(image: ImageSource, index: int) -> str:
    """How errors name an image: its quoted path or file name, else 'image <index>'."""
    if isinstance(image, (str, os.PathLike)):
        return f"'{os.fspath(image)}'"
    filename = getattr(image, "filename", "")
    return f"'{filename}'" if filename else f"image {index}"


def _as_list(images: Sequence[ImageSource] | ImageSource) -> list[ImageSource]:
    """One image or a sequence of images as a non-empty list."""
    items = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
    if not items:
        raise LookalikeError("no reference images were given; pass at least one image")
    return items


def _per_image(face_index: int | Sequence[int | None] | None, n: int) -> list[int | None]:
    """One face index per image: the same for all, or one given per image."""
    if face_index is None or isinstance(face_index, (int, np.integer)):
        return [face_index] * n  # type: ignore[list-item]
    indices = list(face_index)
    if len(indices) != n:
        raise LookalikeError(f"face_index has {len(indices)} entries for {n} images; give one per image or one int")
    return indices

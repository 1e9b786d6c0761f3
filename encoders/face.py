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
from pathlib import Path
from typing import Any, Literal, Protocol, Union

import numpy as np
import torch
from PIL import Image

from ..errors import LookalikeError
from .base import Features, check_batch_size
from .prepare import CROP_MODES, CropMode, load_image

FACE_KINDS: tuple[str, ...] = ("face_id",)
DetectorName = Literal["insightface", "yunet"]
DETECTORS: tuple[str, ...] = ("insightface", "yunet")
DEFAULT_ROOT = "~/.insightface"  # insightface's own default root (FaceAnalysis, model_zoo.get_model)
DEFAULT_PACK = "buffalo_l"
#: The detection and recognition files of the known insightface packs; other files are ignored.
PACK_FILES: dict[str, tuple[str, str]] = {
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
    "buffalo_m": ("det_2.5g.onnx", "w600k_r50.onnx"),
    "buffalo_s": ("det_500m.onnx", "w600k_mbf.onnx"),
    "buffalo_sc": ("det_500m.onnx", "w600k_mbf.onnx"),
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
}
ImageSource = Union[str, os.PathLike, Image.Image]  # a file path or a PIL image
_NO_FACE_HINT = "use a photo where the face is clearly visible, or an adapter that is not a FaceID variant"


@dataclass(frozen=True, eq=False)
class Detection:
    """One detected face: box (x1, y1, x2, y2), 5 landmarks in insightface's order, and score."""

    bbox: np.ndarray  # (4,) float32, source-image pixels
    kps: np.ndarray  # (5, 2) float32: left eye, right eye, nose, left mouth, right mouth (image sides)
    det_score: float

    @property
    def area(self) -> float:
        """Box area in source pixels, used to pick the largest face."""
        width, height = self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1]
        return float(max(width, 0.0) * max(height, 0.0))


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


class FaceDetector(Protocol):
    """Anything that finds faces in a BGR uint8 image: rows (x1, y1, x2, y2, score) and (N, 5, 2) landmarks."""

    def detect(self, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes with scores (N, 5) and landmarks (N, 5, 2) in source pixels."""
        ...


class InsightFaceDetector:
    """insightface's own detector (SCRFD or RetinaFace from ``model_zoo.get_model``), prepared once."""

    def __init__(
        self, model: Any, *, det_size: tuple[int, int] = (640, 640), det_thresh: float = 0.5, ctx_id: int = 0
    ) -> None:
        """Wrap a loaded insightface detection model and set its input size and score threshold."""
        model.prepare(ctx_id, input_size=tuple(det_size), det_thresh=float(det_thresh))
        self.model = model

    def detect(self, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes with scores (N, 5) and landmarks (N, 5, 2); refuses a detector without landmarks."""
        boxes, kps = self.model.detect(bgr, max_num=0)  # (N, 5), (N, 5, 2) or None
        if kps is None:
            raise LookalikeError(
                f"the face detector '{self.model.model_file}' gives no landmarks, so faces cannot be aligned; "
                "use a detector with 5 keypoints such as buffalo_l's det_10g.onnx"
            )
        return np.asarray(boxes, np.float32).reshape(-1, 5), np.asarray(kps, np.float32).reshape(-1, 5, 2)


class YuNetDetector:
    """OpenCV's YuNet (``cv2.FaceDetectorYN``): boxes, scores and 5 landmarks, no insightface weights needed.

    YuNet lists the subject's right eye, left eye, nose, right and left mouth corners; the subject's
    right is the image's left, so this is already insightface's order and is kept as it is.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        det_size: tuple[int, int] = (640, 640),
        det_thresh: float = 0.5,
        nms_thresh: float = 0.4,
    ) -> None:
        """Load a YuNet ONNX file (e.g. OpenCV Zoo's face_detection_yunet_2023mar.onnx)."""
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise LookalikeError(
                f"YuNet model '{path}' does not exist; pass the path of face_detection_yunet_2023mar.onnx "
                "from OpenCV Zoo (opencv/opencv_zoo, models/face_detection_yunet)"
            )
        cv2 = _import_cv2()
        self.det_size = (int(det_size[0]), int(det_size[1]))
        try:
            self.model = cv2.FaceDetectorYN.create(str(path), "", self.det_size, float(det_thresh), float(nms_thresh))
        except cv2.error as exc:
            raise LookalikeError(
                f"OpenCV cannot load '{path}' as a YuNet face detector ({_first_line(exc)}); pass a YuNet ONNX file"
            ) from exc

    def detect(self, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes with scores (N, 5) and landmarks (N, 5, 2), found on the image scaled into det_size."""
        cv2 = _import_cv2()
        height, width = bgr.shape[:2]
        scale = min(self.det_size[0] / width, self.det_size[1] / height)  # as insightface's detectors scale
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        self.model.setInputSize(size)
        _, rows = self.model.detect(cv2.resize(bgr, size) if size != (width, height) else bgr)
        rows = np.zeros((0, 15), np.float32) if rows is None else np.asarray(rows, np.float32)  # (N, 15)
        xywh, kps, scores = rows[:, 0:4] / scale, rows[:, 4:14] / scale, rows[:, 14:15]
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:4], scores], axis=1)  # (N, 5)
        return boxes, kps.reshape(-1, 5, 2)  # (N, 5), (N, 5, 2)


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
        the pack's detector, so the folder then needs only the recognition model. ``providers`` default
        to CUDA (when onnxruntime has it) then CPU; ``ctx_id < 0`` forces CPU, as in insightface.
        """
        if detector not in DETECTORS:
            raise LookalikeError(f"unknown face detector {detector!r}; use one of {', '.join(DETECTORS)}")
        if detector == "yunet" and yunet_model is None:
            raise LookalikeError("detector='yunet' needs yunet_model, the path of a YuNet ONNX file")
        folder = model_folder(model_dir, name=name, root=root)
        providers = list(providers) if providers is not None else default_providers()
        models = _load_pack(folder, name, need_detector=detector == "insightface", providers=providers)
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
        boxes, kps = self.detector.detect(bgr)  # (N, 5), (N, 5, 2)
        found = [Detection(box[:4].copy(), points.copy(), float(box[4])) for box, points in zip(boxes, kps)]
        return sorted(found, key=lambda face: (float(face.bbox[0]), float(face.bbox[1])))

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


class FacePlusEncoder:
    """FaceID-Plus features: "face_id" from a FaceEncoder plus CLIP features of the aligned face crop."""

    def __init__(self, face: FaceEncoder, clip: Any) -> None:
        """Pair a FaceEncoder with a CLIP ImageEncoder (e.g. ClipImageEncoder with kinds=("patch",))."""
        self.face = face
        self.clip = clip
        self.kinds: tuple[str, ...] = FACE_KINDS + tuple(clip.kinds)

    @property
    def embed_dims(self) -> dict[str, int]:
        """The "face_id" width and the CLIP encoder's widths."""
        return {**self.face.embed_dims, **self.clip.embed_dims}

    @property
    def device(self) -> torch.device:
        """The CLIP encoder's device, where all features are returned."""
        return self.clip.device

    @property
    def dtype(self) -> torch.dtype:
        """The CLIP encoder's dtype, in which all features are returned."""
        return self.clip.dtype

    def encode(
        self,
        images: Sequence[ImageSource],
        *,
        crop: CropMode = "center",
        face_index: int | Sequence[int | None] | None = None,
    ) -> Features:
        """Detect once per image: "face_id" (N, D) and the CLIP features of the aligned crops."""
        _check_crop(crop)
        faces = self.face.encode_faces(images, face_index=face_index)
        face_id = self.face.embeddings(faces).to(device=self.device, dtype=self.dtype)  # (N, D)
        return {"face_id": face_id, **self.clip.encode([face.crop for face in faces], crop="center")}

    def encode_negative(self, n: int) -> Features:
        """Zeros for "face_id" and the CLIP encoder's own negatives."""
        face_id = self.face.encode_negative(n)["face_id"].to(device=self.device, dtype=self.dtype)  # (n, D)
        return {"face_id": face_id, **self.clip.encode_negative(n)}


def select_face(faces: Sequence[Detection], label: str, face_index: int | None = None) -> Detection:
    """The largest face (by box area; the leftmost on ties), or the face_index-th from the left."""
    if not faces:
        raise LookalikeError(f"no face found in {label}; {_NO_FACE_HINT}")
    if face_index is None:
        return faces[int(np.argmax([face.area for face in faces]))]
    if isinstance(face_index, bool) or not isinstance(face_index, (int, np.integer)):
        raise LookalikeError(f"face_index must be an integer or None, not {face_index!r}")
    if not 0 <= face_index < len(faces):
        count = f"{len(faces)} face" + ("s were" if len(faces) > 1 else " was")
        raise LookalikeError(
            f"face_index {face_index} is out of range for {label}: {count} found; pass an index from 0 to "
            f"{len(faces) - 1}, counted left to right"
        )
    return faces[int(face_index)]


def model_folder(
    model_dir: str | os.PathLike[str] | None = None,
    *,
    name: str = DEFAULT_PACK,
    root: str | os.PathLike[str] | None = None,
) -> Path:
    """The pack folder: model_dir when given, else ``<root>/models/<name>`` (root: ~/.insightface)."""
    if model_dir is not None:
        return Path(model_dir).expanduser()
    return Path(root if root is not None else DEFAULT_ROOT).expanduser() / "models" / name


def default_providers() -> list[str]:
    """onnxruntime providers: CUDA first when this onnxruntime has it, then CPU."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    cuda = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
    return [*cuda, "CPUExecutionProvider"]


def _load_pack(folder: Path, name: str, *, need_detector: bool, providers: list[Any]) -> dict[str, Any]:
    """Route the pack's ONNX files through insightface's model zoo; keep "detection" and "recognition"."""
    tasks = ("detection", "recognition") if need_detector else ("recognition",)
    known = [folder / file for file in PACK_FILES.get(name, ())][-len(tasks):]
    hint = _pack_hint(name, [file.name for file in known])
    if not folder.is_dir():
        raise LookalikeError(f"the insightface model folder '{folder}' does not exist; {hint}")
    # The known pack's two files when present; otherwise every ONNX file, as FaceAnalysis does.
    files = known if known and all(file.is_file() for file in known) else sorted(folder.glob("*.onnx"))
    models: dict[str, Any] = {}
    for file in files:
        model = _zoo_model(file, providers)
        task = getattr(model, "taskname", None)
        if task in tasks and task not in models:
            models[task] = model
    missing = [task for task in tasks if task not in models]
    if missing:
        raise LookalikeError(
            f"the insightface model folder '{folder}' has no {' or '.join(missing)} model; {hint}"
        )
    return models


def _zoo_model(file: Path, providers: list[Any]) -> Any:
    """One ONNX file through ``insightface.model_zoo.get_model`` (None when it routes nowhere)."""
    model_zoo = _import_insightface_zoo()
    try:
        return model_zoo.get_model(str(file.resolve()), providers=providers)  # a full path: never downloads
    except Exception as exc:  # a corrupt or foreign ONNX file
        raise LookalikeError(
            f"cannot load '{file}' with insightface: {_first_line(exc)}; replace it with a fresh copy"
        ) from exc


def _pack_hint(name: str, files: Sequence[str]) -> str:
    """How to get a pack: which files the folder should hold, and where insightface gets them."""
    expected = " and ".join(files) if files else "a 5-landmark detection model and an ArcFace recognition model"
    return (
        f"it should hold {expected} (the {name} pack): insightface downloads the pack on first use of "
        f"FaceAnalysis(name='{name}') where the network is reachable, or unzip {name}.zip from insightface's "
        "model-zoo release into that folder, or pass model_dir"
    )


def _check_crop(crop: str) -> None:
    """Refuse an unknown crop mode (face encoders take it for the common interface; alignment sets the crop)."""
    if crop not in CROP_MODES:
        raise LookalikeError(f"unknown crop mode {crop!r}; use one of {', '.join(CROP_MODES)}")


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


def _import_insightface_zoo() -> Any:
    """insightface's model_zoo, or a LookalikeError saying how to install it."""
    try:
        from insightface import model_zoo
    except ImportError as exc:
        raise LookalikeError(
            f"the face encoder needs insightface and onnxruntime ({_first_line(exc)}); "
            "run pip install insightface onnxruntime (onnxruntime-gpu for CUDA)"
        ) from exc
    return model_zoo


def _import_cv2() -> Any:
    """OpenCV, or a LookalikeError saying how to install it."""
    try:
        import cv2
    except ImportError as exc:
        raise LookalikeError("the face encoder needs OpenCV; run pip install opencv-python-headless") from exc
    return cv2


def _first_line(exc: BaseException) -> str:
    """First line of an exception message, without a trailing full stop."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.rstrip(".")

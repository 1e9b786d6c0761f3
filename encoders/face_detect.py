"""Face detection and model loading for the face encoder: insightface's detectors or OpenCV's YuNet.

Detectors return boxes with scores ``(N, 5)`` and 5 landmarks ``(N, 5, 2)`` in insightface's order (the eye on
the image's left, the eye on the image's right, nose tip, left then right mouth corner). Models load through
``insightface.model_zoo.get_model`` on full paths, so nothing is ever downloaded at run time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from ..errors import LookalikeError

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


def load_pack(folder: Path, name: str, *, need_detector: bool, providers: list[Any],
              need_recognizer: bool = True) -> dict[str, Any]:
    """Route the pack's ONNX files through insightface's model zoo; keep "detection" and "recognition"."""
    tasks = tuple(t for t, need in (("detection", need_detector), ("recognition", need_recognizer)) if need)
    pack = PACK_FILES.get(name, ())
    known = [folder / file for file, task in zip(pack, ("detection", "recognition")) if task in tasks]
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

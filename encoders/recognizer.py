"""A replaceable face recognizer: any ONNX model that embeds one aligned 112 x 112 face crop, checked at load.

insightface's packs (``buffalo_l``, ``antelopev2``) are licensed for non-commercial research only; a user may
ship another ArcFace-style recognizer instead. What the face path gives it, as insightface's ``ArcFaceONNX``
does: the face warped onto ArcFace's 5-point template at 112 px, RGB, NCHW float32, normalised
``(pixel - 127.5) / 127.5`` unless the graph starts by normalising itself (its first nodes subtract and
multiply, as the MXNet-converted models do; then raw pixels). The output is one embedding row per face.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LookalikeError

INPUT_SIDE = 112  # ArcFace's aligned crop
_NEED = "an ArcFace-style recognizer taking one aligned 112x112 RGB face crop (input 1x3x112x112, NCHW)"


def _dim(value: Any) -> int | None:
    """A fixed dimension as an int, None for a symbolic or unknown one."""
    return int(value) if isinstance(value, (int, np.integer)) and int(value) > 0 else None


def _normalises_itself(path: Path) -> bool:
    """Whether the graph's first nodes subtract and multiply (insightface's test for built-in normalisation)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise LookalikeError(f"the face recognizer '{path}' keeps its weights in external files; save it as one "
                             f".onnx file")
    names = [node.name for node in model.graph.node[:8]]
    sub = any(n.startswith(("Sub", "_minus")) for n in names)
    mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return sub and mul


class OnnxRecognizer:
    """A checked ONNX face recognizer with insightface's ``ArcFaceONNX`` interface (``get_feat`` on BGR crops)."""

    def __init__(self, path: str | os.PathLike[str], providers: Sequence[Any] | None = None) -> None:
        """Open ``path`` with onnxruntime and check its input, output and one run on a blank crop."""
        import onnxruntime

        from .face_detect import default_providers

        file = Path(path).expanduser()
        if not file.is_file():
            raise LookalikeError(f"the face recognizer '{file}' does not exist; pass the path of {_NEED}")
        try:
            self.session = onnxruntime.InferenceSession(
                str(file), providers=list(providers) if providers is not None else default_providers())
        except Exception as exc:  # not ONNX, damaged, unsupported operators
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LookalikeError(f"cannot open the face recognizer '{file}' with onnxruntime ({first}); pass "
                                 f"{_NEED}") from exc
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = list(inputs[0].shape) if len(inputs) == 1 else []
        if len(inputs) != 1 or len(shape) != 4 or _dim(shape[1]) != 3 or _dim(shape[2]) != INPUT_SIDE \
                or _dim(shape[3]) != INPUT_SIDE or _dim(shape[0]) not in (None, 1):
            given = ", ".join(str(list(i.shape)) for i in inputs) or "none"
            raise LookalikeError(f"the face recognizer '{file}' takes input of shape {given}; lookalike needs {_NEED}")
        out = list(outputs[0].shape)
        if len(outputs) != 1 or len(out) != 2 or _dim(out[1]) is None:
            given = ", ".join(str(list(o.shape)) for o in outputs)
            raise LookalikeError(f"the face recognizer '{file}' gives outputs of shape {given}; it must give one "
                                 f"embedding of fixed width per face (N x D, e.g. N x 512)")
        self.model_file = str(file)
        self.taskname = "recognition"
        self.input_name = inputs[0].name
        self.output_names = [outputs[0].name]
        self.input_size = (INPUT_SIDE, INPUT_SIDE)
        self.output_shape = [out[0], _dim(out[1])]
        self.input_mean, self.input_std = (0.0, 1.0) if _normalises_itself(file) else (127.5, 127.5)
        probe = self.get_feat(np.zeros((INPUT_SIDE, INPUT_SIDE, 3), np.uint8))
        if probe.shape != (1, self.output_shape[1]) or not np.isfinite(probe).all():
            raise LookalikeError(f"the face recognizer '{file}' gave {probe.shape} values (finite: "
                                 f"{bool(np.isfinite(probe).all())}) for one blank face; it must give one finite "
                                 f"{self.output_shape[1]}-d embedding")

    def prepare(self, ctx_id: int = 0, **_: Any) -> None:
        """``ctx_id < 0`` runs on the CPU only, as insightface's models do."""
        if ctx_id < 0:
            self.session.set_providers(["CPUExecutionProvider"])

    def get_feat(self, crops: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """Aligned BGR uint8 crops (112, 112, 3) -> embeddings (N, D): RGB, NCHW, normalised as the model needs."""
        import cv2

        batch = crops if isinstance(crops, list) else [crops]
        blob = cv2.dnn.blobFromImages(batch, 1.0 / self.input_std, self.input_size,
                                      (self.input_mean,) * 3, swapRB=True)  # (N, 3, 112, 112) RGB float32
        if _dim(self.session.get_inputs()[0].shape[0]) == 1:  # a batch-1 model: one crop at a time
            return np.concatenate([self.session.run(self.output_names, {self.input_name: b[None]})[0] for b in blob])
        return self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(blob)})[0]

    def __repr__(self) -> str:
        """The file, the embedding width and the normalisation found."""
        return (f"OnnxRecognizer('{self.model_file}', dim={self.output_shape[1]}, "
                f"mean={self.input_mean}, std={self.input_std})")

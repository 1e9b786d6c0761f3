"""A replaceable ONNX face recognizer (--face-recognizer FILE): its input is checked at load, a wrong one is
refused with a sentence, and a right one embeds the aligned crop as insightface's ArcFaceONNX does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike.encoders.face import FaceEncoder
from lookalike.encoders.recognizer import OnnxRecognizer
from lookalike.errors import LookalikeError

from helpers import YUNET as _YUNET
from helpers import TinyArcFace, export_onnx

YUNET = next((p for p in (_YUNET, Path(__file__).resolve().parents[3] / "shared" / _YUNET.relative_to(_YUNET.parents[2]))
              if p.is_file()), _YUNET)


class Wide(torch.nn.Module):
    """An ArcFace-like model built for 128 px crops (the wrong input)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 128 * 128, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class Maps(torch.nn.Module):
    """Gives a feature map, not an embedding (the wrong output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, TinyArcFace]:
    torch.manual_seed(0)
    model = TinyArcFace().eval()
    path = export_onnx(model, torch.zeros(1, 3, 112, 112), tmp_path_factory.mktemp("rec") / "mine.onnx", ["emb"],
                       batch=True)
    return path, model


def test_a_recognizer_with_the_wrong_input_shape_is_refused_with_a_sentence(tmp_path):
    path = export_onnx(Wide(), torch.zeros(1, 3, 128, 128), tmp_path / "wide.onnx", ["emb"], batch=True)
    with pytest.raises(LookalikeError, match=r"takes input of shape \['batch', 3, 128, 128\]; lookalike needs .*"
                                             r"112x112 .*1x3x112x112"):
        OnnxRecognizer(path)
    maps = export_onnx(Maps(), torch.zeros(1, 3, 112, 112), tmp_path / "maps.onnx", ["emb"], batch=True)
    with pytest.raises(LookalikeError, match="one embedding of fixed width"):
        OnnxRecognizer(maps)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(LookalikeError, match="cannot open the face recognizer"):
        OnnxRecognizer(junk)
    with pytest.raises(LookalikeError, match="does not exist"):
        OnnxRecognizer(tmp_path / "missing.onnx")


def test_a_right_recognizer_embeds_as_insightface_and_as_its_torch_model(good):
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    path, model = good
    ours = OnnxRecognizer(path, ["CPUExecutionProvider"])
    assert (ours.input_mean, ours.input_std, ours.output_shape[1]) == (127.5, 127.5, 512)
    crop = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)  # BGR
    theirs = ArcFaceONNX(str(path), None)
    assert np.array_equal(ours.get_feat(crop), theirs.get_feat(crop))
    rgb = torch.from_numpy(crop[:, :, ::-1].copy()).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        expected = model((rgb - 127.5) / 127.5).numpy()
    assert abs(ours.get_feat(crop) - expected).max() < 1e-4


@pytest.mark.skipif(not YUNET.is_file(), reason="../shared (the YuNet model) is absent")
def test_yunet_and_an_own_recognizer_need_no_insightface_pack(good, tmp_path):
    from skimage import data

    path, model = good
    encoder = FaceEncoder.from_folder(tmp_path / "no-pack-here", detector="yunet", yunet_model=YUNET,
                                      face_recognizer=path, ctx_id=-1)
    face = encoder.encode_faces([Image.fromarray(data.astronaut())])[0]
    crop = np.asarray(face.arcface_crop)  # RGB 112
    with torch.no_grad():
        expected = model((torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float() - 127.5) / 127.5)[0].numpy()
    assert abs(face.embedding - expected).max() < 1e-4
    assert encoder.embed_dims == {"face_id": 512}

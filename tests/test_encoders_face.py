"""Tests for lookalike.encoders.face: detection, 5-point alignment and ArcFace embeddings, offline.

A tiny ArcFace-shaped recognition model is built in torch and exported to ONNX; detection uses the
real YuNet model (../shared's, or the copy shipped in tests/data) or a fake SCRFD exported the same way, whose
constant outputs place one face on the astronaut. The photo is scikit-image's bundled NASA portrait.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lookalike.encoders.base import ImageEncoder
from lookalike.encoders.face import FaceEncoder, model_folder
from lookalike.errors import LookalikeError

from helpers import DREAMBENCH, YUNET, TinyArcFace
from helpers import export_onnx as _export

TEAPOT = DREAMBENCH / "teapot" / "00.jpg"

# The astronaut's face in source pixels (as YuNet finds it): box and insightface-ordered landmarks.
ASTRONAUT_BOX = np.array([179.0, 63.0, 270.0, 174.0], np.float32)
ASTRONAUT_KPS = np.array(
    [[201.5, 105.0], [245.2, 104.9], [220.7, 127.1], [203.9, 145.2], [242.4, 145.0]], np.float32
)


class FakeSCRFD(nn.Module):
    """SCRFD's 9 outputs (3 strides x scores, boxes, landmarks) as constants: one face, fixed."""

    def __init__(self, outputs: list[np.ndarray]) -> None:
        super().__init__()
        for i, value in enumerate(outputs):
            self.register_buffer(f"out{i}", torch.from_numpy(value))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        zero = x.mean() * 0.0
        return tuple(buffer + zero for buffer in self.buffers())


def _scrfd_outputs(box: np.ndarray, kps: np.ndarray, scale: float, size: int = 640) -> list[np.ndarray]:
    """Constant SCRFD outputs whose one positive anchor (stride 32) decodes to box and kps at scale."""
    strides, anchors = (8, 16, 32), 2
    counts = [(size // s) ** 2 * anchors for s in strides]
    scores = [np.zeros((n, 1), np.float32) for n in counts]
    boxes = [np.zeros((n, 4), np.float32) for n in counts]
    points = [np.zeros((n, 10), np.float32) for n in counts]
    stride, grid = 32, size // 32
    col, row = (int(round(v * scale / stride)) for v in ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2))
    index, centre = (row * grid + col) * anchors, np.array([col, row], np.float32) * stride
    x1, y1, x2, y2 = box * scale
    scores[2][index] = 0.9
    boxes[2][index] = np.array([centre[0] - x1, centre[1] - y1, x2 - centre[0], y2 - centre[1]]) / stride
    points[2][index] = ((kps * scale - centre) / stride).reshape(-1)
    return scores + boxes + points


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    """scikit-image's bundled astronaut portrait (512 x 512 RGB), no download."""
    from skimage import data

    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="module")
def arcface_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded tiny ArcFace exported as <pack>/w600k_r50.onnx."""
    torch.manual_seed(0)
    pack = tmp_path_factory.mktemp("rec_only")
    return _export(TinyArcFace(), torch.zeros(1, 3, 112, 112), pack / "w600k_r50.onnx", ["fc1"], batch=True)


@pytest.fixture(scope="module")
def full_pack(tmp_path_factory: pytest.TempPathFactory, arcface_onnx: Path) -> Path:
    """A buffalo_l-named folder: the fake SCRFD as det_10g.onnx beside the tiny ArcFace."""
    pack = tmp_path_factory.mktemp("buffalo_l")
    outputs = _scrfd_outputs(ASTRONAUT_BOX, ASTRONAUT_KPS, scale=640 / 512)
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in (8, 16, 32)]
    _export(FakeSCRFD(outputs), torch.zeros(1, 3, 640, 640), pack / "det_10g.onnx", names, batch=False)
    (pack / "w600k_r50.onnx").write_bytes(arcface_onnx.read_bytes())
    return pack


@pytest.fixture(scope="module")
def yunet_encoder(arcface_onnx: Path) -> FaceEncoder:
    """The real YuNet detector with the tiny ArcFace."""
    return FaceEncoder.from_folder(arcface_onnx.parent, detector="yunet", yunet_model=YUNET)


@pytest.fixture(scope="module")
def two_faces(astronaut: Image.Image) -> Image.Image:
    """The astronaut twice: a half-size copy on the left, the full-size one on the right."""
    canvas = Image.new("RGB", (768, 512), (128, 128, 128))
    canvas.paste(astronaut.resize((256, 256), Image.Resampling.BICUBIC), (0, 128))
    canvas.paste(astronaut, (256, 0))
    return canvas


def _reference_embedding(onnx_file: Path, image: Image.Image, kps: np.ndarray) -> np.ndarray:
    """The ONNX model run by onnxruntime on insightface's own norm_crop, with ArcFace's (x - 127.5) / 127.5."""
    import onnxruntime
    from insightface.utils import face_align

    bgr = np.asarray(image)[:, :, ::-1].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        rgb = face_align.norm_crop(bgr, landmark=kps, image_size=112)[:, :, ::-1]  # (112, 112, 3)
    blob = ((rgb.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]  # (1, 3, 112, 112)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    return session.run(None, {"data": np.ascontiguousarray(blob)})[0][0]  # (512,)


def test_tiny_model_is_routed_by_insightface_model_zoo_as_arcface(arcface_onnx: Path) -> None:
    from insightface import model_zoo
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    model = model_zoo.get_model(str(arcface_onnx), providers=["CPUExecutionProvider"])
    assert isinstance(model, ArcFaceONNX)
    assert (model.input_mean, model.input_std, model.input_size) == (127.5, 127.5, (112, 112))


def test_encoder_fits_image_encoder_protocol_with_dims_read_from_model(yunet_encoder: FaceEncoder) -> None:
    assert isinstance(yunet_encoder, ImageEncoder)
    assert yunet_encoder.kinds == ("face_id",)
    assert yunet_encoder.embed_dims == {"face_id": 512}
    assert (yunet_encoder.device, yunet_encoder.dtype) == (torch.device("cpu"), torch.float32)


def test_yunet_finds_astronaut_face_with_landmarks_in_insightface_order(
    yunet_encoder: FaceEncoder, astronaut: Image.Image
) -> None:
    faces = yunet_encoder.detect(astronaut)
    assert len(faces) == 1
    face = faces[0]
    assert face.det_score > 0.8
    np.testing.assert_allclose(face.bbox, ASTRONAUT_BOX, atol=4.0)
    left_eye, right_eye, nose, left_mouth, right_mouth = face.kps
    assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0]  # image-left first
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])  # eyes, nose, mouth
    np.testing.assert_allclose(face.kps, ASTRONAUT_KPS, atol=4.0)


def test_aligned_crops_are_224_for_clip_and_112_for_arcface(
    yunet_encoder: FaceEncoder, astronaut: Image.Image
) -> None:
    face = yunet_encoder.detect_and_align(astronaut)[0]
    assert (face.crop.mode, face.crop.size) == ("RGB", (224, 224))
    assert (face.arcface_crop.mode, face.arcface_crop.size) == ("RGB", (112, 112))
    crops = yunet_encoder.aligned_crops([astronaut])
    assert len(crops) == 1 and np.array_equal(np.asarray(crops[0]), np.asarray(face.crop))
    # The crop is RGB, not insightface's BGR: the astronaut's face is skin-toned (red above blue).
    centre = np.asarray(face.crop, np.float32)[80:150, 80:150].mean(axis=(0, 1))
    assert centre[0] > centre[2] + 20


def test_embedding_equals_onnx_model_on_insightface_norm_crop(
    yunet_encoder: FaceEncoder, astronaut: Image.Image, arcface_onnx: Path
) -> None:
    face = yunet_encoder.detect_and_align(astronaut)[0]
    reference = _reference_embedding(arcface_onnx, astronaut, face.kps)  # (512,)
    np.testing.assert_allclose(face.embedding, reference, rtol=1e-4, atol=1e-5)
    normed = yunet_encoder.encode([astronaut])["face_id"]  # (1, 512)
    assert normed.shape == (1, 512) and normed.dtype == torch.float32
    assert torch.linalg.vector_norm(normed[0]).item() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(normed[0].numpy(), reference / np.linalg.norm(reference), rtol=1e-4, atol=1e-6)


def test_unnormed_encoder_returns_the_raw_embedding(arcface_onnx: Path, astronaut: Image.Image) -> None:
    raw = FaceEncoder.from_folder(arcface_onnx.parent, detector="yunet", yunet_model=YUNET, normed=False)
    face = raw.detect_and_align(astronaut)[0]
    features = raw.encode([astronaut, astronaut])["face_id"]  # (2, 512)
    assert features.shape == (2, 512)
    np.testing.assert_allclose(features.numpy(), np.stack([face.embedding] * 2), rtol=1e-6)
    assert abs(torch.linalg.vector_norm(features[0]).item() - 1.0) > 1e-3


def test_largest_face_is_default_and_face_index_counts_left_to_right(
    yunet_encoder: FaceEncoder, two_faces: Image.Image
) -> None:
    faces = yunet_encoder.detect_and_align(two_faces)
    assert len(faces) == 2
    assert faces[0].bbox[0] < faces[1].bbox[0] and faces[0].area < faces[1].area  # small left, big right
    default = yunet_encoder.encode([two_faces])["face_id"][0]
    picked = yunet_encoder.encode([two_faces, two_faces], face_index=[0, 1])["face_id"]  # (2, 512)
    np.testing.assert_allclose(default.numpy(), faces[1].normed_embedding, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(picked[0].numpy(), faces[0].normed_embedding, rtol=1e-5, atol=1e-6)
    assert torch.equal(picked[1], default)
    assert yunet_encoder.encode_faces([two_faces], face_index=0)[0].bbox[0] < 256


def test_face_index_out_of_range_names_the_image_and_the_face_count(
    yunet_encoder: FaceEncoder, two_faces: Image.Image
) -> None:
    with pytest.raises(LookalikeError, match=r"face_index 2 is out of range for image 0: 2 faces were found"):
        yunet_encoder.encode([two_faces], face_index=2)


def test_no_face_in_object_photo_names_the_file(yunet_encoder: FaceEncoder) -> None:
    with pytest.raises(LookalikeError, match=r"no face found in '.*teapot/00\.jpg'; use a photo where the face"):
        yunet_encoder.encode([TEAPOT])


def test_no_face_in_pil_image_names_its_position(yunet_encoder: FaceEncoder, astronaut: Image.Image) -> None:
    blank = Image.new("RGB", (320, 240), (200, 200, 200))
    with pytest.raises(LookalikeError, match=r"no face found in image 1;"):
        yunet_encoder.encode([astronaut, blank])


def test_features_follow_the_dtype_argument_and_negative_is_zeros(
    arcface_onnx: Path, astronaut: Image.Image
) -> None:
    encoder = FaceEncoder.from_folder(arcface_onnx.parent, detector="yunet", yunet_model=YUNET, dtype=torch.float64)
    assert encoder.encode([astronaut])["face_id"].dtype == torch.float64
    negative = encoder.encode_negative(3)
    assert set(negative) == {"face_id"} and negative["face_id"].dtype == torch.float64
    assert torch.equal(negative["face_id"], torch.zeros(3, 512, dtype=torch.float64))


def test_insightface_detector_from_pack_matches_face_analysis(full_pack: Path, astronaut: Image.Image) -> None:
    from insightface.app import FaceAnalysis

    encoder = FaceEncoder.from_folder(full_pack, providers=["CPUExecutionProvider"])
    face = encoder.detect_and_align(astronaut)[0]
    np.testing.assert_allclose(face.kps, ASTRONAUT_KPS, atol=1e-3)
    np.testing.assert_allclose(face.bbox, ASTRONAUT_BOX, atol=1e-3)
    app = FaceAnalysis(name=str(full_pack), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=0, det_size=(640, 640))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        official = app.get(np.asarray(astronaut)[:, :, ::-1].copy())[0]
    np.testing.assert_allclose(face.embedding, official.embedding, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(encoder.encode([astronaut])["face_id"][0].numpy(), official.normed_embedding,
                               rtol=1e-5, atol=1e-6)


def test_default_folder_is_buffalo_l_under_insightface_root(tmp_path: Path) -> None:
    assert model_folder() == Path("~/.insightface/models/buffalo_l").expanduser()
    assert model_folder(root=tmp_path, name="antelopev2") == tmp_path / "models" / "antelopev2"
    assert model_folder(tmp_path / "mine") == tmp_path / "mine"


def test_missing_model_folder_says_which_files_and_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(LookalikeError) as caught:
        FaceEncoder.from_folder(root=tmp_path)
    message = str(caught.value)
    assert f"'{tmp_path / 'models' / 'buffalo_l'}' does not exist" in message
    assert "det_10g.onnx and w600k_r50.onnx" in message
    assert "FaceAnalysis(name='buffalo_l')" in message and "unzip buffalo_l.zip" in message
    assert not (tmp_path / "models").exists()  # nothing was downloaded or created


def test_folder_without_detector_is_refused_for_the_insightface_detector(arcface_onnx: Path) -> None:
    with pytest.raises(LookalikeError, match=r"has no detection model; it should hold det_10g\.onnx"):
        FaceEncoder.from_folder(arcface_onnx.parent)


def test_empty_folder_is_refused_for_yunet_naming_the_recognition_file(tmp_path: Path) -> None:
    with pytest.raises(LookalikeError, match=r"has no recognition model; it should hold w600k_r50\.onnx \("):
        FaceEncoder.from_folder(tmp_path, detector="yunet", yunet_model=tmp_path / "yunet.onnx")


def test_yunet_needs_an_existing_model_file(arcface_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(LookalikeError, match="needs yunet_model"):
        FaceEncoder.from_folder(arcface_onnx.parent, detector="yunet")
    with pytest.raises(LookalikeError, match=r"YuNet model '.*absent\.onnx' does not exist"):
        FaceEncoder.from_folder(arcface_onnx.parent, detector="yunet", yunet_model=tmp_path / "absent.onnx")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(LookalikeError, match=r"OpenCV cannot load '.*notes\.txt' as a YuNet face detector"):
        FaceEncoder.from_folder(arcface_onnx.parent, detector="yunet", yunet_model=tmp_path / "notes.txt")


def test_corrupt_model_file_is_named_in_the_error(tmp_path: Path) -> None:
    (tmp_path / "w600k_r50.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(LookalikeError, match=r"cannot load '.*w600k_r50\.onnx' with insightface: .*fresh copy"):
        FaceEncoder.from_folder(tmp_path, detector="yunet", yunet_model=tmp_path / "unused.onnx")


def test_unknown_detector_and_crop_mode_are_refused(full_pack: Path, astronaut: Image.Image) -> None:
    with pytest.raises(LookalikeError, match="unknown face detector 'mtcnn'"):
        FaceEncoder.from_folder(full_pack, detector="mtcnn")  # type: ignore[arg-type]
    encoder = FaceEncoder.from_folder(full_pack)
    with pytest.raises(LookalikeError, match="unknown crop mode 'zoom'"):
        encoder.encode([astronaut], crop="zoom")  # type: ignore[arg-type]


def test_faceid_plus_subject_runs_face_then_clip_on_the_aligned_crop_and_generates(
    yunet_encoder: FaceEncoder, astronaut: Image.Image
) -> None:
    from lookalike.adapters.module import IPAdapter
    from lookalike.adapters.spec import REGISTRY
    from lookalike.pipeline.demo import DEMO_CLIP, demo_clip_encoder, demo_personalizer

    p = demo_personalizer(None)
    clip = demo_clip_encoder()
    p.set_encoder(clip)
    p.set_encoder(yunet_encoder)
    dim = yunet_encoder.embed_dims["face_id"]
    spec = REGISTRY["ip-adapter-faceid-plusv2_sd15"]
    spec = spec.with_(embed_dim=dim, cross_attention_dim=32, lora_rank=0,
                      projector_kwargs=dict(spec.projector_kwargs, heads=1, clip_dim=DEMO_CLIP["hidden_size"]))
    torch.manual_seed(0)
    p.load_adapter(IPAdapter.for_unet(spec, p.pipe.unet))
    subject = p.encode([astronaut])
    face = yunet_encoder.encode_faces([astronaut])[0]
    assert torch.allclose(subject.features["face_id"][0, 0], torch.as_tensor(face.normed_embedding).float())
    assert torch.equal(subject.features["patch"][0], clip.encode([face.crop])["patch"])
    assert torch.equal(subject.negative["face_id"], torch.zeros_like(subject.negative["face_id"]))
    kw = dict(prompt="a portrait", num_inference_steps=2, height=64, width=64, output_type="np")
    on = p.generate(subject=subject, generator=torch.Generator().manual_seed(0), **kw).images
    off = p.generate(subject=subject, scale=0.0, generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(on - off).max() > 1e-4

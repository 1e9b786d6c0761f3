"""Evaluation metrics: the maths on known vectors, and tiny metric models loaded through from_pretrained."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.errors import LookalikeError
from lookalike.evaluation.demo import tiny_clip_model, tiny_dino_model
from lookalike.evaluation.metrics import (
    cosine,
    cosine_matrix,
    mean_ci,
    mean_cosine_to_references,
    paired_cosine,
    summarize_scores,
    t_quantile,
)
from lookalike.evaluation.scorers import (
    ClipScorer,
    DinoScorer,
    FaceScorer,
    References,
    Scorers,
    embed_references,
    score_images,
)
from lookalike.pipeline.tiny import tiny_tokenizer

from helpers import YUNET


def picture(seed: int, size: int = 48) -> Image.Image:
    """A seeded random RGB image."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clip")
    tiny_clip_model(seed=1).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dino")
    tiny_dino_model(seed=2).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip(clip_dir: Path) -> ClipScorer:
    return ClipScorer.from_pretrained(clip_dir)


@pytest.fixture(scope="module")
def dino(dino_dir: Path) -> DinoScorer:
    return DinoScorer.from_pretrained(dino_dir)


# -- maths ----------------------------------------------------------------------------------------


def test_cosine_of_known_vectors():
    assert cosine([1, 0], [0, 1]) == pytest.approx(0.0)
    assert cosine([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert cosine([1, 0], [-1, 0]) == pytest.approx(-1.0)
    assert cosine([3, 4], [4, 3]) == pytest.approx(24 / 25)
    assert cosine_matrix(np.array([[1, 0], [0, 2]]), np.array([[1, 1]])) == pytest.approx(
        np.array([[1 / math.sqrt(2)], [1 / math.sqrt(2)]]))


def test_clip_i_is_the_mean_cosine_to_every_reference_and_clip_t_is_paired():
    gen = np.array([[1.0, 0.0], [0.0, 5.0]])
    refs = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    expected = [(1 + 0 + 1 / math.sqrt(2)) / 3, (0 + 1 + 1 / math.sqrt(2)) / 3]
    assert mean_cosine_to_references(gen, refs) == pytest.approx(expected)
    texts = np.array([[3.0, 4.0], [0.0, -1.0]])
    assert paired_cosine(gen, texts) == pytest.approx([0.6, -1.0])
    with pytest.raises(ValueError):
        paired_cosine(gen, refs)


def test_t_quantiles_match_the_tables():
    assert t_quantile(0.975, 1) == pytest.approx(12.7062047, abs=1e-6)
    assert t_quantile(0.975, 4) == pytest.approx(2.7764451, abs=1e-6)
    assert t_quantile(0.975, 29) == pytest.approx(2.0452296, abs=1e-6)
    assert t_quantile(0.995, 10) == pytest.approx(3.1692727, abs=1e-6)
    assert t_quantile(0.025, 4) == pytest.approx(-2.7764451, abs=1e-6)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)


def test_mean_ci_is_the_student_t_interval():
    stat = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)
    assert (stat.mean, stat.n, stat.std) == (3.0, 5, pytest.approx(math.sqrt(2.5)))
    assert (stat.low, stat.high) == (pytest.approx(3 - half), pytest.approx(3 + half))
    one = mean_ci([0.7])
    assert (one.mean, one.low, one.high, one.half_width) == (0.7, None, None, None)
    same = mean_ci([0.5, 0.5, 0.5])
    assert (same.low, same.high) == (0.5, 0.5)


def test_summaries_skip_missing_values():
    rows = [{"clip_i": 0.5, "face": None}, {"clip_i": 0.7, "face": 0.4}, {"clip_i": 0.9}]
    stats = summarize_scores(rows, ["clip_i", "face", "dino"])
    assert stats["clip_i"].mean == pytest.approx(0.7) and stats["clip_i"].n == 3
    assert stats["face"].n == 1 and "dino" not in stats


# -- tiny models through the real loading code ----------------------------------------------------


def test_tiny_clip_and_dino_load_from_disk_like_hub_models(clip: ClipScorer, dino: DinoScorer):
    assert clip.image_size == 32 and clip.max_length == 77
    assert clip.embed_images([picture(0)]).shape == (1, 16)
    assert clip.embed_texts(["a dog", "a dog on the beach " * 30]).shape == (2, 16)  # long prompts truncated
    assert dino.image_size == 32 and dino.embed_images([picture(0), picture(1)]).shape == (2, 32)
    assert not hasattr(dino.model, "pooler") or dino.model.pooler is None


def test_loaded_models_give_the_in_memory_models_embeddings(clip: ClipScorer):
    direct = ClipScorer(tiny_clip_model(seed=1), tiny_tokenizer())
    assert np.allclose(direct.embed_images([picture(3)]), clip.embed_images([picture(3)]), atol=1e-6)
    assert np.allclose(direct.embed_texts(["a cat"]), clip.embed_texts(["a cat"]), atol=1e-6)


def test_identical_images_score_one_for_clip_i_and_dino_and_clip_t_is_the_cosine(clip: ClipScorer,
                                                                                   dino: DinoScorer):
    image = picture(5)
    scorers = Scorers(clip=clip, dino=dino)
    refs = embed_references([image, image.copy()], scorers, ["clip_i", "clip_t", "dino"])
    row = score_images([image], ["a toy"], refs, scorers, ["clip_i", "clip_t", "dino"])[0]
    assert row["clip_i"] == pytest.approx(1.0, abs=1e-6) and row["dino"] == pytest.approx(1.0, abs=1e-6)
    expected = float(clip.embed_images([image])[0] @ clip.embed_texts(["a toy"])[0])
    assert row["clip_t"] == pytest.approx(expected, abs=1e-6)
    other = score_images([picture(6)], ["a toy"], refs, scorers, ["clip_i", "dino"])[0]
    assert other["clip_i"] < 1.0 - 1e-4 and other["dino"] < 1.0 - 1e-4


def test_wrong_or_missing_metric_models_are_refused_in_one_sentence(clip_dir: Path, dino_dir: Path, tmp_path: Path):
    with pytest.raises(LookalikeError, match="not a ViT"):
        DinoScorer.from_pretrained(clip_dir)
    with pytest.raises(LookalikeError, match="not a full CLIP model"):
        ClipScorer.from_pretrained(dino_dir)
    with pytest.raises(LookalikeError, match="does not exist"):
        ClipScorer.from_pretrained(tmp_path / "absent")
    with pytest.raises(LookalikeError, match="needs its model"):
        Scorers(clip=None).check(["clip_i"])
    with pytest.raises(LookalikeError, match="unknown metric"):
        Scorers().check(["fid"])


# -- face similarity (a stand-in encoder: insightface's own path is tested in test_encoders_face) ---------


@dataclass
class _Face:
    normed_embedding: np.ndarray
    area: float


class _FakeFaceEncoder:
    """Faces keyed by the image's top-left pixel: red -> two faces, green -> one, anything else -> none."""

    def detect_and_align(self, image: Image.Image) -> list[_Face]:
        r, g, _ = image.getpixel((0, 0))
        if r > 128:
            return [_Face(np.array([0.0, 1.0]), 10.0), _Face(np.array([1.0, 0.0]), 50.0)]
        if g > 128:
            return [_Face(np.array([0.6, 0.8]), 20.0)]
        return []


def test_face_similarity_uses_the_largest_face_and_is_none_without_a_face():
    scorer = FaceScorer(_FakeFaceEncoder())
    red, green, grey = (Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (90, 90, 90)))
    scorers = Scorers(face=scorer)
    refs = embed_references([red, grey], scorers, ["face"])
    assert refs.face.shape == (1, 2)  # the reference without a face is left out
    rows = score_images([green, red, grey], ["p"] * 3, refs, scorers, ["face"])
    assert [r["face"] for r in rows] == [pytest.approx(0.6), pytest.approx(1.0), None]
    with pytest.raises(LookalikeError, match="no face was found"):
        embed_references([grey], scorers, ["face"], "alice")


def test_scores_are_plain_floats_for_json():
    refs = References(clip=np.eye(2))

    class _Clip:
        def embed_images(self, images):
            return np.array([[1.0, 0.0]] * len(images))

    row = score_images([picture(0)], ["x"], refs, Scorers(clip=_Clip()), ["clip_i"])[0]  # type: ignore[arg-type]
    assert type(row["clip_i"]) is float and row["clip_i"] == pytest.approx(0.5)


def test_face_scorer_loads_an_insightface_folder_and_scores_the_real_face_path(tmp_path: Path):
    """A tiny ArcFace exported to ONNX + the real YuNet detector: same face 1.0, no face None."""
    torch = pytest.importorskip("torch")
    skimage_data = pytest.importorskip("skimage.data")
    yunet = YUNET
    torch.manual_seed(0)
    arcface = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.Flatten(),
                                  torch.nn.Linear(4 * 14 * 14, 512))  # (B, 3, 112, 112) -> (B, 512)
    pack = tmp_path / "tiny_pack"
    pack.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(arcface.eval(), (torch.zeros(1, 3, 112, 112),), str(pack / "w600k_r50.onnx"),
                          input_names=["data"], output_names=["fc1"], dynamo=False,
                          dynamic_axes={"data": {0: "batch"}, "fc1": {0: "batch"}})
    scorer = FaceScorer.from_pretrained(pack, detector="yunet", yunet_model=yunet)
    astronaut, blank = Image.fromarray(skimage_data.astronaut()), Image.new("RGB", (256, 256), (120, 120, 120))
    scorers = Scorers(face=scorer)
    refs = embed_references([astronaut], scorers, ["face"])
    rows = score_images([astronaut, blank], ["a person", "a person"], refs, scorers, ["face"])
    assert rows[0]["face"] == pytest.approx(1.0, abs=1e-5) and rows[1]["face"] is None

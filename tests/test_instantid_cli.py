"""The command line's InstantID, FaceID-Plus and face-recognizer flags: a run on a tiny SDXL folder, and each
misuse as one error line with exit 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_instantid import KPS, tiny_identitynet

from lookalike import cli
from lookalike.adapters.spec import get_spec
from lookalike.pipeline.subject import Subject
from lookalike.weights.io import save_adapter

from helpers import YUNET as _YUNET
from helpers import TinyArcFace, export_onnx, fresh_pipe, random_adapter

YUNET = next((p for p in (_YUNET, Path(__file__).resolve().parents[3] / "shared" / _YUNET.relative_to(_YUNET.parents[2]))
              if p.is_file()), _YUNET)


def run(argv: list[str], capsys) -> tuple[int, list[str], str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.startswith("error")], captured.out


def test_help_names_the_flags_and_the_face_models_licences(capsys):
    code = cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert code == 0
    for flag in ("--identitynet-scale", "--pose-reference", "--face-recognizer", "--s-scale", "--shortcut",
                 "--no-shortcut"):
        assert flag in text
    assert "non-commercial" in text and "1x3x112x112" in text and "0.8 for InstantID" in text


def test_instantid_from_the_command_line_on_a_tiny_sdxl(tmp_path, capsys):
    pipe = fresh_pipe("sdxl")
    pipe.save_pretrained(tmp_path / "model")
    path = save_adapter(random_adapter(get_spec("instantid"), pipe, seed=5), tmp_path / "ip-adapter.safetensors")
    tiny_identitynet(pipe.unet).save_pretrained(tmp_path / "ControlNetModel")
    face = torch.randn(1, 1, 512, generator=torch.Generator().manual_seed(7))
    subject = Subject({"face_id": face}, {"face_id": torch.zeros_like(face)}, "instantid", "insightface-antelopev2",
                      landmarks={"kps": torch.from_numpy(KPS)[None], "size": torch.tensor([[64, 64]])})
    subject.save(tmp_path / "face.safetensors")
    common = ["generate", "--model", str(tmp_path / "model"), "--adapter", str(path), "--subject",
              str(tmp_path / "face.safetensors"), "--size", "32", "--steps", "1", "--device", "cpu"]
    code, err, _ = run([*common, "--identitynet-scale", "0.5", "--out", str(tmp_path / "a.png")], capsys)
    assert code == 0, err
    meta = Image.open(tmp_path / "a.png").text
    assert meta["identitynet_scale"] == "0.5" and meta["scale"] == "0.8" and meta["prompt"] == "best quality, high quality"
    code, err, _ = run([*common, "--identitynet-scale", "0", "--out", str(tmp_path / "b.png")], capsys)
    assert code == 0, err
    a = np.asarray(Image.open(tmp_path / "a.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "b.png"), dtype=np.int16)
    assert abs(a - b).max() > 0  # the flag reaches IdentityNet


def test_misused_flags_exit_2_with_one_line(tmp_path, capsys):
    face = tmp_path / "face.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(face)
    common = ["generate", "--model", "tiny-random", "--adapter", "basic", "--reference", str(face), "--prompt", "x",
              "--steps", "1", "--out", str(tmp_path / "o.png")]
    code, err, _ = run([*common, "--pose-reference", str(face)], capsys)
    assert code == 2 and len(err) == 1 and "for InstantID" in err[0]
    code, err, _ = run([*common, "--s-scale", "0.5"], capsys)
    assert code == 2 and len(err) == 1 and "FaceID-Plus controls" in err[0]
    code, err, _ = run([*common, "--pose-reference", str(tmp_path / "missing.png")], capsys)
    assert code == 2 and len(err) == 1


@pytest.mark.skipif(not YUNET.is_file(), reason="../shared (YuNet) is absent")
def test_a_recognizer_of_the_wrong_shape_exits_2_with_a_sentence(tmp_path, capsys):
    from skimage import data

    class Wide(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :512]

    wrong = export_onnx(Wide(), torch.zeros(1, 3, 96, 96), tmp_path / "wrong.onnx", ["emb"], batch=True)
    right = export_onnx(TinyArcFace(), torch.zeros(1, 3, 112, 112), tmp_path / "right.onnx", ["emb"], batch=True)
    face = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(face)
    common = ["encode", "--adapter", "faceid", "--reference", str(face), "--face-detector", "yunet",
              "--yunet-model", str(YUNET), "--out", str(tmp_path / "s.safetensors")]
    code, err, _ = run([*common, "--face-recognizer", str(wrong)], capsys)
    assert code == 2 and len(err) == 1 and "1x3x112x112" in err[0] and "96, 96" in err[0]
    code, err, out = run([*common, "--face-recognizer", str(right)], capsys)  # no insightface pack anywhere
    assert code == 0, err
    assert Subject.load(tmp_path / "s.safetensors").landmarks["kps"].shape == (1, 5, 2)

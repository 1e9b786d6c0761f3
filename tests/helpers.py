"""Shared test helpers: tiny specs, random official-layout adapters and features, built in code."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from lookalike.adapters.module import IPAdapter
from lookalike.adapters.spec import REGISTRY, AdapterSpec
from lookalike.pipeline.tiny import tiny_pipeline

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
#: The small test-data set that ships with the repository (tests/data/make_testdata.py rebuilds it).
TEST_DATA = Path(__file__).resolve().parent / "data"


def shared_or_shipped(shared_rel: str, shipped_rel: str) -> Path:
    """``../shared/<shared_rel>`` where the full shared data is beside the checkout, else the shipped copy."""
    full = SHARED / shared_rel
    return full if full.exists() else TEST_DATA / shipped_rel


#: DreamBench (CC-BY-4.0): all 20 subjects from ../shared, or the 4 shipped in tests/data (256 px photos).
DREAMBENCH = shared_or_shipped("data/dreambench/prompts.json", "dreambench/prompts.json").parent
#: The real YuNet face detector (Apache-2.0): ../shared's copy or the shipped one (byte-identical).
YUNET = shared_or_shipped("models/yunet/face_detection_yunet.onnx", "yunet/face_detection_yunet.onnx")

warnings.filterwarnings("ignore", category=FutureWarning)


def tiny_spec(spec: AdapterSpec, cross: int, lora: bool = False) -> AdapterSpec:
    """A registry spec shrunk to a tiny UNet's width, keeping the shapes rules diffusers infers from."""
    kw = dict(spec.projector_kwargs)
    embed = {"linear": 24, "resampler": 40, "id_resampler": 512, "mlp": 40, "faceid": 16,
             "faceid_plus": 16}[spec.projector]
    if spec.projector in ("resampler", "id_resampler"):
        kw.update(dim=32, heads=2)
    if spec.projector == "faceid_plus":
        kw.update(heads=1, clip_dim=40)
    return spec.with_(cross_attention_dim=cross, embed_dim=embed, projector_kwargs=kw,
                      lora_rank=4 if (lora and spec.lora_rank) else 0)


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Fill every parameter with seeded noise so that a swapped or missed weight shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def features_for(spec: AdapterSpec, batch: int = 1, images: int = 1, seed: int = 0,
                 patch_tokens: int = 17) -> dict[str, torch.Tensor]:
    """Random encoder features of the right shapes: (B, I, E), (B, I, L, H), (B, I, 512-like)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for kind in spec.features:
        if kind == "patch":
            width = spec.projector_kwargs.get("clip_dim", spec.embed_dim)
            out[kind] = torch.randn(batch, images, patch_tokens, width, generator=g)
        else:
            out[kind] = torch.randn(batch, images, spec.embed_dim, generator=g)
    return out


_PIPES: dict = {}


def fresh_pipe(base: str):
    """A tiny pipeline of ``base`` with fixed random weights (a copy, so tests may change it)."""
    if base not in _PIPES:
        _PIPES[base] = tiny_pipeline(base, seed=0)
    return copy.deepcopy(_PIPES[base])


def cross_dim(pipe) -> int:
    return pipe.unet.config.cross_attention_dim


def random_adapter(spec: AdapterSpec, pipe, seed: int = 0, lora: bool = False) -> IPAdapter:
    """A random tiny adapter for ``pipe``'s UNet."""
    small = tiny_spec(spec, cross_dim(pipe), lora=lora)
    return randomize(IPAdapter.for_unet(small, pipe.unet), seed)


VARIANTS = sorted(n for n, s in REGISTRY.items() if s.base in ("sd15", "sdxl"))  # UNet variants


class TinyArcFace(torch.nn.Module):
    """ArcFace-shaped: (B, 3, 112, 112) normalised pixels -> (B, 512) embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=8, stride=8)
        self.fc = torch.nn.Linear(8 * 14 * 14, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))  # (B, 512)


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, outputs: list[str],
                batch: bool) -> Path:
    """Export a module to ONNX with the legacy exporter (no onnxscript needed)."""
    axes = {"data": {0: "batch"}, outputs[0]: {0: "batch"}} if batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), str(path), input_names=["data"], output_names=outputs,
                          dynamic_axes=axes, dynamo=False)
    return path


def tiny_arcface_pack(folder: Path, seed: int = 0) -> Path:
    """A folder holding a seeded tiny ArcFace as w600k_r50.onnx (use with the YuNet detector)."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    export_onnx(TinyArcFace(), torch.zeros(1, 3, 112, 112), folder / "w600k_r50.onnx", ["fc1"], batch=True)
    return folder



def one_error(capsys) -> str:
    """The one ``error:`` line a failed CLI call printed on stderr (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]

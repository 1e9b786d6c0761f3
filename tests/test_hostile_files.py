"""Hostile and broken files, generated in code (issue 15): adapter checkpoints (safetensors with bad headers,
offsets, shapes, dtypes, values and spec metadata; pickles of every protocol, torch zip and legacy files with a
code-running payload), subject files and images.

For each case: the API raises ``LookalikeError``; the command line (in-process ``main``) exits 2 with exactly one
``error:`` line and no traceback; an existing output file is byte-identical afterwards; nothing is written
anywhere under the test's folder; the payload never runs. Adding a case is one line in ``CASES``.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lookalike import cli
from lookalike.errors import LookalikeError
from lookalike.pipeline.demo import demo_adapter, demo_personalizer
from lookalike.pipeline.subject import Subject
from lookalike.weights.io import save_adapter

PREVIOUS = b"previous output bytes"


# -- building blocks ---------------------------------------------------------------------------------------


class Payload:
    """Pickles as a call that creates ``marker`` when unpickled: ``os.system`` or ``builtins.exec``."""

    def __init__(self, marker: Path, how: str = "system") -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "exec":
            return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)
        return os.system, (f"touch '{self.marker}'",)


def raw_safetensors(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors file with exactly this header (a dict is dumped as JSON), length field and data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def f32(name: str, shape: list[int], begin: int = 0) -> dict:
    count = 1
    for d in shape:
        count *= d
    return {name: {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + 4 * count]}}


@dataclass
class World:
    """What every case may use: the test folder, a valid demo adapter's tensors and metadata, the marker."""

    root: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    marker: Path

    def file(self, name: str, data: bytes) -> Path:
        (self.root / name).write_bytes(data)
        return self.root / name

    def adapter(self, name: str, tensors: dict | None = None, metadata: dict | None = None) -> Path:
        path = self.root / name
        save_file(self.tensors if tensors is None else tensors, str(path),
                  metadata=self.metadata if metadata is None else metadata)
        return path

    def edited(self, name: str, **spec_changes: object) -> Path:
        spec = json.loads(self.metadata["lookalike.spec"])
        spec.update(spec_changes)
        return self.adapter(name, metadata={**self.metadata, "lookalike.spec": json.dumps(spec)})

    def subject(self, name: str, tensors: dict[str, torch.Tensor], **meta: str) -> Path:
        path = self.root / name
        base = {"format": "lookalike.subject/1", "adapter": "ip-adapter_sd15", "encoder": "clip-vit-h-14",
                "combine": "concat", "sources": "[]", "weights": "[]", "negative_sources": "[]"}
        save_file(tensors, str(path), metadata={**base, **meta})
        return path

    def pooled(self, images: int = 1, value: float | None = None, shape: tuple | None = None) -> dict:
        t = torch.randn(shape or (1, images, 32)) if value is None else torch.full(shape or (1, images, 32), value)
        return {"features.pooled": t, "negative.pooled": torch.zeros_like(t)}

    def pickle_file(self, name: str, protocol: int, how: str = "system") -> Path:
        path = self.root / name
        path.write_bytes(pickle.dumps({"image_proj": {"proj.weight": Payload(self.marker, how)}}, protocol=protocol))
        return path

    def torch_file(self, name: str, protocol: int = 2, legacy: bool = False, how: str = "system") -> Path:
        path = self.root / name
        torch.save({"image_proj": {"proj.weight": Payload(self.marker, how)}}, path, pickle_protocol=protocol,
                   _use_new_zipfile_serialization=not legacy)
        return path

    def png(self, name: str, width: int, height: int, depth: int, body: bytes = b"") -> Path:
        """A PNG whose header claims ``width`` x ``height`` greyscale at ``depth`` bits (data: ``body``)."""
        import zlib

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        ihdr = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
        path = self.root / name
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(body))
                         + chunk(b"IEND", b""))
        return path


def _sparse(w: World) -> Path:
    path = w.adapter("sparse.safetensors")
    with open(path, "r+b") as f:
        f.truncate(100 * 2**30)  # 100 GB that take no disk space
    return path


def _zip_with_deflate(w: World) -> Path:
    good = w.root / "good.bin"
    torch.save({"image_proj": {"proj.weight": torch.zeros(2)}}, good)
    path = w.root / "deflated.bin"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    good.unlink()
    return path


def _truncated_png(w: World) -> Path:
    path = w.root / "truncated.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    path.write_bytes(path.read_bytes()[:60])
    return path


def _extra(w: World) -> dict:
    return {**w.tensors, "image_proj.extra.weight": torch.zeros(3)}


def _missing(w: World) -> dict:
    return {k: v for k, v in w.tensors.items() if k != "image_proj.norm.weight"}


def _reshaped(w: World) -> dict:
    return {**w.tensors, "image_proj.norm.weight": torch.zeros(5)}


def _with(w: World, value: float) -> dict:
    key = next(k for k in w.tensors if k.startswith("ip_adapter."))
    t = w.tensors[key].clone()
    t.view(-1)[3] = value
    return {**w.tensors, key: t}


@dataclass(frozen=True)
class Case:
    """One hostile file: its kind ("adapter", "subject" or "image") and how to make it in ``World``."""

    name: str
    kind: str
    make: Callable[[World], Path]
    says: str = ""  # words the error must contain, where the case is about one particular check


CASES = [
    # safetensors: header and layout
    Case("st-empty-file", "adapter", lambda w: raw_safetensors(w.root / "e.safetensors", b"", length=0)),
    Case("st-header-not-json", "adapter", lambda w: raw_safetensors(w.root / "j.safetensors", b"{not json")),
    Case("st-header-not-utf8", "adapter", lambda w: raw_safetensors(w.root / "u.safetensors", b"\xff\xfe{}")),
    Case("st-header-a-list", "adapter", lambda w: raw_safetensors(w.root / "l.safetensors", b"[1, 2]")),
    Case("st-length-beyond-file", "adapter", lambda w: raw_safetensors(w.root / "b.safetensors", b"{}", length=2**40)),
    Case("st-offsets-outside", "adapter",
         lambda w: raw_safetensors(w.root / "o.safetensors", f32("image_proj.proj.weight", [4]), bytes(8))),
    Case("st-offsets-overlap", "adapter", lambda w: raw_safetensors(
        w.root / "v.safetensors", {**f32("image_proj.a", [4]), **f32("image_proj.b", [4], begin=8)}, bytes(24))),
    Case("st-absurd-shape", "adapter", lambda w: raw_safetensors(w.root / "s.safetensors", {
        "image_proj.proj.weight": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 16]}}, bytes(16)),
        says="needs 18,446,744,073,709,551,616 bytes"),
    Case("st-negative-shape", "adapter", lambda w: raw_safetensors(w.root / "n.safetensors", {
        "image_proj.proj.weight": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, bytes(16))),
    Case("st-unknown-dtype", "adapter", lambda w: raw_safetensors(w.root / "d.safetensors", {
        "image_proj.proj.weight": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}}, bytes(16))),
    Case("st-metadata-not-strings", "adapter", lambda w: raw_safetensors(w.root / "m.safetensors", {
        "__metadata__": {"lookalike.spec": {"nested": 1}}, **f32("image_proj.proj.weight", [4])}, bytes(16))),
    Case("st-sparse-100GB", "adapter", _sparse, says="above the limit"),
    # safetensors: values
    Case("st-nan-weight", "adapter", lambda w: w.adapter("nan.safetensors", _with(w, float("nan"))), says="NaN"),
    Case("st-inf-weight", "adapter", lambda w: w.adapter("inf.safetensors", _with(w, float("inf"))), says="infinite"),
    Case("st-integer-weights", "adapter",
         lambda w: w.adapter("int.safetensors", {k: v.to(torch.int32) for k, v in w.tensors.items()})),
    # safetensors: keys and the lookalike.spec metadata
    Case("st-missing-key", "adapter", lambda w: w.adapter("missing.safetensors", _missing(w))),
    Case("st-extra-key", "adapter", lambda w: w.adapter("extra.safetensors", _extra(w))),
    Case("st-wrong-shape-key", "adapter", lambda w: w.adapter("shape.safetensors", _reshaped(w))),
    Case("spec-not-json", "adapter",
         lambda w: w.adapter("sj.safetensors", metadata={**w.metadata, "lookalike.spec": "{tokens: four"})),
    Case("spec-tokens-four", "adapter", lambda w: w.edited("s4.safetensors", num_tokens="four")),
    Case("spec-absurd-tokens", "adapter", lambda w: w.edited("sa.safetensors", num_tokens=10**15)),
    Case("spec-big-but-allowed-sizes", "adapter",
         lambda w: w.edited("sb.safetensors", num_tokens=4096, cross_attention_dim=16384, embed_dim=16384)),
    Case("spec-unknown-projector", "adapter", lambda w: w.edited("sp.safetensors", projector="warp-drive")),
    Case("spec-features-not-read", "adapter", lambda w: w.edited("sf.safetensors", features=["face_id"])),
    Case("spec-nan-kwarg", "adapter", lambda w: w.edited("sk.safetensors", projector_kwargs={"mult": float("nan")})),
    Case("spec-a-list", "adapter", lambda w: w.adapter("sl.safetensors", metadata={"lookalike.spec": "[1]"})),
    # pickles: raw, every protocol; torch zip (every protocol torch writes) and torch legacy; two payloads
    *[Case(f"pickle-protocol-{p}", "adapter", lambda w, p=p: w.pickle_file(f"p{p}.bin", p)) for p in range(6)],
    Case("pickle-exec-payload", "adapter", lambda w: w.pickle_file("exec.bin", 4, "exec")),
    *[Case(f"torch-zip-protocol-{p}", "adapter", lambda w, p=p: w.torch_file(f"z{p}.bin", p)) for p in range(2, 6)],
    Case("torch-zip-exec-payload", "adapter", lambda w: w.torch_file("zexec.pt", 2, how="exec")),
    Case("torch-legacy", "adapter", lambda w: w.torch_file("legacy.bin", 2, legacy=True), says="legacy"),
    Case("torch-zip-deflated", "adapter", _zip_with_deflate),
    Case("bin-garbage", "adapter", lambda w: w.file("g.bin", b"\x80\x05garbage")),
    # subject files
    Case("subject-no-format", "subject", lambda w: w.subject("nf.safetensors", w.pooled(), format="other")),
    Case("subject-no-features", "subject",
         lambda w: w.subject("nofeat.safetensors", {"negative.pooled": torch.zeros(1, 1, 32)})),
    Case("subject-odd-key", "subject",
         lambda w: w.subject("odd.safetensors", {**w.pooled(), "weird.x": torch.zeros(2)})),
    Case("subject-unknown-kind", "subject",
         lambda w: w.subject("kind.safetensors", {"features.aura": torch.zeros(1, 1, 32),
                                                   "negative.aura": torch.zeros(1, 1, 32)})),
    Case("subject-wrong-rank", "subject", lambda w: w.subject("rank.safetensors", w.pooled(shape=(32,)))),
    Case("subject-negative-mismatch", "subject", lambda w: w.subject(
        "neg.safetensors", {"features.pooled": torch.zeros(1, 1, 32), "negative.pooled": torch.zeros(1, 2, 32)})),
    Case("subject-nan", "subject", lambda w: w.subject("nan.safetensors", w.pooled(value=float("nan")))),
    Case("subject-inf", "subject", lambda w: w.subject("inf.safetensors", w.pooled(value=float("inf")))),
    Case("subject-1000-images", "subject", lambda w: w.subject("many.safetensors", w.pooled(images=1000)),
         says="limit of 64"),
    Case("subject-no-adapter", "subject", lambda w: w.subject("na.safetensors", w.pooled(), adapter="")),
    Case("subject-sources-not-json", "subject", lambda w: w.subject("sj.safetensors", w.pooled(), sources="[oops")),
    Case("subject-weights-strings", "subject", lambda w: w.subject("ws.safetensors", w.pooled(), weights='["a"]')),
    Case("subject-odd-combine", "subject", lambda w: w.subject("oc.safetensors", w.pooled(), combine="blend")),
    Case("subject-for-another-width", "subject", lambda w: w.subject("wd.safetensors", w.pooled(shape=(1, 1, 7)))),
    Case("subject-huge-but-finite", "subject", lambda w: w.subject("hf.safetensors", w.pooled(value=3e38)),
         says="nothing was written"),
    Case("subject-not-safetensors", "subject", lambda w: w.file("t.safetensors", b"hi")),
    # images
    Case("image-text-named-png", "image", lambda w: w.file("t.png", b"not a picture")),
    Case("image-empty-jpg", "image", lambda w: w.file("e.jpg", b"")),
    Case("image-truncated-png", "image", _truncated_png),
    Case("image-16bit-bomb", "image", lambda w: w.png("bomb16.png", 13000, 13000, 16), says="above the limit of 1 GB"),
    Case("image-8bit-pixel-bomb", "image", lambda w: w.png("bomb8.png", 60000, 60000, 8)),
    Case("image-1x1", "image", lambda w: w.png("tiny.png", 1, 1, 8, b"\x00\x00")),
]


# -- the checks ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> tuple[dict, dict, Path]:
    """A valid demo adapter (tensors, metadata) and a valid reference photo, made once."""
    from safetensors import safe_open

    folder = tmp_path_factory.mktemp("valid")
    path = save_adapter(demo_adapter("basic", demo_personalizer(None).pipe.unet), folder / "basic.safetensors")
    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    photo = folder / "photo.png"
    image = Image.new("RGB", (80, 64), (30, 90, 200))
    image.paste((240, 220, 20), (20, 20, 50, 50))
    image.save(photo)
    return tensors, metadata, photo


@pytest.fixture(scope="module")
def personalizer():
    return demo_personalizer(None)


def _tree(root: Path) -> dict[str, bytes | int]:
    """Every file under ``root``: its bytes (its size where it is over 1 MB)."""
    return {str(p.relative_to(root)): p.read_bytes() if p.stat().st_size < 2**20 else p.stat().st_size
            for p in sorted(root.rglob("*")) if p.is_file()}


def _api(case: Case, path: Path, personalizer) -> None:
    from lookalike.encoders.prepare import load_reference

    if case.kind == "adapter":
        try:
            personalizer.load_adapter(path)
        finally:
            personalizer.unload_adapters()
    elif case.kind == "subject":
        subject = Subject.load(path)
        personalizer.load_adapter(demo_adapter("basic", personalizer.pipe.unet))
        try:
            personalizer.generate("a dog", subject=subject, num_inference_steps=2, height=32, width=32)
        finally:
            personalizer.unload_adapters()
    else:
        load_reference(path)


def _commands(case: Case, path: Path, out: Path, photo: Path) -> list[list[str]]:
    fast = ["--model", "tiny-random", "--steps", "2", "--prompt", "a dog", "--out", str(out / "x.png")]
    if case.kind == "adapter":
        return [["info", str(path)], ["generate", *fast, "--adapter", str(path), "--reference", str(photo)]]
    if case.kind == "subject":
        return [["generate", *fast, "--subject", str(path)]]
    return [["generate", *fast, "--reference", str(path)],
            ["encode", "--model", "tiny-random", "--reference", str(path), "--out", str(out / "s.safetensors")]]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_hostile_file_is_one_error_and_changes_nothing(case, valid, personalizer, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    tensors, metadata, photo = valid
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    world = World(inputs, tensors, metadata, tmp_path / "PAYLOAD-RAN")
    path = case.make(world)
    (out / "x.png").write_bytes(PREVIOUS)
    (out / "s.safetensors").write_bytes(PREVIOUS)
    before = _tree(tmp_path)

    with pytest.raises(LookalikeError, match=case.says or None):
        _api(case, path, personalizer)
    for argv in _commands(case, path, out, photo):
        capsys.readouterr()
        code = cli.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (argv[0], err)
        assert len(err) == 1 and err[0].startswith("error: "), err
        assert "Traceback" not in err[0] and "internal error" not in err[0], err
        assert case.says in err[0], err

    assert _tree(tmp_path) == before  # the outputs are byte-identical and nothing else was written
    assert not world.marker.exists()


def test_the_command_in_a_fresh_process_exits_2_with_one_line_and_runs_no_payload(tmp_path):
    world = World(tmp_path, {}, {}, tmp_path / "PAYLOAD-RAN")
    path = world.torch_file("hostile.bin", 2)
    result = subprocess.run([sys.executable, "-m", "lookalike", "info", str(path)], capture_output=True, text=True,
                            timeout=300, env={k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: refused to load") and "Traceback" not in result.stderr
    assert not world.marker.exists()


def test_the_cases_would_run_the_payload_without_lookalikes_checks(tmp_path):
    """The payloads are real: full unpickling (what lookalike never does) runs them."""
    world = World(tmp_path, {}, {}, tmp_path / "PAYLOAD-RAN")
    pickle.loads(world.pickle_file("p.bin", 2, "exec").read_bytes())
    assert world.marker.exists()

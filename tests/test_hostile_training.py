"""lookalike-train on hostile and damaged checkpoints: no code runs on resume, every damage is one sentence
naming the checkpoint, ``--resume latest`` passes over damaged ones, a worker's error is one line."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from test_train_helpers import single_thread, weights, write_json_set

from lookalike.train_encoder import main
from lookalike.training.checkpoint import MANIFEST, problem
from lookalike.training.state import DamagedFile, load_state, save_state

from helpers import one_error

FLAGS = ["--base", "demo", "--adapter", "basic", "--num-workers", "0", "--num-validation", "0", "--steps", "4",
         "--checkpoint-every", "2", "--batch-size", "2", "--ema-decay", "0.9", "--lr", "1e-3"]


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


class Payload:
    """Unpickling this creates ``path``: the sentinel that proves code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickles(sentinel: Path) -> dict[str, bytes]:
    """The payload in every pickle protocol, wrapped like a state dict, and in torch's zip and legacy formats."""
    found = {}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        found[f"pickle{protocol}"] = pickle.dumps({"step": 2, "state": Payload(sentinel)}, protocol=protocol)
    for name, zipped in (("torch-zip", True), ("torch-legacy", False)):
        buf = io.BytesIO()
        torch.save({"state": Payload(sentinel)}, buf, _use_new_zipfile_serialization=zipped)
        found[name] = buf.getvalue()
    return found


def argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--output", str(out), *FLAGS, *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (EMA on), and its data."""
    root = tmp_path_factory.mktemp("hostile")
    data = write_json_set(root / "data", 6)
    torch.set_num_threads(1)
    assert main(argv(data, root / "base")) == 0
    return data, root / "base"


def copy_run(run, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(run[1], out)
    return out


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def rehash(folder: Path) -> None:
    """Rewrite the manifest to match the folder: an attacker who edits files and their hashes alike."""
    manifest = json.loads((folder / MANIFEST).read_text())
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", ["pickle0", "pickle2", "pickle5", "torch-zip", "torch-legacy"])
def test_a_tampered_checkpoint_runs_no_code(run, tmp_path, capsys, kind):
    """accelerate's pickle names and every state file carry the payload (with the manifest rewritten to
    match): the resume is refused in one line and the sentinel never appears."""
    data, _ = run
    out = copy_run(run, tmp_path)
    sentinel = tmp_path / "PWNED"
    payload = pickles(sentinel)[kind]
    ckpt = out / "checkpoint-4"
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin",
                 "scheduler.bin", "pytorch_model.bin"):
        (ckpt / name).write_bytes(payload)
    for name in ("state.safetensors", "rng-0.safetensors"):
        (ckpt / name).write_bytes(payload)
    rehash(ckpt)
    before = snapshot(out)
    assert main(argv(data, out, "--resume", str(ckpt))) == 2
    line = one_error(capsys)
    assert str(ckpt) in line and "damaged" in line
    assert not sentinel.exists(), "unpickling ran the payload"
    assert snapshot(out) == before


def test_an_accelerate_pickle_checkpoint_is_refused_without_unpickling(run, tmp_path, capsys):
    """A checkpoint in accelerate's own layout (what older versions wrote), with payloads in its pickles."""
    data, _ = run
    out = copy_run(run, tmp_path)
    sentinel = tmp_path / "PWNED"
    ckpt = out / "checkpoint-4"
    (ckpt / MANIFEST).unlink()
    for name, blob in zip(("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"),
                          pickles(sentinel).values()):
        (ckpt / name).write_bytes(blob)
    assert main(argv(data, out, "--resume", str(ckpt))) == 2
    assert "pickle format" in one_error(capsys)
    assert not sentinel.exists()


def test_the_state_reader_refuses_every_pickle(tmp_path):
    sentinel = tmp_path / "PWNED"
    for kind, blob in pickles(sentinel).items():
        path = tmp_path / f"{kind}.safetensors"
        path.write_bytes(blob)
        with pytest.raises(DamagedFile):
            load_state(path)
    assert not sentinel.exists()


def test_state_files_round_trip_exactly(tmp_path):
    import random

    import numpy as np

    tree = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
                          "param_groups": [{"betas": (0.9, 0.999), "lr": 1e-4, "foreach": None, "params": [0]}]},
            "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "nested": {"__tensor__": "not a marker", "x": [1, 2.5, "s", True]}}
    save_state(tmp_path / "s.safetensors", tree)
    back = load_state(tmp_path / "s.safetensors")
    assert back["python"] == tree["python"]
    assert back["numpy"][0] == "MT19937" and (back["numpy"][1] == tree["numpy"][1]).all()
    assert back["numpy"][1].dtype == tree["numpy"][1].dtype and back["numpy"][2:] == tree["numpy"][2:]
    assert torch.equal(back["torch"], tree["torch"]) and back["nested"] == tree["nested"]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], tree["optimizer"]["state"][0]["exp_avg"])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "optimizer state missing": lambda c: (c / "state.safetensors").unlink(),
    "optimizer state empty": lambda c: (c / "state.safetensors").write_bytes(b""),
    "model truncated": lambda c: _truncate(c / "model.safetensors"),
    "config not JSON": lambda c: (c / "train_config.json").write_text("{not json"),
    "rng state missing": lambda c: (c / "rng-0.safetensors").unlink(),
    "manifest missing": lambda c: (c / MANIFEST).unlink(),
    "manifest not JSON": lambda c: (c / MANIFEST).write_text("]["),
    "model edited": lambda c: (c / "model.safetensors").write_bytes(
        (c / "model.safetensors").read_bytes()[:-4] + b"\x00\x00\xc0\x7f"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_checkpoint_is_one_line_naming_it(run, tmp_path, capsys, damage):
    data, _ = run
    out = copy_run(run, tmp_path)
    ckpt = out / "checkpoint-4"
    DAMAGES[damage](ckpt)
    assert problem(ckpt) is not None
    before = snapshot(out)
    assert main(argv(data, out, "--resume", str(ckpt))) == 2
    line = one_error(capsys)
    assert f"checkpoint {ckpt} is damaged" in line, line
    assert snapshot(out) == before


def _wrong_shape(ckpt: Path) -> None:
    tree = load_state(ckpt / "state.safetensors")
    entry = tree["optimizer"]["state"][0]
    entry["exp_avg"] = torch.zeros(entry["exp_avg"].numel() + 1)
    save_state(ckpt / "state.safetensors", tree)


@pytest.mark.parametrize("damage", ["model truncated", "optimizer state of the wrong shape", "rng not a state"])
def test_damage_that_passes_the_manifest_is_still_one_line(run, tmp_path, capsys, damage):
    """The manifest rewritten to match the damage: the readers themselves refuse it in one sentence."""
    data, _ = run
    out = copy_run(run, tmp_path)
    ckpt = out / "checkpoint-4"
    if damage == "optimizer state of the wrong shape":
        _wrong_shape(ckpt)
    elif damage == "rng not a state":
        save_state(ckpt / "rng-0.safetensors", {"python": "nonsense", "numpy": [1], "torch": torch.zeros(3)})
    else:
        DAMAGES[damage](ckpt)
    rehash(ckpt)
    assert main(argv(data, out, "--resume", str(ckpt))) == 2
    assert f"checkpoint {ckpt} is damaged" in one_error(capsys)


def test_resume_latest_passes_over_a_damaged_checkpoint_and_says_so(run, tmp_path, caplog):
    """checkpoint-4 is damaged: the run resumes from checkpoint-2 and ends where the uninterrupted run did."""
    import logging

    data, base = run
    out = copy_run(run, tmp_path)
    (out / "adapter.safetensors").unlink()
    (out / "checkpoint-4" / "state.safetensors").write_bytes(b"")
    logger = logging.getLogger("lookalike.train")
    logger.addHandler(caplog.handler)
    try:
        assert main(argv(data, out, "--resume", "latest")) == 0
    finally:
        logger.removeHandler(caplog.handler)
    passed = [r.getMessage() for r in caplog.records if "passed over" in r.getMessage()]
    assert len(passed) == 1 and "checkpoint-4" in passed[0], caplog.text
    assert any("resumed from" in r.getMessage() and "checkpoint-2" in r.getMessage() for r in caplog.records)
    a, b = weights(base / "adapter.safetensors"), weights(out / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert problem(out / "checkpoint-4") is None  # rewritten by the resumed run


def test_resume_latest_with_only_damaged_checkpoints_is_one_line(run, tmp_path, capsys):
    data, _ = run
    out = copy_run(run, tmp_path)
    for c in ("checkpoint-2", "checkpoint-4"):
        (out / c / "model.safetensors").unlink()
    assert main(argv(data, out, "--resume", "latest")) == 2
    assert "every checkpoint" in one_error(capsys)


def test_an_error_inside_a_dataloader_worker_is_one_line(tmp_path, capsys):
    """Every record unreadable: the worker's LookalikeError reaches the CLI as one sentence, no traceback."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "data.json").write_text(json.dumps([{"image_file": f"gone{i}.png", "text": "x"} for i in range(80)]))
    args = ["--data", str(folder / "data.json"), "--output", str(tmp_path / "o"), "--base", "demo", "--steps", "2",
            "--batch-size", "1", "--num-validation", "0", "--num-workers", "1"]
    assert main(args) == 2
    line = one_error(capsys)
    assert "records in a row could not be read" in line and "Caught" not in line


# -- the cache ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A complete cache of 6 records, and its data."""
    root = tmp_path_factory.mktemp("cache")
    data = write_json_set(root / "data", 6)
    torch.set_num_threads(1)
    args = ["--data", str(data), "--output", str(root / "unused"), "--base", "demo", "--num-workers", "0",
            "--num-validation", "0", "--cache", str(root / "cache"), "--build-cache"]
    assert main(args) == 0
    return data, root / "cache"


def _shard(folder: Path) -> Path:
    return next(folder.glob("shard-*.safetensors"))


def _edit_shard(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(_shard(folder)))
    change(tensors)
    save_file(tensors, str(_shard(folder)))


def _edit_manifest(folder: Path, **fields) -> None:
    manifest = json.loads((folder / "cache.json").read_text())
    manifest.update(fields)
    (folder / "cache.json").write_text(json.dumps(manifest))


CACHE_DAMAGES = {
    "manifest not JSON": lambda c, s: (c / "cache.json").write_text("{"),
    "manifest shards escape": lambda c, s: _edit_manifest(c, shards=["../../escape.safetensors"]),
    "manifest records a string": lambda c, s: _edit_manifest(c, records="six"),
    "constants truncated": lambda c, s: _truncate(c / "constants.safetensors"),
    "constants a pickle": lambda c, s: (c / "constants.safetensors").write_bytes(pickles(s)["torch-zip"]),
    "shard a pickle": lambda c, s: _shard(c).write_bytes(pickles(s)["pickle4"]),
    "shard index out of range": lambda c, s: _edit_shard(c, lambda t: t.update(index=t["index"] + 1000)),
    "shard rows short": lambda c, s: _edit_shard(c, lambda t: t.update(latent_mean=t["latent_mean"][:2])),
}


@pytest.mark.parametrize("damage", sorted(CACHE_DAMAGES))
def test_a_damaged_cache_is_one_line_and_runs_no_code(cache, tmp_path, capsys, damage):
    data, built = cache
    folder = tmp_path / "cache"
    shutil.copytree(built, folder)
    sentinel = tmp_path / "PWNED"
    CACHE_DAMAGES[damage](folder, sentinel)
    args = ["--data", str(data), "--output", str(tmp_path / "o"), "--base", "demo", "--num-workers", "0",
            "--num-validation", "0", "--cache", str(folder), "--steps", "1", "--batch-size", "2"]
    assert main(args) == 2
    assert f"the cache in {folder} is damaged" in one_error(capsys)
    assert not sentinel.exists()
    assert not (tmp_path / "o" / "adapter.safetensors").exists()


def test_a_non_finite_cache_row_is_skipped_and_counted(cache, tmp_path):
    from test_train_helpers import run_config

    from lookalike.training.loop import train

    data, built = cache
    folder = tmp_path / "cache"
    shutil.copytree(built, folder)

    def poison(t):
        t["latent_mean"][1] = float("nan")
    _edit_shard(folder, poison)
    result = train(run_config(tmp_path, data, cache=str(folder), steps=3, batch_size=2))
    assert result.skipped == {"non-finite cache row": 1}
    assert all(torch.isfinite(v).all() for v in weights(result.adapter_path).values())


# -- face-embedding and caption files of training records ------------------------------------------------


def hostile_side_files(folder: Path, sentinel: Path) -> dict[str, Path]:
    """Face-embedding files that must each be one skipped sample: payload pickles under every name,
    object arrays, an .npy whose header claims terabytes, an oversized file, non-tensors, NaN."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind, blob in pickles(sentinel).items():
        for suffix in (".pt", ".npy", ".safetensors"):
            files[f"{kind}{suffix}"] = folder / f"{kind}{suffix}"
            files[f"{kind}{suffix}"].write_bytes(blob)
    objects = np.empty(2, dtype=object)
    objects[0] = Payload(sentinel)
    with open(folder / "objects.npy", "wb") as f:
        np.lib.format.write_array(f, objects, allow_pickle=True)
    files["object array"] = folder / "objects.npy"
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
    with open(folder / "huge.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\x00" * 64)
    files["terabyte header"] = folder / "huge.npy"
    np.save(folder / "big.npy", np.zeros(400_000, np.float32))
    files["oversized"] = folder / "big.npy"
    torch.save({"not": "a tensor"}, folder / "dict.pt")
    files["a dict"] = folder / "dict.pt"
    np.save(folder / "nan.npy", np.full(512, np.nan, np.float32))
    files["NaN"] = folder / "nan.npy"
    return files


def test_hostile_face_embedding_files_are_skipped_and_run_no_code(tmp_path):
    from lookalike.training.records import SkipSample, read_face_id

    sentinel = tmp_path / "PWNED"
    for kind, path in hostile_side_files(tmp_path / "faces", sentinel).items():
        with pytest.raises(SkipSample) as caught:
            read_face_id(path)
        assert caught.value.reason == "bad face embedding", kind
    assert not sentinel.exists()
    import numpy as np

    np.save(tmp_path / "ok.npy", np.arange(512, dtype=np.float32))
    assert read_face_id(tmp_path / "ok.npy").shape == (512,)


def test_an_oversized_caption_is_skipped_unread(tmp_path):
    from lookalike.training.records import MAX_SIDE_FILE, SkipSample, read_caption

    (tmp_path / "c.txt").write_bytes(b"a" * (MAX_SIDE_FILE + 1))
    with pytest.raises(SkipSample, match="unreadable caption"):
        read_caption(tmp_path / "c.txt")

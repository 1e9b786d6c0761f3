"""Training data and variants: every trainable variant, face ids, tar shards, the cache, validation, the stream."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_helpers import run_config, single_thread, weights, write_face_id, write_image, write_json_set

from lookalike.pipeline.tiny import tiny_pipeline
from lookalike.training import loop
from lookalike.training.config import TrainConfig, adapter_choices
from lookalike.training.data import DrawSettings, SlotBatches, draw
from lookalike.training.loop import train
from lookalike.training.records import find_records
from lookalike.weights.io import load_adapter, read_checkpoint


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


VARIANTS = [("basic", "demo"), ("plus", "demo"), ("plus-face", "demo"), ("full-face", "demo"), ("faceid", "demo"),
            ("faceid-plus", "demo"), ("faceid-portrait", "demo"), ("basic", "demo-sdxl"), ("plus", "demo-sdxl"),
            ("faceid-plusv2", "demo-sdxl")]


def test_every_registry_projector_is_offered():
    assert {"basic", "plus", "full-face", "faceid", "faceid-plus", "ip-adapter_sd15"} <= set(adapter_choices())


@pytest.mark.parametrize("adapter,base", VARIANTS)
def test_every_trainable_variant_trains_and_exports(tmp_path, adapter, base):
    data = write_json_set(tmp_path / "data", 4, faces=True)
    result = train(run_config(tmp_path, data, adapter=adapter, base=base, steps=2))
    family = "sdxl" if base == "demo-sdxl" else "sd15"
    loaded = load_adapter(result.adapter_path, tiny_pipeline(family, seed=0).unet)
    assert loaded.spec.base == family and loaded.spec.lora_rank == 0 and result.skipped == {}
    _, meta = read_checkpoint(result.adapter_path)
    assert json.loads(meta["lookalike.train"])["step"] == 2


def test_face_records_without_an_embedding_are_skipped_with_a_reason(tmp_path, caplog):
    data = write_json_set(tmp_path / "data", 4, faces=True,
                          extra=[{"image_file": "img0.png", "text": "no id here"},
                                 {"image_file": "img1.png", "text": "bad id", "id_embed_file": "bad.npy"}])
    (tmp_path / "data" / "bad.npy").write_bytes(b"not numpy")
    result = train(run_config(tmp_path, data, adapter="faceid", steps=6, batch_size=2))
    assert set(result.skipped) == {"no face embedding", "bad face embedding"}
    assert any("no face embedding" in r.getMessage() for r in caplog.records)


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def test_webdataset_shards_are_read_by_offset_and_bad_members_counted(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        members = {}
        for i in range(3):
            png = write_image(tmp_path / f"src{s}{i}.png", seed=10 * s + i).read_bytes()
            members.update({f"{s:03d}{i:03d}.png": png, f"{s:03d}{i:03d}.txt": f"shard {s} item {i}".encode()})
        members.update({f"{s:03d}999.png": b"broken", f"{s:03d}999.txt": b"a broken image"})
        _tar(shards / f"train-{s:03d}.tar", members)
    records = find_records(str(shards / "train-{000..001}.tar"))
    assert len(records) == 8 and records[0].key == "train-000.tar/000000"
    assert len(find_records(str(shards))) == 8
    result = train(run_config(tmp_path, shards, steps=4, batch_size=2))
    assert set(result.skipped) == {"corrupt image"}


def test_the_cache_trains_like_live_encoding_without_loading_encoders(tmp_path, monkeypatch):
    data = write_json_set(tmp_path / "data", 6)
    common = dict(steps=3, lr=1e-3, drop_image=0.3, drop_text=0.3, num_validation=2, validate_every=3,
                  validation_steps=2)
    live = train(run_config(tmp_path, data, out="live", **common))
    cache = tmp_path / "cache"
    built = train(run_config(tmp_path, data, out="unused", cache=str(cache), build_cache=True, **common))
    assert built.cache_only and (cache / "cache.json").is_file()
    asked = []
    real = loop.load_models

    def spy(config, name, need_encoders=True):
        asked.append(need_encoders)
        return real(config, name, need_encoders)

    monkeypatch.setattr(loop, "load_models", spy)
    cached = train(run_config(tmp_path, data, out="cached", cache=str(cache), **common))
    assert asked == [False], "training from a complete cache loads no VAE, text or image encoder"
    a, b = weights(live.adapter_path), weights(cached.adapter_path)
    # Adam moves every weight by about lr per step whatever its gradient's size, so float-rounding noise in a
    # near-zero gradient reaches the weights at a few percent of lr (seen: 1.9e-5, 2% of a step, in 1 weight of
    # 2048). 1e-4 is a tenth of one step: features that differed for real would move many weights a whole step.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4)
    assert cached.losses == pytest.approx(live.losses, rel=1e-4)
    assert (Path(cached.adapter_path).parent / "validation" / "step-000003.png").is_file()
    assert cached.val_losses.keys() == live.val_losses.keys() == {3}
    with pytest.raises(Exception, match="another resolution"):
        train(run_config(tmp_path, data, out="other", cache=str(cache), resolution=16, **common))


def test_the_cache_knows_a_local_base_by_its_folder_not_by_how_its_path_was_written(tmp_path, monkeypatch):
    from lookalike.adapters.spec import get_spec

    for folder in ("sd", "enc", "demo"):  # "demo" is also a preset, which the loader takes before the folder
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path)
    spec = get_spec("basic", "sd15")

    def stamp(base: str, encoder: str | None = None) -> dict:
        return loop.fingerprint(run_config(tmp_path, "data", base=base, image_encoder=encoder), spec, 32, 4)

    assert stamp("sd") == stamp(str(tmp_path / "sd")) == stamp("./sd/")
    assert stamp("sd")["base"] == str((tmp_path / "sd").resolve())
    assert stamp("sd", "enc") == stamp("sd", str(tmp_path / "enc"))
    assert stamp("org/model")["base"] == "org/model" and stamp("demo")["base"] == "demo"  # hub ids and presets


def test_validation_holds_references_out_and_writes_a_grid(tmp_path):
    data = write_json_set(tmp_path / "data", 6)
    result = train(run_config(tmp_path, data, steps=2, num_validation=2, validate_every=1, validation_steps=2))
    grids = sorted(p.name for p in (Path(result.adapter_path).parent / "validation").iterdir())
    assert grids == ["step-000001.png", "step-000002.png"]
    assert set(result.val_losses) == {1, 2} and all(np.isfinite(list(result.val_losses.values())))
    text = Image.open(Path(result.adapter_path).parent / "validation" / grids[1]).text  # as the DiT grids'
    assert text["step"] == "2" and text["adapter"] == "ip-adapter_sd15" and text["guidance"] == "7.5"
    assert json.loads(text["references"]) == ["img4.png", "img5.png"]


def test_init_from_starts_at_the_given_adapter(tmp_path, monkeypatch):
    data = write_json_set(tmp_path / "data", 4)
    first = train(run_config(tmp_path, data, out="first", steps=3, lr=1e-2))
    seen = {}
    real = loop.build_adapter

    def spy(*args, **kwargs):
        adapter = real(*args, **kwargs)
        seen.update({k: v.clone() for k, v in adapter.state_dict().items()})
        return adapter

    monkeypatch.setattr(loop, "build_adapter", spy)
    train(run_config(tmp_path, data, out="second", init_from=str(first.adapter_path)))
    start = weights(first.adapter_path)
    assert all(torch.equal(seen[k], start[k]) for k in start)


def test_only_the_last_k_checkpoints_are_kept_and_each_holds_an_export(tmp_path):
    data = write_json_set(tmp_path / "data", 4)
    result = train(run_config(tmp_path, data, steps=4, checkpoint_every=1, keep_checkpoints=2))
    out = Path(result.adapter_path).parent
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", ".checkpoint"))) == [
        "checkpoint-3", "checkpoint-4"]
    assert (out / "checkpoint-3" / "adapter.safetensors").is_file()


def test_resume_refuses_a_run_of_another_variant(tmp_path):
    data = write_json_set(tmp_path / "data", 4)
    train(run_config(tmp_path, data, steps=1))
    with pytest.raises(Exception, match="--adapter basic"):
        train(run_config(tmp_path, data, adapter="plus", steps=2, resume="latest"))


def test_batches_of_any_layout_cover_the_same_slots_with_the_same_draws():
    single = next(iter(SlotBatches(start=8, batch_size=4)))
    ranks = [next(iter(SlotBatches(start=8, batch_size=2, rank=r, world=2))) for r in range(2)]
    assert single == ranks[0] + ranks[1] == [8, 9, 10, 11]
    s = DrawSettings((4, 8, 8), 1000, 0.1, 0.1, 0.1, noise_offset=0.1)
    a, b = draw(3, 9, s), draw(3, 9, s)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["noise"], draw(3, 10, s)["noise"])
    drops = [draw(0, k, DrawSettings((1, 1, 1), 10)) for k in range(4000)]
    image = sum(bool(d["drop_image"]) for d in drops) / 4000
    text = sum(bool(d["drop_text"]) for d in drops) / 4000
    both = sum(bool(d["drop_image"] and d["drop_text"]) for d in drops) / 4000
    assert abs(image - 0.10) < 0.02 and abs(text - 0.10) < 0.02 and abs(both - 0.05) < 0.015


def test_timestep_bias_draws_the_biased_portion_as_often_as_the_multiplier_says():
    uniform = DrawSettings((1, 1, 1), 1000)
    later = DrawSettings((1, 1, 1), 1000, timestep_bias="later", timestep_bias_portion=0.25,
                         timestep_bias_multiplier=3.0)
    earlier = DrawSettings((1, 1, 1), 1000, timestep_bias="earlier", timestep_bias_portion=0.5,
                           timestep_bias_multiplier=0.0)
    t = {name: torch.stack([draw(0, k, s)["timestep"] for k in range(4000)])
         for name, s in (("uniform", uniform), ("later", later), ("earlier", earlier))}
    assert abs(float((t["uniform"] >= 750).float().mean()) - 0.25) < 0.03
    assert abs(float((t["later"] >= 750).float().mean()) - 0.5) < 0.03  # 3 * 0.25 / (3 * 0.25 + 0.75)
    assert int(t["earlier"].min()) >= 500 and int(t["later"].min()) < 100  # 'later' still draws the rest
    assert torch.equal(draw(2, 5, later)["timestep"], draw(2, 5, later)["timestep"])


def test_jsonl_lists_and_folders_are_read_in_a_fixed_order(tmp_path):
    path = write_json_set(tmp_path / "a", 3, faces=True, jsonl=True)
    records = find_records(str(path))
    assert [r.key for r in records] == ["img0.png", "img1.png", "img2.png"]
    assert records[0].face_id == tmp_path / "a" / "id0.npy"
    folder = tmp_path / "b"
    for name in ("z", "a", "m"):
        write_image(folder / f"{name}.png", seed=1)
    write_face_id(folder / "a.npy", 1)
    keys = [(r.key, r.face_id is not None) for r in find_records(str(folder))]
    assert keys == [("a.png", True), ("m.png", False), ("z.png", False)]
    assert isinstance(run_config(tmp_path, path), TrainConfig)

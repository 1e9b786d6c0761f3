"""The whole FaceID recipe in lookalike-train: the attention LoRA trains beside the projector and exports in the
official layout that diffusers (with peft) loads and runs like lookalike; official numpy face ids are read and
other pickles refused; faces are embedded on the fly; empty captions train; held-out records only with
validation on."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_helpers import run_config, single_thread, train_watched, weights, write_image, write_json_set

from lookalike import Personalizer
from lookalike.errors import LookalikeError
from lookalike.pipeline.tiny import tiny_pipeline
from lookalike.training import loop
from lookalike.training.config import parse_args
from lookalike.training.loop import train
from lookalike.weights.io import load_adapter, read_checkpoint

TOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


# -- the attention LoRA -------------------------------------------------------------------------------------


def test_train_lora_defaults_to_the_official_rank(tmp_path):
    data = write_json_set(tmp_path / "data", 1)
    config = parse_args(["--data", str(data), "--output", str(tmp_path / "o"), "--adapter", "faceid", "--train-lora"])
    assert config.train_lora and config.lora_rank == 128
    assert not parse_args(["--data", str(data), "--output", str(tmp_path / "o")]).train_lora


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A FaceID run with --train-lora (rank 4, no weight decay: every change comes from a gradient), its starting
    adapter and the frozen models before and after."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lora")
    data = write_json_set(root / "data", 6, faces=True)
    cfg = run_config(root, data, adapter="faceid", train_lora=True, lora_rank=4, steps=6, batch_size=2, lr=1e-2,
                     weight_decay=0.0)
    return train_watched(cfg)


def test_lora_training_changes_every_lora_weight_and_leaves_the_unet_bitwise_frozen(lora_run):
    result, seen = lora_run
    trained = weights(result.adapter_path)
    assert set(trained) == set(seen["init"])
    lora = [k for k in trained if "_lora." in k]
    layers = {k.split(".")[1] for k in lora}
    unet = seen["models"].unet
    assert len(layers) == len(unet.attn_processors), "a LoRA on every attention layer, self and cross"
    for i in layers:
        for part in ("to_q", "to_k", "to_v", "to_out"):
            for side in ("down", "up"):
                assert f"ip_adapter.{i}.{part}_lora.{side}.weight" in trained
    assert all(not seen["init"][k].any() for k in lora if ".up." in k), "LoRA starts at the base UNet"
    assert all(not torch.equal(trained[k], seen["init"][k]) for k in lora), "every LoRA tensor trains"
    assert all(trained[k].shape[0 if ".down." in k else 1] == 4 for k in lora)
    for module, before in zip(seen["models"].frozen(), seen["frozen"]):
        after = module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), type(module).__name__
    spec = json.loads(read_checkpoint(result.adapter_path)[1]["lookalike.spec"])
    assert spec["lora_rank"] == 4 and spec["projector"] == "faceid"


def _without_lora(path: Path, out: Path) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if "_lora." not in k}
    spec = json.loads(meta["lookalike.spec"])
    spec["lora_rank"] = 0
    save_file(tensors, str(out), metadata={**meta, "lookalike.spec": json.dumps(spec)})
    return out


def test_the_lora_export_loads_in_diffusers_with_peft_and_generates_as_lookalike(lora_run, tmp_path):
    pytest.importorskip("peft")
    result, _ = lora_run
    g = torch.Generator().manual_seed(3)
    face, negative = torch.randn(1, 1, 512, generator=g), torch.zeros(1, 1, 512)
    kwargs = dict(prompt="a photo", num_inference_steps=2, guidance_scale=5.0, height=32, width=32,
                  output_type="np")

    def ours(path: Path) -> np.ndarray:
        p = Personalizer(tiny_pipeline("sd15", seed=0))  # the demo base the adapter was trained on
        p.load_adapter(str(path))
        return p.generate(image_embeds=[face], negative_image_embeds=[negative],
                          generator=torch.Generator().manual_seed(0), **kwargs).images

    theirs = tiny_pipeline("sd15", seed=0)
    theirs.load_ip_adapter(str(result.adapter_path.parent), subfolder="", weight_name=result.adapter_path.name,
                           image_encoder_folder=None)
    assert "faceid_0" in theirs.unet.peft_config, "diffusers applies the LoRA through peft"
    b = theirs(ip_adapter_image_embeds=[torch.cat([negative, face])], generator=torch.Generator().manual_seed(0),
               **kwargs).images
    a = ours(result.adapter_path)
    assert abs(a - b).max() <= TOL
    plain = tiny_pipeline("sd15", seed=0)(generator=torch.Generator().manual_seed(0), **kwargs).images
    no_lora = ours(_without_lora(result.adapter_path, tmp_path / "no_lora.safetensors"))
    assert abs(a - plain).max() > 1e-3, "the adapter must change the image"
    assert abs(a - no_lora).max() > 1e-4, "the trained LoRA must change the image, or the test proves nothing"
    assert load_adapter(result.adapter_path, tiny_pipeline("sd15", seed=0).unet).has_lora


def test_init_from_an_official_faceid_file_keeps_its_lora_when_training_one(lora_run, tmp_path, monkeypatch):
    result, _ = lora_run
    data = write_json_set(tmp_path / "data", 4, faces=True)
    seen = {}
    real = loop.build_adapter

    def spy(*args, **kwargs):
        adapter = real(*args, **kwargs)
        seen["init"] = {k: v.clone() for k, v in adapter.state_dict().items()}
        return adapter

    monkeypatch.setattr(loop, "build_adapter", spy)
    train(run_config(tmp_path, data, adapter="faceid", train_lora=True, lora_rank=4, steps=1,
                     init_from=str(result.adapter_path)))
    given = weights(result.adapter_path)
    assert all(torch.equal(seen["init"][k], given[k]) for k in given)
    train(run_config(tmp_path, data, out="plain", adapter="faceid", steps=1, init_from=str(result.adapter_path)))
    assert not any("_lora." in k for k in seen["init"]), "without --train-lora the file's LoRA is left out"


# -- face-id files of the official data -------------------------------------------------------------------


def _torch_bytes(value, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(value, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def test_official_numpy_face_ids_are_read_as_the_arrays_they_hold(tmp_path):
    from lookalike.training.records import read_face_id

    vec = np.random.default_rng(0).standard_normal(512)
    files = {
        "float32.bin": _torch_bytes(vec.astype(np.float32)),
        "float64.pt": _torch_bytes(vec),
        "float16-2d.pt": _torch_bytes(vec.astype(np.float16).reshape(1, 512)),
        "legacy.pt": _torch_bytes(vec.astype(np.float32), legacy=True),
        # written by numpy 1, whose array rebuilder lived in numpy.core
        "numpy1.pt": _torch_bytes(vec.astype(np.float32), legacy=True).replace(b"numpy._core.", b"numpy.core."),
        "tensor.pt": _torch_bytes(torch.from_numpy(vec.astype(np.float32))),
    }
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
        tol = 1e-3 if "16" in name else 1e-6
        got = read_face_id(tmp_path / name, normed=False)
        assert got.shape == (512,) and got.dtype == torch.float32, name
        torch.testing.assert_close(got, torch.from_numpy(vec).float(), atol=tol, rtol=tol)
        assert abs(float(read_face_id(tmp_path / name).norm()) - 1.0) < 1e-5
    assert b"numpy.core.multiarray" in files["numpy1.pt"]


def test_a_run_on_official_numpy_face_ids_skips_nothing(tmp_path):
    data = write_json_set(tmp_path / "data", 4)
    records = json.loads(data.read_text())
    for i, record in enumerate(records):
        name = f"id{i}.bin"
        (tmp_path / "data" / name).write_bytes(_torch_bytes(np.random.default_rng(i).standard_normal(512)))
        record["id_embed_file"] = name
    data.write_text(json.dumps(records))
    result = train(run_config(tmp_path, data, adapter="faceid", steps=3))
    assert result.skipped == {} and result.steps == 3


class _Sneaky:
    """Unpickles through numpy's array rebuilder with the payload as an argument."""

    def __init__(self, payload) -> None:
        self.payload = payload

    def __reduce__(self):
        return (np.zeros(1).__reduce__()[0], (np.ndarray, (0,), self.payload))


def test_a_face_id_pickle_that_is_not_a_plain_array_is_refused_counted_and_runs_no_code(tmp_path):
    from test_hostile_training import Payload, pickles

    from lookalike.training.records import SkipSample, read_face_id

    sentinel = tmp_path / "PWNED"
    objects = np.empty(2, dtype=object)
    objects[:] = [Payload(sentinel), 1.0]
    blobs = {**{f"{k}.pt": v for k, v in pickles(sentinel).items()},
             "object-array.pt": _torch_bytes(objects),
             "plain-object-array.pt": _torch_bytes(np.array([1.0, "a"], dtype=object)),
             "dict.pt": _torch_bytes({"id": np.zeros(512, np.float32)}),
             "int-array.pt": _torch_bytes(np.arange(512)),
             "list.pt": _torch_bytes([np.zeros(512, np.float32)]),
             "payload-in-rebuilder.pt": _torch_bytes(_Sneaky(Payload(sentinel))),
             "huge-shape.pt": _torch_bytes(_Huge())}
    folder = tmp_path / "data"
    folder.mkdir()
    for name, blob in blobs.items():
        (folder / name).write_bytes(blob)
        with pytest.raises(SkipSample) as caught:
            read_face_id(folder / name)
        assert caught.value.reason == "bad face embedding", name
    assert not sentinel.exists()

    data = write_json_set(folder, 4, faces=True, extra=[{"image_file": "img0.png", "text": "x", "id_embed_file": name}
                                                        for name in ("pickle2.pt", "object-array.pt", "dict.pt")])
    result = train(run_config(tmp_path, data, adapter="faceid", steps=4, batch_size=2))
    assert not sentinel.exists()
    assert set(result.skipped) == {"bad face embedding"}


class _Huge:
    """An array pickle whose header claims 10**12 floats over 16 bytes of data."""

    def __reduce__(self):
        rebuild = np.zeros(1).__reduce__()[0]
        return (rebuild, (np.ndarray, (0,), b"b"), (1, (10**12,), np.dtype("f4"), False, b"\0" * 16))


# -- face embeddings on the fly ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def face_data(tmp_path_factory):
    """Records without id files: the astronaut (one face) twice, a teapot (no face); one record with an id file.
    The face encoder: the real YuNet and a seeded tiny ArcFace exported to ONNX."""
    from PIL import Image
    from skimage import data as skdata

    from helpers import DREAMBENCH, YUNET, tiny_arcface_pack

    root = tmp_path_factory.mktemp("faces")
    folder = root / "data"
    folder.mkdir()
    Image.fromarray(skdata.astronaut()).save(folder / "astronaut.png")
    Image.open(DREAMBENCH / "teapot" / "00.jpg").save(folder / "teapot.png")
    write_image(folder / "other.png", seed=3)
    np.save(folder / "other.npy", np.random.default_rng(0).standard_normal(512).astype(np.float32))
    records = [{"image_file": "astronaut.png", "text": "an astronaut"}, {"image_file": "teapot.png", "text": "a pot"},
               {"image_file": "other.png", "text": "a thing", "id_embed_file": "other.npy"},
               {"image_file": "astronaut.png", "text": "a portrait"}]
    (folder / "data.json").write_text(json.dumps(records))
    pack = tiny_arcface_pack(root / "pack")
    return {"data": folder / "data.json", "folder": folder, "pack": pack, "yunet": YUNET, "root": root}


def _face_config(tmp_path, face_data, **changes):
    return run_config(tmp_path, face_data["data"], adapter="faceid-plus", face_models=str(face_data["pack"]),
                      face_detector="yunet", yunet_model=str(face_data["yunet"]), **changes)


def test_records_without_an_id_file_get_the_face_encoders_embedding_and_crop(tmp_path, face_data):
    from PIL import Image

    from lookalike.encoders.face import FaceEncoder
    from lookalike.encoders.prepare import to_clip_pixels
    from lookalike.training.models import load_models
    from lookalike.training.records import SkipSample, find_records, read_face_id

    cfg = _face_config(tmp_path, face_data)
    models, spec = load_models(cfg, cfg.adapter)
    source = loop.image_source(models, find_records(cfg.data), spec, 32, cfg)
    astronaut = Image.open(face_data["folder"] / "astronaut.png")
    encoder = FaceEncoder.from_folder(face_data["pack"], detector="yunet", yunet_model=face_data["yunet"])
    expected = encoder.encode([astronaut])["face_id"][0]
    crop = encoder.aligned_crops([astronaut])[0]
    enc = models.image_encoder
    for i in (0, 3):
        sample = source.load(i, torch.zeros(2))
        torch.testing.assert_close(sample["face_id"], expected, atol=1e-6, rtol=0)
        clip = to_clip_pixels([crop], enc.image_size, enc.mean, enc.std)[0]
        assert torch.equal(sample["clip_pixels"], clip), "FaceID-Plus's CLIP sees the aligned face crop"
    with pytest.raises(SkipSample) as caught:
        source.load(1, torch.zeros(2))
    assert caught.value.reason == "no face found"
    assert torch.equal(source.load(2, torch.zeros(2))["face_id"], read_face_id(face_data["folder"] / "other.npy"))


def test_the_cache_and_live_batches_embed_faces_and_count_images_without_one(tmp_path, face_data):
    from safetensors.torch import load_file

    from lookalike.encoders.face import FaceEncoder

    cache = tmp_path / "cache"
    assert train(_face_config(tmp_path, face_data, cache=str(cache), build_cache=True)).cache_only
    manifest = json.loads((cache / "cache.json").read_text())
    assert manifest["skipped"] == {"no face found": 1}
    assert manifest["fingerprint"]["face_models"].startswith(str(face_data["pack"].resolve()))
    rows = {}
    for name in manifest["shards"]:
        shard = load_file(str(cache / name))
        rows.update({int(i): shard["face_id"][n] for n, i in enumerate(shard["index"])})
    assert sorted(rows) == [0, 2, 3]
    encoder = FaceEncoder.from_folder(face_data["pack"], detector="yunet", yunet_model=face_data["yunet"])
    torch.testing.assert_close(rows[0], encoder.encode([face_data["folder"] / "astronaut.png"])["face_id"][0],
                               atol=1e-6, rtol=0)
    cached = train(_face_config(tmp_path, face_data, out="cached", cache=str(cache), steps=2))
    assert cached.skipped == {}

    live = train(_face_config(tmp_path, face_data, out="live", steps=3, num_workers=1))  # a forked worker
    assert live.skipped == {"no face found": live.skipped["no face found"]} and live.skipped["no face found"] >= 1


def test_face_models_for_an_adapter_without_face_ids_is_one_sentence(tmp_path, face_data, capsys):
    from lookalike.train_encoder import main

    argv = ["--data", str(face_data["data"]), "--output", str(tmp_path / "o"), "--adapter", "plus",
            "--face-models", str(face_data["pack"]), "--num-workers", "0"]
    assert main(argv) == 2
    assert "--face-models embeds faces for FaceID adapters" in capsys.readouterr().err
    assert main(argv[:6] + ["--face-detector", "yunet"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --face-detector and --yunet-model")


# -- captions and held-out records --------------------------------------------------------------------------


def test_empty_and_absent_captions_train_as_the_empty_caption(tmp_path):
    from lookalike.training.data import tokenize
    from lookalike.training.models import load_models
    from lookalike.training.records import find_records

    data = write_json_set(tmp_path / "data", 2, extra=[{"image_file": "img0.png", "text": ""},
                                                       {"image_file": "img1.png", "text": "  \n"},
                                                       {"image_file": "img0.png"}])
    cfg = run_config(tmp_path, data)
    models, spec = load_models(cfg, cfg.adapter)
    source = loop.image_source(models, find_records(cfg.data), spec, 32, cfg)
    empty = tokenize(models.tokenizers, "")
    for i in (2, 3, 4):
        assert all(torch.equal(a, b) for a, b in zip(source.load(i, torch.zeros(2))["input_ids"], empty))
    assert not torch.equal(source.load(0, torch.zeros(2))["input_ids"][0], empty[0])
    result = train(run_config(tmp_path, data, steps=3, batch_size=2))
    assert result.skipped == {} and result.steps == 3


def _trained_records(cfg) -> int:
    from lookalike.training.loop import build_run, make_accelerator

    run = build_run(cfg, make_accelerator(cfg))
    return len(run.train_source)


def test_validation_records_are_held_back_only_when_validation_is_on(tmp_path):
    data = write_json_set(tmp_path / "data", 10)
    assert _trained_records(run_config(tmp_path, data, num_validation=4)) == 10
    assert _trained_records(run_config(tmp_path, data, num_validation=4, validate_every=5)) == 6


def test_a_lora_run_resumed_from_its_checkpoint_ends_bit_identical(tmp_path):
    from dataclasses import replace

    data = write_json_set(tmp_path / "data", 4, faces=True)
    cfg = run_config(tmp_path, data, out="full", adapter="faceid", train_lora=True, lora_rank=4, steps=4,
                     checkpoint_every=2, lr=1e-2, ema_decay=0.9)
    full = train(cfg)
    resumed = train(replace(cfg, output=str(tmp_path / "resumed"), resume=str(tmp_path / "full/checkpoint-2")))
    assert resumed.losses == full.losses[2:]
    a, b = weights(full.adapter_path), weights(resumed.adapter_path)
    assert any("_lora." in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(LookalikeError, match="train-lora"):
        train(replace(cfg, output=str(tmp_path / "other"), train_lora=False, resume=str(tmp_path / "full/checkpoint-2")))

"""train_encoder: the loss falls and only the adapter trains; resume is bit-identical; two processes equal one;
bad data is skipped and counted; the export loads in diffusers; the CLI fails with one sentence."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_train_helpers import (
    interrupted_at,
    run_config,
    single_thread,
    train_watched,
    weights,
    write_image,
    write_json_set,
)

import lookalike
from lookalike.train_encoder import main
from lookalike.training import loop
from lookalike.training.data import DrawSettings
from lookalike.training.loop import train
from lookalike.training.models import build_adapter, fit_spec, load_models, negative_features
from lookalike.training.records import find_records
from lookalike.training.step import AdapterTrainer, constants_from_models
from lookalike.training.validation import make_validation_set, validation_loss
from lookalike.weights.io import load_adapter


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


def _fixed_loss(models, spec, adapter_sd, cfg) -> float:
    """The loss over the training records at fixed draws (no drops), for given adapter weights."""
    from lookalike.adapters.module import IPAdapter

    adapter = IPAdapter.for_unet(spec, models.unet)
    adapter.load_state_dict(adapter_sd)
    consts = constants_from_models(models, negative_features(models, spec))
    source = loop.image_source(models, find_records(cfg.data), spec, 32, cfg)
    vset = make_validation_set(source, 7, DrawSettings((4, 16, 16), 1000), [])
    trainer = AdapterTrainer(adapter, models.unet)
    try:
        return validation_loss(trainer, models, consts, vset, torch.device("cpu"))
    finally:
        trainer.handle.detach()


def test_loss_falls_and_only_adapter_weights_change(tmp_path, monkeypatch):
    data = write_json_set(tmp_path / "data", 8)
    cfg = run_config(tmp_path, data, steps=30, batch_size=4, lr=3e-3)
    result, seen = train_watched(cfg)

    models = seen["models"]
    assert len(models.frozen()) == 4  # UNet, VAE, text encoder, image encoder
    for module, before in zip(models.frozen(), seen["frozen"]):
        after = module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), type(module).__name__
    trained = weights(result.adapter_path)
    assert set(trained) == set(seen["init"])
    assert all(not torch.equal(trained[k], seen["init"][k]) for k in trained), "every adapter tensor trains"
    before, after = (_fixed_loss(models, seen["spec"], sd, cfg) for sd in (seen["init"], trained))
    assert after < 0.97 * before, (before, after)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])


RESUME = dict(steps=6, checkpoint_every=2, grad_accum=2, lr=1e-3, lr_scheduler="cosine", lr_warmup_steps=2,
              ema_decay=0.9, drop_image=0.2, drop_text=0.2, drop_both=0.2, noise_offset=0.05, max_grad_norm=1.0)


def test_killed_run_resumed_ends_bit_identical(tmp_path, monkeypatch):
    data = write_json_set(tmp_path / "data", 6)
    full = train(run_config(tmp_path, data, out="full", **RESUME))

    cfg = run_config(tmp_path, data, out="killed", **RESUME)
    monkeypatch.setattr(loop, "model_inputs", interrupted_at(2 * 4 + 2))  # step 5, micro-batch 2: after checkpoint-4
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    out = Path(cfg.output)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    (out / ".checkpoint-6.tmp").mkdir()  # a half-written checkpoint of a killed save is ignored
    resumed = train(replace(cfg, resume="latest"))

    assert resumed.losses == full.losses[4:]
    for name in ("adapter.safetensors", "checkpoint-6/adapter.safetensors", "checkpoint-6/model.safetensors"):
        a, b = weights(Path(full.adapter_path).parent / name), weights(out / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(lookalike.__file__).parent.parent), **extra)
    return env


def _cli(data: Path, out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "lookalike.train_encoder", "--base", "demo", "--adapter", "plus", "--data",
            str(data), "--output", str(out), "--num-workers", "0", "--num-validation", "0", *flags]


@pytest.mark.slow
def test_two_processes_give_the_adapter_of_one_process_with_twice_the_batch(tmp_path):
    data = write_json_set(tmp_path / "data", 8)
    flags = ("--steps", "3", "--lr", "1e-3", "--drop-image", "0.3", "--checkpoint-every", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen(_cli(data, tmp_path / "two", "--batch-size", "2", *flags), cwd=tmp_path,
                              env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(r),
                                       LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    assert main(_cli(data, tmp_path / "one", "--batch-size", "4", *flags)[3:]) == 0
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out.decode()[-3000:]
    one, two = weights(tmp_path / "one/adapter.safetensors"), weights(tmp_path / "two/adapter.safetensors")
    start = _initial_weights(run_config(tmp_path, data, adapter="plus"))
    assert one.keys() == two.keys() == start.keys()
    for k in one:  # Adam turns float noise in near-zero gradients into ~lr-sized steps: compare at 1e-5
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    assert max(float((one[k] - start[k]).abs().max()) for k in one) > 1e-3, "training must move the weights"


def _initial_weights(cfg) -> dict[str, torch.Tensor]:
    """The seeded starting adapter of a run (what the trainer builds before its first step)."""
    models, spec = load_models(cfg, cfg.adapter)
    dims = {k: int(v.shape[-1]) for k, v in negative_features(models, spec).items()}
    spec = fit_spec(spec, dims, models.unet.config.cross_attention_dim)
    return build_adapter(spec, models.unet, cfg.seed).state_dict()


@pytest.mark.slow
def test_a_process_killed_by_sigkill_resumes_to_the_same_adapter(tmp_path):
    data = write_json_set(tmp_path / "data", 6)
    flags = ("--steps", "40", "--checkpoint-every", "5", "--batch-size", "2", "--lr", "1e-3")
    proc = subprocess.Popen(_cli(data, tmp_path / "killed", *flags), cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (tmp_path / "killed/checkpoint-10").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed/adapter.safetensors").exists(), "the run was killed before its end"
    assert main(_cli(data, tmp_path / "killed", *flags, "--resume", "latest")[3:]) == 0
    assert main(_cli(data, tmp_path / "full", *flags)[3:]) == 0
    a, b = weights(tmp_path / "full/adapter.safetensors"), weights(tmp_path / "killed/adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_data_is_skipped_and_counted_and_the_export_loads_in_diffusers(tmp_path, caplog):
    folder = tmp_path / "data"
    for i in range(6):
        write_image(folder / f"good{i}.png", seed=i)
        (folder / f"good{i}.txt").write_text(f"a thing {i}")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (folder / "corrupt.txt").write_text("a corrupt file")
    write_image(folder / "blank.png", seed=9)
    (folder / "blank.txt").write_text("  \n")
    result = train(run_config(tmp_path, folder, steps=8, batch_size=2))
    assert result.steps == 8
    assert set(result.skipped) == {"corrupt image"} and result.skipped["corrupt image"] >= 1  # blank.txt trains

    listed = write_json_set(tmp_path / "listed", 4, extra=[{"image_file": "gone.png", "text": "a missing file"}])
    result = train(run_config(tmp_path, listed, out="listed_out", steps=5, batch_size=2))
    assert set(result.skipped) == {"missing file"} and result.skipped["missing file"] >= 1

    from lookalike.pipeline.tiny import tiny_pipeline

    pipe = tiny_pipeline("sd15", seed=0)
    pipe.load_ip_adapter(str(result.adapter_path.parent), subfolder="", weight_name=result.adapter_path.name,
                         image_encoder_folder=None)
    embeds = torch.randn(2, 1, 16)  # [negative; positive] pooled embeddings of the demo's 16-d CLIP
    image = pipe("a photo", ip_adapter_image_embeds=[embeds], num_inference_steps=2, height=32, width=32,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(image)).all()
    ours = load_adapter(result.adapter_path, tiny_pipeline("sd15", seed=0).unet)
    assert ours.spec.name == "ip-adapter_sd15" and ours.spec.lora_rank == 0


@pytest.mark.parametrize("argv,fragment", [
    (["--adapter", "bogus"], "invalid choice: 'bogus'"),
    (["--data", "/no/such/data.json"], "no such file or folder"),
    (["--steps", "0"], "must be a positive integer"),
    (["--drop-image", "0.6", "--drop-text", "0.6"], "must not exceed 1"),
    (["--resume", "/no/such/checkpoint"], "no such checkpoint folder"),
    (["--timestep-bias", "later", "--timestep-bias-portion", "1", "--timestep-bias-multiplier", "0"],
     "leaves no timestep to draw"),
])
def test_bad_flags_exit_2_with_one_error_line(tmp_path, capsys, argv, fragment):
    data = write_json_set(tmp_path / "data", 1)
    base = ["--data", str(data), "--output", str(tmp_path / "o")]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


def test_a_variant_for_another_base_is_refused_with_one_sentence(tmp_path, capsys):
    data = write_json_set(tmp_path / "data", 2)
    argv = ["--data", str(data), "--output", str(tmp_path / "o"), "--adapter", "ip-adapter_sdxl"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: adapter ip-adapter_sdxl is for sdxl")


def test_lookalike_info_names_the_exported_adapter(tmp_path, capsys):
    cli = pytest.importorskip("lookalike.cli")
    data = write_json_set(tmp_path / "data", 2)
    result = train(run_config(tmp_path, data, steps=1))
    capsys.readouterr()
    assert cli.main(["info", str(result.adapter_path)]) == 0
    assert "ip-adapter_sd15" in capsys.readouterr().out

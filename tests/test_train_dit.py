"""lookalike-train on tiny random FLUX.1 and SD3.5 models: the loss falls and only the adapter trains, a killed run
resumes bit-identically, gradient checkpointing gives the same gradients, two processes equal one, and the export
generates in diffusers (XLabs FLUX, InstantX SD3.5) as in lookalike."""

from __future__ import annotations

import socket
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from dit_helpers import flux_kwargs, gen
from test_train_encoder import _cli, _env
from test_train_helpers import (
    interrupted_at,
    run_config,
    single_thread,
    train_watched,
    weights,
    write_json_set,
)

from lookalike import Personalizer
from lookalike.train_encoder import main
from lookalike.training import loop
from lookalike.training.data import DrawSettings
from lookalike.training.dit import DitTrainer, build_dit_adapter, fit_dit_spec
from lookalike.training.flow import FlowSettings
from lookalike.training.loop import train
from lookalike.training.models import load_models, negative_features
from lookalike.training.records import find_records
from lookalike.training.step import constants_from_models, loss_of, model_inputs
from lookalike.training.validation import make_validation_set, validation_loss
from lookalike.weights.dit_formats import published_to_flat

VARIANTS = [("demo-flux", "flux-ip"), ("demo-flux", "flux-ip-instantx"), ("demo-sd3", "sd35-ip")]
FLOW = FlowSettings("logit_normal")


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


def _setup(cfg):
    """Frozen demo models, the fitted spec, constants and a fixed-draw set over the training records."""
    models, spec = load_models(cfg, cfg.adapter)
    negatives = negative_features(models, spec)
    consts = constants_from_models(models, negatives)
    consts.flow = FLOW
    spec = fit_dit_spec(spec, {k: int(v.shape[-1]) for k, v in negatives.items()}, models.unet)
    vae = models.vae.config
    side = 32 // 2 ** (len(vae.block_out_channels) - 1)
    settings = DrawSettings((vae.latent_channels, side, side), 1000, flow=FLOW)
    source = loop.image_source(models, find_records(cfg.data), spec, 32, cfg)
    return models, spec, consts, make_validation_set(source, 7, settings, [])


def _fixed_loss(models, spec, consts, vset, adapter_sd) -> float:
    adapter = build_dit_adapter(spec, models.unet, 0)
    adapter.load_state_dict(adapter_sd)
    trainer = DitTrainer(adapter, models.unet)
    try:
        return validation_loss(trainer, models, consts, vset, torch.device("cpu"))
    finally:
        trainer.handle.detach()


def _flat(path: Path) -> dict[str, torch.Tensor]:
    return published_to_flat(weights(path))


@pytest.mark.parametrize("base,adapter", VARIANTS)
def test_dit_loss_falls_and_only_adapter_weights_change(tmp_path, monkeypatch, base, adapter):
    data = write_json_set(tmp_path / "data", 8)
    cfg = run_config(tmp_path, data, base=base, adapter=adapter, steps=12, batch_size=4, lr=3e-3,
                     drop_image=0.0, drop_text=0.0, drop_both=0.0)
    result, seen = train_watched(cfg, "build_dit_adapter")

    models = seen["models"]
    assert len(models.frozen()) == 3 + len(models.text_encoders)  # transformer, VAE, image encoder, text encoders
    for module, before in zip(models.frozen(), seen["frozen"]):
        after = module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), type(module).__name__
    trained = _flat(result.adapter_path)
    assert set(trained) == set(seen["init"])
    moved = [k for k in trained if not torch.equal(trained[k], seen["init"][k])]
    assert len(moved) == len(trained), set(trained) - set(moved)
    models, spec, consts, vset = _setup(cfg)
    before, after = (_fixed_loss(models, spec, consts, vset, sd) for sd in (seen["init"], trained))
    assert after < 0.99 * before, (before, after)


RESUME = dict(steps=4, checkpoint_every=2, grad_accum=2, lr=1e-3, lr_scheduler="cosine", lr_warmup_steps=1,
              ema_decay=0.9, drop_image=0.3, drop_text=0.3, drop_both=0.2, max_grad_norm=1.0, batch_size=2)


@pytest.mark.parametrize("base,adapter", VARIANTS)
def test_dit_killed_run_resumed_ends_bit_identical(tmp_path, monkeypatch, base, adapter):
    data = write_json_set(tmp_path / "data", 6)
    full = train(run_config(tmp_path, data, out="full", base=base, adapter=adapter, **RESUME))
    cfg = run_config(tmp_path, data, out="killed", base=base, adapter=adapter, **RESUME)
    monkeypatch.setattr(loop, "model_inputs", interrupted_at(2 * 2 + 2))  # step 3, micro-batch 2: after checkpoint-2
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    resumed = train(replace(cfg, resume="latest"))
    assert resumed.losses == full.losses[2:]
    out = Path(cfg.output)
    for name in ("adapter.safetensors", "checkpoint-4/model.safetensors"):
        a, b = weights(Path(full.adapter_path).parent / name), weights(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("base,adapter", [VARIANTS[1], VARIANTS[2]])
def test_dit_gradient_checkpointing_gives_the_same_gradients(tmp_path, base, adapter):
    data = write_json_set(tmp_path / "data", 3)
    models, spec, consts, vset = _setup(run_config(tmp_path, data, base=base, adapter=adapter))
    grads = []
    for checkpointing in (False, True):
        trainer = DitTrainer(build_dit_adapter(spec, models.unet, 0), models.unet, checkpointing=checkpointing)
        try:
            loss_of(trainer, model_inputs(models, consts, vset.batch, torch.device("cpu"))).backward()
        finally:
            trainer.handle.detach()
            models.unet.disable_gradient_checkpointing()
        grads.append({n: p.grad.clone() for n, p in trainer.adapter.named_parameters()})
    assert all(float(g.abs().max()) > 0 for g in grads[0].values()), "every adapter tensor gets a gradient"
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def _demo_pipe(base: str):
    from lookalike.pipeline.tiny_dit import tiny_flux_pipeline, tiny_sd3_pipeline

    return tiny_flux_pipeline(seed=0, guidance=True) if base == "demo-flux" else tiny_sd3_pipeline(seed=0)


def _kwargs(base: str) -> dict:
    return flux_kwargs() if base == "demo-flux" else flux_kwargs(guidance_scale=5.0)


@pytest.mark.parametrize("base,adapter,width,diffusers_reads", [
    ("demo-flux", "flux-ip", (1, 16), True), ("demo-flux", "flux-ip-instantx", (1, 24), False),
    ("demo-sd3", "sd35-ip", (5, 24), True)])
def test_dit_export_generates_in_diffusers_as_in_lookalike(tmp_path, base, adapter, width, diffusers_reads):
    data = write_json_set(tmp_path / "data", 4)
    result = train(run_config(tmp_path, data, base=base, adapter=adapter, steps=2, lr=1e-2))
    emb = torch.randn(1, *width, generator=torch.Generator().manual_seed(3))  # tiny CLIP pooled / SigLIP features
    p = Personalizer(_demo_pipe(base))
    p.load_adapter(str(result.adapter_path))
    assert p.adapters[0].spec.name == adapter
    ours = p.generate(image_embeds=emb, generator=gen(), **_kwargs(base)).images
    plain = _demo_pipe(base)(generator=gen(), **_kwargs(base)).images
    assert abs(ours - plain).max() > 1e-3, "the trained adapter must change the image"
    if not diffusers_reads:  # diffusers has no loader for InstantX's FLUX adapter
        return
    theirs = _demo_pipe(base)
    path = result.adapter_path
    if base == "demo-flux":
        theirs.load_ip_adapter(str(path.parent), weight_name=[path.name],
                               image_encoder_pretrained_model_name_or_path=None)
        b = theirs(ip_adapter_image_embeds=[emb], negative_ip_adapter_image_embeds=[torch.zeros_like(emb)],
                   generator=gen(), **_kwargs(base)).images
    else:
        theirs.load_ip_adapter(str(path.parent), weight_name=path.name, image_encoder_folder=None,
                               low_cpu_mem_usage=False)
        theirs.set_ip_adapter_scale(1.0)  # its SD3 processor starts at 0.5
        b = theirs(ip_adapter_image_embeds=torch.cat([torch.zeros_like(emb), emb]), generator=gen(),
                   **_kwargs(base)).images
    assert abs(ours - b).max() <= 1e-5


@pytest.mark.slow
def test_dit_two_processes_give_the_adapter_of_one_process_with_twice_the_batch(tmp_path):
    data = write_json_set(tmp_path / "data", 8)
    flags = ("--steps", "2", "--lr", "1e-3", "--drop-image", "0.3", "--checkpoint-every", "0")

    def cli(out: str, *more: str) -> list[str]:
        argv = _cli(data, tmp_path / out, *more, *flags)
        argv[argv.index("--base") + 1], argv[argv.index("--adapter") + 1] = "demo-flux", "flux-ip"
        return argv

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen(cli("two", "--batch-size", "2"), cwd=tmp_path,
                              env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(r),
                                       LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    assert main(cli("one", "--batch-size", "4")[3:]) == 0
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode()[-3000:]
    one, two = _flat(tmp_path / "one/adapter.safetensors"), _flat(tmp_path / "two/adapter.safetensors")
    models, spec, _, _ = _setup(run_config(tmp_path, data, base="demo-flux", adapter="flux-ip"))
    start = build_dit_adapter(spec, models.unet, 0).state_dict()
    assert one.keys() == two.keys() == start.keys()
    for k in one:  # a key bias shifts every logit of a query's image softmax alike: its true gradient is 0, and
        # Adam turns the float noise left there into steps of up to lr (1e-3), so it is held to 1e-4
        tol = 1e-4 if k.endswith("to_k_ip.bias") else 1e-5
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=tol)
    assert max(float((one[k] - start[k]).abs().max()) for k in one) > 1e-4, "training must move the weights"


@pytest.mark.parametrize("base,adapter", [VARIANTS[0], VARIANTS[2]])
def test_dit_cached_run_trains_as_the_live_run(tmp_path, base, adapter):
    """The cache holds the VAE posterior, the prompt encodings and the image features (and the VAE's shift)."""
    data = write_json_set(tmp_path / "data", 4)
    kw = dict(base=base, adapter=adapter, steps=3, lr=1e-3)
    live = train(run_config(tmp_path, data, out="live", **kw))
    cached = train(run_config(tmp_path, data, out="cached", cache=str(tmp_path / "cache"), **kw))
    torch.testing.assert_close(torch.tensor(cached.losses), torch.tensor(live.losses), rtol=1e-5, atol=1e-6)
    a, b = _flat(live.adapter_path), _flat(cached.adapter_path)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4 if k.endswith("to_k_ip.bias") else 1e-6)


def test_dit_bf16_transformer_trains_an_fp32_adapter(tmp_path, monkeypatch):
    """--mixed-precision bf16 keeps the frozen transformer in bf16 (with --gradient-checkpointing too)."""
    from accelerate.state import AcceleratorState

    data = write_json_set(tmp_path / "data", 4)
    seen, real = {}, loop.load_models
    monkeypatch.setattr(loop, "load_models", lambda *a, **k: seen.setdefault("m", real(*a, **k)))
    saved = dict(AcceleratorState._shared_state)
    AcceleratorState._shared_state.clear()  # this process's accelerate state was made for fp32 runs
    try:
        result = train(run_config(tmp_path, data, base="demo-sd3", adapter="sd35-ip", steps=2,
                                  mixed_precision="bf16", gradient_checkpointing=True))
    finally:
        AcceleratorState._shared_state.clear()
        AcceleratorState._shared_state.update(saved)
    assert seen["m"][0].unet.dtype == torch.bfloat16
    trained = _flat(result.adapter_path)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in trained.values())
    assert all(torch.isfinite(torch.tensor(result.losses)))

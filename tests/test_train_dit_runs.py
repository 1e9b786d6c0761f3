"""lookalike-train on FLUX.1/SD3.5 as users run it: from saved diffusers folders (the same losses as the demo
models they were saved from), validation images through the library's generation path, the DDPM-only
--timestep-bias and --noise-offset refused on flow-matching bases, and the flow-matching flags on UNet bases."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_helpers import run_config, single_thread, write_json_set

from lookalike import Personalizer
from lookalike.errors import LookalikeError
from lookalike.train_encoder import main
from lookalike.training.config import FlagError
from lookalike.training.dit import pretrained_components
from lookalike.training.loop import train
from lookalike.training.models import tiny_clip_vision, tiny_siglip_vision

from helpers import one_error

FOLDERS = [("flux", "demo-flux", "flux-ip"), ("sd3", "demo-sd3", "sd35-ip")]


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The demo's tiny FLUX.1-dev and SD3.5 pipelines (and their image encoders) saved as diffusers folders."""
    from lookalike.pipeline.tiny_dit import tiny_flux_pipeline, tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("bases")
    tiny_flux_pipeline(seed=0, guidance=True).save_pretrained(root / "flux")
    tiny_clip_vision().save_pretrained(root / "flux" / "image_encoder")
    tiny_sd3_pipeline(seed=0).save_pretrained(root / "sd3")
    tiny_siglip_vision().save_pretrained(root / "sd3" / "image_encoder")
    return root


def _argv(data, out, base, adapter, *more):
    return ["--base", str(base), "--adapter", adapter, "--data", str(data), "--output", str(out), "--steps", "2",
            "--batch-size", "2", "--num-workers", "0", "--num-validation", "0", "--checkpoint-every", "0",
            "--lr", "1e-2", *more]


@pytest.mark.parametrize("family,demo,adapter", FOLDERS)
def test_a_saved_folder_trains_as_the_demo_it_was_saved_from(tmp_path, saved, family, demo, adapter):
    """Every part (both or three text encoders and tokenizers, the shifted scheduler, the VAE's shift and scale,
    BASE/image_encoder) loads from its subfolder: the losses equal the in-code demo's, and the export loads."""
    data = write_json_set(tmp_path / "data", 4)
    assert main(_argv(data, tmp_path / "folder", saved / family, adapter, "--resolution", "32")) == 0
    demo_run = train(run_config(tmp_path, data, out="demo", base=demo, adapter=adapter, lr=1e-2))
    folder_run = train(run_config(tmp_path, data, out="again", base=str(saved / family), adapter=adapter, lr=1e-2,
                                  resolution=32))
    assert all(np.isfinite(folder_run.losses))
    torch.testing.assert_close(torch.tensor(folder_run.losses), torch.tensor(demo_run.losses), rtol=1e-5, atol=1e-6)
    p = Personalizer.from_pretrained(saved / family)
    p.load_adapter(str(tmp_path / "folder" / "adapter.safetensors"))
    assert p.adapters[0].spec.name == adapter


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_saved_folder_loads_in_the_run_dtype(saved, family):
    parts = pretrained_components(str(saved / family), family, True, torch.bfloat16)
    assert parts["unet"].dtype == torch.bfloat16
    assert [e.dtype for e in parts["text_encoders"]] == [torch.bfloat16] * (2 if family == "flux" else 3)
    assert len(parts["tokenizers"]) == len(parts["text_encoders"])
    fp32 = pretrained_components(str(saved / family), family, False)
    assert fp32["unet"].dtype == torch.float32 and "text_encoders" not in fp32


def test_a_folder_missing_a_part_is_one_error_line(tmp_path, saved, capsys):
    base = tmp_path / "flux"
    shutil.copytree(saved / "flux", base)
    shutil.rmtree(base / "text_encoder_2")
    data = write_json_set(tmp_path / "data", 2)
    assert main(_argv(data, tmp_path / "o", base, "flux-ip")) == 2
    assert one_error(capsys).startswith("error: cannot load text_encoder_2/ of the base model")
    with pytest.raises(LookalikeError, match="tokenizer_2/"):
        shutil.rmtree(base / "tokenizer_2")
        pretrained_components(str(base), "flux", False)


@pytest.mark.parametrize("which", ["demo-sd3", "folder"])
def test_timestep_bias_is_refused_on_flow_matching_bases(tmp_path, saved, capsys, which):
    data = write_json_set(tmp_path / "data", 2)
    base = saved / "flux" if which == "folder" else which
    adapter = "flux-ip" if which == "folder" else "sd35-ip"
    assert main(_argv(data, tmp_path / "o", base, adapter, "--timestep-bias", "later")) == 2
    line = one_error(capsys)
    assert line.startswith("error: --timestep-bias biases DDPM timesteps") and "--weighting-scheme" in line
    assert not (tmp_path / "o" / "adapter.safetensors").exists()
    with pytest.raises(LookalikeError, match="--timestep-bias"):  # the API refuses it too
        train(run_config(tmp_path, data, out="api", base="demo-flux", adapter="flux-ip", timestep_bias="earlier"))


@pytest.mark.parametrize("base,adapter", [("demo-flux", "flux-ip"), ("demo-sd3", "sd35-ip")])
def test_noise_offset_is_refused_on_flow_matching_bases(tmp_path, capsys, base, adapter):
    """diffusers' FLUX and SD3 scripts add no offset noise; on these bases the flag would change the objective."""
    data = write_json_set(tmp_path / "data", 2)
    assert main(_argv(data, tmp_path / "o", base, adapter, "--noise-offset", "0.05")) == 2
    assert one_error(capsys).startswith("error: --noise-offset shifts DDPM noise (SD1.5/SDXL)")
    assert not (tmp_path / "o" / "adapter.safetensors").exists()
    with pytest.raises(FlagError, match="--noise-offset"):
        train(run_config(tmp_path, data, out="api", base=base, adapter=adapter, noise_offset=0.05))


@pytest.mark.parametrize("flag,value", [("--weighting-scheme", "mode"), ("--logit-mean", -0.5), ("--logit-std", 2.0),
                                        ("--mode-scale", 1.0)])
def test_flow_matching_flags_are_refused_on_unet_bases(tmp_path, capsys, flag, value):
    """A DDPM UNet run never reads them: set, they would be silently ignored."""
    data = write_json_set(tmp_path / "data", 2)
    assert main(_argv(data, tmp_path / "o", "demo", "basic", flag, str(value))) == 2
    assert one_error(capsys).startswith(f"error: {flag} applies to FLUX.1/SD3.5 flow matching only")
    assert not (tmp_path / "o" / "adapter.safetensors").exists()
    with pytest.raises(FlagError, match=f"{flag} applies to FLUX.1/SD3.5"):
        train(run_config(tmp_path, data, out="api", **{flag[2:].replace("-", "_"): value}))


@pytest.mark.parametrize("base,adapter", [("demo", "basic"), ("demo-sd3", "sd35-ip")])
def test_guidance_is_refused_without_flux(tmp_path, capsys, base, adapter):
    data = write_json_set(tmp_path / "data", 2)
    assert main(_argv(data, tmp_path / "o", base, adapter, "--guidance", "3.5")) == 2
    assert one_error(capsys).startswith("error: --guidance sets FLUX.1-dev's guidance embedding")
    with pytest.raises(FlagError, match="--guidance"):
        train(run_config(tmp_path, data, out="api", base=base, adapter=adapter, guidance=3.5))


@pytest.mark.parametrize("base,adapter", [("demo-flux", "flux-ip"), ("demo-sd3", "sd35-ip")])
def test_dit_validation_writes_images_that_follow_the_adapter(tmp_path, base, adapter):
    """Held-out references above images generated by the Personalizer on the run's frozen transformer (which
    refuses NaN and blank images); the adapter moves between the steps, and so do the images (same seed and
    captions), while the references stay."""
    data = write_json_set(tmp_path / "data", 6)
    result = train(run_config(tmp_path, data, base=base, adapter=adapter, steps=2, lr=1e-2, num_validation=2,
                              validate_every=1, validation_steps=2))
    folder = result.adapter_path.parent / "validation"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000001.png", "step-000002.png"]
    assert set(result.val_losses) == {1, 2} and all(np.isfinite(list(result.val_losses.values())))
    grids = [Image.open(folder / f"step-00000{s}.png") for s in (1, 2)]
    for step, grid in enumerate(grids, 1):
        assert grid.size == (2 * 32, 2 * 32)  # two references over two generated images
        assert grid.text["step"] == str(step) and grid.text["adapter"] == adapter and grid.text["model"] == base
        assert json.loads(grid.text["references"]) == ["img4.png", "img5.png"]  # the last records, held back
    a, b = (np.asarray(g.convert("RGB")).astype(np.float32) for g in grids)
    assert np.array_equal(a[:32], b[:32])
    assert a[32:].std() > 1 and b[32:].std() > 1
    assert np.abs(a[32:] - b[32:]).max() > 2, "the adapter changed, so must the images"


def test_a_validation_that_generates_nan_is_one_warning_and_writes_no_image(tmp_path, caplog):
    """A diverged adapter: the held-out loss is still returned, the NaN images are refused (never saved black)
    and the run is not stopped by it."""
    from lookalike.training.loop import build_run, build_trainer, draw_settings, make_accelerator
    from lookalike.training.validation import make_validation_set, reference_images, validate

    data = write_json_set(tmp_path / "data", 6)
    cfg = run_config(tmp_path, data, base="demo-flux", adapter="flux-ip", num_validation=2, validate_every=1,
                     validation_steps=2)
    run = build_run(cfg, make_accelerator(cfg))
    trainer, *_ = build_trainer(run)
    vset = make_validation_set(run.val_source, cfg.seed, draw_settings(run), reference_images(run.val_records))
    log = logging.getLogger("lookalike.train")
    log.addHandler(caplog.handler)  # a CLI run in this process stops the logger propagating to pytest's handler
    try:
        with torch.no_grad():
            for p in trainer.adapter.parameters():
                p.fill_(float("nan"))
        loss = validate(run, trainer, vset, 3)
    finally:
        log.removeHandler(caplog.handler)
        trainer.handle.detach()
    assert np.isnan(loss)
    warned = sorted({r.getMessage() for r in caplog.records if r.levelno == logging.WARNING})  # one, maybe seen twice
    assert len(warned) == 1 and warned[0].startswith("step 3: no validation images written: the model produced NaN")
    assert not (tmp_path / "out" / "validation").exists()

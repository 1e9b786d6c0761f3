"""One command rebuilds the world from scratch: data -> CLIP -> VAE -> base UNet -> adapter -> judge -> evaluation.

    lookalike demo --rebuild DIR            # about 107 minutes on two CPU cores, seeded
    lookalike demo --rebuild DIR --quick    # every stage, tiny budgets (a few minutes; what CI runs)

Each stage writes its outputs under DIR and is skipped when they are already there, so an interrupted
rebuild continues where it stopped. The adapter stage runs lookalike's own ``train_encoder.py`` on the
saved pipeline, exactly as a user trains an adapter for SD1.5.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger("lookalike.world")


@dataclass(frozen=True)
class Budget:
    """How much of each stage a rebuild does."""

    bank: int = 30000  # pretraining scenes rendered once
    clip_steps: int = 400
    clip_identity_steps: int = 600  # the vision tower alone, against identity descriptions (text tower locked)
    vae_steps: int = 500
    base_steps: int = 2800
    base_batch: int = 32
    adapter_records: int = 12000
    adapter_steps: int = 2400
    adapter_batch: int = 32
    judge_steps: int = 600
    captions_per_subject: int = 4  # evaluation generations per held-out subject
    sampling_steps: int | None = None  # evaluation denoising steps; None: the CLI's default


FULL = Budget()
QUICK = Budget(bank=512, clip_steps=4, clip_identity_steps=4, vae_steps=4, base_steps=4, base_batch=8, adapter_records=64,
               adapter_steps=4, adapter_batch=8, judge_steps=4, captions_per_subject=1, sampling_steps=4)
STAGES = ("data", "clip", "vae", "base", "adapter", "judge", "model", "evaluate")


def _done(path: Path) -> bool:
    return (path / "DONE").is_file()


def _finish(path: Path, info: dict) -> None:
    (path / "DONE").write_text(json.dumps(info, indent=1, sort_keys=True))


def stage_data(out: Path, budget: Budget, seed: int) -> None:
    from .data import make_split, render_bank

    split = make_split(seed)
    bank = render_bank(split.train, budget.bank, seed + 10)
    bank.save(str(out / "bank.npz"))
    pools = [[i.name for i in pool] for pool in split.pools]
    (out / "split.json").write_text(json.dumps({"seed": seed, "pools": pools}, indent=1))


def _bank(root: Path):
    from .data import Bank

    return Bank.load(str(root / "data" / "bank.npz"))


def stage_clip(out: Path, root: Path, budget: Budget, seed: int) -> dict:
    from .models import split_clip
    from .pretrain import train_clip, tune_clip_vision

    bank = _bank(root)
    clip, losses = train_clip(bank, budget.clip_steps, seed + 20)
    tuned = tune_clip_vision(clip, bank, budget.clip_identity_steps, seed + 25)
    text, vision = split_clip(clip)
    text.save_pretrained(out / "text_encoder")
    vision.save_pretrained(out / "image_encoder")
    write_processor_config(out / "image_encoder", vision.config.image_size)
    return {"loss_first": losses[0], "loss_last": sum(losses[-20:]) / len(losses[-20:]),
            "identity_loss_first": tuned[0], "identity_loss_last": sum(tuned[-20:]) / len(tuned[-20:])}


def write_processor_config(folder: Path, size: int) -> None:
    """The CLIPImageProcessor settings of the encoder (resize and crop to its size, OpenAI statistics)."""
    from ..encoders.prepare import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    config = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
              "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_normalize": True,
              "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "resample": 3,
              "do_convert_rgb": True, "do_rescale": True, "rescale_factor": 1 / 255}
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=1))


def stage_vae(out: Path, root: Path, budget: Budget, seed: int) -> dict:
    from .pretrain import train_vae

    vae, losses = train_vae(_bank(root), budget.vae_steps, seed + 30)
    vae.save_pretrained(out)
    return {"mse_first": losses[0], "mse_last": sum(losses[-20:]) / len(losses[-20:]),
            "scaling_factor": vae.config.scaling_factor}


def stage_base(out: Path, root: Path, budget: Budget, seed: int) -> dict:
    """The text-to-image model, saved as a diffusers StableDiffusionPipeline folder (with the image encoder)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    from .models import assemble_pipeline
    from .pretrain import train_base

    vae = AutoencoderKL.from_pretrained(root / "vae").eval()
    text = CLIPTextModel.from_pretrained(root / "clip" / "text_encoder").eval()
    unet, losses = train_base(_bank(root), vae, text, budget.base_steps, seed + 40, batch=budget.base_batch)
    vision = CLIPVisionModelWithProjection.from_pretrained(root / "clip" / "image_encoder").eval()
    pipe = assemble_pipeline(unet, vae, text, vision)
    pipe.save_pretrained(out / "pipeline")
    write_processor_config(out / "pipeline" / "image_encoder", vision.config.image_size)
    return {"loss_first": losses[0], "loss_last": sum(losses[-50:]) / len(losses[-50:])}


#: The adapter variant the demo ships: basic (4 tokens from CLIP's image embedding). A first rebuild with plus
#: (Resampler over patch tokens, lr 3e-4, 1500 steps) barely moved its loss and carried little identity.
DEMO_ADAPTER = "basic"
#: Timesteps drawn for the adapter: the noisier half three times as often as the rest. The adapter decides shape
#: and colours at high noise; continuing the shipped adapter 400 steps this way gave identity 0.425 against 0.400
#: drawn uniformly (80 generations each: a hint, not a proof).
ADAPTER_TIMESTEPS = ["--timestep-bias", "later", "--timestep-bias-portion", "0.5", "--timestep-bias-multiplier", "3"]


def stage_adapter(out: Path, root: Path, budget: Budget, seed: int) -> dict:
    """The adapter, trained by lookalike's own ``train_encoder.py`` on the saved pipeline, as a user would."""
    from ..train_encoder import main as train_main
    from .data import make_split, write_pairs

    records = write_pairs(str(out / "data"), make_split(seed).train, budget.adapter_records, seed + 50)
    argv = ["--base", str(root / "base" / "pipeline"), "--adapter", DEMO_ADAPTER, "--data", records,
            "--output", str(out / "run"), "--cache", str(out / "cache"), "--resolution", "32",
            "--steps", str(budget.adapter_steps), "--batch-size", str(budget.adapter_batch), "--lr", "1e-3",
            "--lr-scheduler", "cosine", "--lr-warmup-steps", str(max(1, budget.adapter_steps // 25)),
            "--num-workers", "0", "--checkpoint-every", "0", "--num-validation", "0", "--seed", str(seed + 51),
            "--cpu", *ADAPTER_TIMESTEPS]
    log.info("lookalike-train %s", " ".join(argv))
    if train_main(argv) != 0:
        raise RuntimeError("train_encoder.py failed (see the error above)")
    return {"argv": argv}


def stage_judge(out: Path, root: Path, budget: Budget, seed: int) -> dict:
    """The judge (trained apart from everything the model uses), on degraded renders of every subject."""
    from diffusers import AutoencoderKL

    from .data import make_split
    from .judge import save_judge, train_judge
    from .render import all_identities

    vae = AutoencoderKL.from_pretrained(root / "vae").eval()
    judge, losses = train_judge(tuple(all_identities()), make_split(seed).held_out, vae, budget.judge_steps,
                                seed + 60)
    save_judge(judge, str(out / "judge.safetensors"))
    return {"loss_first": losses[0], "loss_last": sum(losses[-20:]) / len(losses[-20:])}


def stage_model(out: Path, root: Path) -> dict:
    """The shipped folder: the pipeline (with image encoder) and adapter in float16, and the judge."""
    import shutil

    from diffusers import StableDiffusionPipeline

    from ..compat import diffusers_dtype
    from ..weights.io import read_checkpoint, write_safetensors

    pipe = StableDiffusionPipeline.from_pretrained(root / "base" / "pipeline", **diffusers_dtype(torch.float32))
    pipe.to(torch.float16).save_pretrained(out)
    shutil.copy(root / "base" / "pipeline" / "image_encoder" / "preprocessor_config.json", out / "image_encoder")
    sd, metadata = read_checkpoint(root / "adapter" / "run" / "adapter.safetensors")
    write_safetensors({k: v.half() for k, v in sd.items()}, out / "adapter.safetensors", metadata)
    shutil.copy(root / "judge" / "judge.safetensors", out / "judge.safetensors")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"megabytes": round(size / 2**20, 2)}


def stage_evaluate(out: Path, root: Path, budget: Budget, seed: int) -> dict:
    """The evaluation table of the shipped folder (written beside it as evaluation.json / .txt)."""
    from .demo import evaluate_model

    result, table = evaluate_model(root / "model", per_subject=budget.captions_per_subject,
                                   steps=budget.sampling_steps, seed=seed)
    (root / "model" / "evaluation.json").write_text(json.dumps(result, indent=1))
    (root / "model" / "evaluation.txt").write_text(table + "\n")
    print(table)
    return {"identity_top1": result["adapter"]["identity_top1"], "background": result["adapter"]["background"]}


def run_stage(name: str, root: Path, fn: Callable[[Path], dict | None]) -> None:
    out = root / name
    if _done(out):
        log.info("stage %s: done already (%s)", name, out)
        return
    out.mkdir(parents=True, exist_ok=True)
    log.info("stage %s ...", name)
    start = time.perf_counter()
    info = fn(out) or {}
    info["seconds"] = round(time.perf_counter() - start, 1)
    _finish(out, info)
    log.info("stage %s: %s", name, json.dumps(info, sort_keys=True))


def rebuild(root: str | Path, quick: bool = False, seed: int = 0, only: tuple[str, ...] = STAGES) -> Path:
    """Run every stage (or ``only`` these) under ``root``; returns the folder of the trained model."""
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    budget = QUICK if quick else FULL
    config = {"seed": seed, "quick": quick, "budget": asdict(budget)}
    saved = root / "rebuild.json"
    same = ("seed", "quick")
    if saved.is_file() and any(json.loads(saved.read_text()).get(k) != config[k] for k in same):
        from ..errors import LookalikeError

        raise LookalikeError(f"{root} holds a rebuild with other settings ({saved}); use an empty folder")
    saved.write_text(json.dumps(config, indent=1))
    torch.manual_seed(seed)
    stages: dict[str, Callable[[Path], dict | None]] = {
        "data": lambda out: stage_data(out, budget, seed),
        "clip": lambda out: stage_clip(out, root, budget, seed),
        "vae": lambda out: stage_vae(out, root, budget, seed),
        "base": lambda out: stage_base(out, root, budget, seed),
        "adapter": lambda out: stage_adapter(out, root, budget, seed),
        "judge": lambda out: stage_judge(out, root, budget, seed),
        "model": lambda out: stage_model(out, root),
        "evaluate": lambda out: stage_evaluate(out, root, budget, seed),
    }
    for name in STAGES:
        if name in only and name in stages:
            run_stage(name, root, stages[name])
    return root / "model"


if __name__ == "__main__":
    import argparse

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", default=list(STAGES))
    a = ap.parse_args()
    rebuild(a.root, a.quick, only=tuple(a.only))

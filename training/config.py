"""Flags -> :class:`TrainConfig`: the one description of a training run (IP-Adapter recipe defaults)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..adapters.spec import DIT_BASES, REGISTRY
from ..errors import LookalikeError
from .data import TIMESTEP_BIASES
from .flow import WEIGHTING_SCHEMES

#: Projectors this trainer knows how to train (every projector of the registry).
TRAINABLE_PROJECTORS = ("linear", "resampler", "mlp", "faceid", "faceid_plus", "flux_mlp", "time_resampler")
#: ``--base`` presets built in code with random weights (no download).
DEMO_BASES = {"demo": "sd15", "demo-sdxl": "sdxl", "demo-flux": "flux", "demo-sd3": "sd3"}
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
PRECISIONS = ("no", "fp16", "bf16")
CACHE_DTYPES = ("float32", "float16", "bfloat16")
OPTIMIZERS = ("adamw", "adamw8bit")


def adapter_choices() -> list[str]:
    """Registry names and short names of every variant whose projector can be trained."""
    names = set()
    for spec in REGISTRY.values():
        if spec.projector in TRAINABLE_PROJECTORS:
            names.add(spec.name)
            if spec.short_name:
                names.add(spec.short_name)
    return sorted(names)


@dataclass
class TrainConfig:
    """Everything a run needs; the defaults are the IP-Adapter paper's recipe where it has one."""

    data: str
    output: str
    base: str = "demo"
    adapter: str = "basic"
    image_encoder: str | None = None
    train_lora: bool = False  # FaceID's rank-r LoRA on every UNet attention layer, beside the projector
    lora_rank: int = 128
    face_models: str | None = None  # insightface pack folder: embeds the faces of records without id_embed_file
    face_detector: str = "insightface"
    yunet_model: str | None = None
    data_root: str | None = None
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.01
    resolution: int | None = None  # None: 512 (sd15), 1024 (sdxl), 32 (demo)
    crop: str = "center"
    grad_accum: int = 1
    max_grad_norm: float = 0.0  # 0: no clipping (the official scripts clip nothing)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    ema_decay: float = 0.0  # 0: no EMA
    noise_offset: float = 0.0
    timestep_bias: str = "none"
    timestep_bias_portion: float = 0.25
    timestep_bias_multiplier: float = 1.0
    drop_image: float = 0.05
    drop_text: float = 0.05
    drop_both: float = 0.05
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    resume: str | None = None
    init_from: str | None = None
    seed: int = 0
    cache: str | None = None
    build_cache: bool = False
    cache_dtype: str = "float32"
    validate_every: int = 0
    num_validation: int = 4
    validation_steps: int = 30
    num_workers: int = 2
    cpu: bool = False
    weighting_scheme: str = "logit_normal"  # DiT flow matching: how u is drawn and the loss weighted
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance: float = 1.0  # FLUX guidance-distilled models: the fixed guidance embedding value while training

    def to_json(self) -> str:
        """The config as JSON (saved in every checkpoint)."""
        return json.dumps(asdict(self), sort_keys=True, indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class FlagError(LookalikeError):
    """A bad flag value; the CLI prints it as one ``error:`` line and exits 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`FlagError` instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise FlagError(message)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``lookalike-train`` command line."""
    d = TrainConfig(data="", output="")
    p = _Parser(prog="lookalike-train", description="Train an IP-Adapter-style adapter (projector and "
                "to_k_ip/to_v_ip, optionally FaceID's attention LoRA) on a frozen SD1.5 or SDXL model; one CPU to "
                "many GPUs through accelerate.")
    g = p.add_argument_group("model")
    g.add_argument("--base", default=d.base, help="hub id, local diffusers folder, 'demo' or 'demo-sdxl' "
                   "(tiny random models built in code)")
    g.add_argument("--image-encoder", help="CLIP image encoder hub id or folder (default: BASE/image_encoder "
                   "when present, else the variant's encoder from h94/IP-Adapter)")
    g.add_argument("--adapter", default=d.adapter, choices=adapter_choices(), metavar="VARIANT",
                   help="registry variant (full or short name): " + ", ".join(adapter_choices()))
    g.add_argument("--train-lora", action="store_true", help="also train a LoRA on every UNet attention layer "
                   "(to_q, to_k, to_v, to_out), as the official FaceID adapters do; exported in their key layout")
    g.add_argument("--lora-rank", type=_positive, default=d.lora_rank, help="rank of --train-lora (default: 128, "
                   "the official FaceID rank)")
    g.add_argument("--face-models", metavar="DIR", help="FaceID: an insightface model folder (e.g. "
                   "~/.insightface/models/buffalo_l); records without an id_embed_file get the embedding of the "
                   "largest face in their image (no face: the record is skipped and counted)")
    g.add_argument("--face-detector", default=d.face_detector, choices=("insightface", "yunet"),
                   help="with --face-models: insightface's detector (default) or OpenCV's YuNet")
    g.add_argument("--yunet-model", metavar="FILE", help="with --face-detector yunet: the YuNet .onnx file")
    g.add_argument("--init-from", help="start from this adapter checkpoint (weights only; fresh optimizer)")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="JSON/JSONL list of {image_file, text} (optional reference_file: "
                   "another photo of the subject for the image encoder, against copying the target), a folder of images "
                   "with .txt captions, or webdataset .tar shards (file, folder, glob or {000..009} pattern)")
    g.add_argument("--data-root", help="folder that image_file paths are relative to (default: the JSON's)")
    g.add_argument("--resolution", type=_positive, help="training size in pixels (default by base model)")
    g.add_argument("--crop", default=d.crop, choices=("center", "random"))
    g.add_argument("--num-workers", type=_non_negative, default=d.num_workers)
    g.add_argument("--cache", help="folder of precomputed VAE latents, image features and text embeddings; "
                   "built on first use")
    g.add_argument("--build-cache", action="store_true", help="build the --cache folder and stop")
    g.add_argument("--cache-dtype", default=d.cache_dtype, choices=CACHE_DTYPES)
    g = p.add_argument_group("optimisation")
    g.add_argument("--output", required=True, help="run folder: checkpoint-STEP/, adapter.safetensors")
    g.add_argument("--steps", type=_positive, default=d.steps, help="optimizer steps")
    g.add_argument("--batch-size", type=_positive, default=d.batch_size, help="samples per process per step")
    g.add_argument("--grad-accum", type=_positive, default=d.grad_accum, help="micro-batches per step")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=_non_negative_float, default=d.weight_decay)
    g.add_argument("--max-grad-norm", type=_non_negative_float, default=d.max_grad_norm, help="0: no clipping")
    g.add_argument("--lr-scheduler", default=d.lr_scheduler, choices=SCHEDULES)
    g.add_argument("--lr-warmup-steps", type=_non_negative, default=d.lr_warmup_steps)
    g.add_argument("--ema-decay", type=_rate, default=d.ema_decay, help="0: no EMA; e.g. 0.9999")
    g.add_argument("--noise-offset", type=_non_negative_float, default=d.noise_offset,
                   help="offset noise of DDPM runs (SD1.5/SDXL; refused on FLUX.1/SD3.5)")
    g.add_argument("--timestep-bias", default=d.timestep_bias, choices=TIMESTEP_BIASES,
                   help="draw the noisiest ('later') or cleanest ('earlier') timesteps more often (default: none)")
    g.add_argument("--timestep-bias-portion", type=_rate, default=d.timestep_bias_portion,
                   help="fraction of the schedule that is biased (default: 0.25)")
    g.add_argument("--timestep-bias-multiplier", type=_non_negative_float, default=d.timestep_bias_multiplier,
                   help="how many times more often the biased portion is drawn (default: 1, no bias; 0: never)")
    g.add_argument("--drop-image", type=_rate, default=d.drop_image, help="per-sample image drop rate")
    g.add_argument("--drop-text", type=_rate, default=d.drop_text, help="per-sample caption drop rate")
    g.add_argument("--drop-both", type=_rate, default=d.drop_both, help="per-sample drop of both")
    g.add_argument("--mixed-precision", default=d.mixed_precision, choices=PRECISIONS)
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute the frozen model's "
                   "activations in the backward pass instead of keeping them (less memory, about a third slower)")
    g.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS, help="adamw (default) or adamw8bit "
                   "(bitsandbytes' 8-bit AdamW: optimizer state in a quarter of the memory; needs bitsandbytes)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is present")
    g = p.add_argument_group("flow matching (FLUX.1, SD3.5)")
    g.add_argument("--weighting-scheme", default=d.weighting_scheme, choices=WEIGHTING_SCHEMES,
                   help="timestep density and loss weight, as diffusers' SD3/FLUX scripts (default: logit_normal)")
    g.add_argument("--logit-mean", type=float, default=d.logit_mean)
    g.add_argument("--logit-std", type=_non_negative_float, default=d.logit_std)
    g.add_argument("--mode-scale", type=float, default=d.mode_scale)
    g.add_argument("--guidance", type=_non_negative_float, default=d.guidance,
                   help="FLUX.1-dev's guidance embedding while training (default: 1)")
    g = p.add_argument_group("checkpoints and validation")
    g.add_argument("--checkpoint-every", type=_non_negative, default=d.checkpoint_every, help="0: only at the end")
    g.add_argument("--keep-checkpoints", type=_positive, default=d.keep_checkpoints, help="keep the last K")
    g.add_argument("--resume", help="'latest' (newest OUTPUT/checkpoint-STEP) or a checkpoint folder")
    g.add_argument("--validate-every", type=_non_negative, default=d.validate_every, help="0: no validation")
    g.add_argument("--num-validation", type=_non_negative, default=d.num_validation,
                   help="held-out references with --validate-every (taken from the end of the data, never "
                   "trained on; without validation every record trains)")
    g.add_argument("--validation-steps", type=_positive, default=d.validation_steps, help="denoising steps")
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Command line -> checked :class:`TrainConfig` (raises :class:`FlagError` with one sentence)."""
    ns = build_parser().parse_args(argv)
    config = TrainConfig.from_dict({k: v for k, v in vars(ns).items()})
    check_config(config)
    return config


def check_config(config: TrainConfig) -> None:
    """Refuse combinations that cannot work, with one sentence each."""
    if config.drop_image + config.drop_text + config.drop_both > 1.0:
        raise FlagError("--drop-image + --drop-text + --drop-both must not exceed 1")
    if config.timestep_bias != "none" and config.timestep_bias_portion == 0:
        raise FlagError("--timestep-bias needs --timestep-bias-portion above 0")
    if config.timestep_bias != "none" and config.timestep_bias_portion == 1 and config.timestep_bias_multiplier == 0:
        raise FlagError("--timestep-bias-multiplier 0 with portion 1 leaves no timestep to draw; raise either")
    if config.lr <= 0:
        raise FlagError(f"--lr must be positive, not {config.lr}")
    if config.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise FlagError("--optimizer adamw8bit needs bitsandbytes, which is not installed: pip install bitsandbytes "
                        "(CUDA machines), or use --optimizer adamw")
    if config.build_cache and not config.cache:
        raise FlagError("--build-cache needs --cache DIR to write to")
    if config.cache and config.crop == "random":
        raise FlagError("--cache stores centre crops; drop --crop random or --cache")
    if config.resume and config.resume != "latest" and not Path(config.resume).is_dir():
        raise FlagError(f"--resume {config.resume}: no such checkpoint folder; pass 'latest' or a "
                        f"checkpoint-STEP folder")
    if config.init_from and not Path(config.init_from).is_file():
        raise FlagError(f"--init-from {config.init_from}: no such file")
    if config.resume and config.init_from:
        raise FlagError("--resume and --init-from exclude each other: a resumed run has its own weights")
    if (config.yunet_model or config.face_detector != "insightface") and not config.face_models:
        raise FlagError("--face-detector and --yunet-model choose how --face-models embeds faces; add --face-models DIR")
    if config.face_detector == "yunet" and not config.yunet_model:
        raise FlagError("--face-detector yunet needs --yunet-model FILE (the YuNet .onnx file)")
    if config.yunet_model and not Path(config.yunet_model).expanduser().is_file():
        raise FlagError(f"--yunet-model {config.yunet_model}: no such file")
    if config.face_models and not Path(config.face_models).expanduser().is_dir():
        raise FlagError(f"--face-models {config.face_models}: no such folder")
    check_data_path(config.data)


#: Flags of flow matching (FLUX.1, SD3.5) alone, as diffusers' SD3/FLUX scripts: a DDPM UNet run never reads them.
FLOW_FLAGS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale")


def _set_flags(config: TrainConfig, names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` the user set to something other than :class:`TrainConfig`'s default, as flags."""
    default = {f.name: f.default for f in fields(TrainConfig)}
    return ["--" + n.replace("_", "-") for n in names if getattr(config, n) != default[n]]


def check_family(config: TrainConfig, family: str) -> None:
    """Refuse flags that mean nothing for this base family (known once the base is read)."""
    if family in DIT_BASES and config.timestep_bias != "none":
        raise FlagError(f"--timestep-bias biases DDPM timesteps (SD1.5/SDXL); this {family} base trains by flow "
                        f"matching, whose timesteps --weighting-scheme draws: logit_normal with --logit-mean below 0 "
                        f"favours the noisier end (as --timestep-bias later), above 0 the cleaner, or mode with "
                        f"--mode-scale; drop --timestep-bias")
    if family in DIT_BASES and config.noise_offset:
        raise FlagError(f"--noise-offset shifts DDPM noise (SD1.5/SDXL); this {family} base trains by flow matching, "
                        f"for which diffusers' FLUX and SD3 scripts use no noise offset; drop --noise-offset")
    flow = _set_flags(config, FLOW_FLAGS)
    if family not in DIT_BASES and flow:
        raise FlagError(f"{flow[0]} applies to FLUX.1/SD3.5 flow matching only; this {family} base trains by DDPM "
                        f"noise prediction (--timestep-bias chooses its timesteps); drop {' and '.join(flow)}")
    if family != "flux" and _set_flags(config, ("guidance",)):
        raise FlagError(f"--guidance sets FLUX.1-dev's guidance embedding; this {family} base has none; "
                        f"drop --guidance")


def check_data_path(data: str) -> None:
    """The data path must exist (a file, a folder, or a shard pattern that matches files)."""
    from .records import expand_shards

    if any(c in data for c in "*?{"):
        if not expand_shards(data):
            raise FlagError(f"--data {data}: the pattern matches no files")
        return
    if not Path(data).expanduser().exists():
        raise FlagError(f"--data {data}: no such file or folder")

"""``train(config)``: build models, build data, build the optimizer, loop, export — on accelerate.

One process or many (DDP, DeepSpeed ZeRO-2 through an accelerate config); the device and precision come
from accelerate and the flags, never from hard-coded names.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import Counter
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapters.spec import DIT_BASES, ENCODERS, AdapterSpec
from ..errors import LookalikeError
from ..fileio import FolderLock
from .cache import CacheSource, build_cache, cache_constants, read_manifest
from .checkpoint import (
    EMA,
    TrainState,
    check_resumable,
    ema_copy,
    export_adapter,
    load_checkpoint,
    remove_leftovers,
    resume_folder,
    save_checkpoint,
)
from .config import DEMO_BASES, TrainConfig, check_family
from .data import DrawSettings, ImageSource, SampleSource, SampleStream, make_loader, next_batch
from .dit import DitTrainer, build_dit_adapter, export_dit, fit_dit_spec
from .flow import FlowSettings
from .models import (
    Models,
    base_family,
    build_adapter,
    fit_spec,
    load_models,
    negative_features,
    place,
    resolve_spec,
    run_dtype,
)
from .progress import Progress, note_skips, sum_skips
from .records import Record, SkipSample, find_records
from .step import AdapterTrainer, Constants, constants_from_models, loss_of, model_inputs
from .validation import make_validation_set, reference_images, validate

log = logging.getLogger("lookalike.train")


@dataclass
class TrainResult:
    """What a run did: per-step losses (mean over processes), skip counts, the exported file."""

    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step
    cpu_seconds: list[float] = field(default_factory=list)  # this process's CPU time of each step
    skipped: dict[str, int] = field(default_factory=dict)
    val_losses: dict[int, float] = field(default_factory=dict)
    adapter_path: Path | None = None
    cache_only: bool = False


@dataclass
class Run:
    """The pieces of a run that the loop steps share."""

    config: TrainConfig
    accelerator: Any
    models: Models
    spec: AdapterSpec
    consts: Constants
    train_source: SampleSource
    val_source: SampleSource | None
    val_records: list[Record]
    resolution: int


def make_accelerator(config: TrainConfig) -> Any:
    """accelerate's Accelerator for this run (CPU when asked or when no accelerator device exists)."""
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available

    has_device = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    trackers = "tensorboard" if is_tensorboard_available() else None
    accelerator = Accelerator(cpu=config.cpu or not has_device, mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.grad_accum, log_with=trackers,
                              project_dir=config.output)
    if not accelerator.is_main_process:
        log.setLevel(logging.WARNING)
    return accelerator


def default_resolution(config: TrainConfig, family: str) -> int:
    if config.resolution:
        return config.resolution
    return 32 if config.base in DEMO_BASES else {"sd15": 512, "sdxl": 1024, "flux": 1024, "sd3": 1024}[family]


def split_records(records: list[Record], held_out: int) -> tuple[list[int], list[int]]:
    """Training and held-out record indices: the last ``held_out`` records are for validation only."""
    if held_out and len(records) <= 2 * held_out:
        log.warning("only %d records: none held out for validation (needs more than %d)", len(records), 2 * held_out)
        held_out = 0
    cut = len(records) - held_out
    return list(range(cut)), list(range(cut, len(records)))


def image_source(run_models: Models, records: list[Record], spec: AdapterSpec, resolution: int,
                 config: TrainConfig) -> ImageSource:
    enc = run_models.image_encoder
    extra = {} if enc is None else {"clip_size": enc.image_size, "clip_mean": enc.mean, "clip_std": enc.std}
    return ImageSource(records, resolution, spec.features, run_models.tokenizers, random_crop=config.crop == "random",
                       face_normed=spec.face_normed, faces=run_models.faces, **extra)


def _model_source(name: str, presets: Container[str]) -> str:
    """A local model folder as its absolute path (``./sd`` and ``/abs/sd`` are one model); a preset (which the
    loaders take before a folder of the same name) or a hub id as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if name not in presets and path.exists() else name


def fingerprint(config: TrainConfig, spec: AdapterSpec, resolution: int, records: int) -> dict[str, Any]:
    """What a cache depends on; a cache built with anything else is refused."""
    encoder = _model_source(config.image_encoder, ENCODERS) if config.image_encoder else "default"
    return {"base": _model_source(config.base, DEMO_BASES), "features": list(spec.features), "image_encoder": encoder,
            "resolution": resolution, "data": str(Path(config.data).expanduser().resolve()), "records": records,
            "dtype": config.cache_dtype, "face_normed": spec.face_normed, "face_models": _face_source(config)}


def _face_source(config: TrainConfig) -> str | None:
    """How missing face ids are embedded (a cache holds their results): the models and the detector."""
    if not config.face_models:
        return None
    yunet = f":{Path(config.yunet_model).expanduser().resolve()}" if config.yunet_model else ""
    return f"{Path(config.face_models).expanduser().resolve()} ({config.face_detector}{yunet})"


def build_run(config: TrainConfig, accelerator: Any, models: Models | None = None) -> Run | None:
    """Models (loaded, or the ones given), constants and data sources (building the cache when asked);
    None after ``--build-cache``."""
    family = base_family(config.base)
    check_family(config, family)
    spec = resolve_spec(config.adapter, family)
    records = find_records(config.data, config.data_root)
    resolution = default_resolution(config, family)
    train_idx, val_idx = split_records(records, config.num_validation if config.validate_every else 0)
    folder = Path(config.cache) if config.cache else None
    stamp = fingerprint(config, spec, resolution, len(records))
    manifest = read_manifest(folder, stamp) if folder else None
    if models is None:
        models, spec = load_models(config, spec.name, need_encoders=folder is None or manifest is None)
    dtype = run_dtype(config)
    place(models, accelerator.device, dtype)
    if folder is None or manifest is None:
        consts = constants_from_models(models, negative_features(models, spec))
    if folder is not None:
        if manifest is None:
            log.info("building the cache in %s (%d records)", folder, len(records))
            manifest = build_cache(accelerator, models, image_source(models, records, spec, resolution, config),
                                   consts, folder, stamp, config.batch_size, config.num_workers,
                                   getattr(torch, config.cache_dtype))
            if config.build_cache:
                return None
            models.vae, models.text_encoders, models.image_encoder = None, [], None  # the cache replaces them
            models.faces = None
            gc.collect()
        consts = cache_constants(folder, manifest)
        train_source: SampleSource = CacheSource.open(folder, manifest, train_idx)
        cached_val = CacheSource.open(folder, manifest, val_idx)
        val_source: SampleSource | None = cached_val if len(cached_val) else None
        val_idx = cached_val.indices  # held-out references the cache could read
    else:
        train_source = image_source(models, [records[i] for i in train_idx], spec, resolution, config)
        val_source = image_source(models, [records[i] for i in val_idx], spec, resolution, config) if val_idx else None
    consts.flow = flow_settings(config)
    consts.guidance = config.guidance
    return Run(config, accelerator, models, spec, consts, train_source, val_source, [records[i] for i in val_idx],
               resolution)


def _cached_latent_shape(source: SampleSource) -> tuple[int, ...]:
    """The latent shape of the first readable cached row."""
    for i in range(min(len(source), 64)):
        try:
            return tuple(source.load(i, torch.zeros(2))["latent_mean"].shape)
        except SkipSample:
            continue
    raise LookalikeError("the cache's first rows are unreadable (NaN or Inf); delete the cache and build it again")


def draw_settings(run: Run) -> DrawSettings:
    c = run.config
    if run.models.vae is not None:
        factor = 2 ** (len(run.models.vae.config.block_out_channels) - 1)
        shape = (run.models.vae.config.latent_channels, run.resolution // factor, run.resolution // factor)
    else:
        shape = _cached_latent_shape(run.train_source)
    return DrawSettings(shape, run.models.noise_scheduler.config.num_train_timesteps,  # type: ignore[arg-type]
                        c.drop_image, c.drop_text, c.drop_both, c.noise_offset, c.timestep_bias,
                        c.timestep_bias_portion, c.timestep_bias_multiplier,
                        flow_settings(c) if run.models.family in DIT_BASES else None)


def flow_settings(config: TrainConfig) -> FlowSettings:
    return FlowSettings(config.weighting_scheme, config.logit_mean, config.logit_std, config.mode_scale)


def build_trainer(run: Run) -> tuple[Any, Any, Any, AdapterSpec]:
    """The trainable adapter (sized to the models), AdamW and the learning-rate schedule."""
    from diffusers.optimization import get_scheduler

    c = run.config
    dims = {k: int(v.shape[-1]) for k, v in run.consts.negatives.items()}
    trainer: AdapterTrainer | DitTrainer
    if run.models.family in DIT_BASES:
        if c.train_lora:
            raise LookalikeError(f"--train-lora trains FaceID's UNet LoRA; {run.spec.name} has none, drop --train-lora")
        spec = fit_dit_spec(run.spec, dims, run.models.unet)
        adapter = build_dit_adapter(spec, run.models.unet, c.seed, c.init_from).to(run.accelerator.device)
        trainer = DitTrainer(adapter, run.models.unet, checkpointing=c.gradient_checkpointing)
    else:
        spec = fit_spec(run.spec, dims, run.models.unet.config.cross_attention_dim,
                        c.lora_rank if c.train_lora else 0)
        adapter = build_adapter(spec, run.models.unet, c.seed, c.init_from).to(run.accelerator.device)
        trainer = AdapterTrainer(adapter, run.models.unet, checkpointing=c.gradient_checkpointing)
    optimizer = make_optimizer(c, adapter.parameters())
    schedule = get_scheduler(c.lr_scheduler, optimizer, num_warmup_steps=c.lr_warmup_steps, num_training_steps=c.steps)
    n = sum(p.numel() for p in adapter.parameters())
    parts = "projector + to_k_ip/to_v_ip" + (f" + rank-{spec.lora_rank} attention LoRA" if spec.lora_rank else "")
    log.info("training %s: %.2fM parameters (%s); everything else frozen", spec.name, n / 1e6, parts)
    return trainer, optimizer, schedule, spec


def make_optimizer(config: TrainConfig, params: Any) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (``--optimizer adamw8bit``; checked installed by the flags)."""
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:  # installed but broken (e.g. no CUDA build)
            raise LookalikeError(f"--optimizer adamw8bit: bitsandbytes does not import ({exc}); use --optimizer "
                                 f"adamw") from exc
        return bnb.optim.AdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _micro_step(run: Run, trainer: Any, optimizer: Any, batch: dict[str, Any]) -> torch.Tensor:
    acc, c = run.accelerator, run.config
    with acc.accumulate(trainer):
        loss = loss_of(trainer, model_inputs(run.models, run.consts, batch, acc.device))
        acc.backward(loss)
        if acc.sync_gradients and c.max_grad_norm > 0:
            acc.clip_grad_norm_(trainer.parameters(), c.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def train(config: TrainConfig, models: Models | None = None) -> TrainResult:
    """Run the training the config describes; returns what it did. ``models``: frozen models built by the
    caller (e.g. full-size random ones in the benchmark) instead of loading ``config.base``. One run at a
    time per ``--output``: a second is refused while the first lives."""
    accelerator = make_accelerator(config)
    lock = FolderLock(config.output, "lookalike-train") if accelerator.is_main_process else None
    if lock is not None:
        lock.acquire()
        remove_leftovers(Path(config.output))
    try:
        return _train(config, accelerator, models)
    finally:
        if lock is not None:
            lock.release()


def _train(config: TrainConfig, accelerator: Any, models: Models | None) -> TrainResult:
    from accelerate.utils import set_seed

    set_seed(config.seed)
    run = build_run(config, accelerator, models)
    if run is None:
        log.info("cache built in %s; train with --cache %s", config.cache, config.cache)
        return TrainResult(steps=0, cache_only=True)
    trainer, optimizer, schedule, _ = build_trainer(run)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:  # no DataLoader goes through prepare(), so DeepSpeed learns the batch size here
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
    trainer, optimizer = accelerator.prepare(trainer, optimizer)
    state = TrainState()
    adapter = accelerator.unwrap_model(trainer).adapter
    ema = EMA(adapter.parameters(), config.ema_decay) if config.ema_decay else None
    folder = resume_folder(config)
    if folder is not None:
        check_resumable(folder, config)
        load_checkpoint(folder, accelerator, trainer, optimizer, schedule, state, ema)
        log.info("resumed from %s at step %d", folder, state.step)
    try:
        return _loop(run, trainer, optimizer, schedule, ema, state)
    finally:
        model = accelerator.unwrap_model(trainer)
        model.handle.detach()
        if model.checkpointing:
            run.models.unet.disable_gradient_checkpointing()
        accelerator.end_training()


def _step(run: Run, trainer: Any, optimizer: Any, loader: Any, state: TrainState, skips: Counter, seen: set) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; the loss averaged over them and all processes."""
    acc, c = run.accelerator, run.config
    losses = []
    for _ in range(c.grad_accum):
        batch = next_batch(loader)
        note_skips(batch.pop("skipped"), skips, seen)
        losses.append(_micro_step(run, trainer, optimizer, batch))
        state.consumed += c.batch_size * acc.num_processes
    state.step += 1
    return float(acc.reduce(torch.stack(losses).mean(), reduction="mean"))


def _loop(run: Run, trainer: Any, optimizer: Any, schedule: Any, ema: EMA | None,
          state: TrainState) -> TrainResult:
    """The optimisation loop: steps, progress, checkpoints, validation, then the export."""
    acc, c = run.accelerator, run.config
    settings = draw_settings(run)
    vset = None
    if acc.is_main_process and run.val_source is not None and c.validate_every:
        vset = make_validation_set(run.val_source, c.seed, settings, reference_images(run.val_records))
    if acc.is_main_process:
        acc.init_trackers("lookalike-train", config={k: v for k, v in vars(c).items() if v is not None})
    stream = SampleStream(run.train_source, c.seed, settings)
    loader = iter(make_loader(stream, state.consumed, c.batch_size, acc.process_index, acc.num_processes,
                              c.num_workers))
    adapter = acc.unwrap_model(trainer).adapter
    info = {"base": c.base, "data": c.data, "seed": c.seed, "variant": run.spec.name}
    result, skips, seen, progress = TrainResult(steps=state.step), Counter(), set(), Progress(acc, c, state)
    try:
        while state.step < c.steps:
            began, began_cpu = time.perf_counter(), time.process_time()
            loss = _step(run, trainer, optimizer, loader, state, skips, seen)
            schedule.step()
            if ema is not None:
                ema.update(adapter.parameters())
            result.losses.append(loss)
            result.seconds.append(time.perf_counter() - began)
            result.cpu_seconds.append(time.process_time() - began_cpu)
            progress.update(state, loss, schedule.get_last_lr()[0], sum(state.skipped.values()) + sum(skips.values()))
            last = state.step == c.steps
            if last or (c.checkpoint_every and state.step % c.checkpoint_every == 0):
                sum_skips(acc, state, skips)
                save_checkpoint(acc, c, state, trainer, optimizer, schedule, ema, info)
            if vset is not None and (last or state.step % c.validate_every == 0):
                result.val_losses[state.step] = validate(run, trainer, vset, state.step)
    finally:
        progress.bar.close()  # ends its line, so an error prints on a line of its own
    return _finish(run, adapter, ema, state, result, info)


def _finish(run: Run, adapter: Any, ema: EMA | None, state: TrainState, result: TrainResult,
            info: dict[str, Any]) -> TrainResult:
    acc, c = run.accelerator, run.config
    acc.wait_for_everyone()
    result.steps, result.skipped = state.step, dict(state.skipped)
    path = Path(c.output) / "adapter.safetensors"
    if acc.is_main_process:
        if run.models.family in DIT_BASES:
            export_dit(ema_copy(adapter, ema), path, {**info, "step": state.step})
        else:
            export_adapter(adapter, ema, path, {**info, "step": state.step})
        if state.skipped:
            detail = ", ".join(f"{k} {v}" for k, v in sorted(state.skipped.items()))
            log.warning("skipped %d samples in all (%s)", sum(state.skipped.values()), detail)
        log.info("adapter written to %s", path)
    result.adapter_path = path
    return result

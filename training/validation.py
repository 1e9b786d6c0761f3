"""Validation on held-out references: a loss at fixed noise and timesteps, and generated images.

The loss uses the same draws at every validation, so its curve compares weights, not luck. Images are
generated as users generate them: lookalike's Personalizer over a diffusers pipeline of the run's own frozen
models (UNet, or FLUX/SD3.5 transformer), the adapter conditioning it through the trainer's handle.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .. import __version__
from ..errors import LookalikeError
from .config import DEMO_BASES, TrainConfig
from .data import DrawSettings, SampleSource, collate, draw
from .models import Models, move, run_dtype
from .records import Record, SkipSample, read_image
from .step import AdapterTrainer, Constants, loss_of, model_inputs

log = logging.getLogger("lookalike.train")
VALIDATION_SLOT = 1 << 40  # draws far away from any training slot


@dataclass
class ValidationSet:
    """Held-out samples with fixed draws (no drops), and their reference images for the grid."""

    batch: dict[str, Any]
    references: list[Image.Image | None]
    keys: list[str] = field(default_factory=list)  # the held-out records' keys (in the grid's PNG text)


def make_validation_set(source: SampleSource, seed: int, settings: DrawSettings,
                        images: list[Image.Image | None]) -> ValidationSet | None:
    """Load every readable held-out sample of ``source`` once; None when there is none."""
    fixed = replace(settings, drop_image=0.0, drop_text=0.0, drop_both=0.0)
    samples, refs, keys = [], [], []
    for i in range(len(source)):
        sample = draw(seed, VALIDATION_SLOT + i, fixed)
        try:
            sample.update(source.load(i, sample["crop_u"]))
        except SkipSample as skip:
            log.warning("validation reference %s skipped: %s", source.key(i), skip)
            continue
        sample.update(skipped=[], slot=VALIDATION_SLOT + i)
        samples.append(sample)
        refs.append(images[i] if i < len(images) else None)
        keys.append(source.key(i))
    return ValidationSet(collate(samples), refs, keys) if samples else None


@torch.no_grad()
def validation_loss(trainer: torch.nn.Module, models: Models, consts: Constants, vset: ValidationSet,
                    device: torch.device) -> float:
    """The held-out loss at the set's fixed draws."""
    return float(loss_of(trainer, model_inputs(models, consts, vset.batch, device)))


#: Classifier-free guidance of validation images: the UNet recipe's 7.5, FLUX.1-dev's distilled guidance value and
#: diffusers' SD3 pipeline default.
GUIDANCE = {"sd15": 7.5, "sdxl": 7.5, "flux": 3.5, "sd3": 7.0}


def _pipeline(models: Models, vae: torch.nn.Module) -> Any:
    """A diffusers pipeline over the run's frozen denoiser and VAE (no text encoders: prompts come encoded), with
    a fresh inference scheduler (the training one keeps its training schedule)."""
    import diffusers as d

    sd3 = models.family == "sd3"
    if models.family in ("flux", "sd3"):
        scheduler = d.FlowMatchEulerDiscreteScheduler.from_config(models.noise_scheduler.config)
        cls = d.StableDiffusion3Pipeline if sd3 else d.FluxPipeline
        texts = ("", "_2", "_3") if sd3 else ("", "_2")
        return cls(transformer=models.unet, scheduler=scheduler, vae=vae,
                   **{f"{kind}{n}": None for n in texts for kind in ("text_encoder", "tokenizer")})
    scheduler = d.DDIMScheduler.from_config(models.noise_scheduler.config)
    if models.family == "sdxl":
        return d.StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                           tokenizer_2=None, unet=models.unet, scheduler=scheduler)
    return d.StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=models.unet, scheduler=scheduler,
                                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _prompt_kwargs(family: str, consts: Constants, inputs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The held-out captions' encodings (and the empty caption's, for guidance) as pipeline keywords."""
    context = inputs["context"]
    n, device = context.shape[0], context.device
    kwargs: dict[str, Any] = {"prompt_embeds": context.to(dtype)}
    pooled = inputs["added"].get("pooled" if family in ("flux", "sd3") else "text_embeds") if inputs["added"] else None
    if pooled is not None:
        kwargs["pooled_prompt_embeds"] = pooled.to(dtype)
    if family != "flux":  # FLUX.1's guidance is distilled into the model: one call per step, no negative prompt
        kwargs["negative_prompt_embeds"] = consts.empty_context.to(device, dtype).expand_as(context)
        if pooled is not None:
            kwargs["negative_pooled_prompt_embeds"] = consts.empty_pooled.to(device, dtype).expand(n, -1)
    return kwargs


@torch.no_grad()
def validation_images(trainer: AdapterTrainer, models: Models, consts: Constants, vset: ValidationSet,
                      vae: torch.nn.Module, steps: int, resolution: int, seed: int) -> list[Image.Image]:
    """One image per held-out reference, from its caption and its image (image scale 1, :data:`GUIDANCE`),
    generated as users generate: a :class:`~lookalike.pipeline.personalizer.Personalizer` over the run's frozen
    models, conditioned through the trainer's own handle (so on the adapter's current weights)."""
    from ..pipeline.personalizer import Personalizer

    device = models.unet.device
    inputs = model_inputs(models, consts, vset.batch, device)
    features = inputs["features"]
    negatives = {k: consts.negatives[k].to(device).expand(v.shape[0], *consts.negatives[k].shape[1:])
                 for k, v in features.items()}
    pipe = _pipeline(models, vae)
    pipe.set_progress_bar_config(disable=True)
    scheduler = trainer.handle.scheduler
    try:
        return Personalizer(pipe, handle=trainer.handle).generate(
            image_embeds=[features], negative_image_embeds=[negatives], scale=1.0, num_inference_steps=steps,
            guidance_scale=GUIDANCE[models.family], height=resolution, width=resolution,
            generator=torch.Generator(device="cpu").manual_seed(seed), output_type="pil",
            **_prompt_kwargs(models.family, consts, inputs, models.unet.dtype)).images
    finally:
        trainer.handle.scheduler = scheduler


def save_grid(references: list[Image.Image | None], generated: list[Image.Image], path: Path,
              text: dict[str, str] | None = None) -> Path:
    """References (top row, when known) above the generated images, written atomically with ``text`` as PNG
    text chunks."""
    from ..pipeline.output import save_png

    size = generated[0].size[0]
    rows = 2 if any(r is not None for r in references) else 1
    grid = Image.new("RGB", (size * len(generated), size * rows), "white")
    for i, image in enumerate(generated):
        grid.paste(image, (i * size, (rows - 1) * size))
        if rows == 2 and references[i] is not None:
            grid.paste(references[i].resize((size, size)), (i * size, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_png(grid, path, text or {})


def load_vae(config: TrainConfig, family: str) -> torch.nn.Module:
    """The VAE alone (validation images when the cache replaced it)."""
    from diffusers import AutoencoderKL

    if config.base in DEMO_BASES:
        from ..pipeline.tiny import tiny_vae
        from .dit import demo_components

        vae = demo_components(family)["vae"] if family in ("flux", "sd3") else tiny_vae(0)
    else:
        vae = AutoencoderKL.from_pretrained(config.base, subfolder="vae")
    return vae.eval().requires_grad_(False)


def reference_images(records: list[Record]) -> list[Image.Image | None]:
    """The held-out records' images for the grid's top row (None where unreadable)."""
    images: list[Image.Image | None] = []
    for r in records:
        try:
            images.append(read_image(r.image))
        except SkipSample:
            images.append(None)
    return images


def validate(run: Any, trainer: Any, vset: ValidationSet, step: int) -> float:
    """Held-out loss and images at ``step`` (main process): ``OUTPUT/validation/step-STEP.png``, references above
    the images, the settings in its PNG text. A generation that fails its checks (NaN, blank) is a warning: the
    run goes on, nothing is written for that step. Returns the loss."""
    acc, c = run.accelerator, run.config
    model = acc.unwrap_model(trainer)
    with acc.autocast():
        loss = validation_loss(model, run.models, run.consts, vset, acc.device)
        acc.log({"val_loss": loss}, step=step)
        log.info("step %d: held-out loss %.5f", step, loss)
        if run.models.vae is None:
            run.models.vae = move(load_vae(c, run.models.family), acc.device, run_dtype(c))
        try:
            images = validation_images(model, run.models, run.consts, vset, run.models.vae, c.validation_steps,
                                       run.resolution, c.seed)
        except LookalikeError as exc:
            log.warning("step %d: no validation images written: %s", step, exc)
            return loss
    text = {"step": str(step), "seed": str(c.seed), "steps": str(c.validation_steps),
            "guidance": repr(GUIDANCE[run.models.family]), "scale": "1.0", "model": c.base,
            "adapter": run.spec.name, "references": json.dumps(vset.keys), "Software": f"lookalike {__version__}"}
    save_grid(vset.references, images, Path(c.output) / "validation" / f"step-{step:06d}.png", text)
    return loss

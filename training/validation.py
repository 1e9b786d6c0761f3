"""Validation on held-out references: a loss at fixed noise and timesteps, and generated images.

The loss uses the same draws at every validation, so its curve compares weights, not luck. Images are
generated with a diffusers pipeline over the run's own UNet, the adapter conditioning it through its handle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..adapters.attach import AdapterInput
from .data import DrawSettings, SampleSource, collate, draw
from .models import Models
from .records import SkipSample
from .step import AdapterTrainer, Constants, loss_of, model_inputs

log = logging.getLogger("lookalike.train")
VALIDATION_SLOT = 1 << 40  # draws far away from any training slot


@dataclass
class ValidationSet:
    """Held-out samples with fixed draws (no drops), and their reference images for the grid."""

    batch: dict[str, Any]
    references: list[Image.Image | None]


def make_validation_set(source: SampleSource, seed: int, settings: DrawSettings,
                        images: list[Image.Image | None]) -> ValidationSet | None:
    """Load every readable held-out sample of ``source`` once; None when there is none."""
    fixed = replace(settings, drop_image=0.0, drop_text=0.0, drop_both=0.0)
    samples, refs = [], []
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
    return ValidationSet(collate(samples), refs) if samples else None


@torch.no_grad()
def validation_loss(trainer: torch.nn.Module, models: Models, consts: Constants, vset: ValidationSet,
                    device: torch.device) -> float:
    """The held-out loss at the set's fixed draws."""
    return float(loss_of(trainer, model_inputs(models, consts, vset.batch, device)))


def _pipeline(models: Models, vae: torch.nn.Module) -> Any:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDIMScheduler.from_config(models.noise_scheduler.config)
    if models.family == "sdxl":
        return StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=models.unet, scheduler=scheduler)
    return StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=models.unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@torch.no_grad()
def validation_images(trainer: AdapterTrainer, models: Models, consts: Constants, vset: ValidationSet,
                      vae: torch.nn.Module, steps: int, resolution: int, seed: int) -> list[Image.Image]:
    """One image per held-out reference, from its caption and its image (guidance 7.5, image scale 1)."""
    device = models.unet.device
    inputs = model_inputs(models, consts, vset.batch, device)
    n = inputs["context"].shape[0]
    negatives = {k: consts.negatives[k].to(device).expand(n, *consts.negatives[k].shape[1:])
                 for k in inputs["features"]}
    tokens = trainer.adapter.project({k: v.unsqueeze(1) for k, v in inputs["features"].items()})  # (n, 1, T, C)
    negative = trainer.adapter.project({k: v.unsqueeze(1) for k, v in negatives.items()})
    dtype = models.unet.dtype
    kwargs: dict[str, Any] = {
        "prompt_embeds": inputs["context"].to(dtype),
        "negative_prompt_embeds": consts.empty_context.to(device, dtype).expand_as(inputs["context"]),
    }
    if models.family == "sdxl":
        kwargs["pooled_prompt_embeds"] = inputs["added"]["text_embeds"].to(dtype)
        kwargs["negative_pooled_prompt_embeds"] = consts.empty_pooled.to(device, dtype).expand(n, -1)
    pipe = _pipeline(models, vae)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with trainer.handle.conditioned([AdapterInput(tokens, negative=negative)]):
        return pipe(num_inference_steps=steps, guidance_scale=7.5, height=resolution, width=resolution,
                    generator=generator, output_type="pil", **kwargs).images


def save_grid(references: list[Image.Image | None], generated: list[Image.Image], path: Path) -> Path:
    """References (top row, when known) above the generated images."""
    size = generated[0].size[0]
    rows = 2 if any(r is not None for r in references) else 1
    grid = Image.new("RGB", (size * len(generated), size * rows), "white")
    for i, image in enumerate(generated):
        grid.paste(image, (i * size, (rows - 1) * size))
        if rows == 2 and references[i] is not None:
            grid.paste(references[i].resize((size, size)), (i * size, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path

"""One training step's maths: frozen encoders (or the cache) -> noisy latents -> adapter + UNet -> MSE.

The loss is the diffusion objective of IP-Adapter (Ye et al. 2023, eq. 6): MSE between the UNet's output
and the scheduler's target (the noise for epsilon models, the velocity for v-prediction models).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.attach import AdapterInput, attach_adapters
from ..adapters.module import IPAdapter
from ..adapters.spec import DIT_BASES
from .dit import dit_inputs
from .flow import FlowSettings, flow_loss
from .models import Models, encode_clip, encode_latent_dist, encode_text


class AdapterTrainer(nn.Module):
    """The trainable adapter driving a frozen UNet. Only the adapter is a submodule, so DDP syncs, and
    checkpoints hold, the adapter alone; the UNet is attached to it through lookalike's own processor."""

    def __init__(self, adapter: IPAdapter, unet: nn.Module, checkpointing: bool = False) -> None:
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "unet", unet)  # frozen, deliberately not registered
        self.handle = attach_adapters(unet, [adapter])
        self.checkpointing = checkpointing
        if checkpointing:  # the frozen blocks' activations are recomputed in the backward pass, not kept
            unet.enable_gradient_checkpointing(self.handle.checkpoint_function())

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                features: dict[str, torch.Tensor], added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        tokens = self.adapter.project({k: v.unsqueeze(1) for k, v in features.items()})  # (B, 1, T, C)
        dtype = self.unet.dtype
        with self.handle.conditioned([AdapterInput(tokens)]):
            return self.unet(noisy.to(dtype), timesteps, context.to(dtype), added_cond_kwargs=added).sample


@dataclass
class Constants:
    """Per-run tensors every step needs: the unconditional caption and image features, the latent scale."""

    scaling_factor: float
    empty_context: torch.Tensor  # (1, L, C)
    empty_pooled: torch.Tensor | None  # (1, P), SDXL
    negatives: dict[str, torch.Tensor]  # per feature (1, ...)
    shift_factor: float = 0.0  # FLUX/SD3 VAEs: latents are (z - shift) * scale
    flow: FlowSettings = field(default_factory=FlowSettings)  # DiT timestep draws and loss weights
    guidance: float = 1.0  # FLUX.1-dev's guidance embedding while training


def constants_from_models(models: Models, negatives: dict[str, torch.Tensor]) -> Constants:
    """Encode the empty caption once (the text drop's input)."""
    from .data import tokenize

    ids = [t.unsqueeze(0) for t in tokenize(models.tokenizers, "")]
    context, pooled = encode_text(models, ids)
    return Constants(float(models.vae.config.scaling_factor), context.float().cpu(),
                     None if pooled is None else pooled.float().cpu(), negatives,
                     float(getattr(models.vae.config, "shift_factor", None) or 0.0))


def _where(flags: torch.Tensor, if_true: torch.Tensor, if_false: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (if_false.ndim - 1)
    return torch.where(flags.view(shape), if_true.to(if_false), if_false)


def model_inputs(models: Models, consts: Constants, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch (pixels and tokens, or cached rows) -> the UNet inputs and the loss target, on ``device``."""
    b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    if "latent_mean" in b:
        mean, std = b["latent_mean"].float(), b["latent_std"].float()
    else:
        mean, std = (t.float() for t in encode_latent_dist(models.vae, b["pixels"]))
    latents = (mean + std * b["latent_eps"] - consts.shift_factor) * consts.scaling_factor  # (B, C, h, w)
    if "context" in b:
        context, pooled = b["context"].float(), b.get("pooled_text")
    else:
        context, pooled = encode_text(models, b["input_ids"])
    context = _where(b["drop_text"], consts.empty_context.to(device), context.float())
    if pooled is not None:
        pooled = _where(b["drop_text"], consts.empty_pooled.to(device), pooled.float())
    features = {k: b[k].float() for k in consts.negatives if k in b}
    if "clip_pixels" in b:
        features.update({k: v.float() for k, v in encode_clip(models.image_encoder, b["clip_pixels"]).items()})
    features = {k: _where(b["drop_image"], consts.negatives[k].to(device), v) for k, v in features.items()}
    if models.family in DIT_BASES:
        return dit_inputs(models.family, models.unet, models.noise_scheduler, latents, context, pooled, features,
                          b["noise"], b["timestep"], consts.flow, consts.guidance)
    noise, timesteps = b["noise"], b["timestep"].long()
    noisy = models.noise_scheduler.add_noise(latents, noise, timesteps)
    if models.noise_scheduler.config.prediction_type == "v_prediction":
        target = models.noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    added = None if pooled is None else {"text_embeds": pooled, "time_ids": b["time_ids"].float()}
    return {"noisy": noisy, "timesteps": timesteps, "context": context, "features": features, "added": added,
            "target": target}


def loss_of(trainer: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """MSE between the model's prediction and the target (fp32); flow matching weights it per sample."""
    pred = trainer(inputs["noisy"], inputs["timesteps"], inputs["context"], inputs["features"], inputs["added"])
    if "weighting" in inputs:
        return flow_loss(pred, inputs["target"], inputs["weighting"])
    return F.mse_loss(pred.float(), inputs["target"].float(), reduction="mean")

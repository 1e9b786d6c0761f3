"""Flow matching for DiT adapters (FLUX.1, SD3.5): timestep draws, noisy latents, velocity target, loss weights.

Rectified flow (Esser et al. 2024, SD3): ``x_t = (1 - sigma) x0 + sigma * noise`` and the model predicts the
velocity ``noise - x0``. Timesteps are drawn as in diffusers' SD3/FLUX training scripts: ``u`` from
``training_utils.compute_density_for_timestep_sampling`` (uniform, logit-normal or mode), mapped to the
scheduler's shifted sigmas by index; the loss is weighted by ``compute_loss_weighting_for_sd3``. Each sample
draws its ``u`` from its own slot generator, so a batch does not depend on how samples are spread over processes.
FLUX's transformer takes latents packed into 2x2 patches with per-patch position ids (diffusers' own helpers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: ``--weighting-scheme`` values of diffusers' SD3/FLUX scripts (the first three choose ``u``, the rest weight the loss).
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


@dataclass(frozen=True)
class FlowSettings:
    """How timesteps are drawn and the loss weighted (diffusers' script defaults)."""

    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29


def draw_u(settings: FlowSettings, generator: torch.Generator) -> torch.Tensor:
    """One sample's position in the schedule, ``u`` in [0, 1) (a 0-d tensor; 0 is the noisiest end, as diffusers'
    scripts index the descending training schedule), from its own generator."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(settings.weighting_scheme, 1, settings.logit_mean, settings.logit_std,
                                              settings.mode_scale, generator=generator)
    return u[0]


def flow_inputs(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, u: torch.Tensor,
                settings: FlowSettings) -> dict[str, torch.Tensor]:
    """Latents (B, ...), noise like them and ``u`` (B,) -> the noisy latents, the model's timesteps (B,), the
    sigmas, the velocity target ``noise - x0`` and per-sample loss weights (B,), on the scheduler's shifted
    training schedule (``FlowMatchEulerDiscreteScheduler`` as loaded, before ``set_timesteps``)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    n = int(scheduler.config.num_train_timesteps)
    index = (u.float() * n).long().clamp(0, n - 1).cpu()
    timesteps = scheduler.timesteps[index].to(latents.device)  # (B,), in [0, n)
    sigmas = scheduler.sigmas[index].to(latents.device, torch.float32)  # (B,)
    sigma = sigmas.view((-1,) + (1,) * (latents.ndim - 1))
    noisy = (1.0 - sigma) * latents.float() + sigma * noise.float()
    weighting = compute_loss_weighting_for_sd3(settings.weighting_scheme, sigmas)
    return {"noisy": noisy, "timesteps": timesteps, "sigmas": sigmas, "target": noise.float() - latents.float(),
            "weighting": weighting}


def flow_loss(pred: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor) -> torch.Tensor:
    """The weighted MSE of diffusers' SD3/FLUX scripts: per-sample mean of ``w (pred - target)^2``, then the batch
    mean (fp32)."""
    err = (pred.float() - target.float()) ** 2
    per_sample = (weighting.view((-1,) + (1,) * (err.ndim - 1)) * err).reshape(err.shape[0], -1).mean(1)
    return per_sample.mean()


def pack_flux(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX latents (B, C, h, w) -> packed 2x2 patches (B, h/2 * w/2, 4C) and their position ids (h/2 * w/2, 3),
    with diffusers' ``FluxPipeline`` helpers (what its transformer was trained on)."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    packed = FluxPipeline._pack_latents(latents, b, c, h, w)
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    return packed, ids

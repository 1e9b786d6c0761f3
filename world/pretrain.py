"""Pretraining the world's frozen parts the way their real counterparts are pretrained: CLIP contrastively on
image-caption pairs, the VAE on reconstruction, the UNet on captioned scenes (v-prediction, min-SNR)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..encoders.prepare import to_clip_pixels
from .data import Bank, to_unit
from .models import clip_model, vae_model
from .render import clip_caption
from .tokenizer import world_tokenizer


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero (multiplier of the base rate)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def descend(opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float, clip: list | None = None) -> None:
    """One optimizer step at learning rate ``lr`` (gradients of ``clip`` clipped to norm 1 when given)."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()


def _loop(total: int, step_fn: Callable[[int], float], desc: str) -> list[float]:
    losses = []
    bar = tqdm(range(total), desc=desc, dynamic_ncols=True, mininterval=2.0)
    for step in bar:
        losses.append(step_fn(step))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return losses


def train_clip(bank: Bank, steps: int, seed: int, batch: int = 128, lr: float = 5e-4) -> tuple[object, list[float]]:
    """Contrastive image-caption pretraining on the bank's scenes (captions name identity and scene)."""
    model = clip_model(seed).train()
    tok = world_tokenizer()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    rng = np.random.default_rng(seed + 1)

    def step_fn(step: int) -> float:
        rows = rng.integers(len(bank), size=batch)
        images = bank.images[rows]
        text = tok([clip_caption(bank.identities[r], bank.scenes[r]) for r in rows], padding="max_length",
                   max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        out = model(input_ids=text.input_ids, attention_mask=text.attention_mask,
                    pixel_values=to_clip_pixels([Image.fromarray(x) for x in images], images.shape[1]),
                    return_loss=True)
        descend(opt, out.loss, lr * cosine_lr(step, steps, max(1, steps // 20)))
        return float(out.loss.detach())

    losses = _loop(steps, step_fn, "world: CLIP")
    return model.eval().requires_grad_(False), losses


def tune_clip_vision(model: object, bank: Bank, steps: int, seed: int, batch: int = 128,
                     lr: float = 3e-4) -> list[float]:
    """Continue the vision tower alone, contrastively against identity descriptions, the text tower locked.

    Joint pretraining pairs each render with its whole caption (identity and scene), and its random batches
    rarely hold two subjects that differ only in shape; here every batch holds distinct identities (many of
    them sharing colours) and the text side names only the identity, so the image embedding learns what the
    adapter needs to carry. The text tower (which the base model is trained on) is not changed.
    """
    tok = world_tokenizer()
    rows_by_identity: dict = {}
    for r, i in enumerate(bank.identities):
        rows_by_identity.setdefault(i, []).append(r)
    identities = sorted(rows_by_identity, key=lambda i: i.name)
    rows_of = [rows_by_identity[i] for i in identities]
    model.eval()
    with torch.no_grad():
        text = tok([i.description() for i in identities], padding="max_length", max_length=tok.model_max_length,
                   truncation=True, return_tensors="pt")
        pooled = model.text_model(input_ids=text.input_ids, attention_mask=text.attention_mask).pooler_output
        text_embeds = F.normalize(model.text_projection(pooled), dim=-1)
    params = [*model.vision_model.parameters(), *model.visual_projection.parameters(), model.logit_scale]
    for p in params:
        p.requires_grad_(True)
    model.vision_model.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    rng = np.random.default_rng(seed)
    batch = min(batch, len(identities))

    def step_fn(step: int) -> float:
        ids = rng.choice(len(identities), size=batch, replace=False)
        rows = [rows_of[k][rng.integers(len(rows_of[k]))] for k in ids]
        images = bank.images[rows]
        pixels = to_clip_pixels([Image.fromarray(x) for x in images], images.shape[1])
        image_embeds = F.normalize(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output), dim=-1)
        logits = model.logit_scale.exp() * image_embeds @ text_embeds[torch.as_tensor(ids)].T  # (B, B)
        target = torch.arange(batch)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        descend(opt, loss, lr * cosine_lr(step, steps, max(1, steps // 20)))
        return float(loss.detach())

    losses = _loop(steps, step_fn, "world: CLIP vision (identity)")
    model.eval().requires_grad_(False)
    return losses


def train_vae(bank: Bank, steps: int, seed: int, batch: int = 32, lr: float = 1e-3,
              kl_weight: float = 1e-6) -> tuple[object, list[float]]:
    """Reconstruction (MSE) with a small KL term, as latent-diffusion autoencoders are trained; sets the
    latent scaling factor to 1/std of the latents, as SD's VAE config does."""
    vae = vae_model(seed).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed + 2)

    def step_fn(step: int) -> float:
        x = to_unit(bank.images[rng.integers(len(bank), size=batch)])
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        mse = F.mse_loss(recon, x)
        kl = dist.kl().mean() / x[0].numel()
        descend(opt, mse + kl_weight * kl, lr * cosine_lr(step, steps, max(1, steps // 20)))
        return float(mse.detach())

    losses = _loop(steps, step_fn, "world: VAE")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = to_unit(bank.images[np.random.default_rng(seed + 3).integers(len(bank), size=256)])
        std = float(vae.encode(x).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae, losses


@torch.no_grad()
def encode_latents(vae: object, images: np.ndarray, chunk: int = 512) -> torch.Tensor:
    """Scaled VAE posterior means of uint8 renders (N, C, h, w), computed once for the base model."""
    out = []
    for i in tqdm(range(0, len(images), chunk), desc="world: latents", mininterval=2.0):
        out.append(vae.encode(to_unit(images[i:i + chunk])).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(out)


@torch.no_grad()
def text_context(text_encoder: object, captions: list[str]) -> torch.Tensor:
    """The text encoder's last hidden states (N, L, C) for the pipeline's padded tokens."""
    tok = world_tokenizer()
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def min_snr_weight(scheduler: object, timesteps: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weights for a v-prediction target: min(SNR, gamma) / (SNR + 1) (Hang et al. 2023)."""
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1.0 - alphas)
    return torch.clamp(snr, max=gamma) / (snr + 1.0)


def train_base(bank: Bank, vae: object, text_encoder: object, steps: int, seed: int, batch: int = 32,
               lr: float = 6e-4, drop_caption: float = 0.1, ema_decay: float = 0.999) -> tuple[object, list[float]]:
    """The text-to-image UNet on captioned scenes (captions name background and position, never identity).

    v-prediction with min-SNR weighting, AdamW with warm-up and cosine decay, an EMA of the weights
    (what ships), 10% empty captions for classifier-free guidance.

    Tried and not adopted: half the captions also describing the (training) subject, as alt-text names what a
    photo shows. With this budget the model then drew held-out subjects from their full description only 0.50
    of the time (judge top-1, K=10; training subjects 0.60) and obeyed positions 0.21 of the time instead of
    1.00; a 600-step adapter on it reached identity 0.45 against 0.35 on this base.
    """
    import copy

    from .models import noise_scheduler, unet_model
    from .render import caption

    sched = noise_scheduler()
    latents = encode_latents(vae, bank.images)
    captions = sorted({caption(s) for s in bank.scenes})
    index = {c: i for i, c in enumerate(captions)}
    contexts = text_context(text_encoder, captions + [""])  # the last row is the empty caption
    rows_caption = torch.tensor([index[caption(s)] for s in bank.scenes])
    unet = unet_model(seed).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    g = torch.Generator().manual_seed(seed + 1)

    def step_fn(step: int) -> float:
        rows = torch.randint(len(bank), (batch,), generator=g)
        x0 = latents[rows]
        cap = rows_caption[rows].clone()
        cap[torch.rand(batch, generator=g) < drop_caption] = len(captions)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        noisy = sched.add_noise(x0, noise, t)
        target = sched.get_velocity(x0, noise, t)
        pred = unet(noisy, t, contexts[cap]).sample
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weight(sched, t)).mean()
        descend(opt, loss, lr * cosine_lr(step, steps, max(1, steps // 25)), clip=params)
        decay = min(ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1.0 - decay)
        return float(per_sample.mean().detach())

    losses = _loop(steps, step_fn, "world: base UNet")
    return ema, losses

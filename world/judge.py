"""The judge: a small CNN, trained apart from the adapter's encoder, that reads a subject's attributes
(shape, pattern, primary and secondary colour) from images degraded the way generations are.

Identity is scored as retrieval: an image's embedding (the judge's four attribute distributions) is
matched to the mean embedding of each pool subject's references; the nearest is its answer. The judge may
see held-out subjects (it is the measuring instrument, not part of the model).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .render import COLOURS, PATTERNS, SHAPES, Identity

HEADS = {"shape": SHAPES, "pattern": PATTERNS, "primary": tuple(COLOURS), "secondary": tuple(COLOURS)}


class Judge(nn.Module):
    """Conv net over 32x32 RGB in [-1, 1] -> logits per attribute."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        w = width
        self.body = nn.Sequential(block(3, w, 1), block(w, w, 1), block(w, 2 * w, 2), block(2 * w, 2 * w, 1),
                                  block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 1))
        self.heads = nn.ModuleDict({k: nn.Linear(8 * w, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # (N, 8w)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated attribute probabilities (N, 22): the space where retrieval takes the nearest."""
        return torch.cat([logits.softmax(-1) for logits in self(x).values()], dim=1)


def targets(identities: list[Identity]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([values.index(getattr(i, k)) for i in identities]) for k, values in HEADS.items()}


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (3x3 kernel, sigma per image; 0 leaves the image as it is)."""
    d = torch.tensor([-1.0, 0.0, 1.0])
    k1 = torch.exp(-(d[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-3) ** 2))  # (N, 3)
    k1 = k1 / k1.sum(1, keepdim=True)
    k = (k1[:, :, None] * k1[:, None, :])  # (N, 3, 3)
    n, c, h, w = x.shape
    out = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate").reshape(1, n * c, h + 2, w + 2),
                   k.repeat_interleave(c, 0)[:, None], groups=n * c)
    return out.reshape(n, c, h, w)


def degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Render -> something like a generation: blur, shifts, colour gain/offset, noise (all drawn per image)."""
    n = x.shape[0]
    x = _blur(x, torch.rand(n, generator=g) * 1.2)
    shifts = torch.randint(-2, 3, (n, 2), generator=g)
    x = torch.stack([torch.roll(img, (int(s[0]), int(s[1])), dims=(1, 2)) for img, s in zip(x, shifts)])
    gain = 1.0 + (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.3
    offset = (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.2
    noise = torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.1
    return (x * gain + offset + noise).clamp(-1, 1)


def train_judge(identities: tuple[Identity, ...], focus: tuple[Identity, ...], vae: nn.Module | None, steps: int,
                seed: int, batch: int = 64, lr: float = 2e-3) -> tuple[Judge, list[float]]:
    """Attribute classification on degraded renders of every subject (half of each batch from ``focus``,
    the held-out pools); half the images also pass through the world's VAE, as generations do."""
    from tqdm.auto import tqdm

    from .data import draw_scenes, to_unit
    from .pretrain import cosine_lr, descend

    torch.manual_seed(seed)
    judge = Judge().train()
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    losses = []
    for step in tqdm(range(steps), desc="world: judge", mininterval=2.0):
        ids_a, _, img_a = draw_scenes(rng, identities, batch // 2)
        ids_b, _, img_b = draw_scenes(rng, focus, batch - batch // 2)
        x = to_unit(np.concatenate([img_a, img_b]))
        if vae is not None:
            with torch.no_grad():
                half = x[: batch // 2]
                x[: batch // 2] = vae.decode(vae.encode(half).latent_dist.mean).sample.clamp(-1, 1)
        x = degrade(x, g)
        want = targets(ids_a + ids_b)
        logits = judge(x)
        loss = sum(F.cross_entropy(logits[k], want[k]) for k in HEADS)
        descend(opt, loss, lr * cosine_lr(step, steps, max(1, steps // 20)))
        losses.append(float(loss.detach()))
    return judge.eval().requires_grad_(False), losses


def save_judge(judge: Judge, path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, path)


def load_judge(path: str) -> Judge:
    from safetensors.torch import load_file

    judge = Judge()
    judge.load_state_dict(load_file(path))
    return judge.eval().requires_grad_(False)

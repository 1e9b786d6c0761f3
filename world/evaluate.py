"""The measurement of issue 6: identity retrieval at K=10 on held-out subjects, and text control.

For each held-out subject: one reference photo (a scene of its own), and new captions whose background
differs from the reference's. The model generates through :class:`~lookalike.Personalizer` exactly as a user
would; the judge names the nearest of the pool's subjects; the background and position are read from pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .data import Split, to_unit
from .judge import Judge
from .render import BACKGROUNDS, POSITIONS, SIZE, Identity, Scene, caption, random_scene, render

REFERENCES_PER_SUBJECT = 4  # clean renders averaged into each pool subject's judge embedding


@dataclass
class Case:
    """One generation to judge: whose reference, which pool, which caption scene."""

    identity: Identity
    pool: int
    reference: Scene
    scene: Scene


def cases(split: Split, per_subject: int, seed: int) -> list[Case]:
    """Per held-out subject: a reference scene and ``per_subject`` caption scenes on other backgrounds."""
    rng = np.random.default_rng(seed)
    out = []
    for p, pool in enumerate(split.pools):
        for identity in pool:
            reference = random_scene(rng)
            out += [Case(identity, p, reference, random_scene(rng, exclude_background=reference.background))
                    for _ in range(per_subject)]
    return out


def border_colour(image: np.ndarray) -> np.ndarray:
    """Median colour of the 2-pixel border (the object never covers most of it)."""
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3),
                             image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)]).astype(np.float32)
    return np.median(border, axis=0)


def read_background(image: np.ndarray) -> str:
    """The background named by the pixels: the palette colour nearest the border's median."""
    median = border_colour(image)
    names = list(BACKGROUNDS)
    return names[int(np.argmin([np.sum((median - np.array(BACKGROUNDS[n])) ** 2) for n in names]))]


def foreground(image: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """Pixels far from the border's median colour (the object)."""
    return np.linalg.norm(image.astype(np.float32) - border_colour(image), axis=-1) > threshold


def read_position(image: np.ndarray) -> str | None:
    """The position word nearest the object's centroid (None when no object is visible)."""
    mask = foreground(image)
    if mask.sum() < 8:
        return None
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.mean() + 0.5) / image.shape[1], (ys.mean() + 0.5) / image.shape[0]
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)


def colour_histogram(image: np.ndarray, bins: int = 4) -> np.ndarray:
    """Normalised RGB histogram (bins^3) of the object's pixels: the colour-only baseline."""
    mask = foreground(image)
    inner = mask.copy()  # eroded by one pixel: anti-aliased edges blend in the background's colour
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    mask = inner if inner.sum() >= 8 else mask
    pixels = image[mask] if mask.sum() >= 8 else image.reshape(-1, 3)
    q = (pixels.astype(np.int64) * bins) // 256
    hist = np.bincount(q[:, 0] * bins * bins + q[:, 1] * bins + q[:, 2], minlength=bins ** 3).astype(np.float64)
    return hist / hist.sum()


def judge_embeddings(judge: Judge, images: np.ndarray) -> torch.Tensor:
    return judge.embed(to_unit(images))


def pool_references(pool: tuple[Identity, ...], seed: int) -> np.ndarray:
    """REFERENCES_PER_SUBJECT clean renders per pool subject, (K, R, H, W, 3)."""
    rng = np.random.default_rng(seed)
    return np.stack([np.stack([render(i, random_scene(rng)) for _ in range(REFERENCES_PER_SUBJECT)]) for i in pool])


def retrieve(judge: Judge, images: np.ndarray, pool_refs: np.ndarray) -> np.ndarray:
    """Index of the nearest pool subject for each image, in the judge's embedding."""
    k, r = pool_refs.shape[:2]
    refs = judge_embeddings(judge, pool_refs.reshape(k * r, SIZE, SIZE, 3)).view(k, r, -1).mean(1)  # (K, D)
    return torch.cdist(judge_embeddings(judge, images), refs).argmin(1).numpy()


def retrieve_colour(images: np.ndarray, pool_refs: np.ndarray) -> np.ndarray:
    """The colour-only baseline: nearest pool subject by L1 distance of object colour histograms."""
    refs = np.stack([np.mean([colour_histogram(x) for x in subject], axis=0) for subject in pool_refs])
    return np.array([int(np.argmin(np.abs(refs - colour_histogram(x)).sum(1))) for x in images])


def identity_top1(judge: Judge, split: Split, all_cases: list[Case], images: np.ndarray, seed: int,
                  colour_only: bool = False) -> float:
    """Top-1 retrieval accuracy of ``images`` (one per case) within each case's pool of K subjects."""
    hits = []
    for p, pool in enumerate(split.pools):
        rows = [n for n, c in enumerate(all_cases) if c.pool == p]
        if not rows:
            continue
        refs = pool_references(pool, seed + p)
        picked = retrieve_colour(images[rows], refs) if colour_only else retrieve(judge, images[rows], refs)
        hits += [pool[int(j)] == all_cases[n].identity for j, n in zip(picked, rows)]
    return float(np.mean(hits))


def text_control(images: np.ndarray, all_cases: list[Case]) -> tuple[float, float]:
    """Background and position accuracy: the caption's words read back from the pixels."""
    bg = np.mean([read_background(x) == c.scene.background for x, c in zip(images, all_cases)])
    pos = np.mean([read_position(x) == c.scene.position for x, c in zip(images, all_cases)])
    return float(bg), float(pos)


def copied_background(images: np.ndarray, all_cases: list[Case]) -> float:
    """How often the reference's own background came out instead of the caption's."""
    return float(np.mean([read_background(x) == c.reference.background for x, c in zip(images, all_cases)]))


def generate_cases(personalizer, all_cases: list[Case], adapter: bool, steps: int, guidance: float,
                   scale: float, seed: int, batch: int = 20) -> np.ndarray:
    """Generate one image per case (uint8), with the reference through the adapter or without it.

    Cases go in batches (one subject per prompt); each case has its own seeded generator, so its image
    does not depend on the batching."""
    from tqdm.auto import tqdm

    out = []
    desc = "world: generating" + ("" if adapter else " (no adapter)")
    for start in tqdm(range(0, len(all_cases), batch), desc=desc, mininterval=2.0):
        chunk = all_cases[start:start + batch]
        kwargs = {"num_inference_steps": steps, "guidance_scale": guidance, "output_type": "np",
                  "generator": [torch.Generator().manual_seed(seed + start + k) for k in range(len(chunk))]}
        prompts = [caption(c.scene) for c in chunk]
        if adapter:
            subjects = [personalizer.encode(Image.fromarray(render(c.identity, c.reference))) for c in chunk]
            images = personalizer.generate(prompts, subject=subjects, scale=scale, **kwargs).images
        else:
            images = personalizer.pipe(prompts, **kwargs).images
        out += [np.clip(np.rint(x * 255), 0, 255).astype(np.uint8) for x in images]
    return np.stack(out)


def evaluate(personalizer, judge: Judge, split: Split, per_subject: int, steps: int, guidance: float,
             scale: float, seed: int) -> dict:
    """Every figure of the evaluation table (see :func:`format_table`)."""
    all_cases = cases(split, per_subject, seed)
    with_adapter = generate_cases(personalizer, all_cases, True, steps, guidance, scale, seed + 1000)
    without = generate_cases(personalizer, all_cases, False, steps, guidance, scale, seed + 1000)
    truth = np.stack([render(c.identity, c.scene) for c in all_cases])
    result = {"subjects": len(split.held_out), "per_subject": per_subject, "pool_size": len(split.pools[0]),
              "scale": scale, "steps": steps, "guidance": guidance}
    for name, images in (("adapter", with_adapter), ("no_adapter", without), ("references", truth)):
        bg, pos = text_control(images, all_cases)
        result[name] = {"identity_top1": identity_top1(judge, split, all_cases, images, seed),
                        "colour_top1": identity_top1(judge, split, all_cases, images, seed, colour_only=True),
                        "background": bg, "position": pos, "copied_background": copied_background(images, all_cases)}
    return result


def format_table(r: dict) -> str:
    """The evaluation table; its last line is the one-line summary."""
    rows = [("adapter", "adapter"), ("no adapter", "no_adapter"), ("references (ceiling)", "references")]
    lines = [f"{r['subjects']} held-out subjects x {r['per_subject']} new captions, pools of K={r['pool_size']} "
             f"(colour-sharing pairs); adapter scale {r['scale']}, {r['steps']} steps, guidance {r['guidance']}",
             f"{'':22}{'identity top-1':>16}{'colour-hist top-1':>19}{'background':>12}{'position':>10}"
             f"{'copied bg':>11}"]
    for label, key in rows:
        x = r[key]
        lines.append(f"{label:22}{x['identity_top1']:>16.3f}{x['colour_top1']:>19.3f}{x['background']:>12.3f}"
                     f"{x['position']:>10.3f}{x['copied_background']:>11.3f}")
    a, b, c = r["adapter"], r["no_adapter"], r["references"]
    lines.append(f"identity top-1: {a['identity_top1']:.2f} (no adapter: {b['identity_top1']:.2f}, references: "
                 f"{c['identity_top1']:.2f}); background: {a['background']:.2f}")
    return "\n".join(lines)

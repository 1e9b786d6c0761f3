"""Who is seen by training and who is held out, and batches of rendered scenes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .render import COLOURS, PATTERNS, SHAPES, Identity, Scene, all_identities, random_scene, render

POOL_SIZE = 10  # K: the retrieval pool of the identity measurement
NUM_POOLS = 2


@dataclass(frozen=True)
class Split:
    """Training identities and held-out pools (no stage of training sees a held-out identity)."""

    train: tuple[Identity, ...]
    pools: tuple[tuple[Identity, ...], ...]

    @property
    def held_out(self) -> tuple[Identity, ...]:
        return tuple(i for pool in self.pools for i in pool)


def make_split(seed: int) -> Split:
    """Held-out pools of K subjects in colour-sharing pairs: each ordered colour pair is worn by two
    subjects of different shape and pattern, so colour alone cannot tell a subject from its partner."""
    rng = np.random.default_rng(seed)
    pairs = [(a, b) for a in COLOURS for b in COLOURS if a != b]
    order = rng.permutation(len(pairs))
    pools, k = [], 0
    for _ in range(NUM_POOLS):
        pool = []
        for _ in range(POOL_SIZE // 2):
            a, b = pairs[order[k]]
            k += 1
            shapes = rng.choice(len(SHAPES), 2, replace=False)
            patterns = rng.choice(len(PATTERNS), 2, replace=False)
            pool += [Identity(SHAPES[s], a, b, PATTERNS[p]) for s, p in zip(shapes, patterns)]
        pools.append(tuple(pool))
    held = {i for pool in pools for i in pool}
    return Split(tuple(i for i in all_identities() if i not in held), tuple(pools))


def draw_scenes(rng: np.random.Generator, identities: tuple[Identity, ...], n: int
                ) -> tuple[list[Identity], list[Scene], np.ndarray]:
    """``n`` random (identity, scene) pairs and their renders (n, H, W, 3) uint8."""
    ids = [identities[j] for j in rng.integers(len(identities), size=n)]
    scenes = [random_scene(rng) for _ in range(n)]
    return ids, scenes, np.stack([render(i, s) for i, s in zip(ids, scenes)])


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@dataclass
class Bank:
    """Scenes rendered once and shared by every pretraining stage (rendering is the slow part on a CPU)."""

    identities: list[Identity]
    scenes: list[Scene]
    images: np.ndarray  # (N, H, W, 3) uint8

    def __len__(self) -> int:
        return len(self.scenes)

    def save(self, path: str) -> None:
        from .render import BACKGROUNDS, POSITIONS

        ids = {identity: k for k, identity in enumerate(all_identities())}
        bgs, pos = {b: k for k, b in enumerate(BACKGROUNDS)}, {p: k for k, p in enumerate(POSITIONS)}
        np.savez_compressed(
            path, images=self.images, identity=np.array([ids[i] for i in self.identities]),
            background=np.array([bgs[s.background] for s in self.scenes]),
            position=np.array([pos[s.position] for s in self.scenes]),
            geometry=np.array([(s.size, s.dx, s.dy) for s in self.scenes], np.float64))

    @classmethod
    def load(cls, path: str) -> Bank:
        from .render import BACKGROUNDS, POSITIONS

        ids, bgs, pos = all_identities(), list(BACKGROUNDS), list(POSITIONS)
        with np.load(path, allow_pickle=False) as z:
            scenes = [Scene(bgs[b], pos[p], float(g[0]), float(g[1]), float(g[2]))
                      for b, p, g in zip(z["background"], z["position"], z["geometry"])]
            return cls([ids[i] for i in z["identity"]], scenes, z["images"])


def render_bank(identities: tuple[Identity, ...], n: int, seed: int, desc: str = "world: rendering") -> Bank:
    """``n`` random scenes of ``identities`` (seeded), with a progress bar."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    ids = [identities[j] for j in rng.integers(len(identities), size=n)]
    scenes = [random_scene(rng) for _ in range(n)]
    images = np.stack([render(i, s) for i, s in tqdm(list(zip(ids, scenes)), desc=desc, mininterval=2.0)])
    return Bank(ids, scenes, images)


def write_pairs(folder: str, identities: tuple[Identity, ...], n: int, seed: int) -> str:
    """The adapter's training data as files a user would have: ``records.json`` with, per sample, a target
    scene (``image_file``), its caption (``text``) and another photo of the same subject on another
    background (``reference_file``), so the adapter learns identity from the image and scene from the text."""
    import json
    from pathlib import Path

    from PIL import Image
    from tqdm.auto import tqdm

    from .render import caption

    root = Path(folder)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for k in tqdm(range(n), desc="world: adapter pairs", mininterval=2.0):
        identity = identities[rng.integers(len(identities))]
        target = random_scene(rng)
        reference = random_scene(rng, exclude_background=target.background)
        Image.fromarray(render(identity, target)).save(root / "images" / f"{k:06d}.png")
        Image.fromarray(render(identity, reference)).save(root / "images" / f"{k:06d}_ref.png")
        records.append({"image_file": f"images/{k:06d}.png", "text": caption(target),
                        "reference_file": f"images/{k:06d}_ref.png"})
    path = root / "records.json"
    path.write_text(json.dumps(records))
    return str(path)

"""The procedural world: subjects (shape, colour pair, pattern) drawn into captioned scenes.

A subject's identity is what a reference photo shows and a caption never names; a scene is what a caption
does name (background colour and position). Everything is a pure function of its arguments: the same
subject and scene always give the same pixels.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

SIZE = 32  # image side in pixels
SUPERSAMPLE = 4  # anti-aliasing: draw at 4x, then average

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
PATTERNS = ("striped", "checked", "bordered", "split")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (240, 215, 35),
    "green": (40, 165, 60), "blue": (40, 80, 220), "purple": (145, 45, 185),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (18, 18, 18), "white": (238, 238, 238), "gray": (125, 125, 125),
    "brown": (105, 70, 40), "teal": (25, 110, 115),
}
#: Position words -> the object's centre as a fraction of the image side (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.32, 0.32), "top": (0.5, 0.32), "top right": (0.68, 0.32),
    "left": (0.32, 0.5), "center": (0.5, 0.5), "right": (0.68, 0.5),
    "bottom left": (0.32, 0.68), "bottom": (0.5, 0.68), "bottom right": (0.68, 0.68),
}
SIZES = (0.5, 0.62)  # object side as a fraction of the image side (drawn uniformly in between)


@dataclass(frozen=True)
class Identity:
    """A subject: what the adapter must carry from the reference to the new image."""

    shape: str
    primary: str
    secondary: str
    pattern: str

    @property
    def name(self) -> str:
        return f"{self.primary}-{self.secondary}-{self.pattern}-{self.shape}"

    def description(self) -> str:
        """Identity words (used only to pretrain the world's CLIP, never in diffusion captions)."""
        return f"a {self.primary} and {self.secondary} {self.pattern} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Where and on what a subject is drawn; ``dx, dy, size`` are small jitters around the named place."""

    background: str
    position: str
    size: float = 0.5
    dx: float = 0.0
    dy: float = 0.0


def all_identities() -> list[Identity]:
    """Every subject of the world (6 shapes x 30 ordered colour pairs x 4 patterns = 720), in a fixed order."""
    return [Identity(s, a, b, p) for s, (a, b), p in
            itertools.product(SHAPES, itertools.permutations(COLOURS, 2), PATTERNS)]


def caption(scene: Scene) -> str:
    """The diffusion caption: background and position, never the identity."""
    return f"a thing on a {scene.background} background, {scene.position}"


def clip_caption(identity: Identity, scene: Scene) -> str:
    """The contrastive pretraining caption: identity and scene, as web alt-text describes a photo."""
    return f"{identity.description()} on a {scene.background} background, {scene.position}"


def random_scene(rng: np.random.Generator, exclude_background: str | None = None) -> Scene:
    """A scene drawn uniformly (a background other than ``exclude_background`` when given)."""
    backgrounds = [b for b in BACKGROUNDS if b != exclude_background]
    return Scene(backgrounds[rng.integers(len(backgrounds))], list(POSITIONS)[rng.integers(len(POSITIONS))],
                 float(rng.uniform(*SIZES)), float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.03, 0.03)))


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-mask of a shape on coordinates ``u, v`` in [-1, 1] (the object's box)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (au <= 0.85) & (av <= 0.85)
    if shape == "triangle":
        return (v <= 0.85) & (v >= -0.95 + 2.0 * au)
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "star":
        r, a = np.hypot(u, v), np.arctan2(v, u) + np.pi / 2
        return r <= 0.5 + 0.5 * np.abs(np.cos(2.5 * a)) ** 1.5
    if shape == "cross":
        return ((au <= 0.36) & (av <= 1.0)) | ((av <= 0.36) & (au <= 1.0))
    raise ValueError(f"unknown shape {shape!r}; the world has {', '.join(SHAPES)}")


def _pattern_mask(pattern: str, shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the secondary colour goes inside the object."""
    if pattern == "striped":
        return np.floor((v + 1.0) * 2.5).astype(int) % 2 == 1  # 5 horizontal bands
    if pattern == "checked":
        return (np.floor((u + 1.0) * 2.0) + np.floor((v + 1.0) * 2.0)).astype(int) % 2 == 1  # 4x4 cells
    if pattern == "bordered":
        return ~_shape_mask(shape, u / 0.62, v / 0.62)  # an outer rim of the same shape
    if pattern == "split":
        return u > 0.0
    raise ValueError(f"unknown pattern {pattern!r}; the world has {', '.join(PATTERNS)}")


def render(identity: Identity, scene: Scene, size: int = SIZE) -> np.ndarray:
    """The scene as uint8 RGB (size, size, 3), anti-aliased."""
    n = size * SUPERSAMPLE
    cx, cy = POSITIONS[scene.position]
    cx, cy = cx + scene.dx, cy + scene.dy
    half = scene.size / 2
    grid = (np.arange(n) + 0.5) / n
    u = (grid[None, :] - cx) / half  # (n, n), x along columns
    v = (grid[:, None] - cy) / half
    u, v = np.broadcast_to(u, (n, n)), np.broadcast_to(v, (n, n))
    inside = _shape_mask(identity.shape, u, v)
    second = _pattern_mask(identity.pattern, identity.shape, u, v)
    image = np.empty((n, n, 3), np.float32)
    image[:] = BACKGROUNDS[scene.background]
    image[inside & ~second] = COLOURS[identity.primary]
    image[inside & second] = COLOURS[identity.secondary]
    image = image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)

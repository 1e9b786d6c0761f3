"""The metrics' maths, as pure numpy functions: cosines and means with Student-t confidence intervals.

Conventions (DreamBooth, Ruiz et al. 2023, section 4.1):

* **CLIP-I** and **DINO**: for one generated image, the mean cosine between its embedding and the
  embedding of every reference image of the subject (:func:`mean_cosine_to_references`).
* **CLIP-T**: the cosine between the generated image's CLIP embedding and its prompt's CLIP text
  embedding (:func:`paired_cosine`); a raw cosine, not CLIPScore's ``2.5 * max(cos, 0)``.
* **face**: the mean ArcFace cosine to the references' faces (ArcFace, Deng et al. 2019), as the
  face-similarity of the PuLID and InstantID papers.

A summary is the mean over generated images with a 95% **Student-t** interval (:func:`mean_ci`); the
items are treated as independent draws, so variation between subjects is not modelled separately.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

#: Metric names, in report order.
METRICS: tuple[str, ...] = ("clip_i", "clip_t", "dino", "face")
#: Metrics computed when none are named (face is added for face subject sets).
DEFAULT_METRICS: tuple[str, ...] = ("clip_i", "clip_t", "dino")
#: Display names for tables.
LABELS: dict[str, str] = {"clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino": "DINO", "face": "Face sim",
                          "face_found": "face found"}


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows divided by their L2 norm (float64): ``(N, D) -> (N, D)``."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors."""
    return float(np.dot(l2_normalize(np.ravel(a)), l2_normalize(np.ravel(b))))


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All cosines between rows: ``(N, D), (M, D) -> (N, M)``."""
    return l2_normalize(np.atleast_2d(a)) @ l2_normalize(np.atleast_2d(b)).T


def mean_cosine_to_references(generated: np.ndarray, references: np.ndarray) -> np.ndarray:
    """CLIP-I / DINO per generated image: mean cosine to all references (DreamBooth, Ruiz et al. 2023)."""
    return cosine_matrix(generated, references).mean(axis=1)  # (N,)


def paired_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """CLIP-T per image: cosine of row i of ``a`` with row i of ``b`` (CLIP, Radford et al. 2021)."""
    a, b = l2_normalize(np.atleast_2d(a)), l2_normalize(np.atleast_2d(b))
    if a.shape != b.shape:
        raise ValueError(f"paired_cosine needs arrays of one shape, got {a.shape} and {b.shape}")
    return np.sum(a * b, axis=1)  # (N,)


# -- Student-t quantiles (no scipy) ---------------------------------------------------------------


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student-t cumulative distribution function."""
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Student-t quantile (inverse CDF) by bisection, to about 1e-10."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
        if high - low < 1e-12:
            break
    return 0.5 * (low + high)


# -- summaries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """A mean with its Student-t confidence interval (``low``/``high`` are None below two values)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    std: float

    @property
    def half_width(self) -> float | None:
        """Half the interval's width (the "±" of a table)."""
        return None if self.low is None or self.high is None else (self.high - self.low) / 2.0

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-ready fields."""
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "std": self.std}

    @classmethod
    def from_dict(cls, d: dict) -> Stat:
        """Inverse of :meth:`to_dict`."""
        return cls(float(d["mean"]), d.get("low"), d.get("high"), int(d["n"]), float(d.get("std", 0.0)))


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> Stat:
    """Mean and two-sided Student-t interval: ``mean ± t_{(1+c)/2, n-1} * s / sqrt(n)``."""
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = float(x.mean())
    if x.size < 2:
        return Stat(mean, None, None, 1, 0.0)
    std = float(x.std(ddof=1))
    half = t_quantile(0.5 + confidence / 2.0, x.size - 1) * std / math.sqrt(x.size)
    return Stat(mean, mean - half, mean + half, int(x.size), std)


def summarize_scores(rows: Sequence[dict[str, float | None]], metrics: Sequence[str]) -> dict[str, Stat]:
    """Per metric, the :class:`Stat` of the rows' non-null values (metrics with no value are left out)."""
    out: dict[str, Stat] = {}
    for metric in metrics:
        values = [r[metric] for r in rows if r.get(metric) is not None]
        if values:
            out[metric] = mean_ci(values)  # type: ignore[arg-type]
    return out

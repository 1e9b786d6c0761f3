"""InstantID's condition image: the 5 facial keypoints drawn as IdentityNet saw them in training.

InstantID (Wang et al. 2024, arXiv:2401.07519) conditions IdentityNet on a black canvas the size of the
output with, for each face, four limbs joining the eyes and mouth corners to the nose tip (filled
ellipses 4 px wide, coloured after their outer keypoint, the whole layer dimmed to 60 %), then a filled
disc of radius 10 on every keypoint. Keypoints are in insightface's order (the eye on the image's left,
the other eye, nose, left then right mouth corner) and coloured red, green, blue, yellow, magenta. The
arithmetic (integer truncation of centres, axes and angles; 1-degree polygon steps; 8-connected fill;
float canvas dimmed then truncated to uint8) follows the authors' ``draw_kps`` so the pixels match.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..errors import LookalikeError

#: RGB colour of each keypoint (and of the limb leaving it).
KEYPOINT_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255),
)
#: Limbs in drawing order: (outer keypoint, nose); later limbs cover earlier ones where they overlap.
LIMBS: tuple[tuple[int, int], ...] = ((0, 2), (1, 2), (3, 2), (4, 2))
LIMB_HALF_WIDTH = 4  # the ellipses' minor semi-axis, pixels
LIMB_ALPHA = 0.6  # the limb layer's brightness
DOT_RADIUS = 10  # pixels
MAX_COORDINATE = 1 << 20  # keypoints farther out than this come from a damaged file, not a photo


def check_keypoints(kps: np.ndarray | Sequence, what: str = "keypoints") -> np.ndarray:
    """Keypoints as a finite (5, 2) float array (float32 stays float32, as detectors give it), or one sentence."""
    array = np.asarray(kps)
    if array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float64)
    if array.shape != (5, 2):
        raise LookalikeError(f"{what} must be 5 (x, y) points (eyes, nose, mouth corners), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise LookalikeError(f"{what} hold NaN or infinite coordinates; detect the face again")
    if np.abs(array).max() > MAX_COORDINATE:
        raise LookalikeError(f"{what} lie {np.abs(array).max():.3g} pixels away, beyond any photo; detect the face "
                             f"again")
    return array


def _limb_polygon(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """The filled ellipse joining two keypoints, as OpenCV's 1-degree polygon (integer centre, axes, angle)."""
    import cv2

    pair = np.stack([start, end])  # (2, 2) in the keypoints' own dtype, so the truncations below match
    dx, dy = pair[0] - pair[1]
    centre = (int(np.mean(pair[:, 0])), int(np.mean(pair[:, 1])))
    axes = (int((dx**2 + dy**2) ** 0.5 / 2), LIMB_HALF_WIDTH)
    angle = int(math.degrees(math.atan2(dy, dx)))
    return cv2.ellipse2Poly(centre, axes, angle, 0, 360, 1)


def draw_keypoints(size: tuple[int, int], faces: Sequence[np.ndarray | Sequence]) -> Image.Image:
    """Draw every face's 5 keypoints (output pixels) on a black ``size = (width, height)`` RGB canvas."""
    import cv2

    width, height = int(size[0]), int(size[1])
    if width <= 0 or height <= 0:
        raise LookalikeError(f"the keypoint image must have a positive size, not {width}x{height}")
    points = [check_keypoints(kps, f"face {i}'s keypoints") for i, kps in enumerate(faces)]
    limbs = np.zeros((height, width, 3), dtype=np.float64)
    for kps in points:
        for outer, nose in LIMBS:
            limbs = cv2.fillConvexPoly(limbs, _limb_polygon(kps[outer], kps[nose]), KEYPOINT_COLORS[outer])
    canvas = np.ascontiguousarray((limbs * LIMB_ALPHA).astype(np.uint8))
    for kps in points:
        for (x, y), colour in zip(kps, KEYPOINT_COLORS):
            canvas = cv2.circle(canvas, (int(x), int(y)), DOT_RADIUS, colour, -1)
    return Image.fromarray(canvas)


def fit_keypoints(kps: np.ndarray | Sequence, source: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    """Keypoints found on a ``source = (width, height)`` photo, moved onto a ``target`` image of another size."""
    array = check_keypoints(kps)
    scale = np.array([target[0] / float(source[0]), target[1] / float(source[1])])
    return (array * scale).astype(array.dtype)


def output_size(source: tuple[int, int], min_side: int = 1024, max_side: int = 1280, multiple: int = 64
                ) -> tuple[int, int]:
    """The authors' generation size for a photo (their ``resize_img``): the short side scaled to 1024, then
    the long side scaled to 1280, each side rounded down to a multiple of 64."""
    width, height = int(source[0]), int(source[1])
    if width <= 0 or height <= 0:
        raise LookalikeError(f"a photo of size {width}x{height} has no area")
    ratio = min_side / min(width, height)
    width, height = round(ratio * width), round(ratio * height)
    ratio = max_side / max(width, height)
    return (max(multiple, round(ratio * width) // multiple * multiple),
            max(multiple, round(ratio * height) // multiple * multiple))

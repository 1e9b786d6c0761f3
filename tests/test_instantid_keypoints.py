"""InstantID's keypoint drawing equals the authors' draw_kps, pixel for pixel, on a real photo and real detector.

The reference below is written from the authors' published ``draw_kps`` (InstantX/InstantID): a float canvas,
limbs eye/eye/mouth/mouth -> nose as OpenCV ellipse polygons (centre and axes truncated to int, angle in whole
degrees, stick width 4) filled in that order, the canvas times 0.6 cast to uint8, then filled circles of radius
10 in the keypoint colours red, green, blue, yellow, magenta.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.encoders.keypoints import draw_keypoints, fit_keypoints, output_size
from lookalike.errors import LookalikeError

from helpers import YUNET as _YUNET

# ../shared beside the checkout (helpers' rule), or beside the worktrees' folder
YUNET = next((p for p in (_YUNET, Path(__file__).resolve().parents[3] / "shared" / _YUNET.relative_to(_YUNET.parents[2]))
              if p.is_file()), _YUNET)
needs_yunet = pytest.mark.skipif(not YUNET.is_file(), reason="../shared (the YuNet model) is absent")


def authors_draw(width: int, height: int, kps: np.ndarray) -> np.ndarray:
    """The authors' drawing, step by step as published (the reference; not lookalike's code)."""
    import cv2

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
    image = np.zeros([height, width, 3])
    for a, b in [[0, 2], [1, 2], [3, 2], [4, 2]]:
        xs, ys = kps[[a, b], 0], kps[[a, b], 1]
        length = ((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        poly = cv2.ellipse2Poly((int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), 4), int(angle), 0, 360, 1)
        image = cv2.fillConvexPoly(image.copy(), poly, colours[a])
    image = (image * 0.6).astype(np.uint8)
    for i, (x, y) in enumerate(kps):
        image = cv2.circle(image.copy(), (int(x), int(y)), 10, colours[i], -1)
    return image.astype(np.uint8)


@pytest.fixture(scope="module")
def astronaut_kps() -> tuple[Image.Image, np.ndarray]:
    from skimage import data

    from lookalike.encoders.face_detect import YuNetDetector

    photo = Image.fromarray(data.astronaut())
    boxes, kps = YuNetDetector(YUNET).detect(np.ascontiguousarray(np.asarray(photo)[:, :, ::-1]))
    assert len(kps) == 1
    return photo, kps[0]


@needs_yunet
def test_drawing_matches_the_authors_pixel_for_pixel_on_the_astronaut(astronaut_kps):
    photo, kps = astronaut_kps
    ours = np.asarray(draw_keypoints(photo.size, [kps]))
    reference = authors_draw(*photo.size, kps)
    assert ours.shape == (512, 512, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, reference)
    # and the picture is the one described: each dot in its colour, limbs at 60 % of theirs, black elsewhere
    for (x, y), colour in zip(kps, [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]):
        assert tuple(ours[int(y), int(x)]) == colour
    assert {tuple(c) for c in ours.reshape(-1, 3)} >= {(153, 0, 0), (0, 153, 0), (153, 153, 0), (153, 0, 153)}
    assert (ours.sum(-1) > 0).mean() < 0.05


@needs_yunet
def test_keypoints_moved_to_the_output_size_match_the_authors_on_the_resized_canvas(astronaut_kps):
    photo, kps = astronaut_kps
    size = output_size(photo.size)
    assert size == (1280, 1280)  # the authors' resize_img: short side 1024, then long side 1280, multiples of 64
    moved = fit_keypoints(kps, photo.size, (320, 192))
    assert moved.dtype == kps.dtype
    assert np.array_equal(np.asarray(draw_keypoints((320, 192), [moved])), authors_draw(320, 192, moved))


def test_several_faces_and_bad_keypoints():
    a = np.array([[10, 10], [30, 10], [20, 20], [12, 30], [28, 30]], np.float32)
    b = a + np.array([50, 5], np.float32)  # a reaches x = 40, b starts at x = 50
    both = np.asarray(draw_keypoints((96, 48), [a, b]))
    assert np.array_equal(both[:, :45], authors_draw(96, 48, a)[:, :45])
    assert np.array_equal(both[:, 45:], authors_draw(96, 48, b)[:, 45:])
    assert output_size((600, 400)) == (1280, 832)
    with pytest.raises(LookalikeError, match="5 \\(x, y\\) points"):
        draw_keypoints((32, 32), [a[:4]])
    with pytest.raises(LookalikeError, match="NaN"):
        draw_keypoints((32, 32), [a * np.nan])
    with pytest.raises(LookalikeError, match="beyond any photo"):
        draw_keypoints((32, 32), [a * 1e30])

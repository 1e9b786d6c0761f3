"""Writing the command's images: atomic PNGs with their settings as text chunks, and grids."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..fileio import write_atomic

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

def save_png(image: Image.Image, path: Path, text: dict[str, str]) -> Path:
    """Save a PNG atomically with ``text`` as tEXt chunks (iTXt where a value is not Latin-1)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def output_paths(out: Path, count: int) -> list[Path]:
    """Where images go: ``out`` itself for one, ``<stem>-i.png`` for several."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def grid_path(out: Path) -> Path:
    """The grid of several images: ``<stem>-grid.png``."""
    return out.with_name(f"{out.stem}-grid{out.suffix}")


def make_grid(images: Sequence[Image.Image]) -> Image.Image:
    """Images in a near-square grid (rows filled left to right), on black."""
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * width, (i // cols) * height))
    return grid

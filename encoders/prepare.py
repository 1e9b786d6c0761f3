"""Image loading and preparation: files to upright RGB images to normalised CLIP pixel tensors.

Conversion rules, chosen to be predictable:

* EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), for files and for PIL images alike.
* Transparent pixels are composited over **white** (as ``transformers``' ``convert_rgb`` does), so
  a cut-out subject on a transparent background becomes a subject on white, not on black.
* 16-bit greyscale (``I;16*``) is scaled by 255/65535; 32-bit integer (``I``) and float (``F``)
  images are scaled from the range their values imply (0..255, 0..65535, 0..1 for floats,
  otherwise their own min..max), never clipped.
* Every other mode (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ...) goes through ``Image.convert("RGB")``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import LookalikeError

CropMode = Literal["center", "pad", "resize"]
CROP_MODES: tuple[str, ...] = get_args(CropMode)

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

#: Largest image (in pixels) ``load_image`` accepts by default: Pillow's own decompression-bomb
#: error threshold, about 179 megapixels.
MAX_PIXELS: int = 2 * 89_478_485
#: Reference photos smaller than this on a side carry no usable subject (a 1x1 image, an icon).
MIN_REFERENCE_SIDE = 16
#: Most memory one image may need while it is decoded and converted to RGB (checked from its header).
MAX_DECODE_BYTES: int = 1 << 30
#: A JPEG too large to decode whole is reduced while decoding (DCT scaling) to no less than this per side.
JPEG_DRAFT_SIDE = 2048

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_HIGH_DEPTH_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_HINT = "pass a JPEG, PNG or WebP photo"


def load_image(
    source: str | os.PathLike[str] | Image.Image, *, max_pixels: int | None = MAX_PIXELS
) -> Image.Image:
    """Open an image file (or take a PIL image), apply EXIF orientation and return it as RGB."""
    if isinstance(source, Image.Image):
        _check_size(source, "the given PIL image", max_pixels)
        return to_rgb(_upright(source))
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_image takes a path or a PIL image, not {type(source).__name__}")
    return to_rgb(_open_file(Path(source), max_pixels))


def load_reference(source: str | os.PathLike[str] | Image.Image, *, min_side: int = MIN_REFERENCE_SIDE,
                   label: str | None = None) -> Image.Image:
    """``load_image`` for a reference photo, refusing images too small to show a subject."""
    image = load_image(source)
    if min(image.size) < min_side:
        name = label or (f"'{os.fspath(source)}'" if isinstance(source, (str, os.PathLike)) else "the given image")
        raise LookalikeError(f"reference image {name} is only {image.width}x{image.height} pixels; use a photo "
                             f"at least {min_side} pixels on each side")
    return image


def _open_file(path: Path, max_pixels: int | None) -> Image.Image:
    """Read an image file fully into memory, upright, turning every failure into a LookalikeError."""
    name = f"cannot read image '{path}'"
    if path.is_dir():
        raise LookalikeError(f"{name}: it is a directory, not a file; pass the path of one image file")
    if not path.exists():
        raise LookalikeError(f"{name}: no such file; check the path and spelling")
    try:
        with warnings.catch_warnings():
            # Size is checked below against max_pixels, so Pillow's own warning is only noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if decode_bytes(image) > MAX_DECODE_BYTES and image.format == "JPEG":
                    image.draft(image.mode, (JPEG_DRAFT_SIDE, JPEG_DRAFT_SIDE))  # decode at 1/2, 1/4 or 1/8
                _check_size(image, f"image '{path}'", max_pixels)  # header only: before decoding pixels
                _check_memory(image, f"image '{path}'")
                image.load()
                # Transpose while the file is open: TIFF keeps its orientation tag on the file object.
                return _upright(image)  # a new image, independent of the file
    except LookalikeError:
        raise
    except Image.DecompressionBombError as exc:
        raise LookalikeError(
            f"{name}: it is above Pillow's decompression-bomb limit of {2 * (Image.MAX_IMAGE_PIXELS or 0):,} "
            "pixels; downscale it first"
        ) from exc
    except UnidentifiedImageError as exc:
        raise LookalikeError(f"{name}: not an image file (PIL could not identify it); {_HINT}") from exc
    except PermissionError as exc:
        raise LookalikeError(f"{name}: permission denied; check the file's permissions") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # Truncated or corrupt data surfaces from load() as OSError (or SyntaxError for some formats).
        raise LookalikeError(f"{name}: the file is truncated or corrupt ({exc}); {_HINT}") from exc


def _upright(image: Image.Image) -> Image.Image:
    """Return a copy of image turned by its EXIF orientation; unreadable EXIF is ignored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # malformed metadata must not reject otherwise good pixels
        return image.copy()


def _check_size(image: Image.Image, label: str, max_pixels: int | None) -> None:
    """Refuse empty images and images above max_pixels with a one-sentence error naming label."""
    width, height = image.size
    if width <= 0 or height <= 0:
        raise LookalikeError(f"cannot use {label}: it is empty ({width}x{height} pixels); {_HINT}")
    if max_pixels is not None and width * height > max_pixels:
        raise LookalikeError(
            f"cannot use {label}: it is {width}x{height} = {width * height:,} pixels, above the limit of "
            f"{max_pixels:,} pixels; downscale it first"
        )


def decode_bytes(image: Image.Image) -> int:
    """Peak bytes to decode ``image`` (from its header), keep an upright copy and convert it to RGB.

    Pillow holds 1 byte per pixel for ``1``/``L``/``P``, 2 for 16-bit greyscale and 4 for everything else;
    16/32-bit greyscale is rescaled through float32 (about 14 bytes per pixel) and transparency is composited
    over white (about 16).
    """
    mode = image.mode
    stored = 1 if mode in {"1", "L", "P"} else 2 if mode.startswith("I;16") else 4
    if mode == "RGB":
        convert = 2  # no conversion; a margin for the allocator
    elif mode in _HIGH_DEPTH_MODES:
        convert = 14
    elif mode in _ALPHA_MODES or "transparency" in image.info:
        convert = 16
    else:
        convert = 4
    return image.width * image.height * (2 * stored + convert)


def _check_memory(image: Image.Image, label: str) -> None:
    """Refuse an image whose decoding would need more than :data:`MAX_DECODE_BYTES`, before decoding it."""
    need = decode_bytes(image)
    if need > MAX_DECODE_BYTES:
        per_pixel = need // max(image.width * image.height, 1)
        limit = MAX_DECODE_BYTES // per_pixel
        raise LookalikeError(
            f"cannot use {label}: decoding its {image.width}x{image.height} {image.mode} pixels would need about "
            f"{need / 2**30:.1f} GB, above the limit of {MAX_DECODE_BYTES / 2**30:.0f} GB ({limit / 1e6:.0f} "
            f"megapixels in this mode); downscale it first (or save it as 8-bit RGB)"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha over white, high bit depths rescaled, not clipped)."""
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_high_depth_to_uint8(np.asarray(image))).convert("RGB")
    if image.mode in _ALPHA_MODES or (image.mode in {"P", "L"} and "transparency" in image.info):
        rgba = image.convert("LA").convert("RGBA") if image.mode == "La" else image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map 16/32-bit integer or float greyscale values to uint8 by the range they imply."""
    data = values.astype(np.float32)  # (H, W); float32 keeps memory bounded (see decode_bytes)
    if np.issubdtype(values.dtype, np.uint16):
        low, high = 0.0, 65535.0
    else:
        finite = data[np.isfinite(data)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if np.issubdtype(values.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
            low, high = 0.0, 1.0
        elif lo >= 0.0 and hi <= 255.0:
            low, high = 0.0, 255.0
        elif lo >= 0.0 and hi <= 65535.0:
            low, high = 0.0, 65535.0
        else:
            low, high = lo, hi
    np.nan_to_num(data, copy=False, nan=low, posinf=high, neginf=low)
    data -= np.float32(low)
    data *= np.float32(255.0 / max(high - low, 1e-12))
    np.rint(data, out=data)
    np.clip(data, 0, 255, out=data)
    return data.astype(np.uint8)


def fit_square(
    image: Image.Image, size: int, mode: CropMode = "center", fill: tuple[int, int, int] = (0, 0, 0)
) -> Image.Image:
    """Make a size x size RGB image: centre crop, pad with fill, or plain (distorting) resize."""
    _check_crop_mode(mode)
    if size <= 0:
        raise LookalikeError(f"the square size must be a positive number of pixels, not {size}")
    image = to_rgb(image)
    width, height = image.size
    if mode == "resize":
        return image.resize((size, size), Image.Resampling.BICUBIC)
    if mode == "pad":
        side = max(width, height)
        canvas = Image.new("RGB", (side, side), tuple(fill))
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        return canvas.resize((size, size), Image.Resampling.BICUBIC)
    # "center": shortest edge to size (long edge truncated, as transformers does), then centre crop.
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    resized = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def _check_crop_mode(mode: str) -> None:
    """Raise a LookalikeError naming the allowed modes when mode is not one of them."""
    if mode not in CROP_MODES:
        raise LookalikeError(f"unknown crop mode {mode!r}; use one of {', '.join(CROP_MODES)}")


def to_clip_pixels(
    images: Sequence[Image.Image],
    size: int = 224,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    mode: CropMode = "center",
) -> torch.Tensor:
    """Turn RGB-able PIL images into a normalised float32 pixel batch (N, 3, size, size)."""
    if isinstance(images, Image.Image):
        images = [images]
    if len(images) == 0:
        raise LookalikeError("no reference images were given; pass at least one image")
    squares = [np.asarray(fit_square(image, size, mode), dtype=np.float32) for image in images]
    pixels = torch.from_numpy(np.stack(squares)).permute(0, 3, 1, 2)  # (N, 3, S, S) in 0..255
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((pixels / 255.0 - mean_t) / std_t).contiguous()  # (N, 3, S, S) float32

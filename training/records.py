"""Training records from a JSON/JSONL list, a folder of images with ``.txt`` captions, or tar shards.

A record only points at its files; reading happens per sample (:func:`read_image`, :func:`read_caption`,
:func:`read_face_id`), and every unreadable piece raises :class:`SkipSample` with a short reason that the
loader counts instead of stopping the run. Tar shards (webdataset layout: members grouped by the name
before the first dot) are indexed once by member offset, so they are read with random access like files.
"""

from __future__ import annotations

import glob
import io
import json
import pickle
import re
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from ..encoders.prepare import load_image
from ..errors import LookalikeError
from ..fileio import inside

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FACE_SUFFIXES = (".npy", ".pt", ".safetensors")


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is what the run counts ("corrupt image", ...)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class TarRef:
    """One member of a tar shard, read by offset."""

    shard: str
    offset: int
    size: int
    name: str


Ref = Union[Path, TarRef]


@dataclass(frozen=True)
class Record:
    """One training sample: the target image (also the reference), its caption and optional face fields."""

    key: str
    image: Ref | None
    text: str | Ref | None
    face_id: Ref | None = None  # a 512-d ArcFace embedding file (.npy, .pt, .safetensors)
    face_image: Ref | None = None  # what the CLIP encoder sees: a face crop or another photo of the subject (default: image)
    problem: str | None = None  # set when the record itself is unusable (e.g. not a JSON object)


#: The most bytes read from a caption or face-embedding file (a 512-d embedding takes 2 KB).
MAX_SIDE_FILE = 1 << 20


def read_bytes(ref: Ref, limit: int | None = None) -> bytes:
    """The bytes of a file or of a tar member; ``limit``: refuse (``ValueError``) a larger one unread."""
    size = ref.size if isinstance(ref, TarRef) else ref.stat().st_size
    if limit is not None and size > limit:
        raise ValueError(f"{size} bytes, more than the {limit} such a file may have")
    if isinstance(ref, TarRef):
        with open(ref.shard, "rb") as f:
            f.seek(ref.offset)
            return f.read(ref.size)
    return ref.read_bytes()


def _npy_vector(data: bytes) -> np.ndarray:
    """A numeric array from ``.npy`` bytes, its header checked (numeric dtype, size) before any allocation."""
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = header(f)
    if dtype.kind not in "fiu" or int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > MAX_SIDE_FILE:
        raise ValueError(f"a {dtype} array of shape {shape} is not an embedding")
    return np.load(io.BytesIO(data), allow_pickle=False)


def _missing(ref: Ref | None) -> bool:
    return ref is None or (isinstance(ref, Path) and not ref.is_file())


def read_image(ref: Ref | None) -> Image.Image:
    """An upright RGB image, or :class:`SkipSample` ("missing file" / "corrupt image")."""
    if _missing(ref):
        raise SkipSample("missing file", str(ref))
    try:
        if isinstance(ref, TarRef):
            with Image.open(io.BytesIO(read_bytes(ref))) as image:
                image.load()
                return load_image(image)
        return load_image(ref)
    except (LookalikeError, OSError, SyntaxError, ValueError) as exc:
        raise SkipSample("corrupt image", f"{ref}: {exc}") from exc


def read_caption(text: str | Ref | None) -> str:
    """The caption, stripped; an absent or empty one is ``""`` (as the official scripts train it: the model
    learns the image alone). :class:`SkipSample` ("unreadable caption") when a caption file cannot be read."""
    if text is not None and not isinstance(text, str):
        if _missing(text):
            return ""
        try:
            text = read_bytes(text, MAX_SIDE_FILE).decode("utf-8")
        except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            raise SkipSample("unreadable caption", f"{text}: {exc}") from exc
    return (text or "").strip()


#: Float dtypes a pickled numpy face embedding may have (their classes are all the unpickler may build).
EMBED_DTYPES = (np.float16, np.float32, np.float64)


def numpy_globals() -> list:
    """Exactly the globals ``torch.save`` of a float numpy array refers to: numpy's array rebuilder (under
    its numpy 2 and numpy 1 module names), ``ndarray``, ``dtype`` and the float dtype classes."""
    rebuild = np.zeros(1).__reduce__()[0]  # numpy._core.multiarray._reconstruct (numpy.core in numpy 1)
    names = ("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct")
    return [*((rebuild, name) for name in names), np.ndarray, np.dtype, *(type(np.dtype(t)) for t in EMBED_DTYPES)]


def _torch_vector(data: bytes) -> torch.Tensor:
    """A tensor from ``torch.save`` bytes: a plain tensor, or a float numpy array (the official FaceID data),
    read with ``weights_only=True`` and only :func:`numpy_globals` allowed (for this call alone)."""
    with warnings.catch_warnings():  # torch warns about pickle protocols it reads anyway
        warnings.simplefilter("ignore", UserWarning)
        try:
            with torch.serialization.safe_globals(numpy_globals()):
                value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError("it pickles something other than a plain tensor or float array; refused unread "
                             "(nothing in it ran)") from exc
    if isinstance(value, np.ndarray):
        if value.dtype.type not in EMBED_DTYPES:
            raise ValueError(f"it holds a {value.dtype} array, not an embedding")
        return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"it holds a {type(value).__name__}, not a tensor or an array")
    return value.float()


def read_face_id(ref: Ref | None, normed: bool = True) -> torch.Tensor:
    """A 1-d ArcFace embedding (L2-normalised when ``normed``), or :class:`SkipSample`."""
    if ref is None:
        raise SkipSample("no face embedding")
    if _missing(ref):
        raise SkipSample("missing file", str(ref))
    name = ref.name if isinstance(ref, TarRef) else ref.name
    try:
        data = read_bytes(ref, MAX_SIDE_FILE)
        if name.endswith(".npy"):
            vec = torch.from_numpy(_npy_vector(data).astype(np.float32))
        elif name.endswith(".safetensors"):
            from safetensors.torch import load as load_st

            vec = next(iter(load_st(data).values())).float()
        else:
            vec = _torch_vector(data)
    except Exception as exc:  # any unreadable payload is one skipped sample, never the end of the run
        raise SkipSample("bad face embedding", f"{ref}: {exc}") from exc
    vec = vec.flatten()
    if vec.numel() == 0 or not torch.isfinite(vec).all():
        raise SkipSample("bad face embedding", str(ref))
    return torch.nn.functional.normalize(vec, dim=0) if normed else vec


def expand_shards(pattern: str) -> list[str]:
    """Shard files of a ``{000..009}`` brace range and/or glob pattern, sorted."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if match:
        lo, hi = match.group(1), match.group(2)
        names = [pattern[:match.start()] + str(i).zfill(len(lo)) + pattern[match.end():]
                 for i in range(int(lo), int(hi) + 1)]
        return sorted(f for name in names for f in (glob.glob(name) or []))
    return sorted(glob.glob(pattern))


def find_records(data: str, root: str | None = None) -> list[Record]:
    """Every record of a dataset, in a fixed order (the file's, or sorted names)."""
    path = Path(data).expanduser()
    if any(c in data for c in "*?{") or path.suffix == ".tar":
        return tar_records(expand_shards(data) if any(c in data for c in "*?{") else [str(path)])
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        return tar_records(shards) if shards else folder_records(path)
    if path.suffix in (".json", ".jsonl"):
        return json_records(path, Path(root).expanduser() if root else path.parent)
    raise LookalikeError(f"--data {data}: use a .json/.jsonl list, a folder of images, or .tar shards")


def _json_items(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        items = json.loads(text)
    except (OSError, ValueError) as exc:
        raise LookalikeError(f"cannot read {path}: {exc}; it must be valid JSON") from exc
    if not isinstance(items, list):
        raise LookalikeError(f"{path} must hold a JSON list of {{\"image_file\", \"text\"}} records")
    return items


def json_records(path: Path, root: Path) -> list[Record]:
    """Records of a JSON list / JSON lines file; paths are relative to ``root``."""
    records = []
    for i, item in enumerate(_json_items(path)):
        if not isinstance(item, dict):
            records.append(Record(f"{path.name}:{i}", None, None, problem="malformed record"))
            continue

        def ref(field: str, item: dict = item) -> Path | None:
            value = item.get(field)
            return inside(root, value, what=field, links=False) if isinstance(value, str) and value else None

        text = item.get("text", item.get("caption"))
        key = str(item.get("image_file", f"{path.name}:{i}"))
        try:
            records.append(Record(key, ref("image_file"), text if isinstance(text, str) else None,
                                  ref("id_embed_file"), ref("reference_file") or ref("face_image_file")))
        except LookalikeError:  # a path leading outside the data root: counted and skipped, never read
            records.append(Record(key, None, None, problem="path outside the data root"))
    return records


def folder_records(folder: Path) -> list[Record]:
    """Images anywhere under ``folder`` with a sidecar ``NAME.txt`` caption and optional ``NAME.npy`` face id."""
    records = []
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        faces = [image.with_suffix(s) for s in FACE_SUFFIXES if image.with_suffix(s).is_file()]
        records.append(Record(str(image.relative_to(folder)), image, image.with_suffix(".txt"),
                              faces[0] if faces else None))
    return records


def _tar_groups(shard: str) -> Iterator[tuple[str, dict[str, TarRef]]]:
    """(key, {extension: member}) per sample of a webdataset shard, in the shard's order."""
    groups: dict[str, dict[str, TarRef]] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                stem, _, ext = base.partition(".")
                key = m.name[: len(m.name) - len(base)] + stem
                groups.setdefault(key, {})["." + ext.lower()] = TarRef(shard, m.offset_data, m.size, m.name)
    except (tarfile.TarError, OSError) as exc:
        raise LookalikeError(f"cannot index tar shard {shard}: {exc}; remove or repair it") from exc
    yield from groups.items()


def tar_records(shards: list[str]) -> list[Record]:
    """Records of webdataset shards: image member, ``.txt`` caption, optional ``.npy`` face id."""
    records = []
    for shard in shards:
        for key, members in _tar_groups(shard):
            images = [members[s] for s in IMAGE_SUFFIXES if s in members]
            faces = [members[s] for s in FACE_SUFFIXES if s in members]
            caption = members.get(".txt") or members.get(".caption")
            records.append(Record(f"{Path(shard).name}/{key}", images[0] if images else None, caption,
                                  faces[0] if faces else None))
    return records

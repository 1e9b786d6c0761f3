"""Check a safetensors file's header against the file before any tensor is read or allocated.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, N bytes of
JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the
tensors' bytes, back to back. Every claim of the header is checked against the others and the file's size
here, in plain Python (no torch), so a hostile or damaged file fails with one sentence and costs nothing.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import LookalikeError

#: The metadata key holding an adapter's spec as JSON.
SPEC_KEY = "lookalike.spec"
#: Bytes per element of every dtype safetensors writes.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
#: safetensors' own limit on the header's size.
MAX_HEADER_BYTES = 100_000_000
MAX_TENSORS = 100_000
MAX_NDIM = 8
GiB = 1 << 30


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it (offsets relative to the end of the header)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A checked header: tensors by name and the string metadata."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def _entry(name: str, value: object) -> TensorEntry:
    """One header entry, its types and its byte count checked; raises ValueError with the reason."""
    if not isinstance(value, dict):
        raise ValueError(f"entry {name!r} is not an object")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"tensor {name!r} has an unknown dtype {dtype!r}")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise ValueError(f"tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise ValueError(f"tensor {name!r} has invalid data offsets {offsets!r}")
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(f"tensor {name!r} of shape {tuple(shape)} ({dtype}) needs {nbytes:,} bytes but its "
                         f"offsets span {offsets[1] - offsets[0]:,}")
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def _parse(path: Path, max_bytes: int) -> Header:
    """The header of ``path``, checked; raises ValueError with the reason."""
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"the file is {size:,} bytes, above the limit of {max_bytes:,} bytes for this kind of file")
    if size < 8:
        raise ValueError(f"the file is only {size} bytes long")
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length < 2 or length > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"the header claims {length:,} bytes, but the file has {size - 8:,} after the length")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"the header is not JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise ValueError("its __metadata__ is not a mapping of strings to strings")
    if len(header) > MAX_TENSORS:
        raise ValueError(f"the header lists {len(header):,} tensors, above the limit of {MAX_TENSORS:,}")
    tensors = {name: _entry(name, value) for name, value in header.items()}
    position = 0
    for entry in sorted(tensors.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            what = "overlaps another" if entry.begin < position else "leaves a gap before it"
            raise ValueError(f"tensor {entry.name!r} {what} (offset {entry.begin:,}, expected {position:,})")
        position = entry.end
    if 8 + length + position != size:
        raise ValueError(f"the header describes {8 + length + position:,} bytes but the file has {size:,}")
    return Header(tensors, dict(metadata))


def read_header(path: str | os.PathLike, what: str = "", max_bytes: int = 8 * GiB) -> Header:
    """The checked header of a safetensors file; any inconsistency is a :class:`LookalikeError` sentence.

    ``max_bytes`` caps the file's size (a sparse 100 GB file is refused before it is mapped).
    """
    path = Path(path)
    try:
        return _parse(path, max_bytes)
    except (ValueError, OSError, struct.error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise LookalikeError(f"cannot read {what}{path}: not a valid safetensors file ({reason}); "
                             f"re-create or re-download it") from exc

"""FaceID-Plus's generation controls, as the official ``IPAdapterFaceIDPlus.generate(s_scale, shortcut)``.

The official projection (Ye et al. 2023, IP-Adapter FaceID-Plus) returns the perceiver's refinement of the id
tokens, or with ``shortcut`` (v2) the id tokens plus ``s_scale`` times it. Here both are set for one generation
and put back afterwards; tokens remembered under other values are forgotten.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ..adapters.module import IPAdapter
from ..errors import LookalikeError


@contextmanager
def faceid_plus_controls(adapters: Sequence[IPAdapter], s_scale: float | None,
                         shortcut: bool | None) -> Iterator[None]:
    """FaceID-Plus's ``s_scale`` and ``shortcut`` for one generation (the official ``generate()`` keywords)."""
    if s_scale is not None and (isinstance(s_scale, bool) or not math.isfinite(float(s_scale))):
        raise LookalikeError(f"s_scale must be a finite number, not {s_scale!r}")
    plus = [a for a in adapters if a.spec.projector == "faceid_plus"]
    if (s_scale is not None or shortcut is not None) and not plus:
        raise LookalikeError("s_scale and shortcut are FaceID-Plus controls; load a faceid-plus adapter to use them")
    saved = [(a.image_proj.s_scale, a.image_proj.shortcut) for a in plus]
    try:
        for a in plus:
            new = (float(s_scale) if s_scale is not None else a.image_proj.s_scale,
                   bool(shortcut) if shortcut is not None else a.image_proj.shortcut)
            if new != (a.image_proj.s_scale, a.image_proj.shortcut):
                a.__dict__.pop("_projected", None)  # remembered tokens were made with the old controls
                a.image_proj.s_scale, a.image_proj.shortcut = new
        yield
    finally:
        for a, (old_scale, old_shortcut) in zip(plus, saved):
            if (a.image_proj.s_scale, a.image_proj.shortcut) != (old_scale, old_shortcut):
                a.__dict__.pop("_projected", None)
                a.image_proj.s_scale, a.image_proj.shortcut = old_scale, old_shortcut

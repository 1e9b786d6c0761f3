"""Style-only and layout-only transfer: named sets of UNet blocks, as diffusers' per-block scale dicts.

InstantStyle found that one transformer model of SDXL carries style (``up_blocks.0.attentions.1``) and one
layout (``down_blocks.2.attentions.1``); ComfyUI_IPAdapter_plus offers the same as weight types ("style
transfer", "composition", "strong style transfer") for SD1.5 and SDXL. ComfyUI numbers a UNet's transformer
models in the order they run (down blocks, the middle block, up blocks); the tables below are its choices in
diffusers' block names (``tests/test_transfer.py`` checks them against that numbering).
"""

from __future__ import annotations

from typing import Any

from ..errors import LookalikeError

_ALL3 = [1.0, 1.0, 1.0]

#: transfer kind -> base family -> per-block scale dict (blocks left out get 0).
TRANSFER_BLOCKS: dict[str, dict[str, dict[str, Any]]] = {
    "style": {
        "sd15": {"down": {"block_0": [1.0, 1.0], "block_1": [1.0, 1.0]},
                 "up": {"block_1": [0.0, 0.0, 1.0], "block_2": _ALL3, "block_3": _ALL3}},
        "sdxl": {"up": {"block_0": [0.0, 1.0, 0.0]}},
    },
    "layout": {
        "sd15": {"down": {"block_2": [0.25, 1.0]}},
        "sdxl": {"down": {"block_2": [0.0, 1.0]}},
    },
    "strong-style": {
        "sd15": {"down": {"block_0": [1.0, 1.0], "block_1": [1.0, 1.0]}, "mid": 1.0,
                 "up": {"block_1": _ALL3, "block_2": _ALL3, "block_3": _ALL3}},
        "sdxl": {"down": {"block_1": [1.0, 1.0], "block_2": [1.0, 0.0]}, "mid": 1.0,
                 "up": {"block_0": _ALL3, "block_1": _ALL3}},
    },
}
#: Every choice of :func:`transfer_scale`; ``all`` is the usual adapter (every block at ``scale``).
TRANSFER_KINDS = ("all", *TRANSFER_BLOCKS)


def _times(value: Any, factor: float) -> Any:
    if isinstance(value, dict):
        return {k: _times(v, factor) for k, v in value.items()}
    if isinstance(value, list):
        return [float(v) * factor for v in value]
    return float(value) * factor


def transfer_scale(kind: str, base: str, scale: float = 1.0) -> float | dict[str, Any]:
    """The adapter scale that transfers only ``kind`` (``style``, ``layout``, ``strong-style``) from the
    reference on a ``base`` (``sd15``/``sdxl``) UNet: a per-block dict for ``Personalizer.generate(scale=...)``
    or diffusers' ``set_ip_adapter_scale``; ``all`` gives ``scale`` itself."""
    if kind not in TRANSFER_KINDS:
        raise LookalikeError(f"unknown transfer {kind!r}; choose one of {', '.join(TRANSFER_KINDS)}")
    if kind == "all":
        return float(scale)
    blocks = TRANSFER_BLOCKS[kind].get(base)
    if blocks is None:
        raise LookalikeError(f"transfer {kind!r} is defined for the sd15 and sdxl block layouts, not {base!r}")
    return _times(blocks, float(scale))

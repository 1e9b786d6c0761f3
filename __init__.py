"""lookalike: zero-shot personalization of diffusers text-to-image models.

The public API is imported lazily so that ``lookalike --help`` never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .compat import quiet_torchvision_fallback  # logging only: no torch

__version__ = "0.1.0"

quiet_torchvision_fallback()

_EXPORTS = {
    "Personalizer": "lookalike.pipeline.personalizer",
    "Subject": "lookalike.pipeline.subject",
    "AdapterSpec": "lookalike.adapters.spec",
    "REGISTRY": "lookalike.adapters.spec",
    "get_spec": "lookalike.adapters.spec",
    "register": "lookalike.adapters.spec",
    "IPAdapter": "lookalike.adapters.module",
    "attach_adapters": "lookalike.adapters.attach",
    "transfer_scale": "lookalike.adapters.transfer",
    "load_adapter": "lookalike.weights.io",
    "save_adapter": "lookalike.weights.io",
    "LookalikeError": "lookalike.errors",
}

__all__ = [
    "REGISTRY",
    "AdapterSpec",
    "IPAdapter",
    "LookalikeError",
    "Personalizer",
    "Subject",
    "__version__",
    "attach_adapters",
    "get_spec",
    "load_adapter",
    "register",
    "save_adapter",
    "transfer_scale",
]

if TYPE_CHECKING:  # pragma: no cover
    from .adapters.attach import attach_adapters
    from .adapters.module import IPAdapter
    from .adapters.spec import REGISTRY, AdapterSpec, get_spec, register
    from .adapters.transfer import transfer_scale
    from .errors import LookalikeError
    from .pipeline.personalizer import Personalizer
    from .pipeline.subject import Subject
    from .weights.io import load_adapter, save_adapter


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lookalike' has no attribute {name!r}")

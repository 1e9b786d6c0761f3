"""Where the shipped demo model lives and which adapters the demo presets take, read without torch (the
command's help text and its checks use the same answer)."""

from __future__ import annotations

import functools
from pathlib import Path

from ..adapters.spec import REGISTRY, AdapterSpec
from ..errors import LookalikeError

#: The trained demo model shipped inside the package (see ``lookalike demo``).
DEMO_DIR = Path(__file__).resolve().parent.parent / "world" / "demo-model"
DEMO_ADAPTER_FILE = "adapter.safetensors"
DEMO_TRAINED = (DEMO_DIR / "model_index.json").is_file() and (DEMO_DIR / DEMO_ADAPTER_FILE).is_file()
#: The adapters the random-weight demo builds, sized for its tiny UNet and encoder.
RANDOM_DEMO_ADAPTERS = ("basic", "plus")


@functools.cache
def shipped_adapter_spec() -> AdapterSpec:
    """The variant of the shipped demo adapter: its spec metadata, else (torch) its shapes."""
    from ..weights.header import SPEC_KEY, read_header

    path = DEMO_DIR / DEMO_ADAPTER_FILE
    metadata = read_header(path, "the demo adapter ").metadata
    if SPEC_KEY in metadata:
        return AdapterSpec.from_json(metadata[SPEC_KEY], f"{path}'s {SPEC_KEY} metadata")
    from ..weights.io import detect_spec, read_checkpoint

    return detect_spec(*read_checkpoint(path), str(path))


def demo_adapters(model: str) -> tuple[str, ...]:
    """Short names of the adapters ``--model demo`` (trained: its shipped adapter) or ``tiny-random`` takes."""
    if model == "demo" and DEMO_TRAINED:
        spec = shipped_adapter_spec()
        return (spec.short_name or spec.name,)
    return RANDOM_DEMO_ADAPTERS


def said(names: tuple[str, ...]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return " and ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} and {names[-1]}"


def check_demo_adapter(model: str, name: str) -> None:
    """Refuse a registry adapter (short or full name) the demo preset ``model`` does not offer, naming those it
    does."""
    offered = demo_adapters(model)
    spec = REGISTRY.get(name)
    short = (spec.short_name or name) if spec is not None and spec.base == "sd15" else name
    if short not in offered:
        kind = "adapters" if len(offered) > 1 else "adapter"
        raise LookalikeError(f"--model {model} offers the {said(offered)} {kind}, not {name!r}; use "
                             f"--adapter {offered[0]} with --model {model}")

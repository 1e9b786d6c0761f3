"""The offline ``demo`` preset: a tiny SD1.5-shaped pipeline, CLIP encoder and adapters, no downloads.

``--model demo`` loads the trained demo model that ships inside the package (:data:`DEMO_DIR`: a diffusers
pipeline folder with its CLIP image encoder, and ``adapter.safetensors``, built by ``lookalike demo
--rebuild``). It knows only a small procedural world of coloured shapes. :func:`demo_personalizer` builds
the same kind of pipeline with random (seeded) weights in code, for tests and smoke runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..adapters.module import IPAdapter
from ..adapters.spec import AdapterSpec, get_spec
from ..errors import LookalikeError
from .demo_files import (  # noqa: F401  (re-exported: where the demo lives)
    DEMO_ADAPTER_FILE,
    DEMO_DIR,
    DEMO_TRAINED,
    check_demo_adapter,
    shipped_adapter_spec,
)
from .personalizer import Personalizer
from .tiny import tiny_pipeline

DEMO_NOTE = ("the demo model knows only a small world of coloured shapes on plain backgrounds "
             "(try a reference from `lookalike demo --out DIR`); use an SD1.5/SDXL model for real photos"
             if DEMO_TRAINED else "the demo model has random weights (no trained demo weights ship): images are noise-like")
#: Widths of the demo's CLIP encoder: pooled (projection) and patch (hidden) features, 17 tokens per image.
DEMO_CLIP = {"hidden_size": 48, "projection_dim": 32, "image_size": 64, "patch_size": 16}


def demo_clip_encoder(seed: int = 0) -> Any:
    """A 2-layer CLIP vision tower with projection (64 px input, 17 tokens)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ..encoders.clip import ClipImageEncoder

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=DEMO_CLIP["hidden_size"], intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, image_size=DEMO_CLIP["image_size"],
                              patch_size=DEMO_CLIP["patch_size"], projection_dim=DEMO_CLIP["projection_dim"])
    return ClipImageEncoder(CLIPVisionModelWithProjection(config).eval())


def demo_spec(name: str) -> AdapterSpec:
    """A registry variant (basic or plus) sized for the demo UNet and encoder."""
    check_demo_adapter("tiny-random", name)
    spec = get_spec(name, "sd15")
    if spec.projector == "linear":
        return spec.with_(embed_dim=DEMO_CLIP["projection_dim"], cross_attention_dim=32)
    if spec.projector == "resampler":
        kwargs = dict(spec.projector_kwargs, dim=32, heads=2)
        return spec.with_(embed_dim=DEMO_CLIP["hidden_size"], cross_attention_dim=32, projector_kwargs=kwargs)
    raise LookalikeError(f"the demo model builds no {spec.projector} projector")  # pragma: no cover


def demo_adapter(name: str, unet: torch.nn.Module, seed: int = 0) -> IPAdapter:
    """A demo adapter: random projector, to_k_ip/to_v_ip started from the text projections (the recipe)."""
    torch.manual_seed(seed)
    adapter = IPAdapter.for_unet(demo_spec(name), unet)
    adapter.init_from_unet(unet)
    return adapter.eval().requires_grad_(False)


def demo_personalizer(adapter: str | None = "plus", seed: int = 0) -> Personalizer:
    """The demo preset, ready to encode and generate (the adapter loaded when named)."""
    pipe = tiny_pipeline("sd15", seed=seed)
    pipe.set_progress_bar_config(disable=True)
    p = Personalizer(pipe, image_encoder=demo_clip_encoder(seed))
    if adapter:
        p.load_adapter(demo_adapter(adapter, pipe.unet, seed))
    return p


def trained_demo_personalizer(adapter: bool = True, model_dir: str | Path | None = None) -> Personalizer:
    """The trained demo model (fp32, CPU) from :data:`DEMO_DIR` (or ``model_dir``), its adapter loaded."""
    folder = Path(model_dir) if model_dir is not None else DEMO_DIR
    if not (folder / "model_index.json").is_file():
        raise LookalikeError(f"no trained demo model in {folder}; reinstall lookalike, or rebuild it with "
                             f"`lookalike demo --rebuild DIR`")
    p = Personalizer.from_pretrained(folder, dtype=torch.float32)
    p.pipe.set_progress_bar_config(disable=True)
    if adapter:
        p.load_adapter(folder / DEMO_ADAPTER_FILE)
    return p

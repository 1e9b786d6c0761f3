"""Tiny FLUX/SD3 pipelines and random published-layout DiT adapters for the DiT tests (built in code)."""

from __future__ import annotations

import copy

import torch

from lookalike.adapters.module import IPAdapter
from lookalike.adapters.spec import REGISTRY, AdapterSpec
from lookalike.pipeline.tiny_dit import tiny_flux_pipeline, tiny_sd3_pipeline

from helpers import randomize

EMBED = 24  # tiny CLIP / SigLIP width
_PIPES: dict = {}


def flux_pipe(cls=None, **kw):
    """A tiny FLUX pipeline with fixed random weights (a copy, so tests may change it)."""
    key = ("flux", cls, tuple(sorted(kw.items())))
    if key not in _PIPES:
        _PIPES[key] = tiny_flux_pipeline(seed=0, cls=cls, **kw)
    return copy.deepcopy(_PIPES[key])


def sd3_pipe(cls=None, **kw):
    key = ("sd3", cls, tuple(sorted(kw.items())))
    if key not in _PIPES:
        _PIPES[key] = tiny_sd3_pipeline(seed=0, cls=cls, **kw)
    return copy.deepcopy(_PIPES[key])


def _with_controlnet(base, cls, net, seed: int):
    """``cls`` (a ControlNet pipeline) on ``base``'s parts and ``net``, whose zero-initialised output layers get
    small seeded noise so that the control image moves the result."""
    import inspect

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder",
                                "pos_embed_input")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    wanted = set(inspect.signature(cls.__init__).parameters)
    return cls(**{k: v for k, v in base.components.items() if k in wanted}, controlnet=net.eval())


def flux_controlnet_pipe():
    """A tiny FluxControlNetPipeline: the tiny FLUX parts and a 1+1-block FluxControlNetModel (InstantX layout:
    the control image goes through the VAE, no hint block)."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    key = ("flux-controlnet",)
    if key not in _PIPES:
        base = tiny_flux_pipeline(seed=0)
        t = base.transformer.config
        torch.manual_seed(1)
        net = FluxControlNetModel(patch_size=1, in_channels=t.in_channels, num_layers=1, num_single_layers=1,
                                  attention_head_dim=t.attention_head_dim, num_attention_heads=t.num_attention_heads,
                                  joint_attention_dim=t.joint_attention_dim,
                                  pooled_projection_dim=t.pooled_projection_dim, axes_dims_rope=t.axes_dims_rope)
        _PIPES[key] = _with_controlnet(base, FluxControlNetPipeline, net, seed=2)
    return copy.deepcopy(_PIPES[key])


def sd3_controlnet_pipe():
    """A tiny StableDiffusion3ControlNetPipeline with a 1-block SD3ControlNetModel of the transformer's widths."""
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    key = ("sd3-controlnet",)
    if key not in _PIPES:
        base = tiny_sd3_pipeline(seed=0)
        t = base.transformer.config
        torch.manual_seed(1)
        net = SD3ControlNetModel(sample_size=t.sample_size, patch_size=t.patch_size, in_channels=t.in_channels,
                                 num_layers=1, attention_head_dim=t.attention_head_dim,
                                 num_attention_heads=t.num_attention_heads, joint_attention_dim=t.joint_attention_dim,
                                 caption_projection_dim=t.caption_projection_dim,
                                 pooled_projection_dim=t.pooled_projection_dim, out_channels=t.out_channels,
                                 pos_embed_max_size=t.pos_embed_max_size, qk_norm=t.qk_norm)
        _PIPES[key] = _with_controlnet(base, StableDiffusion3ControlNetPipeline, net, seed=2)
    return copy.deepcopy(_PIPES[key])


def tiny_dit_spec(name: str, model, tokens: int | None = None) -> AdapterSpec:
    """A registry DiT spec shrunk to a tiny transformer's widths."""
    spec = REGISTRY[name]
    if spec.base == "flux":
        cross = model.context_embedder.in_features
        kw = dict(spec.projector_kwargs)
        return spec.with_(embed_dim=EMBED, cross_attention_dim=cross, projector_kwargs=kw,
                          num_tokens=tokens or (8 if spec.projector == "flux_mlp" else spec.num_tokens))
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    kw = dict(spec.projector_kwargs, dim=32, heads=1, timestep_in_dim=16)  # depth 4: diffusers assumes it
    return spec.with_(embed_dim=EMBED, cross_attention_dim=hidden, projector_kwargs=kw, num_tokens=tokens or 8)


def random_dit_adapter(name: str, pipe, seed: int = 0, std: float = 0.3, tokens: int | None = None) -> IPAdapter:
    """A random tiny adapter of variant ``name`` for ``pipe.transformer``."""
    spec = tiny_dit_spec(name, pipe.transformer, tokens)
    return randomize(IPAdapter.for_model(spec, pipe.transformer), seed, std).eval()


def pooled(batch: int = 1, images: int = 1, seed: int = 10) -> torch.Tensor:
    """Random CLIP image embeddings (batch, images, EMBED)."""
    return torch.randn(batch, images, EMBED, generator=torch.Generator().manual_seed(seed))


def flux_kwargs(steps: int = 2, **extra):
    kw = dict(prompt="a photo", num_inference_steps=steps, height=32, width=32, output_type="np",
              max_sequence_length=16, guidance_scale=3.5)
    kw.update(extra)
    return kw


def sd3_kwargs(**extra):
    kw = dict(prompt="a photo", num_inference_steps=2, height=32, width=32, output_type="np",
              max_sequence_length=16, guidance_scale=5.0)
    kw.update(extra)
    return kw


def patches(batch: int = 1, seed: int = 10, tokens: int = 5) -> torch.Tensor:
    """Random SigLIP patch features (batch, tokens, EMBED); 729 tokens for so400m-patch14-384."""
    return torch.randn(batch, tokens, EMBED, generator=torch.Generator().manual_seed(seed))


def image_and_mask(size: int = 32):
    """A seeded random RGB image and a mask whose centre square is white (the part to repaint)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return image, mask


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def save_gguf(model, folder) -> str:
    """Write ``model`` as a GGUF file (Q8_0 for 2-D weights whose rows split into 32-blocks, F32 otherwise) plus
    its config.json, as llama.cpp-style FLUX quantizations are shipped; returns the .gguf path."""
    import os

    import gguf

    model.save_pretrained(folder)
    path = os.path.join(str(folder), "transformer-q8_0.gguf")
    writer = gguf.GGUFWriter(path, "flux")
    for key, value in model.state_dict().items():
        array = value.float().numpy()
        if array.ndim == 2 and array.shape[-1] % 32 == 0:
            q8 = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(key, q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

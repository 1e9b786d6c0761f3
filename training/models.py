"""The frozen models of a run (UNet, VAE, text and image encoders, noise scheduler) and the trainable adapter.

Only the adapter trains: its projector and the new ``to_k_ip``/``to_v_ip``, initialised from the text
``to_k``/``to_v`` (IP-Adapter, Ye et al. 2023, sec. 3.2). ``--base demo`` builds tiny random models in code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.module import IPAdapter
from ..adapters.spec import DIT_BASES, ENCODERS, AdapterSpec, encoder_of, get_spec
from ..encoders.clip import ClipImageEncoder
from ..errors import LookalikeError
from ..weights.io import check_fits, read_checkpoint
from .config import DEMO_BASES, TrainConfig
from .faces import FaceEmbedder, face_embedder

log = logging.getLogger("lookalike.train")
FACE_ID_DIM = 512


@dataclass
class Models:
    """What a run computes with; encoders are ``None`` when a cache replaces them."""

    family: str  # "sd15", "sdxl", "flux" or "sd3" (then ``unet`` is the FLUX/SD3 transformer)
    unet: nn.Module
    noise_scheduler: Any
    vae: nn.Module | None = None
    text_encoders: list[nn.Module] = field(default_factory=list)
    tokenizers: list[Any] = field(default_factory=list)
    image_encoder: ClipImageEncoder | None = None
    faces: FaceEmbedder | None = None  # embeds faces of records without an id file (--face-models)
    source: str = "demo"

    def frozen(self) -> list[nn.Module]:
        """Every frozen module (for checks that they never change)."""
        mods = [self.unet, self.vae, *self.text_encoders, getattr(self.image_encoder, "model", None)]
        return [m for m in mods if m is not None]


def tiny_clip_vision(seed: int = 0) -> Any:
    """A 2-layer CLIP vision model with projection (hidden 32, 32 px, patch 8, projection 16), random."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=16)
    return CLIPVisionModelWithProjection(config).eval()


def base_family(base: str) -> str:
    """``sd15``, ``sdxl``, ``flux`` or ``sd3`` for a preset, a local diffusers folder or a hub id."""
    if base in DEMO_BASES:
        return DEMO_BASES[base]
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(base)
    except Exception as exc:  # hub and file errors alike become one sentence
        raise LookalikeError(f"cannot read the base model {base!r} ({str(exc).splitlines()[0]}); pass a hub id, "
                             f"a local diffusers folder with model_index.json, or 'demo'") from exc
    index = index[0] if isinstance(index, tuple) else index
    from .dit import dit_family

    return dit_family(index) or ("sdxl" if "text_encoder_2" in index else "sd15")


def _demo_components(family: str) -> dict[str, Any]:
    from diffusers import DDPMScheduler

    from ..pipeline.tiny import tiny_pipeline

    pipe = tiny_pipeline(family, seed=0)
    log.info("--base demo: tiny %s models with RANDOM weights, built in code (for tests and smoke runs)", family)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    return {"unet": pipe.unet, "vae": pipe.vae, "text_encoders": encoders, "tokenizers": tokenizers,
            "noise_scheduler": DDPMScheduler.from_config(pipe.scheduler.config)}


def _pretrained_components(base: str, family: str, need_encoders: bool) -> dict[str, Any]:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    parts: dict[str, Any] = {
        "unet": UNet2DConditionModel.from_pretrained(base, subfolder="unet"),
        "noise_scheduler": DDPMScheduler.from_pretrained(base, subfolder="scheduler"),
        "tokenizers": [CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")],
    }
    if family == "sdxl":
        parts["tokenizers"].append(CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2"))
    if need_encoders:
        parts["vae"] = AutoencoderKL.from_pretrained(base, subfolder="vae")
        parts["text_encoders"] = [CLIPTextModel.from_pretrained(base, subfolder="text_encoder")]
        if family == "sdxl":
            parts["text_encoders"].append(CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2"))
    return parts


def resolve_spec(name: str, family: str) -> AdapterSpec:
    """The registry variant for this base family (short names resolved by family)."""
    spec = get_spec(name, family)  # type: ignore[arg-type]
    if spec.base != family:
        raise LookalikeError(f"adapter {spec.name} is for {spec.base} but the base model is {family}; "
                             f"pick a {family} variant")
    return spec


def image_encoder_source(config: TrainConfig, spec: AdapterSpec) -> str | None:
    """Where the CLIP image encoder comes from: the flag, BASE/image_encoder, or the variant's hub folder."""
    if config.image_encoder:
        return config.image_encoder
    local = Path(config.base).expanduser() / "image_encoder"
    if (local / "config.json").is_file():
        return str(local)
    from ..weights.hub import resolve_encoder_dir

    clip = [e for e in encoder_of(spec) if e.kind in ("clip", "siglip")][0]
    return str(resolve_encoder_dir(ENCODERS[clip.name]))


def clip_kinds(spec: AdapterSpec) -> tuple[str, ...]:
    return tuple(k for k in spec.features if k in ("pooled", "patch"))


def tiny_siglip_vision(seed: int = 0) -> Any:
    """A 2-layer SigLIP vision model (hidden 24, 32 px, patch 8), random."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8)
    return SiglipVisionModel(config).eval()


def load_image_encoder(config: TrainConfig, spec: AdapterSpec) -> Any:
    """The CLIP or SigLIP image encoder the variant needs (None for FaceID, which only reads ArcFace ids)."""
    from ..encoders.siglip import SiglipImageEncoder

    kinds = clip_kinds(spec)
    if not kinds:
        return None
    siglip = encoder_of(spec)[0].kind == "siglip"
    if config.base in DEMO_BASES and not config.image_encoder:
        log.info("--base demo: tiny image encoder with RANDOM weights, built in code")
        return SiglipImageEncoder(tiny_siglip_vision(), kinds=kinds) if siglip else ClipImageEncoder(
            tiny_clip_vision(), kinds=kinds)
    cls = SiglipImageEncoder if siglip else ClipImageEncoder
    return cls.from_pretrained(image_encoder_source(config, spec), kinds=kinds)


def load_models(config: TrainConfig, spec_name: str, need_encoders: bool = True) -> tuple[Models, AdapterSpec]:
    """Build or load every frozen model (fp32, CPU; :func:`place` moves them) and resolve the variant."""
    family = base_family(config.base)
    spec = resolve_spec(spec_name, family)
    if family in DIT_BASES:
        from .dit import demo_components, pretrained_components

        parts = demo_components(family) if config.base in DEMO_BASES else pretrained_components(
            config.base, family, need_encoders, run_dtype(config))
        if not need_encoders:
            parts.update(vae=None, text_encoders=[])
    elif config.base in DEMO_BASES:
        parts = _demo_components(family)
        if not need_encoders:
            parts.update(vae=None, text_encoders=[])
    else:
        parts = _pretrained_components(config.base, family, need_encoders)
    encoder = load_image_encoder(config, spec) if need_encoders else None
    if config.face_models and "face_id" not in spec.features:
        raise LookalikeError(f"--face-models embeds faces for FaceID adapters; {spec.name} reads no face embedding, "
                             f"so drop --face-models")
    faces = face_embedder(config.face_models, config.face_detector, config.yunet_model,
                          spec.face_normed) if need_encoders else None
    models = Models(family=family, image_encoder=encoder, faces=faces, source=config.base, **parts)
    for module in models.frozen():
        module.requires_grad_(False).eval()
    return models, spec


def run_dtype(config: TrainConfig) -> torch.dtype:
    """The frozen models' dtype: ``--mixed-precision``'s (float32 without it)."""
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]


def move(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``module.to(device, dtype)``, casting only when the dtype changes (diffusers warns on every cast)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)
    return module


def place(models: Models, device: torch.device, dtype: torch.dtype) -> None:
    """Move frozen models to ``device``/``dtype`` (an SDXL VAE stays fp32 under fp16: it overflows)."""
    for module in (models.unet, *models.text_encoders):
        move(module, device, dtype)
    if models.vae is not None:
        move(models.vae, device, torch.float32 if models.family == "sdxl" and dtype == torch.float16 else dtype)
    if models.image_encoder is not None:
        models.image_encoder.to(device=device, dtype=dtype)


def fit_spec(spec: AdapterSpec, dims: dict[str, int], cross: int, lora_rank: int = 0) -> AdapterSpec:
    """The variant sized to this UNet and these encoder widths, with a LoRA of ``lora_rank`` (0: none), no hub
    location.

    With the official models nothing but ``lora_rank`` changes. Other widths (the demo's tiny models, other
    encoders) change ``embed_dim``/``clip_dim``; a UNet of another cross-attention width also gets a
    Resampler of that width and ``width // 64`` heads.
    """
    changes: dict[str, Any] = {"lora_rank": lora_rank, "cross_attention_dim": cross, "repo_id": None, "subfolder": None,
                               "filename": None}
    first = spec.features[0]
    if first in dims:
        changes["embed_dim"] = dims[first]
    kw = dict(spec.projector_kwargs)
    if spec.projector == "faceid_plus" and "patch" in dims:
        kw["clip_dim"] = dims["patch"]
    if cross != spec.cross_attention_dim and "heads" in kw:
        if spec.projector == "resampler":
            kw["dim"] = cross
        kw["heads"] = max(1, cross // 64)
    fitted = spec.with_(projector_kwargs=kw, **changes)
    if (fitted.embed_dim, fitted.cross_attention_dim, kw) != (spec.embed_dim, spec.cross_attention_dim,
                                                              spec.projector_kwargs):
        log.info("adapter %s sized to this model: embed %d, cross-attention %d, projector %s", spec.name,
                 fitted.embed_dim, cross, kw or "default")
    return fitted


def feature_dims(models: Models, spec: AdapterSpec, cached: dict[str, int] | None = None) -> dict[str, int]:
    """Widths of the features the adapter eats, from the encoder (or the cache)."""
    dims = dict(cached or {})
    if models.image_encoder is not None:
        dims.update(models.image_encoder.embed_dims)
    if "face_id" in spec.features:
        dims["face_id"] = FACE_ID_DIM
    return dims


def build_adapter(spec: AdapterSpec, unet: nn.Module, seed: int, init_from: str | None = None) -> IPAdapter:
    """A trainable adapter for ``unet``: seeded projector, ``to_k_ip``/``to_v_ip`` copied from text ``to_k``/``to_v``,
    and, when ``spec.lora_rank``, a LoRA on every attention layer (``up`` zero, so training starts at the base
    UNet; Hu et al. 2021); or the weights of ``init_from`` (an official-layout checkpoint; its LoRA is used when
    this run trains one of that rank, else left out)."""
    torch.manual_seed(seed)
    adapter = IPAdapter.for_unet(spec, unet, lora=bool(spec.lora_rank))
    adapter.init_from_unet(unet)
    if init_from:
        sd, _ = read_checkpoint(init_from)
        lora = [k for k in sd if "_lora." in k]
        if lora and not spec.lora_rank:
            sd = {k: v for k, v in sd.items() if "_lora." not in k}
            log.info("--init-from: %d LoRA weights left out (add --train-lora to train them)", len(lora))
        elif spec.lora_rank and not lora:
            sd.update({k: v for k, v in adapter.state_dict().items() if "_lora." in k})
            log.info("--init-from: the file has no LoRA; the LoRA starts fresh (zero up-projection)")
        check_fits(spec, sd, adapter)
        adapter.load_state_dict(sd, strict=True)
        log.info("adapter initialised from %s", init_from)
    return adapter.float().train().requires_grad_(True)


@torch.no_grad()
def encode_text(models: Models, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Caption token ids -> cross-attention context (B, L, C) and, for SDXL, the pooled embedding (B, P).

    SD1.5: the text encoder's last hidden state. SDXL: both encoders' penultimate hidden states
    concatenated, and the second encoder's projected pooled output (as SDXL and the official script do).
    """
    device = models.unet.device
    if models.family in DIT_BASES:
        from .dit import encode_dit_text

        return encode_dit_text(models.family, models.text_encoders, input_ids, device)
    if models.family == "sd15":
        return models.text_encoders[0](input_ids[0].to(device))[0], None
    out1 = models.text_encoders[0](input_ids[0].to(device), output_hidden_states=True)
    out2 = models.text_encoders[1](input_ids[1].to(device), output_hidden_states=True)
    context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)  # (B, L, C1 + C2)
    return context, out2.text_embeds  # (B, P)


@torch.no_grad()
def encode_latent_dist(vae: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels in [-1, 1] (B, 3, H, W) -> the VAE posterior's mean and std (B, C, h, w), unscaled."""
    dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return dist.mean, dist.std


@torch.no_grad()
def encode_clip(encoder: ClipImageEncoder, clip_pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Normalised CLIP pixels (B, 3, S, S) -> the encoder's features, exactly as inference computes them."""
    return encoder.encode_pixels(clip_pixels, encoder.kinds)  # one feature definition for training and inference


def negative_features(models: Models, spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """The official unconditional input per feature (image drop): zeros, or the encoder on zero pixels. (1, ...)"""
    out = models.image_encoder.encode_negative(1) if models.image_encoder is not None else {}
    if "face_id" in spec.features:
        out["face_id"] = torch.zeros(1, FACE_ID_DIM)
    return {k: v.float().cpu() for k, v in out.items() if k in spec.features}

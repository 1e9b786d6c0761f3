"""Tiny FLUX.1- and SD3-shaped diffusers pipelines built in code (random weights, no downloads).

Real diffusers/transformers classes throughout (FluxTransformer2DModel, SD3Transformer2DModel, CLIP and T5
text encoders, a 16-channel AutoencoderKL, FlowMatchEulerDiscreteScheduler), so the code paths are the ones
users run; only the widths and depths are small. The T5 tokenizer is the tiny character-level one of
:mod:`.tiny` (any tokenizer with the ``__call__`` interface serves the pipelines).
"""

from __future__ import annotations

from typing import Any

import torch

from .tiny import tiny_text_encoder, tiny_tokenizer

LATENT_CHANNELS = 16


def tiny_t5(vocab_size: int, hidden: int = 32, seed: int = 0) -> Any:
    """A 2-layer T5 encoder (the shape of FLUX's and SD3's second text encoder)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=hidden, d_kv=8, d_ff=2 * hidden, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, pad_token_id=vocab_size - 1,
                      eos_token_id=vocab_size - 1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def tiny_dit_vae(seed: int = 0, shift: float = 0.0609, scaling: float = 1.5035) -> Any:
    """A 2-level AutoencoderKL with 16 latent channels (downsampling x2), FLUX/SD3-style shift and scale."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3,
                         latent_channels=LATENT_CHANNELS, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=shift,
                         scaling_factor=scaling).eval()


def tiny_flux_transformer(double: int = 2, single: int = 2, heads: int = 2, head_dim: int = 16,
                          joint_dim: int = 32, guidance: bool = False, in_channels: int | None = None,
                          seed: int = 0) -> Any:
    """A small FluxTransformer2DModel: ``double`` dual-stream and ``single`` single-stream blocks.

    ``in_channels`` beyond the packed latents' 64 (FluxFill: + masked-image latents + packed mask) keep 64
    output channels.
    """
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels or LATENT_CHANNELS * 4, out_channels=LATENT_CHANNELS * 4,
        num_layers=double,
        num_single_layers=single, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=joint_dim, pooled_projection_dim=32, guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6)).eval()


def _flux_parts(seed: int) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    tok = tiny_tokenizer()
    vocab = len(tok)
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_dit_vae(seed),
                text_encoder=tiny_text_encoder(vocab, 32, seed=seed), tokenizer=tok,
                text_encoder_2=tiny_t5(vocab, 32, seed=seed + 1), tokenizer_2=tiny_tokenizer())


def tiny_flux_pipeline(seed: int = 0, cls: Any = None, guidance: bool = False, **transformer_kwargs: Any) -> Any:
    """A complete FluxPipeline (or another Flux pipeline class ``cls``) with tiny random components."""
    from diffusers import FluxFillPipeline, FluxPipeline

    cls = cls or FluxPipeline
    if cls is FluxFillPipeline:  # latents, masked-image latents and the packed 2x2 mask of the x2 VAE
        transformer_kwargs.setdefault("in_channels", LATENT_CHANNELS * 4 * 2 + 4 * 4)
    parts = _flux_parts(seed)
    parts["transformer"] = tiny_flux_transformer(guidance=guidance, seed=seed, **transformer_kwargs)
    extra = {"image_encoder": None, "feature_extractor": None} if "image_encoder" in _init_args(cls) else {}
    return cls(**parts, **extra)


def tiny_sd3_transformer(layers: int = 2, heads: int = 2, head_dim: int = 16, joint_dim: int = 32,
                         seed: int = 0) -> Any:
    """A small SD3Transformer2DModel (SD3.5-Large layout: joint blocks with RMS qk-norm)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=LATENT_CHANNELS, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=joint_dim, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=64, out_channels=LATENT_CHANNELS, pos_embed_max_size=32,
        qk_norm="rms_norm").eval()


def tiny_sd3_pipeline(seed: int = 0, cls: Any = None, **transformer_kwargs: Any) -> Any:
    """A complete StableDiffusion3Pipeline (or ``cls``) with tiny random components (fp32, CPU)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    cls = cls or StableDiffusion3Pipeline
    tok = tiny_tokenizer()
    vocab = len(tok)
    parts = dict(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_dit_vae(seed, 0.0609, 1.5305),
                 text_encoder=tiny_text_encoder(vocab, 32, projection=32, seed=seed), tokenizer=tok,
                 text_encoder_2=tiny_text_encoder(vocab, 32, projection=32, seed=seed + 1),
                 tokenizer_2=tiny_tokenizer(), text_encoder_3=tiny_t5(vocab, 32, seed=seed + 2),
                 tokenizer_3=tiny_tokenizer(),
                 transformer=tiny_sd3_transformer(seed=seed, **transformer_kwargs))
    extra = {"image_encoder": None, "feature_extractor": None} if "image_encoder" in _init_args(cls) else {}
    return cls(**parts, **extra)


def _init_args(cls: Any) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)

"""Tiny SD1.5- and SDXL-shaped diffusers pipelines built in code (random weights, no downloads).

Used by the tests, the benchmarks' smoke runs and the offline ``demo`` preset until trained weights exist.
Every component is a real diffusers/transformers class, so the code paths are the ones users run.
"""

from __future__ import annotations

from typing import Any, Literal

import torch


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_tokenizer(max_length: int = 77) -> Any:
    """A character-level CLIP tokenizer (byte alphabet, no merges): real class, tiny vocabulary."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_text_encoder(vocab_size: int, hidden: int, projection: int | None = None, seed: int = 0) -> Any:
    """A 2-layer CLIP text encoder (with a projection head when ``projection`` is given, as SDXL's second)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                            projection_dim=projection or hidden, bos_token_id=vocab_size - 2,
                            eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def tiny_unet(base: Literal["sd15", "sdxl"] = "sd15", cross_attention_dim: int | None = None, seed: int = 0) -> Any:
    """A small UNet2DConditionModel with the block layout of SD1.5 or SDXL (attention in down, mid and up)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if base == "sd15":
        return UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim or 32, attention_head_dim=8,
        ).eval()
    cross = cross_attention_dim or 64
    return UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, cross_attention_dim=cross,
        projection_class_embeddings_input_dim=8 * 6 + cross // 2,
    ).eval()


def tiny_vae(seed: int = 0) -> Any:
    """A 2-level AutoencoderKL (downsampling x2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32).eval()


def tiny_pipeline(base: Literal["sd15", "sdxl"] = "sd15", seed: int = 0) -> Any:
    """A complete StableDiffusionPipeline / StableDiffusionXLPipeline with tiny random components (fp32, CPU)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    tok = tiny_tokenizer()
    vocab = len(tok)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if base == "sd15":
        return StableDiffusionPipeline(
            vae=tiny_vae(seed), text_encoder=tiny_text_encoder(vocab, 32, seed=seed), tokenizer=tok,
            unet=tiny_unet("sd15", seed=seed), scheduler=scheduler, safety_checker=None, feature_extractor=None,
            image_encoder=None, requires_safety_checker=False)
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed), text_encoder=tiny_text_encoder(vocab, 32, seed=seed), tokenizer=tok,
        text_encoder_2=tiny_text_encoder(vocab, 32, projection=32, seed=seed + 1), tokenizer_2=tiny_tokenizer(),
        unet=tiny_unet("sdxl", seed=seed), scheduler=scheduler, image_encoder=None, feature_extractor=None)

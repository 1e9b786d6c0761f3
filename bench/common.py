"""Builders shared by the benchmarks: real architectures with random weights (nothing is downloaded)."""

from __future__ import annotations

from typing import Any

import torch


def full_pipeline(base: str, tiny: bool) -> Any:
    """A diffusers text-to-image pipeline with the real architecture and random weights."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lookalike.pipeline.tiny import tiny_pipeline, tiny_tokenizer

    if tiny:
        return tiny_pipeline(base)
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                          clip_sample=False, set_alpha_to_one=False)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)

    def text(hidden: int, layers: int, proj: bool = False) -> Any:
        cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                             num_hidden_layers=layers, num_attention_heads=hidden // 64, projection_dim=1280,
                             bos_token_id=len(tok) - 2, eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1)
        return (CLIPTextModelWithProjection if proj else CLIPTextModel)(cfg)

    if base == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        return StableDiffusionPipeline(vae=vae, text_encoder=text(768, 12), tokenizer=tok, unet=unet,
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    unet = sdxl_unet()
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text(768, 12), tokenizer=tok,
                                     text_encoder_2=text(1280, 32, proj=True), tokenizer_2=tok, unet=unet,
                                     scheduler=sched)


def vit_h_encoder(tiny: bool) -> Any:
    """CLIP ViT-H/14 vision tower with projection (IP-Adapter's encoder), random weights; or a tiny one."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from lookalike.encoders.clip import ClipImageEncoder

    torch.manual_seed(2)
    if tiny:
        cfg = CLIPVisionConfig(hidden_size=40, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=8, projection_dim=24)
    else:
        cfg = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                               num_attention_heads=16, image_size=224, patch_size=14, projection_dim=1024,
                               hidden_act="gelu")
    return ClipImageEncoder(CLIPVisionModelWithProjection(cfg).eval())


def sdxl_unet() -> Any:
    """The SDXL base UNet architecture (2.6 B parameters) with random weights."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)

"""``train_throughput.py --base flux``: FLUX.1 adapter training (flux-ip), a plain loop vs lookalike's cached run.

The plain loop has the structure of the published FLUX adapter trainers (XLabs' x-flux, diffusers' FLUX
scripts): every step reads and transforms the images, runs the VAE, the CLIP image encoder and both text encoders
(CLIP-L pooled, T5), then the transformer with the adapter, with all of them in memory. Its adapter maths is
lookalike's own (the same DitTrainer and flow-matching inputs), so the arms differ only in the pipeline.
lookalike runs its real ``train()``: ``--cache`` encodes every sample once, then each step reads cached rows and
runs only the transformer and the adapter.

Models (random weights, seeded, fp32): the FLUX.1 transformer at full width (3072 hidden, 24 heads, T5 context
4096, pooled 768, guidance embedding) with ``--double``/``--single`` blocks (19 and 38 in FLUX.1), FLUX's VAE
(16 latent channels), CLIP ViT-L text encoder, a T5-XXL-width encoder with ``--t5-layers`` layers (24 in
T5-XXL), CLIP ViT-L/14 vision with projection 768; a character-level tokenizer stands in for the BPE ones.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch


def flux_models(args: argparse.Namespace, with_encoders: bool) -> Any:
    """Frozen full-width FLUX models for ``train()`` (the transformer alone when the cache replaces the rest)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from lookalike.encoders.clip import ClipImageEncoder
    from lookalike.pipeline.tiny import tiny_tokenizer
    from lookalike.training.models import Models

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15)
    clip_tok, t5_tok = tiny_tokenizer(), tiny_tokenizer()
    clip_tok.model_max_length, t5_tok.model_max_length = 77, args.max_sequence_length
    parts: dict[str, Any] = {}
    if with_encoders:
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=2,
                            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                            scaling_factor=0.3611).eval()
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12,
                                            max_position_embeddings=77, hidden_act="quick_gelu")).eval()
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64,
                                     num_layers=args.t5_layers, feed_forward_proj="gated-gelu")).eval()
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
            patch_size=14, projection_dim=768, hidden_act="quick_gelu")).eval()
        parts = {"vae": vae, "text_encoders": [text, t5], "image_encoder": ClipImageEncoder(vision, kinds=("pooled",))}
    models = Models(family="flux", unet=transformer, noise_scheduler=scheduler, tokenizers=[clip_tok, t5_tok],
                    source="bench", **parts)
    for m in models.frozen():
        m.requires_grad_(False)
    return models


def flux_config(args: argparse.Namespace, data: Path, work: Path, mode: str) -> Any:
    from lookalike.training.config import TrainConfig

    return TrainConfig(data=str(data), output=str(work / f"run-{mode}"), base="demo-flux", adapter="flux-ip",
                       steps=args.warmup + args.steps, batch_size=args.batch_size, resolution=args.resolution,
                       num_workers=0, num_validation=0, checkpoint_every=0, cpu=True,
                       cache=None if mode in ("live", "official") else str(work / "cache"),
                       build_cache=mode == "build")


def run_plain(args: argparse.Namespace, data: Path, work: Path) -> dict[str, Any]:
    """The plain loop: a DataLoader of pixels and tokens, every encoder run at every step, then one update."""
    from accelerate import Accelerator

    from lookalike.training import loop
    from lookalike.training.data import SampleStream, make_loader, next_batch
    from lookalike.training.step import loss_of, model_inputs

    config = flux_config(args, data, work, "official")
    accelerator = Accelerator(cpu=True)
    run = loop.build_run(config, accelerator, flux_models(args, with_encoders=True))
    trainer, optimizer, _, _ = loop.build_trainer(run)
    trainer, optimizer = accelerator.prepare(trainer, optimizer)
    batches = iter(make_loader(SampleStream(run.train_source, config.seed, loop.draw_settings(run)), 0,
                               config.batch_size, 0, 1, 0))
    times, cpu = [], []
    for _ in range(args.warmup + args.steps):
        began, began_cpu = time.perf_counter(), time.process_time()
        batch = next_batch(batches)
        batch.pop("skipped")
        loss = loss_of(trainer, model_inputs(run.models, run.consts, batch, accelerator.device))  # encodes here
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
    return {"seconds": times[args.warmup:], "cpu_seconds": cpu[args.warmup:]}


def run_flux_arm(args: argparse.Namespace, data: Path, work: Path, mode: str) -> dict[str, Any]:
    """One FLUX arm: ``official`` (the plain loop), ``live``, ``build`` or ``cache`` (lookalike's train())."""
    import json

    from lookalike.training.loop import train

    if mode == "official":
        return run_plain(args, data, work)
    models = flux_models(args, with_encoders=mode != "cache")
    began, began_cpu = time.perf_counter(), time.process_time()
    result = train(flux_config(args, data, work, mode), models=models)
    if mode == "build":
        return {"seconds": [time.perf_counter() - began], "cpu_seconds": [time.process_time() - began_cpu],
                "samples": len(json.loads(data.read_text()))}
    return {"seconds": result.seconds[args.warmup:], "cpu_seconds": result.cpu_seconds[args.warmup:]}

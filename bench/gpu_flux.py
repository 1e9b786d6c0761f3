"""The FLUX GPU benchmark (``python bench/gpu.py --flux``): FLUX.1-dev at full size with random weights.

bf16, 1024 px, 28 steps, guidance-distilled (batch 1), random prompt embeddings (512 T5 tokens: the text
encoders are not what is measured) and ``output_type="latent"`` (no VAE decode). Modes, on one pipeline whose
processors are swapped between calls: bare, diffusers' XLabs IP-Adapter, lookalike ``flux-ip`` and lookalike
``flux-ip-instantx``. Each mode reports wall seconds per image and GPU seconds between CUDA events around the
call (on the last GPU runs the wall time between calls drifted more than the adapters cost), medians of
interleaved runs with a rotating start, plus peak memory; ``--profile`` adds the summed kernel time of one call
from torch.profiler. ``--tiny`` runs the same code on the tiny FLUX on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from lookalike import Personalizer
from lookalike.adapters.module import IPAdapter
from lookalike.adapters.spec import REGISTRY
from lookalike.weights.io import official_state_dict


def build(tiny: bool, device: str, dtype: torch.dtype) -> Any:
    """FluxPipeline with FLUX.1-dev's transformer and VAE configs, random weights, no text encoders."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from lookalike.pipeline.tiny_dit import tiny_flux_pipeline

    if tiny:
        return tiny_flux_pipeline(guidance=True).to(device, dtype)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(guidance_embeds=True)  # 19 double + 38 single, 3072 wide
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False,
                                shift_factor=0.1159, scaling_factor=0.3611)
    finally:
        torch.set_default_dtype(previous)
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                                                max_shift=1.15, use_dynamic_shifting=True)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer, image_encoder=None, feature_extractor=None)


def adapter_of(name: str, model: Any, tiny: bool, device: str, dtype: torch.dtype) -> IPAdapter:
    spec = REGISTRY[name]
    if tiny:
        spec = spec.with_(cross_attention_dim=model.context_embedder.in_features, embed_dim=24,
                          num_tokens=8 if spec.projector == "flux_mlp" else spec.num_tokens)
    torch.manual_seed(1)
    with torch.device(device):
        return IPAdapter.for_model(spec, model, dtype=dtype).eval()


def modes(pipe: Any, args: argparse.Namespace, device: str, dtype: torch.dtype) -> dict[str, Any]:
    model = pipe.transformer
    size, text = (32, 16) if args.tiny else (1024, 512)
    g = torch.Generator().manual_seed(0)
    embeds = dict(prompt_embeds=torch.randn(1, text, model.config.joint_attention_dim, generator=g),
                  pooled_prompt_embeds=torch.randn(1, model.config.pooled_projection_dim, generator=g))
    kw = dict(**{k: v.to(device, dtype) for k, v in embeds.items()}, num_inference_steps=args.steps, height=size,
              width=size, guidance_scale=3.5, output_type="latent")
    gen = lambda: torch.Generator(device).manual_seed(0)  # noqa: E731
    xlabs = adapter_of("flux-ip", model, args.tiny, device, dtype)
    instantx = adapter_of("flux-ip-instantx", model, args.tiny, device, dtype)
    clip = torch.randn(1, 1, xlabs.spec.embed_dim, generator=g).to(device, dtype)
    siglip = torch.randn(1, 1, instantx.spec.embed_dim, generator=g).to(device, dtype)
    original = dict(model.attn_processors)
    pipe.load_ip_adapter(official_state_dict(xlabs), weight_name="x", image_encoder_pretrained_model_name_or_path=None)
    theirs_procs, theirs_proj = dict(model.attn_processors), model.encoder_hid_proj
    pipe.set_progress_bar_config(disable=True)

    def bare_state() -> None:
        model.set_attn_processor(dict(original))
        model.encoder_hid_proj, model.config.encoder_hid_dim_type = None, None

    def bare() -> Any:
        bare_state()
        return pipe(generator=gen(), **kw)

    def diffusers() -> Any:
        model.set_attn_processor(dict(theirs_procs))
        model.encoder_hid_proj, model.config.encoder_hid_dim_type = theirs_proj, "ip_image_proj"
        try:
            return pipe(ip_adapter_image_embeds=[clip], negative_ip_adapter_image_embeds=[torch.zeros_like(clip)],
                        generator=gen(), **kw)
        finally:
            bare_state()

    def ours(adapter: IPAdapter, feats: torch.Tensor) -> Any:
        bare_state()
        p = Personalizer(pipe)
        p.load_adapter(adapter)
        try:
            return p.generate(image_embeds=feats, generator=gen(), **kw)
        finally:
            p.detach()

    bare_state()
    return {"bare": bare, "diffusers flux-ip": diffusers, "lookalike flux-ip": lambda: ours(xlabs, clip),
            "lookalike flux-ip-instantx": lambda: ours(instantx, siglip)}


def timed(calls: dict[str, Any], runs: int, device: str) -> dict[str, tuple[float, float, float]]:
    """Per mode: median wall s, median GPU s (CUDA events), peak GiB; interleaved with a rotating start."""
    cuda = device == "cuda"
    for fn in calls.values():
        fn()
    wall: dict[str, list[float]] = {n: [] for n in calls}
    gpu: dict[str, list[float]] = {n: [] for n in calls}
    peak = dict.fromkeys(calls, 0.0)
    order = list(calls)
    for run in range(runs):
        shift = run % len(order)
        for name in order[shift:] + order[:shift]:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start_ev.record()
            start = time.perf_counter()
            calls[name]()
            if cuda:
                end_ev.record()
                torch.cuda.synchronize()
                gpu[name].append(start_ev.elapsed_time(end_ev) / 1000)
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated() / 2**30)
            wall[name].append(time.perf_counter() - start)
    return {n: (statistics.median(wall[n]), statistics.median(gpu[n]) if gpu[n] else float("nan"), peak[n])
            for n in calls}


def kernel_seconds(fn: Any) -> float:
    """Summed device time of every kernel in one call (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="add summed kernel time of one call per mode")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.tiny:
        args.steps, args.runs = min(args.steps, 2), 1
    with torch.no_grad():
        pipe = build(args.tiny, device, dtype)
        calls = modes(pipe, args, device, dtype)
        outs = {n: calls[n]().images.float() for n in ("diffusers flux-ip", "lookalike flux-ip")}
        diff = float((outs["diffusers flux-ip"] - outs["lookalike flux-ip"]).abs().max())
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        print(f"{name}, torch {torch.__version__}, {dtype}, FLUX.1-dev config (random weights), "
              f"{'32' if args.tiny else '1024'} px, {args.steps} steps, median of {args.runs} interleaved runs")
        print(f"parity: diffusers vs lookalike flux-ip final latents, max abs diff {diff:.2e}")
        results = timed(calls, args.runs, device)
        kernels = {n: kernel_seconds(fn) for n, fn in calls.items()} if args.profile and device == "cuda" else {}
    bare_wall, bare_gpu = results["bare"][0], results["bare"][1]
    print("| mode | wall s/img | GPU s/img (events) | kernel s (profiler) | peak GiB | wall vs bare | GPU vs bare |")
    print("|---|---|---|---|---|---|---|")
    for n, (wall, gpu, peak) in results.items():
        print(f"| {n} | {wall:.3f} | {gpu:.3f} | {kernels.get(n, float('nan')):.3f} | {peak:.2f} | "
              f"{wall / bare_wall:.3f}x | {gpu / bare_gpu:.3f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One prepared GPU benchmark: bare pipeline vs diffusers' IP-Adapter vs lookalike, eager and compiled.

Full-size SD1.5 (random weights; nothing is downloaded) at 512 px, 30 steps, fp16, the plus adapter with
257 patch tokens; seconds per image (median of ``--runs``) and peak GPU memory, as one table.
``--sdxl`` adds SDXL at 1024 px when time allows. ``--tiny`` is a CPU smoke run of the same code.

    python bench/gpu.py                # on a lent GPU: the whole table in one call
    python bench/gpu.py --tiny         # anywhere, seconds
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch
from common import full_pipeline

from lookalike import Personalizer
from lookalike.adapters.module import IPAdapter
from lookalike.adapters.spec import REGISTRY
from lookalike.weights.io import official_state_dict


def plus_adapter(pipe: Any, base: str, tiny: bool) -> tuple[IPAdapter, torch.Tensor]:
    """A random plus adapter of the real size (or the tiny one) and its 257-token features."""
    spec = REGISTRY["ip-adapter-plus_sd15" if base == "sd15" else "ip-adapter-plus_sdxl_vit-h"]
    if tiny:
        spec = spec.with_(cross_attention_dim=pipe.unet.config.cross_attention_dim, embed_dim=40,
                          projector_kwargs=dict(spec.projector_kwargs, dim=32, heads=2))
    torch.manual_seed(1)
    adapter = IPAdapter.for_unet(spec, pipe.unet)
    return adapter, torch.randn(1, 1, 257, spec.embed_dim)


def measure(fn: Any, runs: int, device: str) -> tuple[float, float]:
    """Median seconds per call after one warm-up, and peak GPU memory in GiB (0 on the CPU)."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return statistics.median(times), peak


def modes(base: str, args: argparse.Namespace, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Three pipelines (bare, diffusers IP-Adapter, lookalike) sharing weights, each as a zero-argument call."""
    template = full_pipeline(base, args.tiny)
    adapter, feats = plus_adapter(template, base, args.tiny)
    size = 64 if args.tiny else (512 if base == "sd15" else 1024)
    kw = dict(prompt="a photo of a dog", num_inference_steps=args.steps, guidance_scale=7.5, height=size,
              width=size, output_type="latent")
    feats = feats.to(device, dtype)
    bare = copy.deepcopy(template).to(device, dtype)
    theirs = copy.deepcopy(template)
    theirs.load_ip_adapter(official_state_dict(adapter), subfolder="", weight_name="x", image_encoder_folder=None)
    theirs.to(device, dtype)
    ours = Personalizer(copy.deepcopy(template).to(device, dtype))
    ours.load_adapter(adapter.to(device, dtype))
    for p in (bare, theirs, ours.pipe):
        p.set_progress_bar_config(disable=True)
    gen = lambda: torch.Generator(device).manual_seed(0)  # noqa: E731
    return {
        "bare": (bare, lambda: bare(generator=gen(), **kw)),
        "diffusers": (theirs, lambda: theirs(ip_adapter_image_embeds=[torch.cat([torch.zeros_like(feats), feats])],
                                             generator=gen(), **kw)),
        "lookalike": (ours.pipe, lambda: ours.generate(image_embeds=[feats], negative_image_embeds=[
            torch.zeros_like(feats)], generator=gen(), **kw)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--sdxl", action="store_true", help="also SDXL at 1024 px")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    if args.tiny:
        args.steps, args.runs = min(args.steps, 2), 1
    rows = []
    for base in ["sd15"] + (["sdxl"] if args.sdxl else []):
        for name, (pipe, call) in modes(base, args, device, dtype).items():
            eager, mem = measure(call, args.runs, device)
            compiled = float("nan")
            if not args.no_compile:
                pipe.unet = torch.compile(pipe.unet, backend="eager" if args.tiny else "inductor")
                compiled, _ = measure(call, args.runs, device)
            rows.append((base, name, eager, compiled, mem))
            del pipe
            if device == "cuda":
                torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{name}, {dtype}, {args.steps} steps, guidance 7.5, plus adapter (257 tokens), median of {args.runs}")
    print("| base | mode | eager s/img | compiled s/img | peak GiB | eager vs bare |")
    print("|---|---|---|---|---|---|")
    bare = {b: e for b, n, e, _, _ in rows if n == "bare"}
    for base, mode, eager, compiled, mem in rows:
        print(f"| {base} | {mode} | {eager:.3f} | {compiled:.3f} | {mem:.2f} | {eager / bare[base]:.3f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

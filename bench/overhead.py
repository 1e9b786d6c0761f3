"""Adapter overhead per generation: bare UNet vs lookalike vs diffusers' IP-Adapter, side by side in one run.

A "generation" is what a pipeline does with the UNet: project the image features (lookalike: a new subject
once per generation, the unconditional input once while the weights last; diffusers: both inside every UNet
call) and run ``--steps`` UNet calls with classifier-free guidance (batch 2).
One full-size SD1.5 UNet (random weights) is shared by all modes; processors are swapped between runs,
and runs are interleaved so drift hits every mode alike. Prints medians and ratios to bare.

    python bench/overhead.py                 # full-size SD1.5, 32x32 latents (256 px), CPU
    python bench/overhead.py --tiny --runs 1 # smoke run on a tiny UNet
    python bench/overhead.py --base flux     # FLUX.1 at full width, fewer blocks (bench/overhead_flux.py)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lookalike.adapters.attach import AdapterInput, attach_adapters
from lookalike.adapters.module import IPAdapter
from lookalike.adapters.spec import REGISTRY, AdapterSpec
from lookalike.weights.io import official_state_dict

CONFIGS = {  # name -> registry names of the stacked adapters
    "basic x1": ["ip-adapter_sd15"],
    "plus x1": ["ip-adapter-plus_sd15"],
    "basic x2": ["ip-adapter_sd15", "ip-adapter_sd15"],
    "plus x2": ["ip-adapter-plus_sd15", "ip-adapter-plus_sd15"],
}


def sd15_unet(tiny: bool, device: str, dtype: torch.dtype):
    """The SD1.5 UNet architecture (random weights), or a tiny one for smoke runs."""
    from diffusers import UNet2DConditionModel

    from lookalike.pipeline.tiny import tiny_unet

    torch.manual_seed(0)
    unet = tiny_unet("sd15") if tiny else UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    return unet.to(device=device, dtype=dtype).eval()


def sized_spec(name: str, unet, tiny: bool) -> AdapterSpec:
    spec = REGISTRY[name]
    if not tiny:
        return spec
    kw = dict(spec.projector_kwargs, dim=32, heads=2) if spec.projector == "resampler" else spec.projector_kwargs
    return spec.with_(cross_attention_dim=unet.config.cross_attention_dim, projector_kwargs=kw,
                      embed_dim=64 if spec.projector == "resampler" else 32)


def features(spec: AdapterSpec, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Positive features (1, 1, ...) of the adapter's kind (257 patch tokens for plus)."""
    g = torch.Generator().manual_seed(1)
    shape = (1, 1, 257, spec.embed_dim) if spec.features == ("patch",) else (1, 1, spec.embed_dim)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


@dataclass
class Inputs:
    latents: torch.Tensor
    text: torch.Tensor
    steps: int


def unet_steps(unet, inp: Inputs, watch: Stopwatch | None = None, **extra) -> None:
    """The denoising loop's UNet calls; with a stopwatch, the cross-attention processors are timed too."""
    restore = watch.time_attn2(unet) if watch is not None else None
    for i in range(inp.steps):
        unet(inp.latents, 999 - i * 10, inp.text, **extra)
    if restore is not None:
        unet.set_attn_processor(restore)


class Stopwatch:
    """Adds up the time spent in what an adapter changes: cross-attention processors and image projection."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.total = 0.0

    def wrap(self, fn: Callable) -> Callable:
        def timed_call(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.device)
            self.total += time.perf_counter() - start
            return out

        return timed_call

    def time_attn2(self, unet) -> dict:
        """Wrap every cross-attention processor in a timer; returns the processors to put back."""
        procs = dict(unet.attn_processors)
        unet.set_attn_processor({k: self.wrap(p) if ".attn2." in k else p for k, p in procs.items()})
        return procs


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_modes(unet, names: list[str], inp: Inputs, tiny: bool, device: str, dtype: torch.dtype,
               watches: dict[str, Stopwatch]):
    """Callables for one configuration: (lookalike generation, diffusers generation, cleanup)."""
    adapters, feats = [], []
    for i, name in enumerate(names):
        spec = sized_spec(name, unet, tiny)
        torch.manual_seed(10 + i)
        adapter = IPAdapter.for_unet(spec, unet, device=device, dtype=dtype).eval()
        adapter.name = f"{name}#{i}"
        adapters.append(adapter)
        feats.append(features(spec, device, dtype))
    original = dict(unet.attn_processors)

    generation = [0]

    def lookalike() -> None:  # what Personalizer.generate does with a new subject each generation
        watch = watches["lookalike"]
        handle = attach_adapters(unet, adapters)
        inputs = []
        generation[0] += 1
        for a, f in zip(adapters, feats):
            key = a.spec.features[0]
            project = watch.wrap(a.project_once)
            tokens = project({key: f + generation[0]})  # new features: projected once per generation
            inputs.append(AdapterInput(tokens, project({key: torch.zeros_like(f)})))  # the same every time
        with handle.conditioned(inputs):
            unet_steps(unet, inp, watch)
        handle.detach()

    unet._load_ip_adapter_weights([official_state_dict(a) for a in adapters], low_cpu_mem_usage=False)
    unet.to(device=device, dtype=dtype)
    diffusers_procs = dict(unet.attn_processors)
    diffusers_proj = unet.encoder_hid_proj
    diffusers_proj.forward = watches["diffusers"].wrap(diffusers_proj.forward)  # runs inside every UNet call

    def use_bare() -> None:  # the projection's own attention layers leave attn_processors with it
        unet.encoder_hid_proj, unet.config.encoder_hid_dim_type = None, None
        unet.set_attn_processor(dict(original))

    def diffusers() -> None:
        unet.encoder_hid_proj, unet.config.encoder_hid_dim_type = diffusers_proj, "ip_image_proj"
        unet.set_attn_processor(dict(diffusers_procs))
        embeds = [torch.cat([torch.zeros_like(f), f]) for f in feats]
        unet_steps(unet, inp, watches["diffusers"], added_cond_kwargs={"image_embeds": embeds})
        use_bare()

    use_bare()

    return lookalike, diffusers


def timed(fn: Callable[[], None], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--base" in argv:  # --base flux: the DiT benchmark (--base sd15 is this one)
        at = argv.index("--base")
        base = argv[at + 1] if at + 1 < len(argv) else ""
        del argv[at:at + 2]
        if base == "flux":
            from overhead_flux import main as flux_main

            return flux_main(argv)
        if base != "sd15":
            raise SystemExit(f"--base {base!r}: choose sd15 or flux")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny UNet smoke run")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    unet = sd15_unet(args.tiny, args.device, dtype)
    g = torch.Generator().manual_seed(0)
    inp = Inputs(torch.randn(2, 4, args.latent, args.latent, generator=g).to(args.device, dtype),
                 torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(args.device, dtype), args.steps)
    watches = {"bare": Stopwatch(args.device)}
    modes: dict[str, Callable[[], None]] = {"bare": lambda: unet_steps(unet, inp, watches["bare"])}
    for name in args.configs:
        watches[f"lookalike {name}"], watches[f"diffusers {name}"] = Stopwatch(args.device), Stopwatch(args.device)
        pair = {"lookalike": watches[f"lookalike {name}"], "diffusers": watches[f"diffusers {name}"]}
        ours, theirs = make_modes(unet, CONFIGS[name], inp, args.tiny, args.device, dtype, pair)
        modes[f"lookalike {name}"], modes[f"diffusers {name}"] = ours, theirs
    for fn in modes.values():  # warm-up
        timed(fn, args.device)
    times: dict[str, list[float]] = {k: [] for k in modes}
    parts: dict[str, list[float]] = {k: [] for k in modes}  # time in cross-attention + projection
    for _ in range(args.runs):
        for key, fn in modes.items():
            watches[key].total = 0.0
            times[key].append(timed(fn, args.device))
            parts[key].append(watches[key].total)
    print(f"device {args.device}, {args.dtype}, {'tiny' if args.tiny else 'SD1.5'} UNet, latents {args.latent}x"
          f"{args.latent}, {args.steps} steps with guidance, {args.runs} interleaved runs")
    print(f"{'config':<10} {'bare s':>8} {'lookalike/bare':>15} {'diffusers/bare':>15}   (median; min in brackets)")
    for name in args.configs:
        cells = []
        for who in ("lookalike", "diffusers"):
            ratio = {f: f(times[f"{who} {name}"]) / f(times["bare"]) for f in (statistics.median, min)}
            cells.append(f"{ratio[statistics.median]:.4f} [{ratio[min]:.4f}]")
        print(f"{name:<10} {statistics.median(times['bare']):>8.3f} {cells[0]:>15} {cells[1]:>15}")
    bare_total, bare_parts = statistics.median(times["bare"]), statistics.median(parts["bare"])
    print("\nAttributed: time inside cross-attention processors + image projection per generation (s), and the")
    print("ratio it implies: 1 + (adapter parts - bare parts) / bare generation time (low-noise estimate)")
    print(f"{'config':<10} {'bare':>7} {'lookalike':>10} {'diffusers':>10} {'lookalike/bare':>15} {'diffusers/bare':>15}")
    for name in args.configs:
        ours, theirs = (statistics.median(parts[f"{w} {name}"]) for w in ("lookalike", "diffusers"))
        print(f"{name:<10} {bare_parts:>7.3f} {ours:>10.3f} {theirs:>10.3f} "
              f"{1 + (ours - bare_parts) / bare_total:>15.4f} {1 + (theirs - bare_parts) / bare_total:>15.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

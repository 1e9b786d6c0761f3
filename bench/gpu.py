"""One prepared GPU benchmark: bare pipeline vs diffusers' IP-Adapter vs lookalike, eager and compiled.

Full-size SD1.5 (random weights; nothing is downloaded) at 512 px, 30 steps, fp16, the plus adapter with
257 patch tokens; seconds per image (median of ``--runs``) and peak GPU memory, as one table.
``--sdxl`` adds SDXL at 1024 px when time allows. ``--tiny`` is a CPU smoke run of the same code.

    python bench/gpu.py                # on a lent GPU: the whole table in one call
    python bench/gpu.py --tiny         # anywhere, seconds
    python bench/gpu.py --flux         # FLUX.1-dev, bf16, 1024 px, 28 steps (bench/gpu_flux.py; --tiny works too)

Compiled rows use ``torch.compile(unet, mode="reduce-overhead")`` (CUDA graphs) by default; ``--compile-mode
default`` gives plain inductor. Beside wall time each row gives GPU kernel time per image (the sum of the CUDA
kernels torch.profiler records in one generation): wall times of lent machines drifted between calls by more
than the adapters cost, kernel times do not.
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


def one_line(exc: Exception) -> str:
    """An error as one short table cell."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"


def measure(calls: dict[str, Any], runs: int, device: str) -> tuple[dict[str, tuple[float, float]], dict[str, str]]:
    """Per mode: median seconds per call and peak GPU memory in GiB (0 on the CPU), the modes interleaved.

    Every mode is warmed up twice, then the timed runs go round the modes (the starting mode rotates), so a
    drift of the machine falls on all of them alike. Measured one mode after another, SD1.5 on a lent H200 read
    bare 0.90 / 1.10 / 1.66 s in three calls of one lease, and diffusers 1.18 then 1.80 s: more than the adapters'
    own cost. A mode whose call raises is left out of the timings and its error is returned beside them.
    """
    errors: dict[str, str] = {}
    live = dict(calls)
    for name, fn in list(live.items()):
        try:
            fn()
            fn()
        except Exception as exc:  # noqa: BLE001 - one failing mode must not lose the others' rows
            errors[name] = one_line(exc)
            del live[name]
    times: dict[str, list[float]] = {name: [] for name in live}
    peaks = dict.fromkeys(live, 0.0)
    order = list(live)
    for run in range(runs):
        shift = run % max(len(order), 1)
        for name in order[shift:] + order[:shift]:
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            live[name]()
            if device == "cuda":
                torch.cuda.synchronize()
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 2**30)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), peaks[name]) for name in live}, errors


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


def final_latents(modes_: dict[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers' and lookalike's final latents (same weights, seed and inputs)."""
    return {n: call().images.float() for n, (_, call) in modes_.items() if n != "bare"}


def max_diff(outs: dict[str, torch.Tensor]) -> float:
    return float((outs["diffusers"] - outs["lookalike"]).abs().max())


def kernel_ms(call: Any) -> float:
    """GPU kernel time of one call in ms: the sum of the device time torch.profiler records (nan on the CPU)."""
    if not torch.cuda.is_available():
        return float("nan")
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1000.0


def graph_breaks(call: Any) -> int:
    """Dynamo graph breaks recorded during one call of an already compiled pipeline (0 means one graph)."""
    from torch._dynamo.utils import counters

    counters.clear()
    call()
    return sum(counters["graph_break"].values())


def report(line: str, out: Any) -> None:
    print(line, flush=True)
    if out is not None:
        out.write(line + "\n")
        out.flush()


def run_base(base: str, args: argparse.Namespace, device: str, dtype: torch.dtype, compile_: bool,
             out: Any) -> None:
    """Rows for one base model: the modes timed interleaved eager, then each compiled and all timed interleaved
    again; a failing mode prints its error as its row, not a traceback."""
    built = modes(base, args, device, dtype)
    report(f"| {base} | parity | diffusers vs lookalike final latents, max abs diff: {max_diff(final_latents(built)):.2e}"
           " | | | | |", out)
    chosen = {name: built[name] for name in args.modes.split(",") if name in built}
    eager, errors = measure({name: call for name, (_, call) in chosen.items()}, args.runs, device)
    compiled: dict[str, tuple[float, float]] = {}
    compile_s: dict[str, float] = {}
    breaks: dict[str, int] = {}
    kernels = {name: kernel_ms(chosen[name][1]) for name in eager}
    compiled_kernels: dict[str, float] = {}
    if compile_:  # no torch._dynamo.reset() between modes: it would drop the ones compiled before them
        for name in eager:
            pipe, call = chosen[name]
            try:
                options = {"backend": "eager"} if args.tiny else {"mode": args.compile_mode}
                pipe.unet = torch.compile(pipe.unet, **options)
                start = time.perf_counter()
                breaks[name] = graph_breaks(call)  # the first call compiles
                call()  # CUDA graphs are recorded on a later call than the first
                compile_s[name] = time.perf_counter() - start
            except Exception as exc:  # noqa: BLE001
                errors[name] = f"compile: {one_line(exc)}"
        compiled, compile_errors = measure({name: chosen[name][1] for name in compile_s}, args.runs, device)
        errors.update(compile_errors)
        compiled_kernels = {name: kernel_ms(chosen[name][1]) for name in compiled}
    bare = eager.get("bare", (float("nan"), 0.0))[0]
    bare_k = kernels.get("bare", float("nan"))
    bare_ck = compiled_kernels.get("bare", float("nan"))
    for name in chosen:
        if name in errors:
            report(f"| {base} | {name} | failed: {errors[name]} | | | | | | | | |", out)
        if name not in eager:
            continue
        secs, mem = eager[name]
        csecs = compiled.get(name, (float("nan"), 0.0))[0]
        k, ck = kernels.get(name, float("nan")), compiled_kernels.get(name, float("nan"))
        report(f"| {base} | {name} | {secs:.3f} | {csecs:.3f} | {compile_s.get(name, float('nan')):.0f} | "
               f"{breaks.get(name, -1)} | {mem:.2f} | {secs / bare:.3f}x | {csecs / bare:.3f}x | "
               f"{k:.1f} ({k / bare_k:.3f}x) | {ck:.1f} ({ck / bare_ck:.3f}x) |", out)
    del built, chosen
    if device == "cuda":
        torch.cuda.empty_cache()


def reduced_precision(args: argparse.Namespace, device: str, out: Any) -> None:
    """The lookalike path in bf16 (and fp16): runs, finite, and close to diffusers in the same dtype."""
    for dtype in (torch.bfloat16, torch.float16):
        short = argparse.Namespace(**{**vars(args), "steps": 4})
        built = modes("sd15", short, device, dtype)
        outs = final_latents(built)
        report(f"{dtype}: lookalike latents finite={bool(outs['lookalike'].isfinite().all())}, vs diffusers max abs "
               f"diff {max_diff(outs):.2e}", out)
        del built


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--flux" in argv:
        from gpu_flux import main as flux_main

        return flux_main([a for a in argv if a != "--flux"])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--sdxl", action="store_true", help="also SDXL at 1024 px")
    parser.add_argument("--sdxl-compile", action="store_true", help="compile SDXL too (minutes per mode)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compile-mode", default="reduce-overhead", choices=["reduce-overhead", "default"],
                        help="torch.compile mode of the compiled rows (reduce-overhead: CUDA graphs)")
    parser.add_argument("--only-sdxl", action="store_true", help="skip SD1.5 and the precision checks")
    parser.add_argument("--modes", default="bare,diffusers,lookalike",
                        help="which rows to time (the parity line always compares diffusers and lookalike)")
    parser.add_argument("--out", default=None, help="also write the table to this file as it grows")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    if args.tiny:
        args.steps, args.runs = min(args.steps, 2), 1
    out = open(args.out, "w") if args.out else None  # noqa: SIM115 - kept open while rows arrive
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    report(f"{name}, torch {torch.__version__}, {dtype}, {args.steps} steps, guidance 7.5, plus adapter "
           f"(257 tokens), median of {args.runs}; compiled = torch.compile(unet, mode={args.compile_mode!r})", out)
    report("Modes are timed interleaved (round robin, rotating start) so that a drift of the machine falls on all. "
           "All modes' pipelines stay on the GPU together, so peak GiB counts all their weights: compare differences.",
           out)
    report("| base | mode | eager s/img | compiled s/img | compile s | graph breaks | peak GiB (eager) | eager vs bare | "
           "compiled vs bare eager | eager kernel ms/img (vs bare) | compiled kernel ms/img (vs bare compiled) |", out)
    report("|---|---|---|---|---|---|---|---|---|---|---|", out)
    if not args.only_sdxl:
        run_base("sd15", args, device, dtype, not args.no_compile, out)
        reduced_precision(args, device, out)
    if args.sdxl or args.only_sdxl:
        run_base("sdxl", args, device, dtype, args.sdxl_compile and not args.no_compile, out)
    if out is not None:
        out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

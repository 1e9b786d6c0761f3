"""Adapter overhead per generation on FLUX: bare transformer vs lookalike vs diffusers' XLabs IP-Adapter.

FLUX.1 at full width (3072, 24 heads of 128, T5 width 4096) with fewer blocks (``--double``/``--single``),
random weights, on the CPU by default. A "generation" is ``--steps`` transformer calls (FLUX-dev: guidance
distilled, batch 1) plus what each side does with the image features: lookalike projects them once per
generation and computes image keys/values once per layer; diffusers projects inside every transformer call
and computes keys/values in every processor call. Modes are interleaved; the attributed measure times the
attention processors and the projection only (the low-noise estimate used for the UNet benchmark).

    python bench/overhead.py --base flux                # 2 double + 4 single full-width blocks, 256 px
    python bench/overhead.py --base flux --tiny --runs 1  # smoke run on the tiny FLUX
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

from lookalike.adapters.attach import AdapterInput, attach_adapters
from lookalike.adapters.module import IPAdapter
from lookalike.adapters.spec import REGISTRY
from lookalike.weights.io import official_state_dict


class Timed:
    """A processor timed by a stopwatch, with the signature FluxAttention filters its kwargs by."""

    def __init__(self, processor, watch) -> None:
        import inspect

        self.call = watch.wrap(processor)
        self.takes_ip = "ip_hidden_states" in inspect.signature(processor.__call__).parameters

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 ip_hidden_states=None):
        extra = {"ip_hidden_states": ip_hidden_states} if self.takes_ip else {}
        return self.call(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **extra)


def flux_transformer(tiny: bool, double: int, single: int, device: str, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    from lookalike.pipeline.tiny_dit import tiny_flux_transformer

    torch.manual_seed(0)
    model = tiny_flux_transformer() if tiny else FluxTransformer2DModel(
        num_layers=double, num_single_layers=single, guidance_embeds=True)
    return model.to(device=device, dtype=dtype).eval()


def make_adapter(name: str, model, tiny: bool, device: str, dtype: torch.dtype) -> IPAdapter:
    spec = REGISTRY[name]
    if tiny:
        spec = spec.with_(cross_attention_dim=model.context_embedder.in_features, embed_dim=24,
                          num_tokens=8 if spec.projector == "flux_mlp" else spec.num_tokens)
    torch.manual_seed(1)
    return IPAdapter.for_model(spec, model, device=device, dtype=dtype).eval()


def main(argv: list[str] | None = None) -> int:
    from overhead import Stopwatch, sync, timed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny FLUX smoke run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--latent", type=int, default=32, help="VAE latent side (32 = 256 px, 256 image tokens)")
    parser.add_argument("--text", type=int, default=128, help="T5 tokens")
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--no-instantx", action="store_true", help="skip flux-ip-instantx (its MLP has 1.2 B weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    dtype, device = getattr(torch, args.dtype), args.device
    model = flux_transformer(args.tiny, args.double, args.single, device, dtype)
    g = torch.Generator().manual_seed(0)
    tokens = (args.latent // 2) ** 2
    call = dict(hidden_states=torch.randn(1, tokens, model.config.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, args.text, model.context_embedder.in_features, generator=g),
                pooled_projections=torch.randn(1, model.config.pooled_projection_dim, generator=g),
                txt_ids=torch.zeros(args.text, 3), img_ids=torch.randn(tokens, 3, generator=g),
                guidance=torch.full((1,), 3.5) if model.config.guidance_embeds else None)
    call = {k: (v.to(device, dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in call.items()}
    watches: dict[str, Stopwatch] = {}

    def steps(key: str, embeds: list | None = None) -> None:
        watch = watches[key]
        procs = dict(model.attn_processors)
        model.set_attn_processor({k: Timed(p, watch) for k, p in procs.items()})
        for i in range(args.steps):  # diffusers pops the embeds from the kwargs: a fresh dict per call
            extra = {"joint_attention_kwargs": {"ip_adapter_image_embeds": embeds}} if embeds else {}
            model(timestep=torch.full((1,), 1.0 - i / args.steps, device=device, dtype=dtype), return_dict=False,
                  **call, **extra)
        model.set_attn_processor(procs)

    original = dict(model.attn_processors)
    modes: dict[str, Callable[[], None]] = {"bare": lambda: steps("bare")}
    names = ["flux-ip"] + ([] if args.no_instantx else ["flux-ip-instantx"])
    generation = [0]
    for name in names:
        adapter = make_adapter(name, model, args.tiny, device, dtype)
        feats = torch.randn(1, 1, adapter.spec.embed_dim, generator=g).to(device, dtype)
        key = f"lookalike {name}"
        watches[key] = Stopwatch(device)

        def ours(adapter=adapter, feats=feats, key=key) -> None:
            handle = attach_adapters(model, [adapter])
            generation[0] += 1
            tokens = watches[key].wrap(adapter.project_once)({"pooled": feats + generation[0]})  # a new subject
            with handle.conditioned([AdapterInput(tokens)]):
                steps(key)
            handle.detach()

        modes[key] = ours
    xlabs = make_adapter("flux-ip", model, args.tiny, device, dtype)
    model._load_ip_adapter_weights([official_state_dict(xlabs)], low_cpu_mem_usage=False)
    model.to(device=device, dtype=dtype)
    theirs_procs, theirs_proj = dict(model.attn_processors), model.encoder_hid_proj
    watches["diffusers flux-ip"] = Stopwatch(device)
    theirs_proj.forward = watches["diffusers flux-ip"].wrap(theirs_proj.forward)  # inside every model call
    feats = torch.randn(1, 1, xlabs.spec.embed_dim, generator=g).to(device, dtype)

    def theirs() -> None:
        model.encoder_hid_proj = theirs_proj
        model.set_attn_processor(dict(theirs_procs))
        steps("diffusers flux-ip", [feats])
        model.set_attn_processor(dict(original))

    modes["diffusers flux-ip"] = theirs
    model.set_attn_processor(dict(original))
    for key in modes:
        watches.setdefault(key, Stopwatch(device))
    for fn in modes.values():  # warm-up
        timed(fn, device)
    times: dict[str, list[float]] = {k: [] for k in modes}
    parts: dict[str, list[float]] = {k: [] for k in modes}
    order = list(modes)
    for run in range(args.runs):  # interleaved, the starting mode rotating, so a drift falls on all modes alike
        for key in order[run % len(order):] + order[:run % len(order)]:
            fn = modes[key]
            watches[key].total = 0.0
            times[key].append(timed(fn, device))
            parts[key].append(watches[key].total)
    sync(device)
    shape = "tiny" if args.tiny else f"full-width ({args.double} double + {args.single} single blocks)"
    print(f"device {device}, {args.dtype}, {shape} FLUX transformer, {tokens} image + {args.text} text tokens, "
          f"{args.steps} steps, {args.runs} interleaved runs")
    bare, bare_parts = statistics.median(times["bare"]), statistics.median(parts["bare"])
    print(f"{'mode':<28} {'total s':>8} {'/bare':>7} {'[min]':>7} {'attributed s':>13} {'attributed /bare':>17}")
    for key in modes:
        ratio = statistics.median(times[key]) / bare
        low = min(times[key]) / min(times["bare"])
        attributed = statistics.median(parts[key])
        print(f"{key:<28} {statistics.median(times[key]):>8.3f} {ratio:>7.4f} {low:>7.4f} {attributed:>13.3f} "
              f"{1 + (attributed - bare_parts) / bare:>17.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

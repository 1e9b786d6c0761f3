"""Dispatched aten compute operations per generation: bare vs lookalike vs diffusers' IP-Adapter.

An eager diffusion step on a GPU is bound by kernel launches, so an adapter's cost there follows the number of
operations it dispatches, not its FLOPs. This counts them on the CPU, where no GPU is needed: torch.profiler
records one generation and every aten operation the code dispatches counts once (a composite such as
``linear`` or ``scaled_dot_product_attention`` is one), while views, allocations and metadata count only for the
copies they make (a ``reshape`` of a transposed tensor, a ``to`` that converts). A generation is what a pipeline does with the denoiser: lookalike projects a new
subject's features once and runs ``--steps`` calls; diffusers projects inside every call. UNets run with
classifier-free guidance (batch 2), FLUX-dev without (guidance distilled, batch 1). Prints counts and ratios to
bare; the counts do not depend on the resolution, so small latents keep the run short.

Goal (issue 21): one adapter on SD1.5 at most 1.04x bare (the floor is 2 operations x 16 layers per step), and
lookalike below diffusers everywhere.

    python bench/ops.py                     # full-size SD1.5 config, random weights
    python bench/ops.py --base sdxl         # full-size SDXL config (about 10 GB in fp32)
    python bench/ops.py --base flux         # FLUX.1 at full width, 2 double + 4 single blocks
    python bench/ops.py --tiny              # tiny models, seconds (all three bases)
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable

import torch
from common import sdxl_unet
from overhead import features, sd15_unet, sized_spec
from overhead_flux import flux_transformer, make_adapter

from lookalike.adapters.attach import AdapterInput, attach_adapters
from lookalike.adapters.module import IPAdapter, model_family
from lookalike.weights.io import official_state_dict

#: Leaf aten operations that launch no kernel: views, allocations and metadata.
NOT_COMPUTE = frozenset({
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::transpose", "aten::permute", "aten::expand",
    "aten::as_strided", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::t",
    "aten::detach", "aten::alias", "aten::lift_fresh", "aten::empty", "aten::empty_like", "aten::empty_strided",
    "aten::resize_", "aten::to", "aten::unflatten", "aten::flatten", "aten::split", "aten::chunk", "aten::unbind",
    "aten::narrow", "aten::contiguous", "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense",
    "aten::result_type", "aten::view_as", "aten::expand_as", "aten::split_with_sizes", "aten::numpy_T",
    "aten::resolve_conj", "aten::resolve_neg", "aten::_reshape_alias", "aten::unsafe_split", "aten::movedim",
    "aten::swapaxes", "aten::matrix_H", "aten::dim", "aten::size", "aten::stride", "aten::clone_", "aten::set_",
})

#: Configurations: name -> (registry names of the stacked adapters, with masks).
CONFIGS = {
    "sd15": {"basic": (["ip-adapter_sd15"], False), "plus": (["ip-adapter-plus_sd15"], False),
             "two adapters": (["ip-adapter_sd15", "ip-adapter-plus_sd15"], False),
             "masks": (["ip-adapter_sd15", "ip-adapter_sd15"], True)},
    "sdxl": {"basic": (["ip-adapter_sdxl"], False), "plus": (["ip-adapter-plus_sdxl_vit-h"], False),
             "two adapters": (["ip-adapter_sdxl", "ip-adapter-plus_sdxl_vit-h"], False),
             "masks": (["ip-adapter_sdxl", "ip-adapter_sdxl"], True)},
    "flux": {"flux-ip": (["flux-ip"], False), "two adapters": (["flux-ip", "flux-ip"], False),
             "masks": (["flux-ip", "flux-ip"], True), "flux-ip-instantx": (["flux-ip-instantx"], False)},
}


def count_ops(fn: Callable[[], None]) -> Counter:
    """The aten compute operations ``fn`` dispatches (no gradients), by name."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: Counter = Counter()

    def visit(event) -> None:  # an operation the code dispatched counts once; a view or a conversion counts
        if event.name.startswith("aten::") and event.name not in NOT_COMPUTE:  # the copies it makes, if any
            counts[event.name] += 1
            return
        for child in event.cpu_children:
            visit(child)

    for event in prof.events():
        if event.cpu_parent is None:
            visit(event)
    return counts


def half_masks(count: int, side: int) -> list[torch.Tensor]:
    """``count`` masks ``(1, 1, side, side)`` splitting the image into vertical bands, one per adapter."""
    masks = []
    for i in range(count):
        m = torch.zeros(1, 1, side, side)
        m[..., i * side // count:(i + 1) * side // count] = 1.0
        masks.append(m)
    return masks


def unet_model(base: str, tiny: bool) -> torch.nn.Module:
    """The SD1.5 or SDXL UNet architecture with random weights (or a tiny one)."""
    from lookalike.pipeline.tiny import tiny_unet

    torch.manual_seed(0)
    if base == "sd15":
        return sd15_unet(tiny, "cpu", torch.float32)
    return (tiny_unet(base) if tiny else sdxl_unet()).eval()


def unet_modes(base: str, tiny: bool, steps: int, latent: int, dtype: torch.dtype = torch.float32
               ) -> dict[str, Callable[[], None]]:
    """bare, then lookalike and diffusers for each configuration, on one shared UNet."""
    unet = unet_model(base, tiny).to(dtype)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, latent, latent, generator=g).to(dtype)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(dtype)
    extra: dict = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra = {"text_embeds": torch.randn(2, pooled, generator=g).to(dtype),
                 "time_ids": torch.tensor([[64.0] * 6] * 2, dtype=dtype)}
    original = dict(unet.attn_processors)

    def run(cross: dict | None = None, images: list | None = None) -> None:
        added = dict(extra, image_embeds=images) if images is not None else dict(extra)
        for i in range(steps):
            unet(latents, 999 - i * 10, text, added_cond_kwargs=added or None, cross_attention_kwargs=cross)

    def bare() -> None:
        unet.encoder_hid_proj, unet.config.encoder_hid_dim_type = None, None
        unet.set_attn_processor(dict(original))
        run()

    modes: dict[str, Callable[[], None]] = {"bare": bare}
    for name, (names, masked) in CONFIGS[base].items():
        adapters = []
        for i, reg in enumerate(names):
            torch.manual_seed(10 + i)
            adapters.append(IPAdapter.for_unet(sized_spec(reg, unet, tiny), unet, dtype=dtype).eval())
            adapters[-1].name = f"{reg}#{i}"
        feats = [features(a.spec, "cpu", dtype) + i for i, a in enumerate(adapters)]
        masks = half_masks(len(adapters), 8 * latent) if masked else None
        modes[f"lookalike {name}"] = _lookalike(unet, adapters, feats, masks, run)
        unet.set_attn_processor(dict(original))
        unet._load_ip_adapter_weights([official_state_dict(a) for a in adapters], low_cpu_mem_usage=False)
        unet.to(dtype)
        procs, proj = dict(unet.attn_processors), unet.encoder_hid_proj
        unet.encoder_hid_proj, unet.config.encoder_hid_dim_type = None, None
        unet.set_attn_processor(dict(original))

        def theirs(procs=procs, proj=proj, feats=feats, masks=masks) -> None:
            unet.encoder_hid_proj, unet.config.encoder_hid_dim_type = proj, "ip_image_proj"
            unet.set_attn_processor(dict(procs))
            run({"ip_adapter_masks": masks} if masks else None, [torch.cat([torch.zeros_like(f), f]) for f in feats])
            unet.encoder_hid_proj, unet.config.encoder_hid_dim_type = None, None
            unet.set_attn_processor(dict(original))

        modes[f"diffusers {name}"] = theirs
    return modes


def _lookalike(model, adapters, feats, masks, run) -> Callable[[], None]:
    """One lookalike generation: a new subject projected once, then the denoiser calls (adapters stay attached).

    The subject's features (what an image encoder gives) are made before the counted call; the unconditional
    features are the same every generation, as the Personalizer's are.
    """
    generation = [0]
    unconditional = [torch.zeros_like(f) for f in feats]
    subjects: list[list[torch.Tensor]] = []

    def next_subject() -> None:
        generation[0] += 1
        subjects.append([f + generation[0] for f in feats])

    def ours() -> None:
        handle = attach_adapters(model, adapters)
        inputs = []
        for i, (a, f, zero) in enumerate(zip(adapters, subjects.pop(), unconditional)):
            key = a.spec.features[0]
            tokens = a.project_once({key: f})
            negative = a.project_once({key: zero}) if model_family(model) == "unet" else None  # guidance
            inputs.append(AdapterInput(tokens, negative, masks=None if masks is None else masks[i]))
        with handle.conditioned(inputs):
            run()
        handle.detach()

    ours.prepare = next_subject
    return ours


def flux_modes(tiny: bool, steps: int, latent: int) -> dict[str, Callable[[], None]]:
    """bare, then lookalike (and diffusers' XLabs processor where it has the configuration) on one FLUX."""
    model = flux_transformer(tiny, 2, 4, "cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    tokens, text = (latent // 2) ** 2, 128
    call = dict(hidden_states=torch.randn(1, tokens, model.config.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, text, model.context_embedder.in_features, generator=g),
                pooled_projections=torch.randn(1, model.config.pooled_projection_dim, generator=g),
                txt_ids=torch.zeros(text, 3), img_ids=torch.randn(tokens, 3, generator=g),
                guidance=torch.full((1,), 3.5) if model.config.guidance_embeds else None)
    original = dict(model.attn_processors)

    def run(embeds: list | None = None, masks: list | None = None) -> None:
        for i in range(steps):  # diffusers pops the embeds from the kwargs: a fresh dict per call
            kw = {"ip_adapter_image_embeds": embeds} if embeds else {}
            model(timestep=torch.full((1,), 1.0 - i / steps), return_dict=False, joint_attention_kwargs=kw or None,
                  **call)

    def bare() -> None:
        model.set_attn_processor(dict(original))
        run()

    modes: dict[str, Callable[[], None]] = {"bare": bare}
    for name, (names, masked) in CONFIGS["flux"].items():
        adapters = []
        for i, reg in enumerate(names):
            adapters.append(make_adapter(reg, model, tiny, "cpu", torch.float32))
            adapters[-1].name = f"{reg}#{i}"
        feats = [features(a.spec, "cpu", torch.float32) + i for i, a in enumerate(adapters)]
        masks = half_masks(len(adapters), 8 * latent) if masked else None
        modes[f"lookalike {name}"] = _lookalike(model, adapters, feats, masks, run)
        if masked or any(a.spec.flavor != "xlabs" for a in adapters):
            continue  # diffusers' FLUX processor ignores masks and cannot read InstantX FLUX
        model.set_attn_processor(dict(original))
        model._load_ip_adapter_weights([official_state_dict(a) for a in adapters], low_cpu_mem_usage=False)
        procs, proj = dict(model.attn_processors), model.encoder_hid_proj
        model.set_attn_processor(dict(original))

        def theirs(procs=procs, proj=proj, feats=feats) -> None:
            model.encoder_hid_proj = proj
            model.set_attn_processor(dict(procs))
            run(list(feats))
            model.set_attn_processor(dict(original))

        modes[f"diffusers {name}"] = theirs
    return modes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=list(CONFIGS), action="append",
                        help="sd15, sdxl or flux (repeatable; default sd15, or all three with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny models: a smoke run of the same code")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--latent", type=int, default=16, help="latent side; counts do not depend on it")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="bfloat16 halves the memory (full SDXL: 5 GB); the counts do not change")
    parser.add_argument("--by-name", action="store_true", help="also list each mode's extra operations by name")
    args = parser.parse_args(argv)
    bases = args.base or (list(CONFIGS) if args.tiny else ["sd15"])
    for base in bases:
        modes = flux_modes(args.tiny, args.steps, args.latent) if base == "flux" else \
            unet_modes(base, args.tiny, args.steps, args.latent, getattr(torch, args.dtype))
        counts = {}
        for key, fn in modes.items():
            for _ in range(2):  # a first generation, then the counted one (remembered projections warm)
                getattr(fn, "prepare", lambda: None)()
                counts[key] = count_ops(fn)
        bare = sum(counts["bare"].values())
        print(f"{base}{' (tiny)' if args.tiny else ''}: {args.steps} steps"
              f"{' with guidance' if base != 'flux' else ''}, aten compute operations per generation")
        print(f"{'mode':<30} {'ops':>7} {'/bare':>7} {'extra':>6}")
        for key, c in counts.items():
            total = sum(c.values())
            print(f"{key:<30} {total:>7} {total / bare:>7.4f} {total - bare:>6}")
            if args.by_name and key != "bare":
                extra = {n: c[n] - counts["bare"][n] for n in c | counts["bare"] if c[n] != counts["bare"][n]}
                print("    " + ", ".join(f"{n.removeprefix('aten::')} {v:+d}" for n, v in sorted(extra.items())))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

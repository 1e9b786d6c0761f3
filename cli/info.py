"""``lookalike info`` (describe a checkpoint) and ``lookalike download`` (fetch one into the cache)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LookalikeError, MissingFileError
from ..pipeline.loading import quiet_hub

if TYPE_CHECKING:  # pragma: no cover
    from ..adapters.spec import AdapterSpec


_BASE_NAMES = {"sd15": "Stable Diffusion 1.5", "sdxl": "Stable Diffusion XL", "flux": "FLUX.1",
               "sd3": "Stable Diffusion 3.5"}


def _add_info(sub: Any) -> None:
    """The ``info`` subcommand."""
    p = sub.add_parser(
        "info", help="describe an adapter checkpoint: variant, base model, encoder, tokens, parameters",
        description="Describe an adapter checkpoint: its variant, base model family, image encoder, image "
                    "tokens and parameter count. Nothing is downloaded: a registry name is described from "
                    "the registry, and from its file when `lookalike download` has cached it.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a .safetensors/.bin/.pt checkpoint file, a registry name, or org/repo/path/file")
    p.add_argument("--base", choices=("sd15", "sdxl"), default="sd15",
                   help="base family for a short name such as plus (default: sd15)")
    p.set_defaults(run=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    """``lookalike info``: describe a checkpoint file, hub file or registry entry."""
    from ..adapters.spec import REGISTRY, get_spec
    from ..weights.hub import resolve_adapter_source
    from ..weights.io import SPEC_KEY, detect_spec, read_checkpoint
    from ..weights.problems import checkpoint_problems

    source = args.checkpoint
    registry = source in REGISTRY or any(s.short_name == source for s in REGISTRY.values())
    try:
        path, _ = resolve_adapter_source(source, base=args.base if registry else None, local_files_only=True)
    except MissingFileError:
        if not registry:
            raise
        spec = get_spec(source, args.base)
        _print_info(spec, None, {}, "the registry")
        print(f"parameters:  unknown until the file is cached; run `lookalike download {spec.name}`")
        return 0
    sd, metadata = read_checkpoint(path)
    spec = detect_spec(sd, metadata, str(path))
    problems = checkpoint_problems(spec, sd)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise LookalikeError(f"{path} is not a complete {spec.name} checkpoint: {'; '.join(problems[:3])}{more}; "
                             f"the file is damaged or incomplete: re-download or re-create it")
    _print_info(spec, path, sd, "the file's metadata" if SPEC_KEY in metadata else "the tensor shapes")
    return 0


def _print_info(spec: AdapterSpec, path: Path | None, sd: dict, origin: str) -> None:
    """The info lines for one checkpoint (parameters only when its tensors are given)."""
    from ..adapters.spec import REGISTRY

    entry = REGISTRY.get(spec.name)
    if entry == spec:
        known = f"registry entry, short name {spec.short_name}" if spec.short_name else "registry entry"
    elif entry is not None:
        known = "registry name, but other shapes than the registry's"
    else:
        known = "not in the registry"
    widths = {"face_id": spec.embed_dim, "pooled": spec.embed_dim,
              "patch": spec.projector_kwargs.get("clip_dim", spec.embed_dim)}
    features = " + ".join(f"{f} {widths[f]}-d" for f in spec.features)
    per = "per face image" if spec.features[0] == "face_id" else "per reference image"
    if path is not None:
        print(f"checkpoint:  {path}")
    print(f"variant:     {spec.name} ({known}; read from {origin})")
    print(f"base:        {spec.base} ({_BASE_NAMES.get(spec.base, spec.base)}, "
          f"{spec.cross_attention_dim}-d cross-attention)")
    print(f"encoder:     {spec.encoder} ({features})")
    print(f"projector:   {spec.projector}")
    print(f"tokens:      {spec.num_tokens} {per}")
    print(f"lora:        {f'rank {spec.lora_rank}' if spec.lora_rank else 'none'}")
    if spec.blocks:  # DiT adapters: which transformer blocks take image attention
        count = len({k.split(".")[1] for k in sd if k.startswith("ip_adapter.")}) if sd else None
        print(f"blocks:      {count if count is not None else 'all'} ({' + '.join(spec.blocks)}; {spec.flavor} style)")
    if sd:
        total = sum(t.numel() for t in sd.values())
        parts = {name: sum(t.numel() for k, t in sd.items() if k.startswith(name + ".")) for name in
                 ("image_proj", "ip_adapter")}
        dtypes = ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in sd.values()}))
        print(f"parameters:  {total:,} (image_proj {parts['image_proj']:,}, ip_adapter {parts['ip_adapter']:,}; "
              f"{dtypes})")


def _add_download(sub: Any) -> None:
    """The ``download`` subcommand."""
    from ..adapters.spec import spec_names

    p = sub.add_parser(
        "download", help="fetch an adapter and its image encoder into the Hugging Face cache",
        description="Fetch a registry adapter's checkpoint and its CLIP image encoder into the Hugging Face "
                    "cache (HF_HOME / HF_HUB_CACHE), with progress, so that later runs work offline.",
        epilog=f"Registry names: {', '.join(spec_names())}. FaceID adapters also need insightface's buffalo_l "
               f"face models in ~/.insightface/models/buffalo_l, which insightface provides.",
    )
    p.add_argument("name", metavar="NAME", help="registry name (ip-adapter-plus_sd15) or short name (plus)")
    p.add_argument("--base", choices=("sd15", "sdxl"), default="sd15",
                   help="base family for a short name such as plus (default: sd15, as the default --model)")
    p.add_argument("--no-encoder", action="store_true", help="fetch the checkpoint only, not the image encoder")
    p.set_defaults(run=cmd_download)


def cmd_download(args: argparse.Namespace) -> int:
    """``lookalike download``: a registry adapter (and its image encoder) into the cache."""
    from ..adapters.spec import get_spec
    from ..weights.hub import download

    spec = get_spec(args.name, args.base)
    with quiet_hub():
        paths = download(spec.name, with_encoder=not args.no_encoder)
    for path in paths:
        print(path)
    if spec.controlnet_subfolder:
        from ..pipeline.identity import resolve_identitynet_dir

        with quiet_hub():
            print(resolve_identitynet_dir(spec))
    if "face_id" in spec.features:
        pack = spec.encoder.split("+")[0].removeprefix("insightface-")
        print(f"note: {spec.name} also needs insightface's {pack} face models in ~/.insightface/models/{pack} "
              f"(non-commercial research only), or --face-detector yunet with --face-recognizer FILE",
              file=sys.stderr)
    return 0

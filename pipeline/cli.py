"""The ``lookalike`` command line: ``generate``, ``encode``, ``info`` and ``download``.

torch, diffusers and transformers are imported inside the commands, never at module level, so that
``lookalike --help`` answers at once. Every input is checked before any model is loaded. Problems the
user can fix (:class:`~lookalike.errors.LookalikeError`) exit with code 2 and one ``error:`` line; an
interruption exits with 130; anything else is an internal error (exit 1, traceback with ``LOOKALIKE_DEBUG=1``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import LookalikeError, MissingFileError
from .cli_output import grid_path, make_grid, output_paths, save_png
from .cli_plan import (
    DEBUG_ENV,
    DEFAULT_ADAPTER,
    DEFAULT_MODEL,
    adapter_choice,
    check_combination,
    check_output,
    check_references,
    check_subject_fits,
    check_transfer,
    debug,
    device_and_dtype,
    encode_plan,
    encode_references,
    face_options,
    load_personalizer,
    load_subject,
    make_plan,
    quiet_hub,
    quiet_libraries,
)

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from ..adapters.spec import AdapterSpec
    from .personalizer import Personalizer
    from .subject import Subject

DEFAULT_SCALE = 0.6
DEFAULT_STEPS = 30
DEFAULT_NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality"
#: Default output size per base family (the demo models use their own native size).
DEFAULT_SIZE = {"sd15": 512, "sdxl": 1024, "flux": 1024, "sd3": 1024}
#: Default classifier-free guidance per base family (the diffusers pipelines' own defaults).
DEFAULT_GUIDANCE = {"sd15": 7.5, "sdxl": 5.0, "flux": 3.5, "sd3": 7.0}
DTYPES = ("float16", "bfloat16", "float32")
_BASE_NAMES = {"sd15": "Stable Diffusion 1.5", "sdxl": "Stable Diffusion XL", "flux": "FLUX.1",
               "sd3": "Stable Diffusion 3.5"}

# -- argument types ----------------------------------------------------------------------------------------


def _number(cast: Callable[[str], Any], low: float, high: float = math.inf) -> Callable[[str], Any]:
    """An argparse type: ``cast(text)`` (int or float), finite and within [low, high]."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' * (cast is int)}number") from None
        if not (math.isfinite(value) and low <= value <= high):
            limit = f"between {low:g} and {high:g}" if math.isfinite(high) else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"{text} must be {limit}")
        return value

    return parse


_positive_int = _number(int, 1)
_non_negative_int = _number(int, 0)
_non_negative_float = _number(float, 0.0)
_fraction = _number(float, 0.0, 1.0)


def _size(text: str) -> tuple[int, int]:
    """argparse type: ``N`` or ``WIDTHxHEIGHT`` in pixels, multiples of 8 -> (width, height)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use N (square) or WIDTHxHEIGHT, e.g. 768x512")
    width, height = int(parts[0]), int(parts[-1])
    if width < 8 or height < 8 or width % 8 or height % 8:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive multiples of 8")
    return width, height


# -- parser ------------------------------------------------------------------------------------------------


def _adapter_help(with_subject: bool) -> str:
    """The --adapter help text, listing the registry's short names (the registry imports no torch)."""
    from ..adapters.spec import REGISTRY

    shorts = ", ".join(sorted({s.short_name for s in REGISTRY.values() if s.short_name}))
    default = f"{DEFAULT_ADAPTER}; with --subject: the subject's adapter" if with_subject else DEFAULT_ADAPTER
    return (f"adapter variant: a short name ({shorts}), a full registry name (see `lookalike download "
            f"--help`), a local .safetensors/.bin checkpoint, or org/repo/path/file on the hub "
            f"(default: {default}; --model demo offers plus and basic)")


def _add_model_options(parser: argparse.ArgumentParser, with_subject: bool) -> None:
    """--model, --adapter, --device and --dtype (generate and encode)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL, metavar="ID|FOLDER|demo",
                       help=f"diffusers text-to-image model, SD1.5 or SDXL: a hub id, a local folder, or `demo` "
                            f"(a tiny built-in model trained on a world of coloured shapes, offline, seconds on a CPU; "
                            f"`tiny-random`: the same shape with random weights, for smoke tests) (default: {DEFAULT_MODEL})")
    group.add_argument("--adapter", default=None, metavar="NAME|FILE", help=_adapter_help(with_subject))
    group.add_argument("--device", default=None, metavar="DEVICE",
                       help="torch device, e.g. cuda, cuda:1, cpu (default: cuda when available, else cpu; "
                            "the demo model always runs on the cpu)")
    group.add_argument("--dtype", choices=DTYPES, default=None,
                       help="weights' precision (default: float16 on cuda, float32 on cpu)")


def _add_reference_options(parser: argparse.ArgumentParser) -> None:
    """--crop, --face-index, --combine, --reference-weight, --negative-reference: how photos are encoded."""
    group = parser.add_argument_group("reference photos")
    group.add_argument("--crop", choices=("center", "pad", "resize"), default="center",
                       help="how a photo is made square for the image encoder (default: center)")
    group.add_argument("--face-index", type=_non_negative_int, default=None, metavar="N",
                       help="FaceID adapters: which face to use, counted left to right from 0 "
                            "(default: the largest face)")
    group.add_argument("--combine", choices=("concat", "mean"), default=None,
                       help="several photos: keep every photo's tokens (concat) or average them (mean) "
                            "(default: concat; mean with --reference-weight)")
    group.add_argument("--reference-weight", action="append", type=_non_negative_float, dest="reference_weights",
                       metavar="W", help="how much a photo counts in the average: repeat once per --reference, "
                                         "in the same order (implies --combine mean)")
    group.add_argument("--negative-reference", action="append", dest="negative_references", metavar="IMG",
                       help="a photo of what the image should move away from (its encoder features replace the "
                            "adapter's blank negative); repeat to average several; not for FaceID adapters")
    group.add_argument("--face-models", metavar="DIR", default=None,
                       help="FaceID adapters: the insightface model folder (default: ~/.insightface/models/buffalo_l)")
    group.add_argument("--face-detector", choices=("insightface", "yunet"), default=None,
                       help="FaceID adapters: insightface's detector (default) or OpenCV's YuNet")
    group.add_argument("--yunet-model", metavar="FILE", default=None,
                       help="with --face-detector yunet: the YuNet .onnx file")


def _add_generate(sub: Any) -> None:
    """The ``generate`` subcommand."""
    p = sub.add_parser(
        "generate", help="generate images of a subject from reference photos and a prompt",
        description="Generate images of the subject in reference photos (or a saved subject), following a prompt.",
        epilog="With --num-images 1 the image is written to --out itself. With --num-images N > 1, image i "
               "is written to <stem>-i.png next to --out (out.png -> out-0.png, out-1.png, ...) and all of "
               "them to a grid, <stem>-grid.png; --out itself is not written. Image i starts from a noise "
               "seeded with --seed + i (on the cpu, so the same on every device) and can be reproduced alone. "
               "Each PNG records its prompt, seed, model, adapter, scale and the other settings in its "
               "metadata. Files are replaced only by complete images.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--reference", action="append", dest="references", metavar="IMG",
                        help="a photo of the subject (JPEG, PNG, WebP); repeat for several photos")
    source.add_argument("--subject", metavar="SUBJECT.safetensors",
                        help="a subject saved by `lookalike encode`, instead of --reference")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="what to generate, e.g. 'a dog on the beach'")
    p.add_argument("--out", required=True, metavar="PATH.png", help="output PNG (see below for several images)")
    _add_model_options(p, with_subject=True)
    _add_reference_options(p)
    g = p.add_argument_group("generation")
    g.add_argument("--scale", type=_non_negative_float, default=DEFAULT_SCALE,
                   help=f"strength of the subject against the prompt: 0 ignores the photos, 1 follows them "
                        f"closely (default: {DEFAULT_SCALE})")
    g.add_argument("--transfer", choices=("all", "style", "layout", "strong-style"), default="all",
                   help="what the photos give: all (the subject), or only their style or layout, through the "
                        "UNet blocks that carry it (InstantStyle; ComfyUI's weight types; SD1.5 and SDXL) "
                        "(default: all)")
    g.add_argument("--window", nargs=2, type=_fraction, default=None, metavar=("START", "END"),
                   help="the part of the schedule where the subject acts, as fractions, e.g. 0 0.8 "
                        "(default: 0 1, the whole schedule)")
    g.add_argument("--seed", type=_non_negative_int, default=0, help="random seed of the first image (default: 0)")
    g.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS,
                   help=f"denoising steps (default: {DEFAULT_STEPS})")
    g.add_argument("--num-images", type=_positive_int, default=1, metavar="N",
                   help="how many images to generate (default: 1)")
    g.add_argument("--guidance", type=_non_negative_float, default=None, metavar="CFG",
                   help="classifier-free guidance scale (default: 7.5 for SD1.5 and demo, 5.0 for SDXL)")
    g.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE, metavar="TEXT",
                   help=f"what to avoid (default: '{DEFAULT_NEGATIVE}'; '' for none)")
    g.add_argument("--size", type=_size, default=None, metavar="N|WxH",
                   help="image size in pixels, multiples of 8 (default: 512 for SD1.5, 1024 for SDXL, the demo model's own size)")
    p.set_defaults(run=cmd_generate)


def _add_encode(sub: Any) -> None:
    """The ``encode`` subcommand."""
    p = sub.add_parser(
        "encode", help="encode reference photos once into a reusable subject file",
        description="Run the image encoder(s) an adapter needs on reference photos and save the features, "
                    "so that `lookalike generate --subject FILE` needs no photos and no image encoder.",
        epilog="The subject file records the adapter, the encoder, --combine, the photos' weights and the SHA-256 "
               "of every photo (negative photos included). "
               "Only the image encoder is loaded (not the text-to-image model); --model chooses the base "
               "family that a short --adapter name refers to.",
    )
    p.add_argument("--reference", action="append", dest="references", required=True, metavar="IMG",
                   help="a photo of the subject (JPEG, PNG, WebP); repeat for several photos")
    p.add_argument("--out", required=True, metavar="SUBJECT.safetensors", help="the subject file to write")
    _add_model_options(p, with_subject=False)
    _add_reference_options(p)
    p.set_defaults(run=cmd_encode)


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its subcommands."""
    from ..evaluation.cli import add_eval_parser
    from ..world.cli import add_demo_parser

    parser = argparse.ArgumentParser(
        prog="lookalike",
        description="Zero-shot personalization of text-to-image models: images of a subject from a few photos.",
        epilog="Try it offline: lookalike generate --model demo --reference photo.jpg --prompt 'a dog' "
               "--out dog.png. Errors exit with code 2; set LOOKALIKE_DEBUG=1 for tracebacks.",
    )
    parser.add_argument("--version", action="version", version=f"lookalike {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_encode(sub)
    _add_info(sub)
    _add_download(sub)
    add_eval_parser(sub)
    add_demo_parser(sub)
    return parser


# -- commands ----------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """The generation settings of one ``generate`` run (what the PNG metadata records)."""

    prompt: str
    negative_prompt: str
    model: str
    adapter: str
    scale: float
    steps: int
    guidance: float
    width: int
    height: int
    window: tuple[float, float]
    seed: int
    references: list[str]
    reference_weights: list[float] = field(default_factory=list)
    negative_references: list[str] = field(default_factory=list)
    transfer: str = "all"

    def metadata(self, seed: int | str) -> dict[str, str]:
        """PNG text fields for the image made with ``seed`` (a description of seeds for a grid)."""
        return {
            "prompt": self.prompt, "negative_prompt": self.negative_prompt, "seed": str(seed),
            "model": self.model, "adapter": self.adapter, "scale": repr(self.scale), "steps": str(self.steps),
            "guidance": repr(self.guidance), "size": f"{self.width}x{self.height}",
            "window": f"{self.window[0]!r},{self.window[1]!r}", "references": json.dumps(self.references),
            **({"reference_weights": json.dumps(self.reference_weights)} if self.reference_weights else {}),
            **({"negative_references": json.dumps(self.negative_references)} if self.negative_references else {}),
            **({"transfer": self.transfer} if self.transfer != "all" else {}),
            "lookalike_version": __version__, "Software": f"lookalike {__version__}",
            "parameters": f"{self.prompt}\nNegative prompt: {self.negative_prompt}\nSteps: {self.steps}, "
                          f"CFG scale: {self.guidance}, Seed: {seed}, Size: {self.width}x{self.height}, "
                          f"Model: {self.model}, IP-Adapter: {self.adapter}, IP-Adapter scale: {self.scale}",
        }


def cmd_generate(args: argparse.Namespace) -> int:
    """``lookalike generate``: check everything, load, encode or read the subject, generate, write PNGs."""
    out = check_output(args.out, ".png", "images are written as PNG")
    paths = output_paths(out, args.num_images) + ([grid_path(out)] if args.num_images > 1 else [])
    for path in paths:
        if path.is_dir():
            raise LookalikeError(f"cannot write {path}: it is a folder; pick another --out")
    window = tuple(args.window) if args.window else (0.0, 1.0)
    if window[0] >= window[1]:
        raise LookalikeError(f"--window {window[0]} {window[1]}: START must be below END, e.g. --window 0 0.8")
    references = check_references(args.references) if args.references else []
    args.negative_references = check_references(args.negative_references) if args.negative_references else None
    check_combination(args, len(references))
    subject = load_subject(args.subject) if args.subject else None
    device, dtype = device_and_dtype(args.model, args.device, args.dtype)
    adapter = adapter_choice(args.adapter, subject, args.model)
    with quiet_hub():
        plan = make_plan(args.model, adapter, with_encoder=subject is None)
    check_subject_fits(subject, plan.spec)
    guidance = args.guidance if args.guidance is not None else DEFAULT_GUIDANCE[plan.base]
    with quiet_hub(), quiet_libraries():
        p, name = load_personalizer(plan, device, dtype, face_options(args))
    check_transfer(p, args.transfer)
    native = int(p.pipe.unet.config.sample_size) * int(p.pipe.vae_scale_factor) if plan.demo else 0  # demo size
    width, height = args.size or ((native if plan.demo else DEFAULT_SIZE[plan.base]),) * 2
    with quiet_hub(), quiet_libraries():
        if subject is None:
            subject = p.encode(references, adapter=name, combine=args.combine, crop=args.crop,
                               face_index=args.face_index, weights=args.reference_weights,
                               negative_images=args.negative_references)
        settings = Settings(args.prompt, args.negative_prompt, args.model, name, args.scale, args.steps, guidance,
                            width, height, (window[0], window[1]), args.seed, list(subject.sources),
                            list(subject.weights), list(subject.negative_sources), args.transfer)
        images = _generate_and_save(p, subject, settings, paths[: args.num_images])
    if len(images) > 1:
        save_png(make_grid(images), paths[-1], settings.metadata(f"{args.seed}..{args.seed + len(images) - 1}"))
        print(f"wrote {paths[-1]}")
    if plan.demo:
        from .demo import DEMO_NOTE, DEMO_TRAINED

        if not DEMO_TRAINED:
            print(f"note: {DEMO_NOTE}", file=sys.stderr)
    return 0


def _generate_and_save(p: Personalizer, subject: Subject, s: Settings, paths: list[Path]) -> list[Image.Image]:
    """Generate one image per path (seed + i each), each saved as soon as it is done; a progress bar on stderr."""
    import torch
    from tqdm import tqdm

    from ..adapters.transfer import transfer_scale

    p.pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=len(paths) * s.steps, unit="step", disable=None, dynamic_ncols=True, file=sys.stderr)

    def on_step(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        bar.update(1)
        return kwargs

    images = []
    try:
        for i, path in enumerate(paths):
            bar.set_description(f"image {i + 1}/{len(paths)}")
            generator = torch.Generator("cpu").manual_seed(s.seed + i)
            result = p.generate(s.prompt, subject=subject, scale=transfer_scale(s.transfer, p.base, s.scale),
                                window=s.window,
                                negative_prompt=s.negative_prompt or None, num_inference_steps=s.steps,
                                guidance_scale=s.guidance, height=s.height, width=s.width, generator=generator,
                                callback_on_step_end=on_step)
            image = result.images[0]
            flagged = getattr(result, "nsfw_content_detected", None)
            save_png(image, path, s.metadata(s.seed + i))
            bar.clear()
            print(f"wrote {path}")
            if flagged and flagged[0]:
                print(f"warning: the model's safety checker blanked {path}; change the prompt or the seed",
                      file=sys.stderr)
            images.append(image)
    finally:
        bar.close()
    return images


def cmd_encode(args: argparse.Namespace) -> int:
    """``lookalike encode``: reference photos -> a subject file."""
    out = check_output(args.out, ".safetensors", "subjects are saved as safetensors")
    references = check_references(args.references)
    args.negative_references = check_references(args.negative_references) if args.negative_references else None
    check_combination(args, len(references))
    device, dtype = device_and_dtype(args.model, args.device, args.dtype)
    with quiet_hub():
        plan = encode_plan(args.model, args.adapter or DEFAULT_ADAPTER)
    with quiet_hub(), quiet_libraries():
        subject = encode_references(plan, references, args, device, dtype)
    try:
        subject.save(out)
    except OSError as exc:
        raise LookalikeError(f"cannot write {out}: {exc.strerror or exc}; check free space and permissions") from exc
    print(f"wrote {out} ({subject.num_images} image(s) for {subject.adapter}, encoder {subject.encoder})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """``lookalike info``: describe a checkpoint file, hub file or registry entry."""
    from ..adapters.spec import REGISTRY, get_spec
    from ..weights.hub import resolve_adapter_source
    from ..weights.io import SPEC_KEY, detect_spec, read_checkpoint

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


def cmd_download(args: argparse.Namespace) -> int:
    """``lookalike download``: a registry adapter (and its image encoder) into the cache."""
    from ..adapters.spec import get_spec
    from ..weights.hub import download

    spec = get_spec(args.name, args.base)
    with quiet_hub():
        paths = download(spec.name, with_encoder=not args.no_encoder)
    for path in paths:
        print(path)
    if "face_id" in spec.features:
        print("note: FaceID also needs insightface's buffalo_l models in ~/.insightface/models/buffalo_l",
              file=sys.stderr)
    return 0


# -- entry point -------------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    """A message on one line."""
    return " ".join(str(text).split())


def _fail(message: str, code: int) -> int:
    """Print the traceback when debugging, then ``error: message`` on one line; return ``code``."""
    if debug():
        traceback.print_exc()
    print(f"error: {_one_line(message)}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors (code 2)
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
    try:
        return int(args.run(args))
    except LookalikeError as exc:
        return _fail(str(exc), 2)
    except KeyboardInterrupt:
        return _fail("interrupted; every output file written so far is complete", 130)
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":
            return _fail(f"the device ran out of memory ({_one_line(str(exc))[:120]}); lower --size or "
                         f"--num-images, use --dtype float16, or --device cpu", 2)
        detail = _one_line(str(exc))[:300] or "no message"
        return _fail(f"internal error: {type(exc).__name__}: {detail}; rerun with {DEBUG_ENV}=1 for the traceback", 1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

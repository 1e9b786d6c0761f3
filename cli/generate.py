"""``lookalike generate``: images of a subject from reference photos (or a saved subject) and a prompt."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LookalikeError
from ..pipeline.checks import MAX_SEED, MAX_SIDE, MAX_STEPS, check_seeds
from ..pipeline.loading import device_and_dtype, load_personalizer, quiet_hub, quiet_libraries
from ..pipeline.output import (
    DEFAULT_GUIDANCE,
    DEFAULT_NEGATIVE,
    DEFAULT_PROMPT,
    DEFAULT_SCALE,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    Settings,
    generate_and_save,
    grid_path,
    make_grid,
    output_paths,
    save_png,
)
from ..pipeline.plan import (
    adapter_choice,
    check_references,
    check_subject_fits,
    check_transfer,
    load_subject,
    make_plan,
)
from .checks import check_combination, check_output, face_options
from .layout import (
    add_layout_options,
    check_layout_flags,
    encode_layout,
    first_subject,
    layout_settings,
    layout_subjects,
    needs_encoder,
    read_subjects_for,
    save_layout,
)
from .options import (
    _add_model_options,
    _add_reference_options,
    _fraction,
    _non_negative_float,
    _positive_int,
    _seed,
    _size,
    _steps,
)

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from ..pipeline.personalizer import Personalizer
    from ..pipeline.subject import Subject


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
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help="what to generate, e.g. 'a dog on the beach' (default: the official image-only prompt "
                        "'best quality, high quality')")
    p.add_argument("--out", required=True, metavar="PATH.png", help="output PNG (see below for several images)")
    _add_model_options(p, with_subject=True)
    _add_reference_options(p)
    g = p.add_argument_group("generation")
    g.add_argument("--scale", type=_non_negative_float, default=None,
                   help=f"strength of the subject against the prompt: 0 ignores the photos, 1 follows them "
                        f"closely (default: {DEFAULT_SCALE}; 0.8 for InstantID, its authors' default)")
    g.add_argument("--identitynet-scale", type=_non_negative_float, default=None, metavar="S",
                   help="InstantID: strength of IdentityNet, the ControlNet on the face keypoints (default: 0.8)")
    g.add_argument("--pose-reference", metavar="IMG", default=None,
                   help="InstantID: a photo whose face keypoints (pose and framing) IdentityNet follows "
                        "(default: the reference photo's own)")
    g.add_argument("--s-scale", type=_non_negative_float, default=None, metavar="S",
                   help="FaceID-Plus: weight of the CLIP face features added to the id tokens (with --shortcut; "
                        "default: 1.0)")
    g.add_argument("--shortcut", action=argparse.BooleanOptionalAction, default=None,
                   help="FaceID-Plus: keep the id tokens and add the CLIP face features to them (v2's rule; "
                        "default: the adapter's own, on for plusv2)")
    g.add_argument("--transfer", choices=("all", "style", "layout", "strong-style"), default="all",
                   help="what the photos give: all (the subject), or only their style or layout, through the "
                        "UNet blocks that carry it (InstantStyle; ComfyUI's weight types; SD1.5 and SDXL) "
                        "(default: all)")
    g.add_argument("--window", nargs=2, type=_fraction, default=None, metavar=("START", "END"),
                   help="the part of the schedule where the subject acts, as fractions, e.g. 0 0.8 "
                        "(default: 0 1, the whole schedule)")
    g.add_argument("--seed", type=_seed, default=0,
                   help=f"random seed of the first image, 0 to {MAX_SEED} (default: 0)")
    g.add_argument("--steps", type=_steps, default=DEFAULT_STEPS,
                   help=f"denoising steps, 1 to {MAX_STEPS} (default: {DEFAULT_STEPS})")
    g.add_argument("--num-images", type=_positive_int, default=1, metavar="N",
                   help="how many images to generate (default: 1)")
    g.add_argument("--guidance", type=_non_negative_float, default=None, metavar="CFG",
                   help="classifier-free guidance scale (default: 7.5 for SD1.5 and demo, 5.0 for SDXL)")
    g.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE, metavar="TEXT",
                   help=f"what to avoid (default: '{DEFAULT_NEGATIVE}'; '' for none)")
    g.add_argument("--size", type=_size, default=None, metavar="N|WxH",
                   help=f"image size in pixels, multiples of 8, at most {MAX_SIDE} a side (default: 512 for SD1.5, "
                        f"1024 for SDXL, the demo model's own size)")
    add_layout_options(p, source)
    p.set_defaults(run=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    """``lookalike generate``: check everything, load, encode or read the subject, generate, write PNGs."""
    out = check_output(args.out, ".png", "images are written as PNG")
    paths = output_paths(out, args.num_images) + ([grid_path(out)] if args.num_images > 1 else [])
    for path in paths:
        if path.is_dir():
            raise LookalikeError(f"cannot write {path}: it is a folder; pick another --out")
    check_seeds(args.seed, args.num_images)
    window = tuple(args.window) if args.window else (0.0, 1.0)
    if window[0] >= window[1]:
        raise LookalikeError(f"--window {window[0]} {window[1]}: START must be below END, e.g. --window 0 0.8")
    references = check_references(args.references) if args.references else []
    args.negative_references = check_references(args.negative_references) if args.negative_references else None
    check_combination(args, len(references))
    check_layout_flags(args)
    layout = read_subjects_for(args.subjects_for) if args.subjects_for else None
    subject = load_subject(args.subject) if args.subject else first_subject(layout or {})
    device, dtype = device_and_dtype(args.model, args.device, args.dtype)
    adapter = adapter_choice(args.adapter, subject, args.model)
    pose = check_references([args.pose_reference])[0] if args.pose_reference else None
    with quiet_hub():
        plan = make_plan(args.model, adapter, with_encoder=subject is None or needs_encoder(layout or {}))
    for one in layout_subjects(layout) if layout else [subject]:
        check_subject_fits(one, plan.spec)
    if (pose is not None or args.identitynet_scale is not None) and not plan.spec.controlnet_subfolder:
        raise LookalikeError(f"--pose-reference and --identitynet-scale are for InstantID; {plan.spec.name} has no "
                             f"IdentityNet: use --adapter instantid or drop them")
    scale = args.scale if args.scale is not None else (
        plan.spec.default_scale if plan.spec.controlnet_subfolder else DEFAULT_SCALE)
    identity = {"pose_reference": pose, "identitynet_scale": args.identitynet_scale, "s_scale": args.s_scale,
                "shortcut": args.shortcut}
    guidance = args.guidance if args.guidance is not None else DEFAULT_GUIDANCE[plan.base]
    with quiet_hub(), quiet_libraries():
        p, name = load_personalizer(plan, device, dtype, face_options(args))
    check_transfer(p, args.transfer)
    native = int(p.pipe.unet.config.sample_size) * int(p.pipe.vae_scale_factor) if plan.demo else 0  # demo size
    width, height = args.size or ((native if plan.demo else DEFAULT_SIZE[plan.base]),) * 2
    with quiet_hub(), quiet_libraries():
        subjects = encode_layout(p, layout, name, args) if layout else None
        if subject is None and subjects is None:
            subject = p.encode(references, adapter=name, combine=args.combine, crop=args.crop,
                               face_index=args.face_index, weights=args.reference_weights,
                               negative_images=args.negative_references)
        if subjects is None:
            sources = (list(subject.sources), list(subject.weights), list(subject.negative_sources))
            placed: dict[str, list[str]] = {}
        else:
            sources = ([h for s in subjects.values() for h in s.sources], [], [])
            placed = {phrase: list(s.sources) for phrase, s in subjects.items()}
        settings = Settings(args.prompt or DEFAULT_PROMPT, args.negative_prompt, args.model, name, scale, args.steps,
                            guidance, width, height, (window[0], window[1]), args.seed, *sources, args.transfer,
                            placed, "start={!r},threshold={!r}".format(*layout_settings(args)) if placed else "",
                            {k: v for k, v in identity.items() if v is not None})
        images = _generate_and_save(p, subject, settings, paths[: args.num_images], subjects, args)
    if len(images) > 1:
        save_png(make_grid(images), paths[-1], settings.metadata(f"{args.seed}..{args.seed + len(images) - 1}"))
        print(f"wrote {paths[-1]}")
    if plan.demo:
        from ..pipeline.demo import DEMO_NOTE, DEMO_TRAINED

        if not DEMO_TRAINED:
            print(f"note: {DEMO_NOTE}", file=sys.stderr)
    return 0


def _generate_and_save(p: Personalizer, subject: Subject | None, s: Settings, paths: list[Path],
                       subjects: dict[str, Subject] | None = None, args: argparse.Namespace | None = None
                       ) -> list[Image.Image]:
    """Generate one image per path (seed + i each), each saved as soon as it is done; a progress bar on stderr.

    ``subjects`` (--subject-for): placed by their phrases; their regions/heatmaps are saved as ``args`` asks."""
    from tqdm import tqdm

    p.pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=len(paths) * s.steps, unit="step", disable=None, dynamic_ncols=True, file=sys.stderr)

    def on_step(done: int, total: int) -> None:
        bar.set_description(f"image {(done - 1) // s.steps + 1}/{len(paths)}")
        bar.update(1)

    def on_image(i: int, path: Path, blanked: bool) -> None:
        bar.clear()
        print(f"wrote {path}")
        if blanked:
            print(f"warning: the model's safety checker blanked {path}; change the prompt or the seed",
                  file=sys.stderr)

    def on_result(i: int, path: Path, result: Any) -> None:
        for extra in save_layout(result, result.images[0], path, args, s.metadata(s.seed + i)):
            print(f"wrote {extra}")

    layout = dict(zip(("layout_start", "layout_threshold"), layout_settings(args))) if subjects else None
    try:
        return generate_and_save(p, subject, s, paths, on_step=on_step, on_image=on_image, subjects=subjects,
                                 layout=layout, on_result=on_result if subjects else None)
    finally:
        bar.close()

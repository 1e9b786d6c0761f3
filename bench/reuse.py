"""Reusing a saved subject vs re-encoding the reference for every image, side by side in one run.

N images of one subject with the plus adapter on the SD1.5 architecture (random weights) and a ViT-H/14
image encoder (random weights, IP-Adapter's size):
  - lookalike, saved subject: the subject is loaded from disk, no encoder runs;
  - lookalike, re-encoding: ``p.encode(photo)`` before every image;
  - diffusers ``ip_adapter_image``: the reference is encoded inside every pipeline call.
Prints seconds per image (median of ``--runs``) and each as a ratio to the saved subject.

    python bench/reuse.py                # full size, 256 px, CPU (several minutes)
    python bench/reuse.py --tiny         # smoke run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import full_pipeline, vit_h_encoder
from PIL import Image

from lookalike import Personalizer, Subject
from lookalike.adapters.module import IPAdapter
from lookalike.adapters.spec import REGISTRY
from lookalike.weights.io import official_state_dict

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench" / "dog" / "00.jpg"


def reference() -> Image.Image:
    """A real photo where ../shared is present, else a drawn one."""
    if SHARED.is_file():
        return Image.open(SHARED).convert("RGB")
    image = Image.new("RGB", (320, 240), (40, 90, 160))
    image.paste((220, 180, 40), (80, 60, 240, 200))
    return image


def plus_adapter(pipe, encoder, tiny: bool) -> IPAdapter:
    spec = REGISTRY["ip-adapter-plus_sd15"]
    if tiny:
        spec = spec.with_(cross_attention_dim=pipe.unet.config.cross_attention_dim,
                          embed_dim=encoder.embed_dims["patch"], projector_kwargs=dict(spec.projector_kwargs,
                                                                                        dim=32, heads=2))
    torch.manual_seed(1)
    return IPAdapter.for_unet(spec, pipe.unet).eval()


def timed(fn) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--images", type=int, default=4, help="N images of the subject")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    size = 64 if args.tiny else args.size
    template = full_pipeline("sd15", args.tiny)
    template.set_progress_bar_config(disable=True)
    encoder = vit_h_encoder(args.tiny)
    adapter = plus_adapter(template, encoder, args.tiny)
    photo = reference()
    kw = dict(prompt="a dog on the beach", num_inference_steps=args.steps, guidance_scale=7.5, height=size,
              width=size, output_type="np")

    ours = Personalizer(copy.deepcopy(template), image_encoder=encoder)
    ours.load_adapter(copy.deepcopy(adapter))
    folder = Path(tempfile.mkdtemp())
    ours.encode([photo]).save(folder / "dog.safetensors")

    theirs = copy.deepcopy(template)
    theirs.load_ip_adapter(official_state_dict(adapter), subfolder="", weight_name="x", image_encoder_folder=None)
    theirs.image_encoder = encoder.model
    from transformers import CLIPImageProcessor

    s = encoder.image_size
    theirs.feature_extractor = CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})

    def saved() -> None:
        subject = Subject.load(folder / "dog.safetensors")
        for i in range(args.images):
            ours.generate(subject=subject, generator=torch.Generator().manual_seed(i), **kw)

    def reencode() -> None:
        for i in range(args.images):
            ours.generate(subject=ours.encode([photo]), generator=torch.Generator().manual_seed(i), **kw)

    def diffusers() -> None:
        for i in range(args.images):
            theirs(ip_adapter_image=photo, generator=torch.Generator().manual_seed(i), **kw)

    modes = {"lookalike, saved subject": saved, "lookalike, re-encoding": reencode,
             "diffusers ip_adapter_image": diffusers}
    with torch.no_grad():  # warm-up: one image per path
        ours.generate(subject=ours.encode([photo]), **kw)
        theirs(ip_adapter_image=photo, **kw)
    times: dict[str, list[float]] = {k: [] for k in modes}
    for _ in range(args.runs):  # interleaved
        for name, fn in modes.items():
            times[name].append(timed(fn) / args.images)
    base = statistics.median(times["lookalike, saved subject"])
    print(f"{'tiny' if args.tiny else 'SD1.5 + ViT-H/14'} (random weights), {size} px, {args.steps} steps, "
          f"{args.images} images per run, median of {args.runs} interleaved runs")
    print(f"{'mode':<28} {'s/image':>8} {'vs saved':>9}")
    for name in modes:
        t = statistics.median(times[name])
        print(f"{name:<28} {t:>8.3f} {t / base:>8.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

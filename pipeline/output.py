"""Generating and writing images: the settings of a run (and their defaults), atomic PNGs with the settings
as text chunks, and grids. The command line and the web page write the same PNGs through these."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..fileio import write_atomic

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from .personalizer import Personalizer
    from .subject import Subject


DEFAULT_SCALE = 0.6


DEFAULT_STEPS = 30


DEFAULT_NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality"


DEFAULT_PROMPT = "best quality, high quality"  # the official IP-Adapter image-only prompt


#: Default output size per base family (the demo models use their own native size).
DEFAULT_SIZE = {"sd15": 512, "sdxl": 1024, "flux": 1024, "sd3": 1024}


#: Default classifier-free guidance per base family (the diffusers pipelines' own defaults).
DEFAULT_GUIDANCE = {"sd15": 7.5, "sdxl": 5.0, "flux": 3.5, "sd3": 7.0}


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
    subject_for: dict[str, list[str]] = field(default_factory=dict)  # --subject-for: phrase -> photos' SHA-256
    layout: str = ""  # --subject-for: "start=S,threshold=T"
    identity: dict[str, Any] = field(default_factory=dict)  # InstantID / FaceID-Plus keywords given to generate()

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
            **({"subject_for": json.dumps(self.subject_for), "layout": self.layout} if self.subject_for else {}),
            **{k: str(v) for k, v in self.identity.items()},
            "lookalike_version": __version__, "Software": f"lookalike {__version__}",
            "parameters": f"{self.prompt}\nNegative prompt: {self.negative_prompt}\nSteps: {self.steps}, "
                          f"CFG scale: {self.guidance}, Seed: {seed}, Size: {self.width}x{self.height}, "
                          f"Model: {self.model}, IP-Adapter: {self.adapter}, IP-Adapter scale: {self.scale}",
        }


def save_png(image: Image.Image, path: Path, text: dict[str, str]) -> Path:
    """Save a PNG atomically with ``text`` as tEXt chunks (iTXt where a value is not Latin-1)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def output_paths(out: Path, count: int) -> list[Path]:
    """Where images go: ``out`` itself for one, ``<stem>-i.png`` for several."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def grid_path(out: Path) -> Path:
    """The grid of several images: ``<stem>-grid.png``."""
    return out.with_name(f"{out.stem}-grid{out.suffix}")


def make_grid(images: Sequence[Image.Image]) -> Image.Image:
    """Images in a near-square grid (rows filled left to right), on black."""
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * width, (i // cols) * height))
    return grid


def generate_and_save(p: Personalizer, subject: Subject | None, s: Settings, paths: Sequence[Path], *,
                      on_step: Callable[[int, int], None] | None = None,
                      on_image: Callable[[int, Path, bool], None] | None = None,
                      subjects: Mapping[str, Subject] | None = None, layout: Mapping[str, float] | None = None,
                      on_result: Callable[[int, Path, Any], None] | None = None) -> list[Image.Image]:
    """Generate one image per path (image i from noise seeded with ``s.seed + i`` on the cpu), each saved with
    ``s.metadata`` as soon as it is done. ``on_step(done, total)`` follows every denoising step;
    ``on_image(i, path, blanked)`` every saved image (``blanked``: the model's safety checker blanked it).
    ``subjects`` ({phrase: Subject}) places subjects by their words instead of ``subject`` (auto layout, with
    ``layout``'s ``layout_start``/``layout_threshold``); ``on_result(i, path, result)`` sees each pipeline output."""
    import torch

    from ..adapters.transfer import transfer_scale

    total, done = len(paths) * s.steps, 0

    def step(pipe: Any, index: int, timestep: Any, kwargs: dict) -> dict:
        nonlocal done
        done += 1
        if on_step is not None:
            on_step(done, total)
        return kwargs

    images = []
    for i, path in enumerate(paths):
        generator = torch.Generator("cpu").manual_seed(s.seed + i)
        conditioning = {"subject": subject} if subjects is None else {"subjects": subjects, **(layout or {})}
        result = p.generate(s.prompt, **conditioning, scale=transfer_scale(s.transfer, p.base, s.scale),
                            window=s.window,
                            negative_prompt=s.negative_prompt or None, num_inference_steps=s.steps,
                            guidance_scale=s.guidance, height=s.height, width=s.width, generator=generator,
                            callback_on_step_end=step, **s.identity)
        image = result.images[0]
        flagged = getattr(result, "nsfw_content_detected", None)
        save_png(image, path, s.metadata(s.seed + i))
        if on_image is not None:
            on_image(i, path, bool(flagged and flagged[0]))
        if on_result is not None:
            on_result(i, path, result)
        images.append(image)
    return images

"""What the web page does, without the page: load a model, encode photos, generate and save PNGs.

Everything here is plain Python (no gradio), and calls the same library steps as the command line: the plan and
loading (``pipeline/plan.py``, ``pipeline/loading.py``: ``make_plan``, ``load_personalizer``), the input checks
(``check_references``, ``check_subject_fits``, ``check_transfer``) and the PNG writing (``pipeline/output.py``:
``Settings``, ``generate_and_save``), so a page's PNG carries the same metadata as ``lookalike generate``'s. User mistakes raise :class:`~lookalike.errors.LookalikeError`.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LookalikeError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from ..pipeline.output import Settings
    from ..pipeline.personalizer import Personalizer
    from ..pipeline.plan import Plan
    from ..pipeline.subject import Subject

#: Largest generated side in pixels (the page's sliders stop here too).
MAX_SIDE = 2048
#: Largest number of images per press of Generate.
MAX_IMAGES = 8
#: Largest number of denoising steps.
MAX_STEPS = 200
#: The demo models' own image size (their UNet's 16 latents times the VAE's factor 2).
DEMO_SIZE = 32
TRANSFERS = ("all", "style", "layout", "strong-style")
#: ``on_step(done, total)`` after every denoising step.
StepCallback = Callable[[int, int], None]


@dataclass
class Photos:
    """Reference photos (uploaded file paths) with their weights, negative photos, and the face to use."""

    references: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)
    face_index: int | None = None


@dataclass
class Request:
    """One press of Generate: the prompt and every setting (photos, or a subject file, in ``photos``)."""

    prompt: str
    negative_prompt: str = ""
    model: str = "demo"
    adapter: str | None = None
    scale: float = 0.6
    transfer: str = "all"
    window: tuple[float, float] = (0.0, 1.0)
    seed: int = 0
    steps: int = 30
    guidance: float = 7.5
    width: int = 512
    height: int = 512
    num_images: int = 1
    photos: Photos = field(default_factory=Photos)
    subject_file: str | None = None


def _named(exc: LookalikeError, paths: Sequence[str]) -> LookalikeError:
    """The error with each upload's temporary path replaced by the file's own name (what the user picked)."""
    message = str(exc)
    for path in paths:
        message = message.replace(str(path), Path(path).name)
    return LookalikeError(message)


def check_photos(paths: Sequence[str]) -> list[Path]:
    """Open and decode every uploaded photo once (the command line's check: format, pixels, size)."""
    from ..pipeline.plan import check_references

    try:
        return check_references(list(paths))
    except LookalikeError as exc:
        raise _named(exc, paths) from None


def check_request(r: Request) -> None:
    """The settings a page can send, checked before any model loads (sliders can be typed into)."""
    if not r.prompt.strip():
        raise LookalikeError("type a prompt: what the image should show, e.g. 'a red circle on a blue background'")
    if r.transfer not in TRANSFERS:
        raise LookalikeError(f"unknown transfer {r.transfer!r}; pick one of {', '.join(TRANSFERS)}")
    if not (0.0 <= r.window[0] < r.window[1] <= 1.0):
        raise LookalikeError(f"the window {r.window[0]:g}..{r.window[1]:g} must satisfy 0 <= start < end <= 1, "
                             f"e.g. 0 to 0.8")
    for name, value, low, high in (("width", r.width, 8, MAX_SIDE), ("height", r.height, 8, MAX_SIDE)):
        if not (low <= value <= high) or value % 8:
            raise LookalikeError(f"the {name} {value} must be a multiple of 8 from {low} to {high} pixels")
    for name, value, high in (("steps", r.steps, MAX_STEPS), ("number of images", r.num_images, MAX_IMAGES)):
        if not (1 <= value <= high):
            raise LookalikeError(f"the {name} must be from 1 to {high}, not {value}")
    if r.seed < 0 or r.scale < 0 or r.guidance < 0:
        raise LookalikeError("seed, scale and guidance must not be negative")
    if r.photos.face_index is not None and r.photos.face_index < 0:
        raise LookalikeError(f"face index {r.photos.face_index}: count faces from 0, left to right "
                             f"(leave it empty for the largest face)")
    if r.subject_file is None and not r.photos.references:
        raise LookalikeError("upload at least one reference photo of the subject, or load a subject file")


def photo_weights(weights: Sequence[float], count: int) -> tuple[str | None, list[float] | None]:
    """``combine`` and weights for ``count`` photos: equal positive weights keep every photo's tokens (the CLI's
    default); other weights average the photos, weighted (``--reference-weight``; all zero is refused)."""
    from ..pipeline.encode import resolve_combine

    given = [float(w) for w in weights[:count]]
    if len(set(given)) == 1 and given[0] > 0:
        return None, None
    return resolve_combine(None, given, count)


class Engine:
    """One loaded model at a time, for the page's requests (the queue runs one of them at a time)."""

    def __init__(self, model: str, *, device: str | None = None, dtype: str | None = None,
                 faces: dict[str, Any] | None = None, workdir: str | Path | None = None) -> None:
        self.model = model
        self.device, self.dtype = device, dtype
        self.faces = dict(faces or {})
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="lookalike-app-"))
        self._loaded: tuple[tuple[str, str], Personalizer, str, Plan] | None = None
        self._lock = threading.Lock()
        self._runs = 0

    # -- models ----------------------------------------------------------------------------------------
    def adapter_choices(self, model: str | None = None) -> list[str]:
        """The adapter variants the model takes: the registry's entries of its base family (the demo: its own)."""
        from ..adapters.spec import REGISTRY
        from ..pipeline.plan import DEMO, DEMOS

        model = model or self.model
        if model in DEMOS:
            from ..pipeline.demo import DEMO_TRAINED, shipped_adapter_spec

            if DEMO_TRAINED and model == DEMO:
                spec = shipped_adapter_spec()
                return [spec.short_name or spec.name]
            return ["plus", "basic"]
        base = self.base(model)
        return [s.short_name or s.name for s in REGISTRY.values() if s.base == base]

    def default_adapter(self, model: str | None = None) -> str:
        """The command line's default adapter for the model, if the model takes it, else its first."""
        from ..pipeline.plan import adapter_choice

        choices = self.adapter_choices(model)
        wanted = adapter_choice(None, None, model or self.model)
        return wanted if wanted in choices else choices[0]

    def base(self, model: str | None = None) -> str:
        """The model's base family (sd15, sdxl), read from its config (the demo models: sd15)."""
        from ..pipeline.loading import quiet_hub
        from ..pipeline.plan import DEMOS, model_base

        model = model or self.model
        if model in DEMOS:
            return "sd15"
        with quiet_hub():
            return model_base(model)

    def default_size(self, model: str | None = None) -> int:
        """The command line's default size: the demo model's own (32), 512 for SD1.5, 1024 for SDXL."""
        from ..pipeline.output import DEFAULT_SIZE
        from ..pipeline.plan import DEMOS

        model = model or self.model
        return DEMO_SIZE if model in DEMOS else DEFAULT_SIZE[self.base(model)]

    def defaults(self, model: str | None = None) -> dict[str, Any]:
        """The command line's defaults for the page's fields: negative prompt, scale, steps, guidance."""
        from ..pipeline.output import DEFAULT_GUIDANCE, DEFAULT_NEGATIVE, DEFAULT_SCALE, DEFAULT_STEPS

        return {"negative_prompt": DEFAULT_NEGATIVE, "scale": DEFAULT_SCALE, "steps": DEFAULT_STEPS,
                "guidance": DEFAULT_GUIDANCE[self.base(model)]}

    def load(self, model: str, adapter: str, *, with_encoder: bool) -> tuple[Personalizer, str, Plan]:
        """The model with the adapter (kept loaded until another pair is asked for)."""
        from ..pipeline.loading import device_and_dtype, load_personalizer, quiet_hub, quiet_libraries
        from ..pipeline.plan import make_plan

        key = (model, adapter)
        if self._loaded is not None and self._loaded[0] == key:
            return self._loaded[1], self._loaded[2], self._loaded[3]
        self._loaded = None  # free the old model before loading the new one
        device, dtype = device_and_dtype(model, self.device, self.dtype)
        with quiet_hub():
            plan = make_plan(model, adapter, with_encoder=with_encoder)
        with quiet_hub(), quiet_libraries():
            p, name = load_personalizer(plan, device, dtype, self.faces)
        self._loaded = (key, p, name, plan)
        return p, name, plan

    # -- subjects ----------------------------------------------------------------------------------------
    def encode(self, photos: Photos, model: str, adapter: str) -> Subject:
        """Encode the uploaded photos for the adapter (weights: see :func:`photo_weights`)."""
        from ..pipeline.loading import quiet_libraries

        if not photos.references:
            raise LookalikeError("upload at least one reference photo of the subject")
        references = check_photos(photos.references)
        negatives = check_photos(photos.negatives) if photos.negatives else None
        combine, weights = photo_weights(photos.weights, len(references))
        p, name, _ = self.load(model, adapter, with_encoder=True)
        try:
            with quiet_libraries():
                return p.encode(references, adapter=name, combine=combine, face_index=photos.face_index,
                                weights=weights, negative_images=negatives)
        except LookalikeError as exc:
            raise _named(exc, [*photos.references, *photos.negatives]) from None

    def save_subject(self, photos: Photos, model: str, adapter: str) -> Path:
        """Encode the photos and write the subject file the page offers for download."""
        with self._lock:
            subject = self.encode(photos, model, adapter)
            path = self._run_dir() / "subject.safetensors"
            return subject.save(path)

    # -- generation --------------------------------------------------------------------------------------
    def generate(self, r: Request, on_step: StepCallback | None = None) -> tuple[list[Path], str]:
        """Generate ``r.num_images`` PNGs (seed + i each) with the command line's metadata; (paths, summary)."""
        from ..pipeline.output import Settings
        from ..pipeline.plan import adapter_choice, check_subject_fits, check_transfer, load_subject

        check_request(r)
        with self._lock:
            subject = load_subject(r.subject_file) if r.subject_file else None
            adapter = adapter_choice(None, subject, r.model) if subject is not None else (
                r.adapter or self.default_adapter(r.model))
            p, name, plan = self.load(r.model, adapter, with_encoder=subject is None)
            check_subject_fits(subject, plan.spec)
            check_transfer(p, r.transfer)
            if subject is None:
                subject = self.encode(r.photos, r.model, adapter)
            settings = Settings(r.prompt, r.negative_prompt, r.model, name, float(r.scale), int(r.steps),
                                float(r.guidance), int(r.width), int(r.height), (float(r.window[0]), float(r.window[1])),
                                int(r.seed), list(subject.sources), list(subject.weights),
                                list(subject.negative_sources), r.transfer)
            folder = self._run_dir()
            paths = [folder / f"lookalike-{r.seed + i}.png" for i in range(r.num_images)]
            self._generate(p, subject, settings, paths, on_step)
        source = f"the subject file {Path(r.subject_file).name} (no encoder run)" if r.subject_file else (
            f"{len(r.photos.references)} reference photo(s)")
        return paths, (f"{len(paths)} image(s) from {source}: adapter {name}, scale {r.scale:g}, "
                       f"seed {r.seed}{f'..{r.seed + len(paths) - 1}' if len(paths) > 1 else ''}")

    def _generate(self, p: Personalizer, subject: Subject, s: Settings, paths: list[Path],
                  on_step: StepCallback | None) -> None:
        """One image per path, each written as soon as it is done (the CLI's PNG writer and metadata)."""
        from ..pipeline.loading import quiet_libraries
        from ..pipeline.output import generate_and_save

        with quiet_libraries():
            generate_and_save(p, subject, s, paths, on_step=on_step)

    def _run_dir(self) -> Path:
        """A fresh folder for one request's files (so downloads never change under the user)."""
        self._runs += 1
        folder = self.workdir / f"run-{self._runs:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # -- faces ---------------------------------------------------------------------------------------------
    def show_faces(self, photo: str) -> Image.Image:
        """The photo with every detected face boxed and numbered as ``face index`` counts them."""
        from ..encoders.face import build_detector, find_faces
        from ..encoders.prepare import load_reference

        (path,) = check_photos([photo])
        image = load_reference(path)
        detector = build_detector(**{k: v for k, v in self.faces.items()
                                     if k in ("model_dir", "detector", "yunet_model")})
        found = find_faces(detector, image)
        if not found:
            raise LookalikeError(f"no face found in {Path(photo).name}; FaceID adapters need a photo where the face "
                                 f"is clearly visible")
        return draw_faces(image, [face.bbox for face in found])


def draw_faces(image: Image.Image, boxes: Sequence[Sequence[float]]) -> Image.Image:
    """A copy of ``image`` with each box outlined and numbered 0, 1, ... in the order given."""
    from PIL import ImageDraw

    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(out.size) / 150))
    for i, box in enumerate(boxes):
        x0, y0, x1, y1 = (float(v) for v in box[:4])
        draw.rectangle((x0, y0, x1, y1), outline=(255, 40, 40), width=width)
        label = str(i)
        size = max(12, round((y1 - y0) / 5))
        draw.rectangle((x0, y0, x0 + size * 0.7 * len(label) + 6, y0 + size + 4), fill=(255, 40, 40))
        draw.text((x0 + 3, y0 + 2), label, fill=(255, 255, 255), font_size=size)
    return out

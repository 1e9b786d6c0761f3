"""The ``lookalike app`` web page: Gradio Blocks over :class:`~lookalike.app.engine.Engine`.

Offline by construction: analytics and Gradio's version check are off, no sharing link, the theme uses
the fonts Gradio ships and the system's, so the page loads nothing from any host but the one serving it.
Generation and encoding share one queue slot (one job at a time on the device). Every user mistake is a
:class:`gradio.Error` carrying the :class:`~lookalike.errors.LookalikeError`'s words, never a traceback.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..errors import LookalikeError
from .engine import MAX_IMAGES, MAX_SIDE, MAX_STEPS, TRANSFERS, Engine, Photos, Request

#: Reference photo slots on the page, each with its own weight (the handlers name reference_1 .. reference_3).
REFERENCE_SLOTS = 3
#: Largest upload Gradio accepts (a photo or a subject file); pixels are checked when a photo is opened.
MAX_UPLOAD = "50mb"
PHOTO_TYPES = [".png", ".jpg", ".jpeg", ".webp"]
#: The environment a quiet, offline Gradio needs, set before gradio is imported.
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_SSR_MODE": "False"}
F = TypeVar("F", bound=Callable[..., Any])


def _import_gradio() -> Any:
    """gradio, imported with analytics and telemetry switched off."""
    for key, value in OFFLINE_ENV.items():
        os.environ[key] = value
    try:
        import gradio
    except ImportError as exc:  # a broken install: gradio is a main dependency
        raise LookalikeError(f"the app needs gradio ({exc}); pip install 'gradio>=6'") from None
    return gradio


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def shown_errors(fn: F) -> F:
    """Turn a LookalikeError into ``gr.Error(message)`` (shown until closed), anything else into one line."""
    gr = _import_gradio()

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except LookalikeError as exc:
            raise gr.Error(_one_line(str(exc)), duration=None, print_exception=False) from None
        except Exception as exc:
            if type(exc).__name__ == "OutOfMemoryError":
                message = "the device ran out of memory; lower the size or the number of images"
            else:
                message = f"internal error: {type(exc).__name__}: {_one_line(str(exc))[:300] or 'no message'}"
            raise gr.Error(message, duration=None) from None

    return wrapper  # type: ignore[return-value]


def _path(value: Any) -> str | None:
    """An upload's file path (gradio gives str paths with type='filepath')."""
    if value is None or value == "":
        return None
    return str(getattr(value, "name", value))


def _photos(values: list[Any]) -> Photos:
    """The page's photo inputs: (photo, weight) per slot, negative photos, face index (-1: the largest)."""
    slots, negatives, face_index = values[: 2 * REFERENCE_SLOTS], values[2 * REFERENCE_SLOTS], values[-1]
    references, weights = [], []
    for photo, weight in zip(slots[0::2], slots[1::2]):
        if _path(photo):
            references.append(_path(photo))
            weights.append(float(weight))
    negative = [p for p in (_path(n) for n in (negatives or [])) if p]
    index = None if face_index is None or face_index == "" or int(face_index) < 0 else int(face_index)
    return Photos(references, weights, negative, index)  # type: ignore[arg-type]


def theme(gr: Any) -> Any:
    """Gradio's default theme on fonts it serves itself and the system's (no Google Fonts)."""
    return gr.themes.Default(
        font=[gr.themes.LocalFont("Source Sans Pro", weights=(400, 600)), "ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=[gr.themes.LocalFont("IBM Plex Mono", weights=(400, 600)), "ui-monospace", "monospace"])


def build_page(engine: Engine) -> Any:
    """The Blocks page (not launched): inputs on the left, the gallery and files on the right."""
    gr = _import_gradio()
    model = engine.model
    adapters = engine.adapter_choices(model)
    size = engine.default_size(model)
    defaults = engine.defaults(model)
    with gr.Blocks(title="lookalike", analytics_enabled=False) as page:
        gr.Markdown("## lookalike\nImages of a subject from a few photos and a prompt. Upload reference "
                    "photos (or load a subject file), type a prompt, press **Generate**.")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="prompt", lines=2, placeholder="a dog on the beach", elem_id="prompt")
                negative_prompt = gr.Textbox(label="negative prompt", value=defaults["negative_prompt"],
                                             elem_id="negative-prompt")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    save = gr.Button("Save subject", elem_id="save-subject")
                slots: list[Any] = []
                with gr.Group():
                    for i in range(REFERENCE_SLOTS):
                        with gr.Row(equal_height=True):
                            slots.append(gr.File(label=f"reference photo {i + 1}", file_types=PHOTO_TYPES,
                                                 type="filepath", height=110, elem_id=f"reference-{i}", scale=3))
                            slots.append(gr.Slider(0, 2, value=1.0, step=0.05, label="weight", scale=2,
                                                   elem_id=f"weight-{i}"))
                negatives = gr.File(label="negative photos (what to move away from)", file_count="multiple",
                                    file_types=PHOTO_TYPES, type="filepath", height=80, elem_id="negatives")
                with gr.Row(equal_height=True):
                    face_index = gr.Number(value=-1, precision=0, minimum=-1, label="face index (-1: the largest)",
                                           elem_id="face-index")
                    faces_button = gr.Button("Show faces", size="sm", elem_id="show-faces")
                faces = gr.Image(label="detected faces, numbered", format="png", type="pil", interactive=False,
                                 visible=True, height=180, elem_id="faces")
                subject_in = gr.File(label="load subject (.safetensors; the photos are then not encoded)",
                                     file_types=[".safetensors"], type="filepath", height=80, elem_id="subject-in")
                with gr.Accordion("model and adapter", open=True):
                    model_box = gr.Dropdown([model], value=model, label="model (hub id, folder or demo)",
                                            allow_custom_value=True, elem_id="model")
                    adapter = gr.Dropdown(adapters, value=engine.default_adapter(model), label="adapter variant",
                                          elem_id="adapter")
                    scale = gr.Slider(0, 1.5, value=defaults["scale"], step=0.05, label="scale", elem_id="scale")
                    transfer = gr.Radio(list(TRANSFERS), value="all", label="transfer", elem_id="transfer")
                    with gr.Row():
                        start = gr.Slider(0, 1, value=0.0, step=0.05, label="window start", elem_id="window-start")
                        end = gr.Slider(0, 1, value=1.0, step=0.05, label="window end", elem_id="window-end")
                with gr.Accordion("generation", open=True):
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, minimum=0, label="seed", elem_id="seed")
                        count = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="images", elem_id="num-images")
                    with gr.Row():
                        steps = gr.Slider(1, MAX_STEPS, value=defaults["steps"], step=1, label="steps", elem_id="steps")
                        guidance = gr.Slider(0, 20, value=defaults["guidance"], step=0.5, label="guidance", elem_id="guidance")
                    with gr.Row():
                        width = gr.Slider(8, MAX_SIDE, value=size, step=8, label="width", elem_id="width")
                        height = gr.Slider(8, MAX_SIDE, value=size, step=8, label="height", elem_id="height")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="images", format="png", type="filepath", columns=2, height=420,
                                     interactive=False, elem_id="gallery")
                status = gr.Markdown("", label="status", elem_id="status")
                files = gr.File(label="PNG files (with their settings in the metadata)", file_count="multiple",
                                interactive=False, elem_id="png-files")
                subject_out = gr.File(label="subject file", interactive=False, elem_id="subject-out")

        photo_inputs = [*slots, negatives, face_index]

        first_adapter = engine.default_adapter(model)

        @shown_errors
        def on_generate(reference_1: str | None = None, weight_1: float = 1.0, reference_2: str | None = None,
                        weight_2: float = 1.0, reference_3: str | None = None, weight_3: float = 1.0,
                        negative_photos: list[str] | None = None, face_index: int = -1,
                        subject: str | None = None, prompt: str = "",
                        negative_prompt: str = defaults["negative_prompt"], model: str = model,
                        adapter: str = first_adapter, scale: float = defaults["scale"], transfer: str = "all",
                        window_start: float = 0.0, window_end: float = 1.0, seed: int = 0, images: int = 1,
                        steps: int = defaults["steps"], guidance: float = defaults["guidance"], width: int = size,
                        height: int = size, progress: Any = gr.Progress(),  # noqa: B008
                        ) -> tuple[Any, str, Any]:
            """Generate images (named arguments: what gradio_client's predict(..., api_name="/generate") takes)."""
            photos = _photos([reference_1, weight_1, reference_2, weight_2, reference_3, weight_3,
                              negative_photos, face_index])
            request = Request(
                prompt=prompt or "", negative_prompt=negative_prompt or "", model=model or engine.model,
                adapter=adapter or None, scale=float(scale), transfer=transfer,
                window=(float(window_start), float(window_end)), seed=int(seed or 0), steps=int(steps),
                guidance=float(guidance), width=int(width), height=int(height), num_images=int(images),
                photos=photos, subject_file=_path(subject))
            progress((0, request.num_images * request.steps), desc="loading", unit="steps")
            paths, summary = engine.generate(
                request, lambda done, total: progress((done, total), desc="denoising", unit="steps"))
            shown = [(str(path), f"seed {request.seed + i}") for i, path in enumerate(paths)]
            return shown, summary, [str(path) for path in paths]

        @shown_errors
        def on_save(reference_1: str | None = None, weight_1: float = 1.0, reference_2: str | None = None,
                    weight_2: float = 1.0, reference_3: str | None = None, weight_3: float = 1.0,
                    negative_photos: list[str] | None = None, face_index: int = -1, model: str = model,
                    adapter: str = first_adapter, progress: Any = gr.Progress(),  # noqa: B008
                    ) -> tuple[str, str]:
            """Encode the photos into a subject file (what api_name="/save_subject" takes)."""
            photos = _photos([reference_1, weight_1, reference_2, weight_2, reference_3, weight_3,
                              negative_photos, face_index])
            progress(0.0, desc="encoding")
            path = engine.save_subject(photos, model or engine.model, adapter)
            return str(path), f"subject saved for {adapter}: download it below, load it later"

        @shown_errors
        def on_faces(first: Any) -> Any:
            if not _path(first):
                raise LookalikeError("upload a photo in reference photo 1 first")
            return engine.show_faces(_path(first))  # type: ignore[arg-type]

        @shown_errors
        def on_model(name: str) -> Any:
            choices = engine.adapter_choices(name)
            return gr.Dropdown(choices=choices, value=engine.default_adapter(name))

        inputs = [*photo_inputs, subject_in, prompt, negative_prompt, model_box, adapter, scale, transfer,
                  start, end, seed, count, steps, guidance, width, height]
        generate.click(on_generate, inputs, [gallery, status, files], concurrency_limit=1,
                       concurrency_id="device", api_name="generate")
        save.click(on_save, [*photo_inputs, model_box, adapter], [subject_out, status], concurrency_limit=1,
                   concurrency_id="device", api_name="save_subject")
        faces_button.click(on_faces, [slots[0]], [faces], concurrency_limit=1, concurrency_id="device",
                           api_visibility="private")
        model_box.change(on_model, [model_box], [adapter], api_visibility="private")
    return page


def launch(engine: Engine, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True) -> Any:
    """Serve the page on ``host:port`` (no sharing link, uploads limited to :data:`MAX_UPLOAD`)."""
    gr = _import_gradio()
    page = build_page(engine)
    page.queue(default_concurrency_limit=1, max_size=32)
    try:
        page.launch(server_name=host, server_port=port, share=False, inbrowser=False, max_file_size=MAX_UPLOAD,
                    allowed_paths=[str(Path(engine.workdir))], theme=theme(gr), footer_links=[], ssr_mode=False,
                    show_error=True, prevent_thread_lock=not block, quiet=False, pwa=False, mcp_server=False)
    except OSError as exc:  # gradio's "Cannot find empty port", or an address that is not this machine's
        raise LookalikeError(f"cannot serve on {host}:{port} ({_one_line(str(exc)).split('. ')[0]}); "
                             f"pick another --port or --host") from None
    return page

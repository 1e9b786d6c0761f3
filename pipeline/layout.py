"""Several subjects without masks: ``generate(prompt, subjects={"dog": dog, "cat": cat})``.

Each key is a word or phrase of the prompt. The image runs on text alone until ``layout_start`` (FastComposer's
delayed subject conditioning); meanwhile each phrase's text cross-attention is recorded at one resolution
(:mod:`lookalike.adapters.layout`); from ``layout_start`` on each subject acts only in its region (MS-Diffusion's
auto layout) through the regional-mask path of the adapters. The output carries ``.regions`` and ``.attention``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..adapters.attach import AdapterInput
from ..adapters.layout import LayoutRecorder, layout_layers
from ..errors import LookalikeError
from .subject import Subject

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from .personalizer import Personalizer

#: Default schedule fraction run on text alone (FastComposer delays the subjects; MS-Diffusion: step 5 of 30).
LAYOUT_START = 0.2
#: Default threshold on the normalised maps (MS-Diffusion's 0.5).
LAYOUT_THRESHOLD = 0.5


def _token_ids(tokenizer: Any, text: str, special: bool, truncate: bool) -> list[int]:
    kwargs = dict(truncation=True, max_length=tokenizer.model_max_length) if truncate else {}
    return list(tokenizer(text, add_special_tokens=special, **kwargs).input_ids)


def _find(ids: Sequence[int], part: Sequence[int]) -> int:
    for i in range(len(ids) - len(part) + 1):
        if list(ids[i:i + len(part)]) == list(part):
            return i
    return -1


def phrase_positions(tokenizer: Any, prompt: str, phrases: Sequence[str]) -> list[list[int]]:
    """Each phrase's token positions in the prompt as the pipeline encodes it (first occurrence; BOS is 0)."""
    ids = _token_ids(tokenizer, prompt, special=True, truncate=True)
    out = []
    for phrase in phrases:
        part = _token_ids(tokenizer, phrase, special=False, truncate=False)
        at = _find(ids, part) if part else -1
        if at < 0:
            whole = _token_ids(tokenizer, prompt, special=True, truncate=False)
            if part and _find(whole, part) >= 0:
                raise LookalikeError(f"the subject phrase {phrase!r} lies past the {len(ids)} tokens the text "
                                     f"encoder reads; move it earlier in the prompt")
            raise LookalikeError(f"the subject phrase {phrase!r} is not in the prompt {prompt!r}; each key of "
                                 f"subjects must be a word or phrase of the prompt")
        out.append(list(range(at, at + len(part))))
    return out


def pipeline_positions(pipe: Any, prompt: str, phrases: Sequence[str], prompt_2: str | None = None
                       ) -> list[list[int]]:
    """Token positions with every tokenizer of the pipeline (SDXL: both); they must agree."""
    pairs = [(getattr(pipe, "tokenizer", None), prompt), (getattr(pipe, "tokenizer_2", None), prompt_2 or prompt)]
    found = [phrase_positions(tok, text, phrases) for tok, text in pairs if tok is not None]
    if not found:
        raise LookalikeError("auto layout needs the pipeline's tokenizer to find the phrases in the prompt")
    if any(f != found[0] for f in found[1:]):
        raise LookalikeError("the subject phrases sit at different token positions for the two text encoders; "
                             "use the same prompt for both (no prompt_2) with subjects={phrase: subject}")
    return found[0]


def _check(prompt: Any, subjects: Mapping, start: float, threshold: float, kwargs: dict) -> None:
    if not isinstance(prompt, str):
        raise LookalikeError("subjects={phrase: subject} needs one prompt (a string) that contains the phrases")
    if not subjects:
        raise LookalikeError("subjects={phrase: subject} is empty; give at least one phrase and its subject")
    for phrase, subject in subjects.items():
        if not isinstance(phrase, str) or not phrase.strip():
            raise LookalikeError(f"subject keys must be words of the prompt, got {phrase!r}")
        if not isinstance(subject, Subject):
            raise LookalikeError(f"subjects[{phrase!r}] must be a Subject (from Personalizer.encode or "
                                 f"Subject.load), not {type(subject).__name__}")
    if not 0.0 < float(start) < 1.0:
        raise LookalikeError(f"layout_start {start} must lie strictly between 0 and 1 (a fraction of the schedule)")
    if not 0.0 <= float(threshold) <= 1.0:
        raise LookalikeError(f"layout_threshold {threshold} must lie between 0 and 1")
    if kwargs.get("return_dict", True) is False:
        raise LookalikeError("subjects={phrase: subject} returns its regions on the output; drop return_dict=False")
    if kwargs.get("prompt_embeds") is not None:
        raise LookalikeError("subjects={phrase: subject} finds the phrases in the prompt text; pass prompt, "
                             "not prompt_embeds")


def generate_with_layout(p: Personalizer, prompt: str, subjects: Mapping[str, Subject], *, scale: Any = 1.0,
                         window: tuple[float, float] = (0.0, 1.0), combine: str = "concat",
                         layout_start: float = LAYOUT_START, layout_threshold: float = LAYOUT_THRESHOLD,
                         **kwargs: Any) -> Any:
    """Generate with several subjects, each placed where its phrase's attention lies (see module docstring).

    The adapters act from ``max(layout_start, window[0])`` to ``window[1]``. Returns the pipeline's output with
    ``.regions`` ``{phrase: (H, W) float {0, 1} mask}`` and ``.attention`` ``{phrase: (H, W) map in [0, 1]}``
    (``(N, H, W)`` each with ``num_images_per_prompt=N > 1``), and ``.layout``, the recorder.
    """
    _check(prompt, subjects, layout_start, layout_threshold, kwargs)
    if not (isinstance(window, (list, tuple)) and len(window) == 2):
        raise LookalikeError("with subjects={phrase: subject} give one window (start, end) for the subjects")
    phrases, chosen = list(subjects), list(subjects.values())
    positions = pipeline_positions(p.pipe, prompt, phrases, kwargs.get("prompt_2"))
    embeds, negs = p._subject_embeds(chosen, dim=1)
    index = next(i for i, e in enumerate(embeds) if e is not None)
    height, width = p._output_size(kwargs)
    per_prompt = int(kwargs.get("num_images_per_prompt") or 1)
    images = sum(s.num_images for s in chosen)
    masks: list = [None] * len(embeds)
    masks[index] = torch.ones(1, images, height, width)  # replaced by the regions at layout_start
    acting = (max(float(layout_start), float(window[0])), float(window[1]))
    inputs = p.condition_inputs(embeds, negs, scale, masks, acting, 1, per_prompt, combine)
    target: AdapterInput = inputs[index]
    repeats = torch.tensor([s.num_images for s in chosen])

    def place(recorder: LayoutRecorder) -> None:
        regions = recorder.regions(height, width, layout_threshold)  # (n, P, H, W)
        target.masks = regions.repeat_interleave(repeats, dim=1).to(target.masks)  # (n, images, H, W)

    unet = p.pipe.unet
    recorder = LayoutRecorder(p.handle, positions, layout_layers(unet, p.handle.layers), per_prompt,
                              float(layout_start), place)
    p.handle.scheduler = p.pipe.scheduler
    with recorder.attached(unet), p.handle.conditioned(inputs):
        out = p.pipe(prompt=prompt, **kwargs)
    if recorder.recording:
        warnings.warn(f"no denoising step reached layout_start={layout_start}; the subjects did not act "
                      f"(use more steps or a smaller layout_start)", UserWarning, stacklevel=3)
        recorder.finish()
    maps = recorder.maps(height, width).cpu()
    regions = recorder.regions(height, width, layout_threshold).cpu()
    pick = (lambda t: t[0]) if per_prompt == 1 else (lambda t: t)  # noqa: E731
    out.regions = {ph: pick(regions[:, i]) for i, ph in enumerate(phrases)}
    out.attention = {ph: pick(maps[:, i]) for i, ph in enumerate(phrases)}
    out.layout = recorder
    return out


def attention_overlay(image: Image.Image, values: torch.Tensor, alpha: float = 0.55) -> Image.Image:
    """A phrase's ``(H, W)`` map in [0, 1] as a heatmap (dark blue -> red -> yellow) blended over the image."""
    from PIL import Image

    stops = torch.tensor([[0.0, 0.0, 0.3], [0.1, 0.2, 0.9], [0.9, 0.1, 0.1], [1.0, 0.9, 0.1]])
    x = values.detach().float().cpu().clamp(0, 1) * (len(stops) - 1)
    low = x.floor().long().clamp(max=len(stops) - 2)
    frac = (x - low).unsqueeze(-1)
    heat = stops[low] * (1 - frac) + stops[low + 1] * frac  # (H, W, 3)
    base = torch.frombuffer(bytearray(image.convert("RGB").resize((x.shape[1], x.shape[0])).tobytes()),
                            dtype=torch.uint8).reshape(x.shape[0], x.shape[1], 3).float() / 255
    mixed = ((1 - alpha) * base + alpha * heat).clamp(0, 1).mul(255).round().to(torch.uint8)
    return Image.frombytes("RGB", (x.shape[1], x.shape[0]), mixed.numpy().tobytes())


def region_image(mask: torch.Tensor) -> Image.Image:
    """An ``(H, W)`` mask in [0, 1] as a grayscale PNG image (white: the subject's region)."""
    from PIL import Image

    m = mask.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
    return Image.frombytes("L", (m.shape[1], m.shape[0]), m.numpy().tobytes())

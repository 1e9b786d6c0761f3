"""Conditioning inputs of one generation: every loaded adapter's image features checked, batched to the prompts and
projected once (both halves of guidance), with its scale, window and mask.

Shared by :class:`~lookalike.pipeline.personalizer.Personalizer` and the auto layout (:mod:`.layout`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch

from ..adapters.attach import AdapterInput, Scale
from ..adapters.module import IPAdapter
from ..adapters.spec import AdapterSpec, encoder_of
from ..errors import LookalikeError
from ..weights.io import check_encoder
from .encode import EncoderSet
from .subject import FEATURE_NDIM, Subject, box_mask

#: One adapter's features: a tensor for single-feature variants, a dict ``{"face_id": ..., "patch": ...}`` else.
Embeds = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def one_per_adapter(value: Any, count: int, what: str, is_single: Callable[[Any], bool]) -> list:
    """A value meant for every adapter, or a list with one per adapter -> a list of ``count`` values."""
    if is_single(value):
        return [value] * count
    if isinstance(value, (list, tuple)) and len(value) == count:
        return list(value)
    raise LookalikeError(f"{what} must be one value for all adapters or a list of {count} (one per adapter)")


def is_window(w: Any) -> bool:
    """Whether ``w`` is one ``(start, end)`` window (not a list of them)."""
    return isinstance(w, (list, tuple)) and len(w) == 2 and all(isinstance(v, (int, float)) for v in w)


def is_scale(s: Any) -> bool:
    """Whether ``s`` is one scale: a number or diffusers' per-block dict (not a list of them)."""
    return isinstance(s, (int, float, dict))


def as_features(spec: AdapterSpec, embeds: Embeds, what: str) -> dict[str, torch.Tensor]:
    """Normalise one adapter's embeds to ``{feature: (B, I, ...)}`` and check their widths."""
    if torch.is_tensor(embeds):
        if len(spec.features) != 1:
            raise LookalikeError(f"{spec.name} takes {' and '.join(spec.features)} features; pass {what} "
                                 f"as a dict with keys {list(spec.features)}")
        embeds = {spec.features[0]: embeds}
    missing = [f for f in spec.features if f not in embeds]
    if missing:
        raise LookalikeError(f"{what} for {spec.name} lacks the {missing[0]!r} features it needs")
    out = {}
    for kind in spec.features:
        t = embeds[kind]
        want = FEATURE_NDIM[kind]
        if t.ndim == want - 1:
            t = t.unsqueeze(1)  # one image per sample
        if t.ndim != want:
            raise LookalikeError(f"{what} ({kind}) for {spec.name} should have {want} dims "
                                 f"(batch, images, ...), got shape {tuple(t.shape)}")
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise LookalikeError(f"{what} ({kind}) for {spec.name} holds NaN, infinite or non-float values, "
                                 f"which would give black images; encode the images again (in float32 or "
                                 f"bfloat16 if float16 overflowed)")
        out[kind] = t
    check_encoder(spec, {k: v.shape[-1] for k, v in out.items()}, f"the given {what}")
    return out


def negative_features(spec: AdapterSpec, like: Mapping[str, torch.Tensor],
                      encoders: EncoderSet) -> dict[str, torch.Tensor]:
    """The official unconditional input: zeros, or the image encoder run on an all-zero pixel tensor."""
    out = {}
    for kind, t in like.items():
        if spec.negative_rule(kind) == "zeros":
            out[kind] = torch.zeros_like(t)
            continue
        clip = [e for e in encoder_of(spec) if e.kind != "face"][0]
        if encoders.by_name.get(clip.name) is None and encoders.by_kind.get(clip.kind) is None:
            raise LookalikeError(f"{spec.name} needs negative_image_embeds: its unconditional input is the "
                                 f"image encoder run on a blank image; pass negative_image_embeds or an "
                                 f"image encoder (Personalizer(pipe, image_encoder=...))")
        blank = encoders.get(clip).encode_negative(1)["patch"].to(t)  # (1, T, H)
        out[kind] = blank.unsqueeze(1).expand(t.shape[:2] + blank.shape[1:]).clone()
    return out


def fit_batch(t: torch.Tensor, prompts: int, per_prompt: int, name: str) -> torch.Tensor:
    """Features for 1 or ``prompts`` samples -> one row per generated image (prompt-major)."""
    if t.shape[0] == 1:
        return t.expand((prompts * per_prompt,) + tuple(t.shape[1:]))
    if t.shape[0] == prompts:
        return t.repeat_interleave(per_prompt, dim=0)
    raise LookalikeError(f"image features for {name} have batch {t.shape[0]} but there are {prompts} prompts; "
                         f"give features for one sample or one per prompt")


def prepare(feats: Mapping[str, torch.Tensor], combine: str, prompts: int,
            adapter: IPAdapter) -> dict[str, torch.Tensor]:
    """Features on the adapter's device and dtype, all with batch 1 or all with one row per prompt."""
    param = next(adapter.parameters())
    out = {}
    for k, t in feats.items():
        t = t.to(device=param.device, dtype=param.dtype)
        out[k] = t.mean(dim=1, keepdim=True) if combine == "mean" else t
    batches = {t.shape[0] for t in out.values()}
    if len(batches) > 1 or not batches <= {1, prompts}:
        out = {k: fit_batch(t, prompts, 1, adapter.name) for k, t in out.items()}
    return out


def project_tokens(adapter: IPAdapter, feats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Projected tokens ``(B, I, T, C)``; for a timestep-conditioned projector (SD3.5) the features
    themselves, projected once per denoising step by the handle."""
    if adapter.spec.projector == "time_resampler":
        return feats[adapter.spec.features[0]]
    return adapter.project_once(feats)


def as_mask(m: Any, device: torch.device) -> torch.Tensor | None:
    """One adapter's mask -> ``(1, images, H, W)`` float32 on ``device`` (None stays None)."""
    if m is None:
        return None
    if not torch.is_tensor(m):
        raise LookalikeError("masks must be tensors of shape (1, images, height, width) in [0, 1], as "
                             "diffusers' IPAdapterMaskProcessor.preprocess gives (reshaped)")
    if m.ndim == 3:
        m = m.unsqueeze(0)
    if m.ndim != 4:
        raise LookalikeError(f"a mask must have shape (1, images, height, width), got {tuple(m.shape)}")
    return m.to(device=device, dtype=torch.float32)


def region_masks(subjects: Sequence[Subject], regions: Sequence, height: int, width: int,
                 adapters: int, index: int) -> list:
    """Boxes or (H, W) masks, one per subject, -> the adapter's (1, images, H, W) mask tensor."""
    if len(regions) != len(subjects):
        raise LookalikeError(f"give one region (box or mask) per subject: {len(subjects)} subjects, "
                             f"{len(regions)} regions")
    planes = []
    for subject, region in zip(subjects, regions):
        if torch.is_tensor(region):
            plane = region.float().reshape(region.shape[-2:])
        else:
            plane = box_mask(region, height, width)
        planes += [plane] * subject.num_images
    masks: list = [None] * adapters
    masks[index] = torch.stack(planes).unsqueeze(0)
    return masks


def condition_inputs(adapters: Sequence[IPAdapter], encoders: EncoderSet, image_embeds: Sequence[Embeds | None],
                     negative_image_embeds: Sequence | None, scale: Scale | Sequence[Scale], masks: Sequence | None,
                     window: Any, prompts: int, per_prompt: int, combine: str,
                     mask_device: torch.device) -> list[AdapterInput | None]:
    """Project every adapter's features once for this generation (both halves of guidance)."""
    n = len(adapters)
    if n == 0:
        raise LookalikeError("no adapter is loaded; call load_adapter(...) before generate")
    if len(image_embeds) != n:
        raise LookalikeError(f"{n} adapters are loaded but image_embeds has {len(image_embeds)} entries; "
                             f"give one per adapter (None to leave one out)")
    if combine not in ("concat", "mean"):
        raise LookalikeError(f"combine must be 'concat' or 'mean', not {combine!r}")
    negatives = one_per_adapter(negative_image_embeds, n, "negative_image_embeds", lambda v: v is None)
    if n == 1 and isinstance(scale, (list, tuple)) and len(scale) > 1:
        scale = [list(scale)]  # one adapter: a list is a scale per masked image
    scales = one_per_adapter(scale, n, "scale", is_scale)
    windows = one_per_adapter(window, n, "window", is_window)
    mask_list = one_per_adapter(masks, n, "masks", lambda v: v is None or torch.is_tensor(v))
    inputs: list[AdapterInput | None] = []
    for adapter, emb, neg, s, w, m in zip(adapters, image_embeds, negatives, scales, windows, mask_list):
        if emb is None:
            inputs.append(None)
            continue
        spec = adapter.spec
        pos = as_features(spec, emb, "image_embeds")
        negf = as_features(spec, neg, "negative_image_embeds") if neg is not None else None
        negf = negf or negative_features(spec, pos, encoders)
        with torch.no_grad():  # one projection per distinct row, then repeated per generated image
            tokens = [fit_batch(project_tokens(adapter, prepare(f, combine, prompts, adapter)),
                                prompts, per_prompt, adapter.name) for f in (pos, negf)]
        inputs.append(AdapterInput(tokens[0], tokens[1], s, tuple(w), as_mask(m, mask_device)))
    return inputs

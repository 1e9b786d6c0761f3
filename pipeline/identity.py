"""InstantID's IdentityNet: a ControlNet on the face keypoints whose cross-attention reads the face tokens.

InstantID (Wang et al. 2024, arXiv:2401.07519) runs SDXL with two identity paths: the adapter (decoupled
attention over 16 face tokens, lookalike's ordinary adapter path) and IdentityNet, a diffusers
``ControlNetModel`` whose condition image is the drawing of the 5 facial keypoints and whose
``encoder_hidden_states`` are the same face tokens (the negative face's tokens in guidance's unconditional
half) instead of the prompt. Here the ControlNet runs inside diffusers' ``StableDiffusionXLControlNetPipeline``
built from the user's pipeline; a hook hands it the face tokens. With several faces, the IdentityNet runs once
per face (its keypoints, its tokens) and each run's residuals are kept inside that face's region.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.spec import AdapterSpec
from ..errors import LookalikeError

#: What the IdentityNet folder must hold (config and safetensors weights; pickled weights are never read).
IDENTITYNET_PATTERNS: tuple[str, ...] = ("config.json", "*.safetensors")
#: ControlNet config fields that must equal the UNet's for the residuals to fit.
_MATCHING = ("in_channels", "block_out_channels", "cross_attention_dim", "addition_embed_type",
             "transformer_layers_per_block")


def resolve_identitynet_dir(spec: AdapterSpec, source: str | os.PathLike | None = None,
                            beside: str | os.PathLike | None = None, **hub_kwargs: Any) -> Path:
    """The IdentityNet folder: ``source``, else ``<adapter file's folder>/ControlNetModel``, else the hub."""
    subfolder = spec.controlnet_subfolder or "ControlNetModel"
    if source is not None:
        folder = Path(source).expanduser()
        if not (folder / "config.json").is_file():
            raise LookalikeError(f"the IdentityNet folder '{folder}' has no config.json; pass the {subfolder}/ "
                                 f"folder of {spec.repo_id} (config.json and diffusion_pytorch_model.safetensors)")
        return folder
    if beside is not None and (Path(beside).expanduser().parent / subfolder / "config.json").is_file():
        return Path(beside).expanduser().parent / subfolder
    if not spec.repo_id:
        raise LookalikeError(f"{spec.name} needs its IdentityNet folder; pass identitynet=FOLDER")
    import huggingface_hub

    try:
        root = huggingface_hub.snapshot_download(
            spec.repo_id, allow_patterns=[f"{subfolder}/{p}" for p in IDENTITYNET_PATTERNS], **hub_kwargs)
    except Exception as exc:  # offline, unknown repo, transport errors: one sentence
        raise LookalikeError(
            f"cannot fetch IdentityNet ({spec.repo_id}/{subfolder}): {str(exc).splitlines()[0]}; run "
            f"`hf download {spec.repo_id} --include '{subfolder}/*'` where the network is reachable, or pass "
            f"identitynet=FOLDER") from exc
    return Path(root) / subfolder


def check_identitynet_config(config: dict, unet: nn.Module, where: str) -> None:
    """Refuse a ControlNet whose layout does not fit the UNet, before any weight is allocated."""
    for key in _MATCHING:
        theirs, ours = config.get(key), unet.config.get(key)
        if key == "transformer_layers_per_block" and theirs is None:
            continue
        norm = (lambda v: list(v) if isinstance(v, (list, tuple)) else v)  # noqa: E731
        if norm(theirs) != norm(ours):
            raise LookalikeError(f"the IdentityNet in '{where}' was made for another model: its {key} is {theirs} "
                                 f"but the UNet's is {ours}; use InstantID with an SDXL model")


def load_identitynet(folder: str | os.PathLike, unet: nn.Module, *, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> nn.Module:
    """Load a diffusers ``ControlNetModel`` from safetensors in ``folder``, checked against ``unet`` first."""
    from diffusers import ControlNetModel

    folder = Path(folder).expanduser()
    try:
        config = ControlNetModel.load_config(str(folder))
    except (OSError, ValueError) as exc:
        raise LookalikeError(f"cannot read the IdentityNet config in '{folder}': {str(exc).splitlines()[0]}") from exc
    check_identitynet_config(dict(config), unet, str(folder))
    if not any(folder.glob("*.safetensors")):
        raise LookalikeError(f"'{folder}' holds no .safetensors weights; download diffusion_pytorch_model."
                             f"safetensors of the IdentityNet (pickled .bin weights are not read)")
    try:
        net = ControlNetModel.from_pretrained(str(folder), use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise LookalikeError(f"cannot load the IdentityNet in '{folder}': {str(exc).splitlines()[0]}") from exc
    if dtype is not None and dtype != net.dtype:
        net = net.to(dtype=dtype)
    return net.to(device=device).eval().requires_grad_(False)


@dataclass
class FaceControl:
    """One face for IdentityNet: its tokens ``(B, T, C)`` for both halves of guidance and its region, if any."""

    tokens: torch.Tensor
    negative: torch.Tensor
    mask: torch.Tensor | None = None  # (H, W) in [0, 1], the output's size

    def for_batch(self, batch: int) -> torch.Tensor:
        """``[negative; positive]`` when the ControlNet runs both halves, the positive alone otherwise."""
        if self.tokens.shape[0] == batch:
            return self.tokens
        if 2 * self.tokens.shape[0] == batch:
            return torch.cat([self.negative, self.tokens])
        raise LookalikeError(f"IdentityNet runs a batch of {batch} but the face tokens are for "
                             f"{self.tokens.shape[0]} images")


def _masked(residual: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A residual ``(B, C, h, w)`` kept inside ``mask`` (H, W), resized by nearest neighbour to ``(h, w)``."""
    small = F.interpolate(mask[None, None].to(residual), size=residual.shape[-2:], mode="nearest")
    return residual * small


class FaceTokensHook:
    """Feeds IdentityNet its face tokens in place of the prompt; with several faces, one face per call in turn."""

    def __init__(self, net: nn.Module, faces: Sequence[FaceControl]) -> None:
        self.faces = list(faces)
        self.calls = 0
        self._current: FaceControl | None = None
        self._handles = [net.register_forward_pre_hook(self._before, with_kwargs=True),
                         net.register_forward_hook(self._after)]

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        face = self.faces[self.calls % len(self.faces)]
        self.calls += 1
        self._current = face
        sample = args[0] if args else kwargs["sample"]
        tokens = face.for_batch(sample.shape[0]).to(device=sample.device, dtype=module.dtype)
        if len(args) > 2:
            args = args[:2] + (tokens,) + args[3:]
        else:
            kwargs["encoder_hidden_states"] = tokens
        return args, kwargs

    def _after(self, module: nn.Module, args: tuple, output: Any) -> Any:
        face = self._current
        if face is None or face.mask is None:
            return output
        down, mid = (output.down_block_res_samples, output.mid_block_res_sample) if hasattr(
            output, "mid_block_res_sample") else output
        down = type(down)(_masked(d, face.mask) for d in down)  # a list or a tuple, as the net gave
        mid = _masked(mid, face.mask)
        if hasattr(output, "mid_block_res_sample"):
            return type(output)(down_block_res_samples=down, mid_block_res_sample=mid)
        return down, mid

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextmanager
def face_tokens(net: nn.Module, faces: Sequence[FaceControl]) -> Iterator[FaceTokensHook]:
    """Within the block, every call of ``net`` reads face tokens (one face per call, in turn) as its context."""
    hook = FaceTokensHook(net, faces)
    try:
        yield hook
    finally:
        hook.remove()


def controlnet_pipeline(pipe: Any, controlnets: Sequence[nn.Module]) -> Any:
    """diffusers' SDXL ControlNet pipeline sharing every component of ``pipe`` (one net, or several summed)."""
    from diffusers import StableDiffusionXLControlNetPipeline
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    net = controlnets[0] if len(controlnets) == 1 else MultiControlNetModel(list(controlnets))
    parts = {k: v for k, v in pipe.components.items() if k in (
        "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler",
        "feature_extractor", "image_encoder")}
    force_zeros = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", True))
    control = StableDiffusionXLControlNetPipeline(**parts, controlnet=net, force_zeros_for_empty_prompt=force_zeros,
                                                  add_watermarker=getattr(pipe, "watermark", None) is not None)
    control.set_progress_bar_config(disable=True)
    return control


# -- keypoints for a generation ----------------------------------------------------------------------
Size = tuple[int, int]  # (width, height)


def photo_faces(encoder: Any, photo: Any) -> tuple[list[Any], Size]:
    """Every face of a pose/layout photo, left to right, with the photo's (width, height)."""
    from ..encoders.prepare import load_image

    image = load_image(photo)
    return encoder.detect(image), image.size


def subject_keypoints(subject: Any, label: str) -> tuple[Any, Size]:
    """A subject's first photo's keypoints and size, or one sentence when it was stored without them."""
    marks = getattr(subject, "landmarks", None) or {}
    if "kps" not in marks:
        raise LookalikeError(f"{label} holds no face keypoints (it was encoded before they were stored, or "
                             f"from features); encode the face photo again, or pass pose_reference=PHOTO")
    return marks["kps"][0].numpy(), (int(marks["size"][0][0]), int(marks["size"][0][1]))


def strip_regions(centres: Sequence[float], width: int) -> list[tuple[float, float, float, float]]:
    """Full-height strips split halfway between neighbouring face centres (pixels), left to right, as boxes."""
    cuts = [0.0] + [(a + b) / 2 for a, b in zip(centres, centres[1:])] + [float(width)]
    return [(cuts[i] / width, 0.0, cuts[i + 1] / width, 1.0) for i in range(len(centres))]


def place_in_box(kps: Any, source: Size, box: Sequence[float], out: Size) -> Any:
    """Keypoints of a ``source``-sized photo scaled into a box of the output (aspect kept, centred)."""
    import numpy as np

    from ..encoders.keypoints import check_keypoints

    x0, y0, x1, y1 = (float(v) for v in box)
    if max(x0, y0, x1, y1) <= 1.0:
        x0, x1, y0, y1 = x0 * out[0], x1 * out[0], y0 * out[1], y1 * out[1]
    array = check_keypoints(kps)
    scale = min((x1 - x0) / source[0], (y1 - y0) / source[1])
    offset = np.array([x0 + ((x1 - x0) - scale * source[0]) / 2, y0 + ((y1 - y0) - scale * source[1]) / 2])
    return (array * scale + offset).astype(array.dtype)


def _box_of(region: Any, out: Size) -> tuple[float, float, float, float]:
    """A region as a box in output pixels: the box itself, or the bounding box of a mask's non-zero pixels."""
    if torch.is_tensor(region):
        rows, cols = torch.nonzero(region.reshape(region.shape[-2:]) > 0, as_tuple=True)
        if rows.numel() == 0:
            raise LookalikeError("a region mask is empty; give every subject some of the image")
        plane = region.reshape(region.shape[-2:])
        sy, sx = out[1] / plane.shape[0], out[0] / plane.shape[1]
        return (float(cols.min()) * sx, float(rows.min()) * sy, float(cols.max() + 1) * sx, float(rows.max() + 1) * sy)
    x0, y0, x1, y1 = (float(v) for v in region)
    if max(x0, y0, x1, y1) <= 1.0:
        return x0 * out[0], y0 * out[1], x1 * out[0], y1 * out[1]
    return x0, y0, x1, y1


def face_keypoints(encoder: Any, subjects: Sequence[Any], regions: Sequence | None, pose_reference: Any,
                   out: Size) -> list[Any]:
    """One keypoint set per face, in output pixels: from the pose photo (its faces left to right, or its
    largest face for one subject), else from each subject's own photo (placed in its region when there are
    several)."""
    from ..encoders.face_detect import select_face
    from ..encoders.keypoints import fit_keypoints

    count = max(1, len(subjects)) if regions is not None else 1
    if pose_reference is not None and hasattr(pose_reference, "landmarks"):
        kps, size = subject_keypoints(pose_reference, "the pose_reference subject")
        return [fit_keypoints(kps, size, out)] * count
    if pose_reference is not None:
        found, size = photo_faces(encoder, pose_reference)
        if regions is None:
            return [fit_keypoints(select_face(found, "the pose reference").kps, size, out)]
        if len(found) != count:
            raise LookalikeError(f"the pose reference shows {len(found)} face(s) for {count} subjects; use a "
                                 f"photo with one face per subject, or give regions without it")
        return [fit_keypoints(face.kps, size, out) for face in found]
    if not subjects:
        raise LookalikeError("InstantID needs face keypoints for IdentityNet: pass a subject encoded from a "
                             "photo, or pose_reference=PHOTO")
    if regions is None:
        kps, size = subject_keypoints(subjects[0], "the subject")
        return [fit_keypoints(kps, size, out)]
    placed = []
    for i, (subject, region) in enumerate(zip(subjects, regions)):
        kps, size = subject_keypoints(subject, f"subject {i}")
        placed.append(place_in_box(kps, size, _box_of(region, out), out))
    return placed


def output_size_for(encoder: Any, subjects: Sequence[Any], pose_reference: Any) -> Size:
    """The authors' generation size for the pose photo (or the first subject's photo)."""
    from ..encoders.keypoints import output_size
    from ..encoders.prepare import load_image

    if pose_reference is not None and hasattr(pose_reference, "landmarks"):
        return output_size(subject_keypoints(pose_reference, "the pose_reference subject")[1])
    if pose_reference is not None:
        return output_size(load_image(pose_reference).size)
    if subjects and "size" in (getattr(subjects[0], "landmarks", None) or {}):
        return output_size(subject_keypoints(subjects[0], "the subject")[1])
    return 1024, 1024


def run_instantid(pipe: Any, net: nn.Module, tokens: torch.Tensor, negative: torch.Tensor, keypoints: Sequence,
                  masks: torch.Tensor | None, identitynet_scale: float, extra: Sequence[tuple] | None,
                  kwargs: dict) -> Any:
    """One SDXL generation with IdentityNet (one run per face, each kept in its region) beside the adapter.

    ``tokens``/``negative``: the adapter's projected face tokens ``(B, faces or images, T, C)``; ``masks``:
    ``(1, faces, H, W)`` regions, or None for one face; ``extra``: other ``(ControlNetModel, image, scale)``
    (depth, canny, pose), which read the face tokens as their context too, as in the authors' multi-ControlNet
    demo (their pipeline hands the face tokens to every ControlNet).
    """
    from ..encoders.keypoints import draw_keypoints

    width, height = int(kwargs["width"]), int(kwargs["height"])
    if masks is None:
        faces = [FaceControl(tokens.flatten(1, 2), negative.flatten(1, 2))]
    elif tokens.shape[1] != len(keypoints):
        raise LookalikeError(f"InstantID with several people takes one face embedding per subject, but the subjects "
                             f"hold {tokens.shape[1]} for {len(keypoints)} faces; encode each subject's photos with "
                             f"combine='mean'")
    else:
        faces = [FaceControl(tokens[:, i], negative[:, i], masks[0, i]) for i in range(tokens.shape[1])]
    images = [draw_keypoints((width, height), [kps]) for kps in keypoints]
    nets, scales = [net] * len(faces), [float(identitynet_scale)] * len(faces)
    for other, image, scale in extra or ():
        nets.append(other)
        images.append(image)
        scales.append(float(scale))
    control = controlnet_pipeline(pipe, nets)
    single = len(nets) == 1
    everyone = FaceControl(tokens.flatten(1, 2), negative.flatten(1, 2))  # the authors' multi-ControlNet context
    hooks = [FaceTokensHook(other, [everyone]) for other, _, _ in extra or () if other is not net]
    try:
        with face_tokens(net, faces):
            return control(image=images[0] if single else images,
                           controlnet_conditioning_scale=scales[0] if single else scales, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()

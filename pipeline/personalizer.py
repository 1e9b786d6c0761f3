"""``Personalizer``: wraps any diffusers SD1.5/SDXL pipeline with stacked IP-Adapter-style adapters."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch

from ..adapters.attach import AdapterHandle, AdapterInput, Scale, attach_adapters
from ..adapters.module import IPAdapter
from ..adapters.spec import NEGATIVE_RULE, AdapterSpec, get_spec
from ..errors import LookalikeError
from ..weights.io import adapter_from_state_dict, check_encoder, detect_spec, read_checkpoint

#: One adapter's features: a tensor for single-feature variants, a dict ``{"face_id": ..., "patch": ...}`` else.
Embeds = Union[torch.Tensor, Mapping[str, torch.Tensor]]
#: Feature kind -> number of dims with the (batch, images) pair in front.
_FEATURE_NDIM = {"pooled": 3, "patch": 4, "face_id": 3}


def _one_per_adapter(value: Any, count: int, what: str, is_single: Any) -> list:
    """A value meant for every adapter, or a list with one per adapter -> a list of ``count`` values."""
    if is_single(value):
        return [value] * count
    if isinstance(value, (list, tuple)) and len(value) == count:
        return list(value)
    raise LookalikeError(f"{what} must be one value for all adapters or a list of {count} (one per adapter)")


def _is_window(w: Any) -> bool:
    return isinstance(w, (list, tuple)) and len(w) == 2 and all(isinstance(v, (int, float)) for v in w)


def _is_scale(s: Any) -> bool:
    return isinstance(s, (int, float, dict))


class Personalizer:
    """Zero-shot personalization of a diffusers text-to-image pipeline.

    ``Personalizer(pipe)`` attaches lookalike's decoupled-attention processor to ``pipe.unet``; adapters
    are stacked with :meth:`load_adapter` and conditioned per call of :meth:`generate`.
    """

    def __init__(self, pipe: Any, *, backend: str = "sdpa", image_encoder: Any = None) -> None:
        if not hasattr(pipe, "unet"):
            raise LookalikeError("Personalizer needs a diffusers pipeline with a UNet (SD1.5 or SDXL)")
        self.pipe = pipe
        self.image_encoder = image_encoder if image_encoder is not None else getattr(pipe, "image_encoder", None)
        self.handle: AdapterHandle = attach_adapters(pipe.unet, backend=backend)

    @classmethod
    def from_pretrained(cls, model_id_or_dir: str | os.PathLike, *, torch_dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", backend: str = "sdpa", **kwargs: Any) -> Personalizer:
        """Load a text-to-image pipeline (hub id or local folder; SD1.5 or SDXL) and wrap it."""
        from diffusers import AutoPipelineForText2Image

        try:
            pipe = AutoPipelineForText2Image.from_pretrained(str(model_id_or_dir), torch_dtype=torch_dtype, **kwargs)
        except (OSError, ValueError) as exc:
            raise LookalikeError(f"cannot load the model {str(model_id_or_dir)!r}: {str(exc).splitlines()[0]}; "
                                 f"pass a diffusers folder or a hub id that is cached or reachable") from exc
        return cls(pipe.to(device), backend=backend)

    # -- adapters ---------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[IPAdapter]:
        return self.handle.adapters

    @property
    def base(self) -> str:
        return "sdxl" if self.pipe.unet.config.cross_attention_dim == 2048 else "sd15"

    def load_adapter(self, source: str | os.PathLike | IPAdapter, *, spec: AdapterSpec | str | None = None,
                     name: str | None = None) -> str:
        """Load and stack an adapter: registry name, local file, ``repo_id/filename`` or a built ``IPAdapter``.

        Returns the name the adapter is known by (unique among loaded adapters).
        """
        if isinstance(source, IPAdapter):
            adapter = source
        else:
            if isinstance(spec, str):
                spec = get_spec(spec, self.base)
            path, registry_spec = self._resolve(source)
            sd, metadata = read_checkpoint(path)
            chosen = spec or registry_spec or detect_spec(sd, metadata, str(path))
            unet = self.pipe.unet
            adapter = adapter_from_state_dict(sd, unet, chosen, device=unet.device, dtype=unet.dtype)
        taken = {a.name for a in self.adapters}
        base_name = name or adapter.name
        unique, n = base_name, 2
        while unique in taken:
            unique, n = f"{base_name}#{n}", n + 1
        adapter.name = unique
        self.handle.add(adapter)
        return unique

    def _resolve(self, source: str | os.PathLike) -> tuple[str, AdapterSpec | None]:
        from ..weights.hub import resolve_adapter_source

        path, spec = resolve_adapter_source(str(source), base=self.base)
        return str(path), spec

    def unload_adapters(self) -> None:
        """Remove every adapter; the pipeline then behaves exactly as before."""
        for adapter in list(self.adapters):
            self.handle.remove(adapter.name)

    def detach(self) -> None:
        """Remove lookalike from the pipeline entirely (original attention processors restored)."""
        self.handle.detach()

    # -- features ---------------------------------------------------------------------------------
    def _as_features(self, spec: AdapterSpec, embeds: Embeds, what: str) -> dict[str, torch.Tensor]:
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
            want = _FEATURE_NDIM[kind]
            if t.ndim == want - 1:
                t = t.unsqueeze(1)  # one image per sample
            if t.ndim != want:
                raise LookalikeError(f"{what} ({kind}) for {spec.name} should have {want} dims "
                                     f"(batch, images, ...), got shape {tuple(t.shape)}")
            out[kind] = t
        check_encoder(spec, {k: v.shape[-1] for k, v in out.items()}, f"the given {what}")
        return out

    def negative_features(self, spec: AdapterSpec, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The official unconditional input: zeros, or the image encoder run on an all-zero pixel tensor."""
        out = {}
        for kind, t in like.items():
            if NEGATIVE_RULE[kind] == "zeros":
                out[kind] = torch.zeros_like(t)
                continue
            if self.image_encoder is None:
                raise LookalikeError(f"{spec.name} needs negative_image_embeds: its unconditional input is the "
                                     f"image encoder run on a blank image; pass negative_image_embeds or load an "
                                     f"image encoder (Personalizer(pipe, image_encoder=...))")
            out[kind] = self._encode_blank(t)
        return out

    def _encode_blank(self, like: torch.Tensor) -> torch.Tensor:
        enc = self.image_encoder
        if hasattr(enc, "encode_negative"):
            blank = enc.encode_negative(1)["patch"]
        else:  # a transformers CLIPVisionModelWithProjection
            size = enc.config.image_size
            param = next(enc.parameters())
            pixels = torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)
            with torch.no_grad():
                blank = enc(pixels, output_hidden_states=True).hidden_states[-2]
        blank = blank.to(device=like.device, dtype=like.dtype)  # (1, T, H)
        return blank.reshape((1, 1) + tuple(blank.shape[1:])).expand(like.shape[:2] + blank.shape[1:]).clone()

    @staticmethod
    def _fit_batch(t: torch.Tensor, prompts: int, per_prompt: int, name: str) -> torch.Tensor:
        """Features for 1 or ``prompts`` samples -> one row per generated image (prompt-major)."""
        if t.shape[0] == 1:
            return t.expand((prompts * per_prompt,) + tuple(t.shape[1:]))
        if t.shape[0] == prompts:
            return t.repeat_interleave(per_prompt, dim=0)
        raise LookalikeError(f"image features for {name} have batch {t.shape[0]} but there are {prompts} prompts; "
                             f"give features for one sample or one per prompt")

    def condition_inputs(self, image_embeds: Sequence[Embeds | None], negative_image_embeds: Sequence | None,
                         scale: Scale | Sequence[Scale], masks: Sequence | None, window: Any,
                         prompts: int = 1, per_prompt: int = 1, combine: str = "concat") -> list[AdapterInput | None]:
        """Project every adapter's features once for this generation (both halves of guidance)."""
        n = len(self.adapters)
        if n == 0:
            raise LookalikeError("no adapter is loaded; call load_adapter(...) before generate")
        if len(image_embeds) != n:
            raise LookalikeError(f"{n} adapters are loaded but image_embeds has {len(image_embeds)} entries; "
                                 f"give one per adapter (None to leave one out)")
        if combine not in ("concat", "mean"):
            raise LookalikeError(f"combine must be 'concat' or 'mean', not {combine!r}")
        negatives = _one_per_adapter(negative_image_embeds, n, "negative_image_embeds", lambda v: v is None)
        if n == 1 and isinstance(scale, (list, tuple)) and len(scale) > 1:
            scale = [list(scale)]  # one adapter: a list is a scale per masked image
        scales = _one_per_adapter(scale, n, "scale", _is_scale)
        windows = _one_per_adapter(window, n, "window", _is_window)
        mask_list = _one_per_adapter(masks, n, "masks", lambda v: v is None or torch.is_tensor(v))
        inputs: list[AdapterInput | None] = []
        for adapter, emb, neg, s, w, m in zip(self.adapters, image_embeds, negatives, scales, windows, mask_list):
            if emb is None:
                inputs.append(None)
                continue
            spec = adapter.spec
            pos = self._as_features(spec, emb, "image_embeds")
            negf = self._as_features(spec, neg, "negative_image_embeds") if neg is not None else None
            negf = negf or self.negative_features(spec, pos)
            with torch.no_grad():
                tokens = [adapter.project(self._prepare(f, combine, prompts, per_prompt, adapter))
                          for f in (pos, negf)]
            inputs.append(AdapterInput(tokens[0], tokens[1], s, tuple(w), self._masks(m)))
        return inputs

    def _prepare(self, feats: Mapping[str, torch.Tensor], combine: str, prompts: int, per_prompt: int,
                 adapter: IPAdapter) -> dict[str, torch.Tensor]:
        param = next(adapter.parameters())
        out = {}
        for k, t in feats.items():
            t = t.to(device=param.device, dtype=param.dtype)
            if combine == "mean":
                t = t.mean(dim=1, keepdim=True)
            out[k] = self._fit_batch(t, prompts, per_prompt, adapter.name)
        return out

    def _masks(self, m: Any) -> torch.Tensor | None:
        if m is None:
            return None
        if not torch.is_tensor(m):
            raise LookalikeError("masks must be tensors of shape (1, images, height, width) in [0, 1], as "
                                 "diffusers' IPAdapterMaskProcessor.preprocess gives (reshaped)")
        if m.ndim == 3:
            m = m.unsqueeze(0)
        if m.ndim != 4:
            raise LookalikeError(f"a mask must have shape (1, images, height, width), got {tuple(m.shape)}")
        return m.to(device=self.pipe.unet.device, dtype=torch.float32)

    # -- generation -------------------------------------------------------------------------------
    def generate(self, prompt: str | list[str] | None = None, image_embeds: Sequence[Embeds | None] | None = None,
                 negative_image_embeds: Sequence[Embeds | None] | None = None, scale: Scale | Sequence[Scale] = 1.0,
                 masks: Sequence[torch.Tensor | None] | torch.Tensor | None = None,
                 window: tuple[float, float] | Sequence[tuple[float, float]] = (0.0, 1.0),
                 combine: str = "concat", **pipeline_kwargs: Any) -> Any:
        """Generate with the wrapped pipeline, each adapter conditioned on its image features.

        ``image_embeds[i]``: raw encoder features for adapter ``i`` with a leading (batch, images) pair;
        ``scale``: a float, one per adapter, or diffusers' per-block dict; ``window``: ``(start, end)``
        fractions of the schedule where adapters act; ``masks``: per adapter ``(1, images, H, W)`` regions.
        Other keyword arguments go to the pipeline.
        """
        if image_embeds is None:
            raise LookalikeError("generate needs image_embeds (one entry per loaded adapter)")
        if torch.is_tensor(image_embeds) or isinstance(image_embeds, Mapping):
            image_embeds = [image_embeds]
        if torch.is_tensor(masks):
            masks = [masks]
        prompts = len(prompt) if isinstance(prompt, list) else 1
        per_prompt = int(pipeline_kwargs.get("num_images_per_prompt") or 1)
        inputs = self.condition_inputs(image_embeds, negative_image_embeds, scale, masks, window,
                                       prompts, per_prompt, combine)
        self.handle.scheduler = self.pipe.scheduler
        with self.handle.conditioned(inputs):
            return self.pipe(prompt=prompt, **pipeline_kwargs)

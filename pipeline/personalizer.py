"""``Personalizer``: wraps a diffusers SD1.5/SDXL, FLUX.1 or SD3.5 pipeline with stacked image adapters."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..adapters.attach import AdapterHandle, AdapterInput, Scale, attach_adapters
from ..adapters.module import IPAdapter, model_family
from ..adapters.spec import AdapterSpec, encoder_of, get_spec
from ..compat import diffusers_dtype
from ..errors import LookalikeError
from ..weights.dit_formats import detect_dit_spec
from ..weights.io import adapter_from_state_dict, detect_spec, read_checkpoint
from .checks import check_images, check_size
from .conditioning import Embeds, condition_inputs, negative_features, region_masks
from .encode import EncoderSet, ImageSource, encode_subject
from .faceid import faceid_plus_controls
from .subject import Subject, stack_subjects

#: The official IP-Adapter FaceID prompts when none is given (tencent-ailab/IP-Adapter, ``generate``).
DEFAULT_PROMPT = "best quality, high quality"
DEFAULT_NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"


class Personalizer:
    """Zero-shot personalization of a diffusers text-to-image pipeline.

    ``Personalizer(pipe)`` attaches lookalike's processors to ``pipe.unet`` (SD1.5, SDXL) or
    ``pipe.transformer`` (FLUX.1, SD3.5; any of their pipelines: text-to-image, img2img, inpaint, Fill,
    ControlNet); adapters are stacked with :meth:`load_adapter` and conditioned per call of :meth:`generate`.
    ``handle``: processors already attached to the model, with their adapters (a training run's): generation
    goes through them instead of attaching again.
    """

    def __init__(self, pipe: Any, *, backend: str = "sdpa", image_encoder: Any = None,
                 face_encoder: Any = None, face_options: Mapping[str, Any] | None = None,
                 handle: AdapterHandle | None = None) -> None:
        model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if model is None or not hasattr(model, "attn_processors"):
            raise LookalikeError("Personalizer needs a diffusers pipeline with a UNet (SD1.5, SDXL) or a FLUX/SD3 "
                                 "transformer")
        self.pipe = pipe
        self.model = model
        self.encoders = EncoderSet(model.device, model.dtype, face_options)
        clip = image_encoder if image_encoder is not None else getattr(pipe, "image_encoder", None)
        for encoder in (clip, face_encoder):
            if encoder is not None:
                self.encoders.set(encoder)
        if handle is not None and (handle.model is not model or not handle.attached):
            raise LookalikeError("the given handle is not attached to this pipeline's model")
        self.handle: AdapterHandle = handle or attach_adapters(model, backend=backend)
        self.identitynets: dict[str, Any] = {}  # adapter name -> its IdentityNet (InstantID's ControlNet)

    @classmethod
    def from_pretrained(cls, model_id_or_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu", backend: str = "sdpa",
                        torch_dtype: torch.dtype | None = None, **kwargs: Any) -> Personalizer:
        """Load a text-to-image pipeline (hub id or local folder; SD1.5 or SDXL) and wrap it.

        ``dtype`` defaults to float32; ``torch_dtype`` is the same thing under diffusers' older name.
        """
        from diffusers import AutoPipelineForText2Image

        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise LookalikeError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass only dtype")
        chosen = dtype or torch_dtype or torch.float32
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(str(model_id_or_dir), **diffusers_dtype(chosen), **kwargs)
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
        family = model_family(self.model)
        if family != "unet":
            return family
        return "sdxl" if self.model.config.cross_attention_dim == 2048 else "sd15"

    def load_adapter(self, source: str | os.PathLike | IPAdapter, *, spec: AdapterSpec | str | None = None,
                     name: str | None = None, identitynet: str | os.PathLike | Any = None) -> str:
        """Load and stack an adapter: registry name, local file, ``repo_id/filename`` or a built ``IPAdapter``.

        InstantID also loads its IdentityNet: ``identitynet`` (a folder or a ControlNetModel), else the
        ``ControlNetModel/`` folder beside the adapter file, else (for a registry name or hub path) the hub's;
        ``identitynet=False`` loads the adapter alone. Returns the name the adapter is known by (unique among
        loaded adapters).
        """
        path = None
        if isinstance(source, IPAdapter):
            adapter = source
        else:
            if isinstance(spec, str):
                spec = get_spec(spec, self.base)
            path, registry_spec = self._resolve(source)
            sd, metadata = read_checkpoint(path)
            chosen = spec or detect_dit_spec(sd, metadata, self.base, registry_spec) or registry_spec \
                or detect_spec(sd, metadata, str(path))
            model = self.model
            adapter = adapter_from_state_dict(sd, model, chosen, device=model.device, dtype=self._adapter_dtype())
        taken = {a.name for a in self.adapters}
        base_name = name or adapter.name
        unique, n = base_name, 2
        while unique in taken:
            unique, n = f"{base_name}#{n}", n + 1
        adapter.name = unique
        local = not isinstance(source, IPAdapter) and Path(source).expanduser().exists()
        wanted = adapter.spec.controlnet_subfolder and identitynet is not False
        net = self._identitynet_for(adapter.spec, identitynet, path, local) if wanted else None
        self.handle.add(adapter)
        if net is not None:
            self.identitynets[unique] = net
        return unique

    def _identitynet_for(self, spec: AdapterSpec, given: Any, path: str | None, local: bool) -> Any:
        from .identity import load_identitynet, resolve_identitynet_dir

        unet = self.pipe.unet
        if isinstance(given, torch.nn.Module):
            return given.to(device=unet.device, dtype=unet.dtype).eval().requires_grad_(False)
        beside = Path(path).parent / (spec.controlnet_subfolder or "") if path else None
        if given is None and (path is None or local) and not (beside and (beside / "config.json").is_file()):
            where = f"no {spec.controlnet_subfolder}/ folder beside {path}" if path else "it was given built"
            raise LookalikeError(f"{spec.name} needs its IdentityNet and {where}: pass identitynet=FOLDER (or a "
                                 f"ControlNetModel), or identitynet=False for the adapter alone")
        return load_identitynet(resolve_identitynet_dir(spec, given, beside=path), unet, device=unet.device,
                                dtype=unet.dtype)

    def _adapter_dtype(self) -> torch.dtype:
        """The model's dtype, or float32 when its weights are quantized (integer or packed storage)."""
        dtype = self.model.dtype
        return dtype if dtype.is_floating_point and dtype.itemsize >= 2 else torch.float32

    def _resolve(self, source: str | os.PathLike) -> tuple[str, AdapterSpec | None]:
        from ..weights.hub import resolve_adapter_source

        path, spec = resolve_adapter_source(str(source), base=self.base)
        return str(path), spec

    def unload_adapters(self) -> None:
        """Remove every adapter; the pipeline then behaves exactly as before."""
        for adapter in list(self.adapters):
            self.handle.remove(adapter.name)
        self.identitynets.clear()

    def detach(self) -> None:
        """Remove lookalike from the pipeline entirely (original attention processors restored)."""
        self.handle.detach()

    # -- features ---------------------------------------------------------------------------------
    def negative_features(self, spec: AdapterSpec, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The official unconditional input: zeros, or the image encoder run on an all-zero pixel tensor."""
        return negative_features(spec, like, self.encoders)

    # -- subjects ---------------------------------------------------------------------------------
    def set_encoder(self, encoder: Any, name: str | None = None) -> None:
        """Use ``encoder`` (an ImageEncoder or a CLIPVisionModelWithProjection) for ``name`` or for its kind."""
        self.encoders.set(encoder, name)

    def encode(self, images: Sequence[ImageSource] | ImageSource, adapter: str | None = None, *,
               combine: str | None = None, crop: str = "center", face_index: int | None = None,
               weights: Sequence[float] | None = None,
               negative_images: Sequence[ImageSource] | ImageSource | None = None) -> Subject:
        """Run the encoder(s) an adapter needs on reference images -> a reusable :class:`Subject`.

        ``combine``: ``"concat"`` (the default without ``weights``) keeps every image's tokens, as diffusers
        does; ``"mean"`` averages the images' features, weighted by ``weights`` (one per image) when given.
        ``negative_images``: photos whose features replace the official negative (what to move away from).
        """
        found = self._find(adapter) if adapter is not None else None
        spec = found.spec if found else get_spec(adapter, self.base) if adapter else self._adapter_for(None).spec
        with torch.no_grad():
            return encode_subject(self.encoders, spec, images, combine=combine, crop=crop, face_index=face_index,
                                  weights=weights, negative_images=negative_images)

    def _find(self, name: str) -> IPAdapter | None:
        for a in self.adapters:
            if name in (a.name, a.spec.name, a.spec.short_name):
                return a
        return None

    def _adapter_for(self, name: str | None) -> IPAdapter:
        if not self.adapters:
            raise LookalikeError("no adapter is loaded; call load_adapter(...) first")
        if name is None:
            return self.adapters[0]
        found = self._find(name)
        if found is None:
            loaded = ", ".join(a.name for a in self.adapters)
            raise LookalikeError(f"adapter {name!r} is not loaded (loaded: {loaded}); load it with load_adapter")
        return found

    def _subject_embeds(self, subjects: Sequence[Subject], dim: int) -> tuple[list, list]:
        """Per-adapter image_embeds / negatives from subjects (all for one adapter)."""
        adapter = self._adapter_for(subjects[0].adapter)
        if any(self._adapter_for(s.adapter) is not adapter for s in subjects):
            raise LookalikeError("all subjects of one call must be encoded for the same adapter")
        for s in subjects:
            s.check()
        pos, neg = stack_subjects(subjects, dim)
        embeds: list = [None] * len(self.adapters)
        negs: list = [None] * len(self.adapters)
        index = self.adapters.index(adapter)
        embeds[index], negs[index] = pos, neg
        return embeds, negs

    def condition_inputs(self, image_embeds: Sequence[Embeds | None], negative_image_embeds: Sequence | None,
                         scale: Scale | Sequence[Scale], masks: Sequence | None, window: Any,
                         prompts: int = 1, per_prompt: int = 1, combine: str = "concat") -> list[AdapterInput | None]:
        """Project every adapter's features once for this generation (both halves of guidance)."""
        return condition_inputs(self.adapters, self.encoders, image_embeds, negative_image_embeds, scale, masks,
                                window, prompts, per_prompt, combine, self.model.device)

    # -- generation -------------------------------------------------------------------------------
    def generate(self, prompt: str | list[str] | None = None, image_embeds: Sequence[Embeds | None] | None = None,
                 negative_image_embeds: Sequence[Embeds | None] | None = None,
                 scale: Scale | Sequence[Scale] | None = None,
                 masks: Sequence[torch.Tensor | None] | torch.Tensor | None = None,
                 window: tuple[float, float] | Sequence[tuple[float, float]] = (0.0, 1.0),
                 combine: str = "concat", subject: Subject | Sequence[Subject] | None = None,
                 subjects: Sequence[Subject] | Mapping[str, Subject] | None = None, regions: Sequence | None = None,
                 layout_start: float | None = None, layout_threshold: float | None = None, *,
                 identitynet_scale: float = 0.8, pose_reference: Any = None, controlnets: Sequence[tuple] = (),
                 s_scale: float | None = None, shortcut: bool | None = None, **pipeline_kwargs: Any) -> Any:
        """Generate with the wrapped pipeline, each adapter conditioned on its image features.

        ``image_embeds[i]``: raw encoder features for adapter ``i`` with a leading (batch, images) pair;
        ``scale``: a float, one per adapter, or diffusers' per-block dict (None: each adapter's default, 0.8
        for InstantID as its authors use, else 1.0); ``window``: ``(start, end)`` fractions of the schedule
        where adapters act; ``masks``: per adapter ``(1, images, H, W)`` regions.
        ``subject``: a :class:`Subject` (or one per prompt) instead of ``image_embeds``; ``subjects`` with
        ``regions`` (a box ``(x0, y0, x1, y1)`` or an ``(H, W)`` mask each) places several subjects in one image,
        each region attending only to its own subject's tokens.
        ``subjects={"dog": dog, "cat": cat}`` (words of the prompt) finds the regions from the prompt's own
        attention (auto layout, :mod:`lookalike.pipeline.layout`): text alone until ``layout_start`` (0.2),
        regions where a phrase's normalised map is highest and reaches ``layout_threshold`` (0.5); the output
        then carries ``.regions`` and ``.attention`` ``{phrase: (H, W)}``.
        InstantID: ``identitynet_scale`` is IdentityNet's strength; ``pose_reference`` a photo (or Subject) whose
        face keypoints IdentityNet follows (several subjects: its faces, left to right, give the regions when
        none are given); ``controlnets``: other ``(ControlNetModel, image, scale)`` beside it.
        FaceID-Plus: ``s_scale`` and ``shortcut`` as the official ``generate()`` (None: the adapter's own).
        ``prompt=None`` without ``prompt_embeds`` uses the official default prompt ("best quality, high
        quality") and negative prompt. Other keyword arguments go to the pipeline.
        """
        if isinstance(subjects, Mapping):
            from .layout import LAYOUT_START, LAYOUT_THRESHOLD, generate_with_layout

            if subject is not None or image_embeds is not None or regions is not None or masks is not None:
                raise LookalikeError("subjects={phrase: subject} finds the regions itself; pass no subject, "
                                     "image_embeds, regions or masks with it")
            if self.identitynets or pose_reference is not None or controlnets:
                raise LookalikeError("subjects={phrase: subject} (auto layout) does not run InstantID's IdentityNet "
                                     "or ControlNets; give regions (or a pose_reference) with a list of subjects")
            if scale is None:
                scale = [a.spec.default_scale for a in self.adapters]
                scale = scale[0] if len(scale) == 1 else scale
            with faceid_plus_controls(self.adapters, s_scale, shortcut):
                return generate_with_layout(
                    self, prompt, subjects, scale=scale, window=window, combine=combine,
                    layout_start=LAYOUT_START if layout_start is None else layout_start,
                    layout_threshold=LAYOUT_THRESHOLD if layout_threshold is None else layout_threshold,
                    **pipeline_kwargs)
        if layout_start is not None or layout_threshold is not None:
            raise LookalikeError("layout_start and layout_threshold apply to subjects={phrase: subject} only")
        from .identity import face_keypoints, output_size_for, run_instantid, strip_regions

        many = [] if subjects is None and subject is None else list(subjects) if subjects is not None else (
            list(subject) if isinstance(subject, (list, tuple)) else [subject])
        identity = next(((i, a) for i, a in enumerate(self.adapters) if a.name in self.identitynets), None)
        face_encoder = self.encoders.get(encoder_of(identity[1].spec)[0]) if identity and (
            pose_reference is not None and not hasattr(pose_reference, "landmarks")) else None
        if identity is not None and not (pipeline_kwargs.get("height") and pipeline_kwargs.get("width")):
            width, height = output_size_for(face_encoder, many, pose_reference)  # the authors' size for the photo
            pipeline_kwargs["width"] = pipeline_kwargs.get("width") or width
            pipeline_kwargs["height"] = pipeline_kwargs.get("height") or height
        if subjects is not None and regions is None and pose_reference is not None:
            from .identity import photo_faces

            encoder = face_encoder or self.encoders.get(encoder_of(self._adapter_for(many[0].adapter).spec)[0])
            found, size = photo_faces(encoder, pose_reference)
            regions = strip_regions([float(f.kps[:, 0].mean()) / size[0] for f in found], 1)
        if subject is not None or subjects is not None:
            if image_embeds is not None:
                raise LookalikeError("pass either image_embeds or subject(s), not both")
            image_embeds, negative_image_embeds, masks = self._from_subjects(subject, subjects, regions,
                                                                             pipeline_kwargs)
        if image_embeds is None:
            raise LookalikeError("generate needs image_embeds or a subject (one entry per loaded adapter)")
        if torch.is_tensor(image_embeds) or isinstance(image_embeds, Mapping):
            image_embeds = [image_embeds]
        if torch.is_tensor(negative_image_embeds) or isinstance(negative_image_embeds, Mapping):
            negative_image_embeds = [negative_image_embeds]
        if torch.is_tensor(masks):
            masks = [masks]
        if scale is None:
            defaults = [a.spec.default_scale for a in self.adapters]
            scale = defaults[0] if len(defaults) == 1 else defaults
        if prompt is None and pipeline_kwargs.get("prompt_embeds") is None:
            prompt = DEFAULT_PROMPT
            if pipeline_kwargs.get("negative_prompt") is None and pipeline_kwargs.get("negative_prompt_embeds") is None:
                pipeline_kwargs["negative_prompt"] = DEFAULT_NEGATIVE_PROMPT
        embeds = pipeline_kwargs.get("prompt_embeds")
        prompts = len(prompt) if isinstance(prompt, list) else (
            int(embeds.shape[0]) if prompt is None and torch.is_tensor(embeds) else 1)
        per_prompt = int(pipeline_kwargs.get("num_images_per_prompt") or 1)
        with faceid_plus_controls(self.adapters, s_scale, shortcut):
            inputs = self.condition_inputs(image_embeds, negative_image_embeds, scale, masks, window,
                                           prompts, per_prompt, combine)
        height, width = self._output_size(pipeline_kwargs)
        check_size(width, height)
        self.handle.scheduler = self.pipe.scheduler
        to_pil = pipeline_kwargs.get("output_type", "pil") == "pil"
        if to_pil:  # decoded as floats, checked, then made 8-bit exactly as diffusers' "pil" output does
            pipeline_kwargs["output_type"] = "np"
        self.handle.alternate = self._true_cfg(pipeline_kwargs)
        try:
            with torch.no_grad(), self.handle.conditioned(inputs):  # generation records no gradients
                if identity is None or inputs[identity[0]] is None:
                    result = self.pipe(prompt=prompt, **pipeline_kwargs)
                else:
                    term = inputs[identity[0]]
                    keypoints = face_keypoints(face_encoder, many, regions if term.masks is not None else None,
                                               pose_reference, (width, height))
                    result = run_instantid(self.pipe, self.identitynets[identity[1].name], term.tokens,
                                           term.negative, keypoints, term.masks, identitynet_scale, controlnets,
                                           {"prompt": prompt, **pipeline_kwargs})
        finally:
            self.handle.alternate = False
        return self._checked(result, to_pil, pipeline_kwargs.get("output_type"))

    def _checked(self, result: Any, to_pil: bool, output_type: str | None) -> Any:
        """Refuse non-finite or blank decoded images (they would be saved black); convert "np" back to PIL."""
        as_tuple = isinstance(result, tuple)
        images = result[0] if as_tuple else result.images
        flagged = (result[1] if as_tuple and len(result) > 1 else getattr(result, "nsfw_content_detected", None))
        if output_type != "latent":
            check_images(images, flagged, half=self.model.dtype == torch.float16)
        if to_pil:
            images = self.pipe.image_processor.numpy_to_pil(images)
            if as_tuple:
                return (images,) + tuple(result[1:])
            result.images = images
        return result

    def _true_cfg(self, kwargs: Mapping[str, Any]) -> bool:
        """Whether a FLUX pipeline will run true CFG (two model calls per step: conditional, then not)."""
        if self.base != "flux":
            return False
        negative = kwargs.get("negative_prompt") is not None or (
            kwargs.get("negative_prompt_embeds") is not None and kwargs.get("negative_pooled_prompt_embeds") is not None)
        return float(kwargs.get("true_cfg_scale") or 1.0) > 1 and negative

    def _from_subjects(self, subject: Any, subjects: Any, regions: Any, kwargs: dict) -> tuple:
        if subjects is not None:
            if regions is None:
                raise LookalikeError("several subjects in one image need regions: a box or a mask per subject")
            embeds, negs = self._subject_embeds(list(subjects), dim=1)
            height, width = self._output_size(kwargs)
            index = next(i for i, e in enumerate(embeds) if e is not None)
            masks = region_masks(list(subjects), list(regions), height, width, len(embeds), index)
            return embeds, negs, masks
        many = list(subject) if isinstance(subject, (list, tuple)) else [subject]
        embeds, negs = self._subject_embeds(many, dim=0)
        return embeds, negs, None

    def _output_size(self, kwargs: dict) -> tuple[int, int]:
        scale = getattr(self.pipe, "vae_scale_factor", 8)
        sample = getattr(self.pipe, "default_sample_size", None) or self.model.config.sample_size
        default = sample * scale
        return int(kwargs.get("height") or default), int(kwargs.get("width") or default)

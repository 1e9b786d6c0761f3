"""Metric models: CLIP (CLIP-I, CLIP-T), DINO ViT-S/16 (DINO) and ArcFace (face similarity).

Defaults follow DreamBench's convention (DreamBooth, Ruiz et al. 2023): CLIP ViT-B/32
(``openai/clip-vit-base-patch32``) and DINO ViT-S/16 (``facebook/dino-vits16``); face similarity uses
insightface's ``buffalo_l`` ArcFace. (The IP-Adapter paper's COCO table used CLIP ViT-L/14; pass
``--clip-model openai/clip-vit-large-patch14`` to compare with it.) Images are prepared with lookalike's
``to_clip_pixels`` (shortest side resized, centre crop, the model's mean/std): no torchvision.
Scorers hold their model and nothing global; embeddings are L2-normalised float numpy arrays.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..compat import transformers_dtype
from ..encoders.clip import read_processor_config
from ..encoders.prepare import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_image, to_clip_pixels
from ..errors import LookalikeError
from .metrics import l2_normalize, mean_cosine_to_references, paired_cosine

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"
DEFAULT_FACE_MODEL = "buffalo_l"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__).rstrip(".")


def _model_type(source: str, what: str, hub: dict[str, Any]) -> str:
    """The ``model_type`` of a hub id or folder's config.json, failures as one sentence."""
    from transformers import PretrainedConfig

    local = Path(source).expanduser()
    if (os.path.isabs(source) or source.startswith((".", "~"))) and not local.is_dir():
        raise LookalikeError(f"the {what} folder {source} does not exist; pass a saved model folder or a hub id")
    try:
        config, _ = PretrainedConfig.get_config_dict(source, **hub)
    except (OSError, ValueError) as exc:
        raise LookalikeError(f"cannot load the {what} {source!r}: {_first_line(exc)}; pass a local folder, or "
                             f"run `hf download {source}` where the hub can be reached") from exc
    return str(config.get("model_type", ""))


def _pixel_settings(source: str, default_size: int, mean: Sequence[float], std: Sequence[float],
                    local_files_only: bool | None) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """Crop size, mean and std from the model's preprocessor_config.json (defaults when absent)."""
    local = Path(source).expanduser()
    config = read_processor_config(str(local) if local.is_dir() else source, None, local_files_only)
    size = config.get("crop_size", config.get("size", default_size))
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge", default_size))
    return int(size), tuple(config.get("image_mean", mean)), tuple(config.get("image_std", std))


def _hub(local_files_only: bool | None) -> dict[str, Any]:
    return {} if local_files_only is None else {"local_files_only": local_files_only}


class ClipScorer:
    """CLIP image and text embeddings for CLIP-I and CLIP-T (CLIP, Radford et al. 2021)."""

    def __init__(self, model: Any, tokenizer: Any, *, image_size: int | None = None,
                 mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD) -> None:
        """Wrap a transformers ``CLIPModel`` and its tokenizer."""
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = int(image_size or model.config.vision_config.image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(cls, id_or_dir: str | os.PathLike[str] = DEFAULT_CLIP_MODEL, *,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        local_files_only: bool | None = None) -> ClipScorer:
        """Load a ``CLIPModel`` and its tokenizer (hub id or folder saved with save_pretrained)."""
        from transformers import AutoTokenizer, CLIPModel

        source = str(id_or_dir)
        kind = _model_type(source, "CLIP model", _hub(local_files_only))
        if kind != "clip":
            raise LookalikeError(f"--clip-model {source} holds a {kind or 'unknown'} model, not a full CLIP model "
                                 f"(image and text towers); pass e.g. {DEFAULT_CLIP_MODEL}")
        try:
            model = CLIPModel.from_pretrained(source, **transformers_dtype(dtype), **_hub(local_files_only))
            tokenizer = AutoTokenizer.from_pretrained(source, **_hub(local_files_only))
        except (OSError, ValueError) as exc:
            raise LookalikeError(f"cannot load the CLIP model {source!r}: {_first_line(exc)}; pass a complete "
                                 f"CLIP folder (model and tokenizer) or hub id") from exc
        size, mean, std = _pixel_settings(source, model.config.vision_config.image_size, OPENAI_CLIP_MEAN,
                                          OPENAI_CLIP_STD, local_files_only)
        return cls(model.to(device), tokenizer, image_size=size, mean=mean, std=std)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Normalised CLIP image embeddings ``(N, D)``."""
        param = next(self.model.parameters())
        pixels = to_clip_pixels(list(images), self.image_size, self.mean, self.std).to(param)  # (N, 3, S, S)
        with torch.inference_mode():
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output  # (N, H)
            embeds = self.model.visual_projection(pooled)  # (N, D)
        return l2_normalize(embeds.float().cpu().numpy())

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised CLIP text embeddings ``(N, D)`` (prompts truncated to the model's context)."""
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        with torch.inference_mode():
            pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                           attention_mask=tokens.get("attention_mask")).pooler_output  # (N, H)
            embeds = self.model.text_projection(pooled)  # (N, D)
        return l2_normalize(embeds.float().cpu().numpy())


class DinoScorer:
    """Self-supervised ViT CLS embeddings for the DINO score (DINO, Caron et al. 2021)."""

    def __init__(self, model: Any, *, image_size: int | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        """Wrap a transformers ``ViTModel`` (or ``Dinov2Model``); the embedding is the final CLS token."""
        self.model = model.eval().requires_grad_(False)
        self.image_size = int(image_size or model.config.image_size)
        self.mean, self.std = tuple(mean), tuple(std)

    @classmethod
    def from_pretrained(cls, id_or_dir: str | os.PathLike[str] = DEFAULT_DINO_MODEL, *,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        local_files_only: bool | None = None) -> DinoScorer:
        """Load a DINO ViT (``vit`` or ``dinov2`` model type) from a hub id or folder."""
        from transformers import AutoModel

        source = str(id_or_dir)
        kind = _model_type(source, "DINO model", _hub(local_files_only))
        if kind not in ("vit", "dinov2"):
            raise LookalikeError(f"--dino-model {source} holds a {kind or 'unknown'} model, not a ViT; pass e.g. "
                                 f"{DEFAULT_DINO_MODEL}")
        extra = {"add_pooling_layer": False} if kind == "vit" else {}
        try:
            model = AutoModel.from_pretrained(source, **extra, **transformers_dtype(dtype), **_hub(local_files_only))
        except (OSError, ValueError) as exc:
            raise LookalikeError(f"cannot load the DINO model {source!r}: {_first_line(exc)}; pass a saved ViT "
                                 f"folder or hub id") from exc
        size, mean, std = _pixel_settings(source, model.config.image_size, IMAGENET_MEAN, IMAGENET_STD,
                                          local_files_only)
        return cls(model.to(device), image_size=size, mean=mean, std=std)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Normalised CLS embeddings ``(N, D)`` (after the final layer norm, as DINO's own output)."""
        param = next(self.model.parameters())
        pixels = to_clip_pixels(list(images), self.image_size, self.mean, self.std).to(param)  # (N, 3, S, S)
        with torch.inference_mode():
            cls_token = self.model(pixel_values=pixels).last_hidden_state[:, 0]  # (N, D)
        return l2_normalize(cls_token.float().cpu().numpy())


class FaceScorer:
    """ArcFace identity embeddings of the largest face in each image (ArcFace, Deng et al. 2019)."""

    def __init__(self, encoder: Any) -> None:
        """Wrap a lookalike ``FaceEncoder`` (anything with ``detect_and_align`` giving faces)."""
        self.encoder = encoder

    @classmethod
    def from_pretrained(cls, id_or_dir: str | os.PathLike[str] = DEFAULT_FACE_MODEL, *,
                        detector: str = "insightface", yunet_model: str | os.PathLike[str] | None = None,
                        providers: Sequence[Any] | None = None) -> FaceScorer:
        """An insightface pack: a folder, or a pack name under ``~/.insightface/models`` (default buffalo_l)."""
        from ..encoders.face import FaceEncoder

        local = Path(id_or_dir).expanduser()
        if local.is_dir():
            encoder = FaceEncoder.from_folder(local, name=local.name, detector=detector,  # type: ignore[arg-type]
                                              yunet_model=yunet_model, providers=providers)
        else:
            encoder = FaceEncoder.from_folder(name=str(id_or_dir), detector=detector,  # type: ignore[arg-type]
                                              yunet_model=yunet_model, providers=providers)
        return cls(encoder)

    def embed_images(self, images: Sequence[Image.Image]) -> list[np.ndarray | None]:
        """One normalised embedding per image (its largest face), None where no face is found."""
        out: list[np.ndarray | None] = []
        for image in images:
            faces = self.encoder.detect_and_align(image)
            if not faces:
                out.append(None)
                continue
            largest = max(faces, key=lambda f: f.area)
            out.append(l2_normalize(np.asarray(largest.normed_embedding, dtype=np.float64)))
        return out


@dataclass
class Scorers:
    """The metric models of one run (None where a metric is not computed)."""

    clip: ClipScorer | None = None
    dino: DinoScorer | None = None
    face: FaceScorer | None = None

    def check(self, metrics: Sequence[str]) -> None:
        """Refuse metrics whose model is missing."""
        need = {"clip_i": self.clip, "clip_t": self.clip, "dino": self.dino, "face": self.face}
        for metric in metrics:
            if metric not in need:
                raise LookalikeError(f"unknown metric {metric!r}; use clip_i, clip_t, dino or face")
            if need[metric] is None:
                raise LookalikeError(f"the metric {metric} needs its model, which was not loaded; pass it in scorers")


def load_scorers(metrics: Sequence[str], *, clip_model: str = DEFAULT_CLIP_MODEL,
                 dino_model: str = DEFAULT_DINO_MODEL, face_model: str = DEFAULT_FACE_MODEL,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 face_detector: str = "insightface", yunet_model: str | None = None,
                 local_files_only: bool | None = None) -> Scorers:
    """Load the models the metrics need, each once."""
    scorers = Scorers()
    if {"clip_i", "clip_t"} & set(metrics):
        scorers.clip = ClipScorer.from_pretrained(clip_model, device=device, dtype=dtype,
                                                  local_files_only=local_files_only)
    if "dino" in metrics:
        scorers.dino = DinoScorer.from_pretrained(dino_model, device=device, dtype=dtype,
                                                  local_files_only=local_files_only)
    if "face" in metrics:
        scorers.face = FaceScorer.from_pretrained(face_model, detector=face_detector, yunet_model=yunet_model)
    scorers.check(metrics)
    return scorers


def default_metric_models(metrics: Sequence[str]) -> dict[str, str]:
    """The conventional model of each metric (for labelling a run)."""
    models = {"clip_i": DEFAULT_CLIP_MODEL, "clip_t": DEFAULT_CLIP_MODEL, "dino": DEFAULT_DINO_MODEL,
              "face": DEFAULT_FACE_MODEL}
    return {m: models[m] for m in metrics}


@dataclass
class References:
    """A subject's reference embeddings, per metric model."""

    clip: np.ndarray | None = None  # (M, D)
    dino: np.ndarray | None = None  # (M, D)
    face: np.ndarray | None = None  # (F, 512), references where a face was found


def embed_references(images: Sequence[Image.Image], scorers: Scorers, metrics: Sequence[str],
                     subject: str = "the subject") -> References:
    """Embed a subject's reference images once for every metric that needs them."""
    refs = References()
    if "clip_i" in metrics and scorers.clip is not None:
        refs.clip = scorers.clip.embed_images(images)
    if "dino" in metrics and scorers.dino is not None:
        refs.dino = scorers.dino.embed_images(images)
    if "face" in metrics and scorers.face is not None:
        faces = [f for f in scorers.face.embed_images(images) if f is not None]
        if not faces:
            raise LookalikeError(f"no face was found in any reference image of {subject}; leave out the face "
                                 f"metric or use photos where the face is clearly visible")
        refs.face = np.stack(faces)
    return refs


def score_images(images: Sequence[Image.Image], prompts: Sequence[str], refs: References, scorers: Scorers,
                 metrics: Sequence[str]) -> list[dict[str, float | None]]:
    """The metrics of generated images: one dict per image (``face`` None where no face was found)."""
    rows: list[dict[str, float | None]] = [{} for _ in images]
    columns: dict[str, Sequence[float | None]] = {}
    if scorers.clip is not None and {"clip_i", "clip_t"} & set(metrics):
        gen = scorers.clip.embed_images(images)
        if "clip_i" in metrics:
            columns["clip_i"] = mean_cosine_to_references(gen, refs.clip).tolist()
        if "clip_t" in metrics:
            columns["clip_t"] = paired_cosine(gen, scorers.clip.embed_texts(prompts)).tolist()
    if "dino" in metrics and scorers.dino is not None:
        columns["dino"] = mean_cosine_to_references(scorers.dino.embed_images(images), refs.dino).tolist()
    if "face" in metrics and scorers.face is not None:
        faces = scorers.face.embed_images(images)
        columns["face"] = [None if f is None else float(mean_cosine_to_references(f, refs.face)[0]) for f in faces]
    for metric in metrics:
        for row, value in zip(rows, columns[metric]):
            row[metric] = None if value is None else float(value)
    return rows


def load_references(paths: Sequence[Path]) -> list[Image.Image]:
    """The reference images as upright RGB."""
    return [load_image(p) for p in paths]

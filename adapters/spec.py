"""Adapter variants as data: one ``AdapterSpec`` per official (and own) checkpoint kind.

A new variant is a new registry entry; code is only added for a genuinely new projector or feature.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

from ..errors import LookalikeError

Base = Literal["sd15", "sdxl", "flux", "sd3"]
#: Base models whose denoiser is a transformer (DiT) rather than a UNet.
DIT_BASES = ("flux", "sd3")
#: Feature kinds an encoder produces: CLIP pooled embedding, CLIP penultimate patch tokens, ArcFace id.
FEATURE_KINDS = ("pooled", "patch", "face_id")
#: The official unconditional input of each feature: zeros, or the encoder run on an all-zero pixel tensor.
NEGATIVE_RULE = {"pooled": "zeros", "face_id": "zeros", "patch": "encode_zeros"}


@dataclass(frozen=True)
class EncoderSpec:
    """Where an image encoder lives and what it gives: widths of its pooled and patch features."""

    name: str
    kind: Literal["clip", "face", "siglip"]
    repo_id: str | None
    subfolder: str | None
    pooled_dim: int = 0
    patch_dim: int = 0
    num_patch_tokens: int = 0


ENCODERS: dict[str, EncoderSpec] = {
    "clip-vit-h-14": EncoderSpec(
        "clip-vit-h-14", "clip", "h94/IP-Adapter", "models/image_encoder", 1024, 1280, 257
    ),
    "clip-vit-bigg-14": EncoderSpec(
        "clip-vit-bigg-14", "clip", "h94/IP-Adapter", "sdxl_models/image_encoder", 1280, 1664, 257
    ),
    "insightface-buffalo_l": EncoderSpec("insightface-buffalo_l", "face", None, None, 512, 0, 0),
    "insightface-antelopev2": EncoderSpec("insightface-antelopev2", "face", None, None, 512, 0, 0),
    "clip-vit-l-14": EncoderSpec("clip-vit-l-14", "clip", "openai/clip-vit-large-patch14", None, 768, 1024, 257),
    #: Kolors IP-Adapter-Plus's encoder, OpenAI CLIP ViT-L/14 at 336 px (24 x 24 patches + class token).
    "clip-vit-l-14-336": EncoderSpec(
        "clip-vit-l-14-336", "clip", "Kwai-Kolors/Kolors-IP-Adapter-Plus", "image_encoder", 768, 1024, 577
    ),
    "siglip-so400m-14-384": EncoderSpec(
        "siglip-so400m-14-384", "siglip", "google/siglip-so400m-patch14-384", None, 1152, 1152, 729
    ),
}


@dataclass(frozen=True)
class AdapterSpec:
    """Everything needed to build, load, check and run one adapter variant.

    ``features`` are the encoder outputs the projector eats, in order (``("face_id", "patch")`` for
    FaceID-Plus). ``embed_dim`` is the width of the first feature and ``clip_dim`` the width of CLIP
    patch tokens where a second feature is used. The unconditional input follows from the features
    (:data:`NEGATIVE_RULE`) unless ``negative`` names a rule for every feature (SD3.5's is ``"zeros"``).

    DiT variants name the attention ``blocks`` that get image attention (``"flux_double"``,
    ``"flux_single"``, ``"sd3_joint"``; empty: a UNet's cross-attention layers) and whether the image
    key/value projections carry a bias (``ip_bias``, as XLabs' FLUX adapters do); ``flavor`` says where the
    image term enters a block, after the published code (``"xlabs"`` or ``"instantx"``; see
    :mod:`.dit_attention`).
    """

    name: str
    base: Base
    projector: str
    features: tuple[str, ...]
    encoder: str
    num_tokens: int
    embed_dim: int
    cross_attention_dim: int
    projector_kwargs: dict[str, Any] = field(default_factory=dict)
    repo_id: str | None = None
    subfolder: str | None = None
    filename: str | None = None
    lora_rank: int = 0
    shortcut: bool = False
    face_normed: bool = True
    short_name: str | None = None
    description: str = ""
    controlnet_subfolder: str | None = None  # InstantID: the IdentityNet ControlNet beside the adapter file
    default_scale: float = 1.0  # the adapter's scale when generate() is given none (the authors' default)
    blocks: tuple[str, ...] = ()
    ip_bias: bool = False
    negative: str = ""
    flavor: str = ""

    @property
    def feature(self) -> str:
        """The spec's features as one string, e.g. ``"face_id+patch"``."""
        return "+".join(self.features)

    def to_json(self) -> str:
        """Serialise for safetensors metadata."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "the metadata") -> AdapterSpec:
        """Inverse of :meth:`to_json`, checked against :data:`SPEC_SCHEMA` (types and ranges) before use;
        unknown fields from newer versions are ignored. ``source`` names where the text came from."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError, TypeError):
            raise LookalikeError(f"the adapter spec in {source} is not JSON; the file is damaged or was edited: "
                                 f"re-create it, or pass the variant explicitly (spec=, --adapter NAME)") from None
        if not isinstance(data, dict):
            raise LookalikeError(f"the adapter spec in {source} is not a JSON object; the file is damaged or was "
                                 f"edited")
        known = {f for f in cls.__dataclass_fields__}
        data = {k: v for k, v in data.items() if k in known}
        problem = spec_problem(data)
        if problem:
            raise LookalikeError(f"the adapter spec in {source} is invalid: {problem}; the file is damaged or was "
                                 f"edited: re-create it, or pass the variant explicitly (spec=, --adapter NAME)")
        data["features"] = tuple(data["features"])
        data["blocks"] = tuple(data.get("blocks", ()))
        return cls(**data)

    def negative_rule(self, feature: str) -> str:
        """How the unconditional input of ``feature`` is made: ``"zeros"`` or ``"encode_zeros"``."""
        return self.negative or NEGATIVE_RULE[feature]

    def with_(self, **changes: Any) -> AdapterSpec:
        """A copy with some fields changed."""
        return replace(self, **changes)


#: Largest sizes a spec may name (well above every official variant; a file claiming more is damaged).
MAX_TOKENS = 4096
MAX_WIDTH = 16384
MAX_KWARG = 16384
MAX_LORA_RANK = 4096
#: The features each projector reads (a spec naming others would fail at the first generation).
PROJECTOR_FEATURES: dict[str, tuple[str, ...]] = {
    "linear": ("pooled",), "resampler": ("patch",), "mlp": ("patch",), "faceid": ("face_id",),
    "faceid_plus": ("face_id", "patch"),
}


def _int_in(low: int, high: int) -> Any:
    return lambda v: type(v) is int and low <= v <= high


def _optional_str(v: Any) -> bool:
    return v is None or (isinstance(v, str) and len(v) <= 1000)


#: Field -> (check, what it must be): the schema of a spec read from a file.
SPEC_SCHEMA: dict[str, tuple[Any, str]] = {
    "name": (lambda v: isinstance(v, str) and 0 < len(v) <= 200, "a name of 1 to 200 characters"),
    "base": (lambda v: v in get_args(Base), f"one of {list(get_args(Base))}"),
    "projector": (lambda v: isinstance(v, str) and 0 < len(v) <= 100, "a projector name"),
    "features": (lambda v: isinstance(v, (list, tuple)) and 0 < len(v) <= len(FEATURE_KINDS)
                 and len(set(v)) == len(v) and all(f in FEATURE_KINDS for f in v),
                 f"a list of distinct feature kinds from {list(FEATURE_KINDS)}"),
    "encoder": (lambda v: isinstance(v, str) and all(n in ENCODERS for n in v.split("+")),
                f"encoder names from {list(ENCODERS)} joined by '+'"),
    "num_tokens": (_int_in(1, MAX_TOKENS), f"a whole number from 1 to {MAX_TOKENS}"),
    "embed_dim": (_int_in(1, MAX_WIDTH), f"a whole number from 1 to {MAX_WIDTH}"),
    "cross_attention_dim": (_int_in(1, MAX_WIDTH), f"a whole number from 1 to {MAX_WIDTH}"),
    "projector_kwargs": (lambda v: isinstance(v, dict) and len(v) <= 32 and all(
        isinstance(k, str) and type(x) in (int, float, bool) and 0 <= x <= MAX_KWARG for k, x in v.items()),
        f"a mapping of names to numbers from 0 to {MAX_KWARG} or flags"),
    "repo_id": (_optional_str, "a string or null"),
    "subfolder": (_optional_str, "a string or null"),
    "filename": (_optional_str, "a string or null"),
    "short_name": (_optional_str, "a string or null"),
    "description": (lambda v: isinstance(v, str) and len(v) <= 10_000, "a string"),
    "lora_rank": (_int_in(0, MAX_LORA_RANK), f"a whole number from 0 to {MAX_LORA_RANK}"),
    "shortcut": (lambda v: type(v) is bool, "true or false"),
    "face_normed": (lambda v: type(v) is bool, "true or false"),
}
REQUIRED_FIELDS = ("name", "base", "projector", "features", "encoder", "num_tokens", "embed_dim",
                   "cross_attention_dim")


def spec_problem(data: dict[str, Any]) -> str | None:
    """The first way ``data`` (a spec's fields, as read from JSON) breaks :data:`SPEC_SCHEMA`, or None."""
    missing = [k for k in REQUIRED_FIELDS if k not in data]
    if missing:
        return f"it lacks the field {missing[0]!r}"
    for key, value in data.items():
        check, what = SPEC_SCHEMA.get(key, (lambda v: True, ""))
        if not check(value):
            shown = repr(value)
            return f"{key} is {shown[:60] + '...' if len(shown) > 60 else shown}, not {what}"
    wanted = PROJECTOR_FEATURES.get(data["projector"])
    if wanted is not None and tuple(data["features"]) != wanted:
        return f"the {data['projector']} projector reads {list(wanted)} features, not {list(data['features'])}"
    return None


REGISTRY: dict[str, AdapterSpec] = {}


def register(spec: AdapterSpec) -> AdapterSpec:
    """Add a variant to the registry (names are unique)."""
    if spec.name in REGISTRY:
        raise LookalikeError(f"an adapter named {spec.name!r} is already registered; pick another name")
    REGISTRY[spec.name] = spec
    return spec


_CROSS = {"sd15": 768, "sdxl": 2048}


def _resampler(base: Base, dim: int, heads: int) -> dict[str, Any]:
    return {"dim": dim, "depth": 4, "dim_head": 64, "heads": heads, "ff_mult": 4}


def _clip_variant(
    name: str, short: str, base: Base, projector: str, feature: str, encoder: str, tokens: int,
    subfolder: str, filename: str, kwargs: dict[str, Any] | None = None, description: str = "",
) -> AdapterSpec:
    enc = ENCODERS[encoder]
    embed = enc.pooled_dim if feature == "pooled" else enc.patch_dim
    return AdapterSpec(
        name=name, base=base, projector=projector, features=(feature,), encoder=encoder,
        num_tokens=tokens, embed_dim=embed, cross_attention_dim=_CROSS[base],
        projector_kwargs=kwargs or {},
        repo_id="h94/IP-Adapter", subfolder=subfolder, filename=filename, short_name=short,
        description=description,
    )


def _faceid_variant(
    name: str, short: str, base: Base, projector: str, tokens: int, filename: str,
    lora_rank: int = 0, shortcut: bool = False, face_normed: bool = True, description: str = "",
) -> AdapterSpec:
    plus = projector == "faceid_plus"
    kwargs: dict[str, Any] = {"mult": 2}
    if plus:
        cross = _CROSS[base]
        clip_dim = ENCODERS["clip-vit-h-14"].patch_dim
        kwargs.update({"depth": 4, "dim_head": 64, "heads": cross // 64, "ff_mult": 4, "clip_dim": clip_dim})
    return AdapterSpec(
        name=name, base=base, projector=projector,
        features=("face_id", "patch") if plus else ("face_id",),
        encoder="insightface-buffalo_l+clip-vit-h-14" if plus else "insightface-buffalo_l",
        num_tokens=tokens, embed_dim=512, cross_attention_dim=_CROSS[base], projector_kwargs=kwargs,
        repo_id="h94/IP-Adapter-FaceID", subfolder=None, filename=filename,
        lora_rank=lora_rank, shortcut=shortcut, face_normed=face_normed, short_name=short,
        description=description,
    )


def _register_official() -> None:
    plus15 = _resampler("sd15", 768, 12)
    plusxl = _resampler("sdxl", 1280, 20)
    for spec in (
        _clip_variant("ip-adapter_sd15", "basic", "sd15", "linear", "pooled", "clip-vit-h-14", 4,
                      "models", "ip-adapter_sd15.safetensors", description="pooled CLIP ViT-H -> 4 tokens"),
        _clip_variant("ip-adapter_sd15_light_v11", "light", "sd15", "linear", "pooled", "clip-vit-h-14", 4,
                      "models", "ip-adapter_sd15_light_v11.bin", description="lighter image weight, more text"),
        _clip_variant("ip-adapter-plus_sd15", "plus", "sd15", "resampler", "patch", "clip-vit-h-14", 16,
                      "models", "ip-adapter-plus_sd15.safetensors", plus15, "Resampler over ViT-H patches"),
        _clip_variant("ip-adapter-plus-face_sd15", "plus-face", "sd15", "resampler", "patch", "clip-vit-h-14",
                      16, "models", "ip-adapter-plus-face_sd15.safetensors", plus15, "plus, trained on faces"),
        _clip_variant("ip-adapter-full-face_sd15", "full-face", "sd15", "mlp", "patch", "clip-vit-h-14", 257,
                      "models", "ip-adapter-full-face_sd15.safetensors", description="MLP over all 257 tokens"),
        _clip_variant("ip-adapter_sd15_vit-G", "vit-G", "sd15", "linear", "pooled", "clip-vit-bigg-14", 4,
                      "models", "ip-adapter_sd15_vit-G.safetensors", description="basic with the bigG encoder"),
        _clip_variant("ip-adapter_sdxl", "basic", "sdxl", "linear", "pooled", "clip-vit-bigg-14", 4,
                      "sdxl_models", "ip-adapter_sdxl.safetensors", description="pooled CLIP bigG -> 4 tokens"),
        _clip_variant("ip-adapter_sdxl_vit-h", "vit-h", "sdxl", "linear", "pooled", "clip-vit-h-14", 4,
                      "sdxl_models", "ip-adapter_sdxl_vit-h.safetensors", description="basic with ViT-H"),
        _clip_variant("ip-adapter-plus_sdxl_vit-h", "plus", "sdxl", "resampler", "patch", "clip-vit-h-14", 16,
                      "sdxl_models", "ip-adapter-plus_sdxl_vit-h.safetensors", plusxl, "Resampler, ViT-H"),
        _clip_variant("ip-adapter-plus-face_sdxl_vit-h", "plus-face", "sdxl", "resampler", "patch",
                      "clip-vit-h-14", 16, "sdxl_models", "ip-adapter-plus-face_sdxl_vit-h.safetensors", plusxl,
                      "plus, trained on faces"),
        _faceid_variant("ip-adapter-faceid_sd15", "faceid", "sd15", "faceid", 4, "ip-adapter-faceid_sd15.bin",
                        lora_rank=128, description="ArcFace id -> 4 tokens, with LoRA"),
        _faceid_variant("ip-adapter-faceid-plus_sd15", "faceid-plus", "sd15", "faceid_plus", 4,
                        "ip-adapter-faceid-plus_sd15.bin", lora_rank=128,
                        description="ArcFace id + CLIP on the aligned face"),
        _faceid_variant("ip-adapter-faceid-plusv2_sd15", "faceid-plusv2", "sd15", "faceid_plus", 4,
                        "ip-adapter-faceid-plusv2_sd15.bin", lora_rank=128, shortcut=True,
                        description="FaceID-Plus with the id shortcut (s_scale)"),
        _faceid_variant("ip-adapter-faceid-portrait_sd15", "faceid-portrait", "sd15", "faceid", 16,
                        "ip-adapter-faceid-portrait_sd15.bin", description="16 tokens per face, several faces"),
        _faceid_variant("ip-adapter-faceid-portrait-v11_sd15", "faceid-portrait-v11", "sd15", "faceid", 16,
                        "ip-adapter-faceid-portrait-v11_sd15.bin", description="portrait, v1.1"),
        _faceid_variant("ip-adapter-faceid_sdxl", "faceid", "sdxl", "faceid", 4, "ip-adapter-faceid_sdxl.bin",
                        lora_rank=128, description="ArcFace id -> 4 tokens, with LoRA"),
        _faceid_variant("ip-adapter-faceid-plusv2_sdxl", "faceid-plusv2", "sdxl", "faceid_plus", 4,
                        "ip-adapter-faceid-plusv2_sdxl.bin", lora_rank=128, shortcut=True,
                        description="FaceID-Plus v2 for SDXL"),
        _faceid_variant("ip-adapter-faceid-portrait_sdxl", "faceid-portrait", "sdxl", "faceid", 16,
                        "ip-adapter-faceid-portrait_sdxl.bin", description="16 tokens per face"),
        _faceid_variant("ip-adapter-faceid-portrait_sdxl_unnorm", "faceid-portrait-unnorm", "sdxl", "faceid", 16,
                        "ip-adapter-faceid-portrait_sdxl_unnorm.bin", face_normed=False,
                        description="portrait on the unnormalised ArcFace embedding"),
    ):
        register(spec)


_register_official()
#: InstantID (Wang et al. 2024, arXiv:2401.07519): a Resampler over the raw antelopev2 ArcFace embedding (one
#: 512-d token -> 16 x 2048) plus IdentityNet, a ControlNet on the 5 keypoints that reads the face tokens.
register(AdapterSpec(
    name="instantid", base="sdxl", projector="id_resampler", features=("face_id",), encoder="insightface-antelopev2",
    num_tokens=16, embed_dim=512, cross_attention_dim=2048, projector_kwargs=_resampler("sdxl", 1280, 20),
    repo_id="InstantX/InstantID", subfolder=None, filename="ip-adapter.bin", face_normed=False,
    short_name="instantid", controlnet_subfolder="ControlNetModel", default_scale=0.8,
    description="ArcFace id -> 16 tokens, with IdentityNet on the face keypoints",
))

#: Kolors IP-Adapter-Plus (Kwai-Kolors): IP-Adapter's Plus layout on Kolors' SDXL-shaped UNet (70 cross-attention
#: layers of width 2048, the ChatGLM prompt projected to 2048 by the UNet's own encoder_hid_proj), read as the
#: authors' sample_ipadapter_plus.py reads it (diffusers' load_ip_adapter on KolorsPipeline, scale 0.5). The
#: Resampler is IP-Adapter's SD1.5 recipe at Kolors' width: dim = cross-attention width (2048), 12 heads of 64.
register(AdapterSpec(
    name="kolors-ip-plus", base="sdxl", projector="resampler", features=("patch",), encoder="clip-vit-l-14-336",
    num_tokens=16, embed_dim=1024, cross_attention_dim=2048, projector_kwargs=_resampler("sdxl", 2048, 12),
    repo_id="Kwai-Kolors/Kolors-IP-Adapter-Plus", subfolder=None, filename="ip_adapter_plus_general.bin",
    short_name="kolors-plus", default_scale=0.5,
    description="Kolors only: Resampler over CLIP ViT-L/14-336 patches, 16 tokens (needs KolorsPipeline)",
))


def _register_dit() -> None:
    """FLUX.1 and SD3.5 adapters, read as diffusers' loaders (and InstantX's published code) read them."""
    for spec in (
        AdapterSpec("flux-ip", "flux", "linear", ("pooled",), "clip-vit-l-14", 4, 768, 4096,
                    repo_id="XLabs-AI/flux-ip-adapter", filename="ip_adapter.safetensors", short_name="basic",
                    blocks=("flux_double",), ip_bias=True, flavor="xlabs",
                    description="XLabs: pooled CLIP ViT-L/14 -> 4 tokens, 19 double-stream blocks"),
        AdapterSpec("flux-ip-v2", "flux", "linear", ("pooled",), "clip-vit-l-14", 16, 768, 4096,
                    repo_id="XLabs-AI/flux-ip-adapter-v2", filename="ip_adapter.safetensors", short_name="v2",
                    blocks=("flux_double",), ip_bias=True, flavor="xlabs",
                    description="XLabs v2: pooled CLIP ViT-L/14 -> 16 tokens, 19 double-stream blocks"),
        AdapterSpec("flux-ip-instantx", "flux", "flux_mlp", ("pooled",), "siglip-so400m-14-384", 128, 1152, 4096,
                    {"mult": 2}, repo_id="InstantX/FLUX.1-dev-IP-Adapter", filename="ip-adapter.bin",
                    short_name="instantx", blocks=("flux_double", "flux_single"), flavor="instantx",
                    description="InstantX: pooled SigLIP so400m -> MLP -> 128 tokens, all 57 blocks"),
        AdapterSpec("sd35-ip", "sd3", "time_resampler", ("patch",), "siglip-so400m-14-384", 64, 1152, 2432,
                    {"dim": 1280, "depth": 4, "dim_head": 64, "heads": 20, "ff_mult": 4, "timestep_in_dim": 320,
                     "timestep_flip_sin_to_cos": True, "timestep_freq_shift": 0},
                    repo_id="InstantX/SD3.5-Large-IP-Adapter", filename="ip-adapter.bin", short_name="ip",
                    blocks=("sd3_joint",), negative="zeros", flavor="instantx",
                    description="InstantX: SigLIP so400m tokens -> timestep-conditioned resampler, 64 tokens"),
    ):
        register(spec)


_register_dit()


def get_spec(name: str, base: Base | None = None) -> AdapterSpec:
    """Look a variant up by full name (``ip-adapter-plus_sd15``) or short name and base (``plus``, sd15)."""
    if name in REGISTRY:
        return REGISTRY[name]
    matches = [s for s in REGISTRY.values() if s.short_name == name and (base is None or s.base == base)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        bases = ", ".join(sorted(s.base for s in matches))
        raise LookalikeError(f"adapter {name!r} exists for several base models ({bases}); name the base model")
    known = ", ".join(sorted(REGISTRY))
    raise LookalikeError(f"unknown adapter {name!r}; known adapters: {known}")


def spec_names(base: Base | None = None) -> list[str]:
    """Registry names, optionally for one base family; feeds argparse ``choices``."""
    return sorted(n for n, s in REGISTRY.items() if base is None or s.base == base)


def encoder_of(spec: AdapterSpec) -> list[EncoderSpec]:
    """The encoder(s) a spec needs, in feature order."""
    return [ENCODERS[n] for n in spec.encoder.split("+")]

"""One loaded adapter: its projector and its per-layer decoupled key/value projections.

``IPAdapter.state_dict()`` is exactly the official flat layout (``image_proj.*``, ``ip_adapter.{i}.*``),
so reading and writing official checkpoints needs no key renaming.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CheckpointMismatchError
from .projectors import Features, build_projector
from .spec import AdapterSpec


@dataclass(frozen=True)
class AttnLayer:
    """An attention layer of a UNet or DiT: official index (position in ``model.attn_processors``) and sizes.

    ``family`` is the processor family: ``"unet"`` (cross/self-attention), ``"flux_double"``,
    ``"flux_single"`` or ``"sd3_joint"``. DiT layers attend jointly over text and image tokens, so all of
    them count as ``is_cross`` (they may take image attention); ``context_dim`` is then the width image
    tokens come in (FLUX: the T5 width its adapters project to; SD3: the block width).
    """

    index: int
    name: str  # processor name, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"
    hidden: int  # width of the layer's keys/values (attn.to_k.out_features)
    context_dim: int  # width of what keys are computed from (attn.to_k.in_features)
    is_cross: bool
    family: str = "unet"
    heads: int = 0


def _same_features(a: Features, b: Features) -> bool:
    """Equal keys, and equal tensors (shape, dtype, device and values)."""
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and a[k].device == b[k].device
        and torch.equal(a[k], b[k]) for k in a)


def _version(t: torch.Tensor) -> int | None:
    """The tensor's version counter (bumped by in-place edits); None for inference tensors, which have none."""
    return None if t.is_inference() else t._version


def model_family(model: nn.Module) -> str:
    """``"unet"``, ``"flux"`` or ``"sd3"``: which denoiser ``model`` is (read from its modules)."""
    if hasattr(model, "single_transformer_blocks"):
        return "flux"
    if hasattr(model, "transformer_blocks") and hasattr(model, "context_embedder") and hasattr(model, "pos_embed"):
        return "sd3"
    return "unet"


def attention_layers(model: nn.Module) -> list[AttnLayer]:
    """Every attention layer of a diffusers UNet or FLUX/SD3 transformer, sizes read from the modules."""
    family = model_family(model)
    layers = []
    for index, name in enumerate(model.attn_processors):
        attn = model.get_submodule(name.removesuffix(".processor"))
        hidden = attn.to_k.out_features
        if family == "unet":
            is_cross = bool(getattr(attn, "is_cross_attention", False)) and "motion_modules" not in name
            layers.append(AttnLayer(index, name, hidden, attn.to_k.in_features, is_cross, "unet", attn.heads))
        elif family == "flux":
            kind = "flux_single" if name.startswith("single_transformer_blocks.") else "flux_double"
            layers.append(AttnLayer(index, name, hidden, model.context_embedder.in_features, True, kind, attn.heads))
        else:
            layers.append(AttnLayer(index, name, hidden, hidden, True, "sd3_joint", attn.heads))
    return layers


def takes_image(spec: AdapterSpec, layer: AttnLayer) -> bool:
    """Whether ``spec`` adds image attention at ``layer`` (UNet: cross-attention; DiT: its named blocks)."""
    return layer.is_cross and (layer.family in spec.blocks if spec.blocks else layer.family == "unet")


class LoRALinear(nn.Module):
    """Low-rank residual ``up(down(x))`` (Hu et al. 2021), as FaceID checkpoints store it."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype)))


class IPLayer(nn.Module):
    """What one adapter adds to one attention layer: ``to_k_ip``/``to_v_ip`` and/or a LoRA."""

    def __init__(self, layer: AttnLayer, cross_attention_dim: int, ip: bool, lora_rank: int,
                 bias: bool = False, norm_kv: bool = False) -> None:
        super().__init__()
        self.norm_kv = norm_kv  # RMS-normalise image keys and values per head (InstantX FLUX)
        if ip:
            self.to_k_ip = nn.Linear(cross_attention_dim, layer.hidden, bias=bias)
            self.to_v_ip = nn.Linear(cross_attention_dim, layer.hidden, bias=bias)
        if lora_rank:
            h, c = layer.hidden, layer.context_dim
            self.to_q_lora = LoRALinear(h, h, lora_rank)
            self.to_k_lora = LoRALinear(c, h, lora_rank)
            self.to_v_lora = LoRALinear(c, h, lora_rank)
            self.to_out_lora = LoRALinear(h, h, lora_rank)

    @property
    def has_ip(self) -> bool:
        return hasattr(self, "to_k_ip")

    @property
    def has_lora(self) -> bool:
        return hasattr(self, "to_q_lora")


def make_ip_layer(spec: AdapterSpec, layer: AttnLayer, ip: bool, lora_rank: int) -> nn.Module:
    """The per-layer module of ``spec`` at ``layer``: an :class:`IPLayer`, or SD3.5's with its norms."""
    if ip and layer.family == "sd3_joint":
        from .dit_layers import SD3IPLayer

        return SD3IPLayer(layer, spec.cross_attention_dim, spec.projector_kwargs.get("dim", 1280))
    return IPLayer(layer, spec.cross_attention_dim, ip, lora_rank, bias=spec.ip_bias,
                   norm_kv=spec.flavor == "instantx")


class IPAdapter(nn.Module):
    """An adapter for one UNet: ``image_proj`` (features -> tokens) and ``ip_adapter[str(i)]`` per layer."""

    def __init__(self, spec: AdapterSpec, layers: list[AttnLayer], *, lora: bool | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.lora_scale = 1.0
        use_lora = bool(spec.lora_rank) if lora is None else lora
        self.image_proj = build_projector(spec)
        image = [layer for layer in layers if takes_image(spec, layer)]
        if not image:
            raise CheckpointMismatchError(f"{spec.name} is for {spec.base} models; this model has none of the "
                                          f"attention layers it attaches to; pick an adapter for this base model")
        for layer in image:
            if layer.context_dim != spec.cross_attention_dim:
                raise CheckpointMismatchError(
                    f"{spec.name} makes {spec.cross_attention_dim}-d image tokens but the model's attention "
                    f"takes {layer.context_dim}-d context (layer {layer.name}); pick an adapter for this base model"
                )
        self.ip_adapter = nn.ModuleDict()
        for layer in layers:
            ip = takes_image(spec, layer)
            if ip or (use_lora and layer.family == "unet"):
                rank = spec.lora_rank if use_lora else 0
                self.ip_adapter[str(layer.index)] = make_ip_layer(spec, layer, ip, rank)
        self.to(device=device, dtype=dtype)

    @classmethod
    def for_unet(cls, spec: AdapterSpec, unet: nn.Module, **kwargs) -> IPAdapter:
        """Build (random weights) an adapter whose layers match ``unet`` (a UNet or a FLUX/SD3 transformer)."""
        return cls(spec, attention_layers(unet), **kwargs)

    for_model = for_unet

    @property
    def has_lora(self) -> bool:
        return any(layer.has_lora for layer in self.ip_adapter.values())

    def layer(self, index: int) -> IPLayer | None:
        """This adapter's weights for attention layer ``index``, if any."""
        return self.ip_adapter[str(index)] if str(index) in self.ip_adapter else None

    def init_from_unet(self, unet: nn.Module) -> None:
        """Start ``to_k_ip``/``to_v_ip`` as copies of the text ``to_k``/``to_v`` (the official recipe)."""
        names = list(unet.attn_processors)
        with torch.no_grad():
            for key, layer in self.ip_adapter.items():
                if layer.has_ip:
                    attn = unet.get_submodule(names[int(key)].removesuffix(".processor"))
                    layer.to_k_ip.weight.copy_(attn.to_k.weight)
                    layer.to_v_ip.weight.copy_(attn.to_v.weight)

    def project(self, features: Features) -> torch.Tensor:
        """Features with a leading (batch, images) pair -> tokens ``(B, I, T, C)``."""
        first = features[self.spec.features[0]]
        b, i = first.shape[:2]
        flat = {k: v.reshape((b * i,) + tuple(v.shape[2:])) for k, v in features.items()}
        tokens = self.image_proj(flat)  # (B*I, T, C)
        return tokens.reshape((b, i) + tuple(tokens.shape[1:]))

    PROJECTED_KEPT = 4  # remembered projections: the negative, and a few subjects

    def project_once(self, features: Features) -> torch.Tensor:
        """:meth:`project`, remembering the last few results while the projector's weights are unchanged.

        The unconditional input of guidance is the same for every generation (zeros, or the encoder on a
        blank image), and a subject used again has the same features: those are projected once. Weights are
        "unchanged" while every parameter keeps its storage, dtype, device and version counter (in-place
        updates, ``load_state_dict`` and optimizer steps bump it; ``.to()`` clears the memory). Nothing is
        remembered while gradients are recorded.
        """
        if torch.is_grad_enabled():
            return self.project(features)
        state = self._weights_state()
        memory = self.__dict__.setdefault("_projected", [])
        for entry_state, entry_features, tokens, version in memory:
            if entry_state == state and _same_features(entry_features, features) and _version(tokens) == version:
                return tokens  # (an in-place edit of handed-out tokens bumps their version: projected again)
        tokens = self.project(features)
        if state is not None and _version(tokens) is not None:
            memory.insert(0, (state, {k: v.clone() for k, v in features.items()}, tokens, _version(tokens)))
            del memory[self.PROJECTED_KEPT:]
        return tokens

    def _weights_state(self) -> tuple | None:
        """What changes when the projector's weights do; None (never remember) for inference tensors."""
        state = tuple((p.data_ptr(), _version(p), p.dtype, p.device) for p in self.image_proj.parameters())
        return None if any(s[1] is None for s in state) else state

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(), .cuda(): projected tokens are stale
        self.__dict__.pop("_projected", None)
        return super()._apply(fn, recurse)

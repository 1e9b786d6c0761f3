"""The DiT family's side of a training step (FLUX.1, SD3.5): frozen parts, prompt encoding, flow-matching inputs.

The loop, data, cache, checkpoints and EMA are the UNet's; only the model's inputs and the loss differ. The
objective is rectified flow (Esser et al. 2024): the transformer predicts the velocity ``noise - x0`` at
``x_t = (1 - sigma) x0 + sigma noise`` (training/flow.py). FLUX takes packed 2x2 latents with position ids and,
for guidance-distilled models, a fixed guidance value; SD3.5's time-conditioned resampler receives each sample's
timestep through the handle, once per step.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.attach import AdapterInput, attach_adapters
from ..adapters.module import IPAdapter
from ..adapters.spec import AdapterSpec
from ..errors import LookalikeError
from .flow import FlowSettings, flow_inputs, pack_flux

log = logging.getLogger("lookalike.train")


def dit_family(index: dict[str, Any]) -> str | None:
    """``flux`` or ``sd3`` for a diffusers ``model_index.json``, else None (a UNet pipeline)."""
    name = str(index.get("_class_name", ""))
    if "Flux" in name:
        return "flux"
    if "StableDiffusion3" in name or "text_encoder_3" in index:
        return "sd3"
    return None


def demo_components(family: str) -> dict[str, Any]:
    """Tiny random FLUX (with a guidance embedding, as FLUX.1-dev) or SD3.5 models, built in code."""
    from ..pipeline.tiny_dit import tiny_flux_pipeline, tiny_sd3_pipeline

    pipe = tiny_flux_pipeline(seed=0, guidance=True) if family == "flux" else tiny_sd3_pipeline(seed=0)
    log.info("--base demo-%s: tiny models with RANDOM weights, built in code (for tests and smoke runs)", family)
    names = ("", "_2") if family == "flux" else ("", "_2", "_3")
    return {"unet": pipe.transformer, "vae": pipe.vae, "noise_scheduler": pipe.scheduler,
            "text_encoders": [getattr(pipe, f"text_encoder{n}") for n in names],
            "tokenizers": [getattr(pipe, f"tokenizer{n}") for n in names]}


def pretrained_components(base: str, family: str, need_encoders: bool,
                          dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The frozen parts of a FLUX.1 or SD3.5 diffusers folder or hub id, each from its subfolder as diffusers'
    pipelines lay them out (FLUX: ``text_encoder`` CLIP, ``text_encoder_2`` T5; SD3.5: two CLIPs and
    ``text_encoder_3`` T5), the transformer and text encoders loaded straight in ``dtype`` (the run's
    ``--mixed-precision``: a bf16 FLUX transformer never exists in fp32 in memory). Tokenizers load as their
    ``tokenizer_config.json`` names them (T5's fast or slow tokenizer, or any other)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
    )
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    from ..compat import diffusers_dtype, transformers_dtype

    flux = family == "flux"
    texts = ("", "_2") if flux else ("", "_2", "_3")
    parts: dict[str, Any] = {
        "unet": _load(base, "transformer", FluxTransformer2DModel if flux else SD3Transformer2DModel,
                      **diffusers_dtype(dtype)),
        "noise_scheduler": _load(base, "scheduler", FlowMatchEulerDiscreteScheduler),
        "tokenizers": [_load(base, f"tokenizer{n}", AutoTokenizer) for n in texts],
    }
    if need_encoders:
        parts["vae"] = _load(base, "vae", AutoencoderKL, **diffusers_dtype(dtype))
        clip = CLIPTextModel if flux else CLIPTextModelWithProjection
        parts["text_encoders"] = [_load(base, f"text_encoder{n}", T5EncoderModel if n == texts[-1] else clip,
                                        **transformers_dtype(dtype)) for n in texts]
    return parts


def _load(base: str, subfolder: str, cls: Any, **kwargs: Any) -> Any:
    """``cls.from_pretrained(base, subfolder=...)``, a failure as one sentence naming the part."""
    try:
        return cls.from_pretrained(base, subfolder=subfolder, **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as exc:  # missing files, bad configs, wrong classes
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LookalikeError(f"cannot load {subfolder}/ of the base model {base!r} as {cls.__name__} ({first}); "
                             f"pass a diffusers FLUX.1 or SD3.5 folder or hub id") from exc


@torch.no_grad()
def encode_dit_text(family: str, encoders: list[nn.Module], input_ids: list[torch.Tensor],
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption token ids -> the transformer's context (B, L, C) and pooled text (B, P), as diffusers' pipelines.

    FLUX: T5's last hidden state and CLIP's pooled output. SD3: both CLIPs' penultimate hidden states side by
    side, zero-padded to T5's width and followed by T5's tokens; the pooled text is both CLIPs' projections.
    """
    ids = [i.to(device) for i in input_ids]
    if family == "flux":
        pooled = encoders[0](ids[0], output_hidden_states=False).pooler_output
        return encoders[1](ids[1], output_hidden_states=False)[0], pooled
    outs = [encoders[i](ids[i], output_hidden_states=True) for i in (0, 1)]
    clip = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
    pooled = torch.cat([o[0] for o in outs], dim=-1)
    t5 = encoders[2](ids[2])[0]
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), pooled


def image_cross_dim(transformer: nn.Module) -> int:
    """The width of the image tokens the adapter makes: FLUX's T5 context width, SD3's hidden width."""
    c = transformer.config
    if hasattr(c, "guidance_embeds"):  # FLUX
        return int(c.joint_attention_dim)
    return int(c.num_attention_heads * c.attention_head_dim)


def fit_dit_spec(spec: AdapterSpec, dims: dict[str, int], transformer: nn.Module) -> AdapterSpec:
    """The variant sized to this transformer and image encoder (the official models change nothing)."""
    cross = image_cross_dim(transformer)
    kw = dict(spec.projector_kwargs)
    if spec.projector == "time_resampler" and cross != spec.cross_attention_dim:
        kw.update(dim=cross, heads=max(1, cross // 64))  # diffusers reads heads as inner width // 64
    fitted = spec.with_(embed_dim=dims.get(spec.features[0], spec.embed_dim), cross_attention_dim=cross,
                        projector_kwargs=kw, lora_rank=0, repo_id=None, subfolder=None, filename=None)
    if fitted != spec.with_(repo_id=None, subfolder=None, filename=None, lora_rank=0):
        log.info("adapter %s sized to this model: embed %d, image tokens %d-d, projector %s", spec.name,
                 fitted.embed_dim, cross, kw or "default")
    return fitted


def build_dit_adapter(spec: AdapterSpec, transformer: nn.Module, seed: int, init_from: str | None = None) -> IPAdapter:
    """A seeded trainable adapter for ``transformer`` (or the weights of a published-layout ``init_from``)."""
    torch.manual_seed(seed)
    adapter = IPAdapter.for_model(spec, transformer)
    if init_from:
        from ..weights.dit_formats import published_to_flat
        from ..weights.io import check_fits, read_checkpoint

        sd, _ = read_checkpoint(init_from)
        sd = published_to_flat(sd)
        check_fits(spec, sd, adapter)
        adapter.load_state_dict(sd, strict=True)
        log.info("adapter initialised from %s", init_from)
    return adapter.float().train().requires_grad_(True)


class DitTrainer(nn.Module):
    """The trainable adapter driving a frozen FLUX/SD3 transformer (only the adapter is a submodule)."""

    def __init__(self, adapter: IPAdapter, transformer: nn.Module, checkpointing: bool = False) -> None:
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "unet", transformer)  # frozen, deliberately not registered
        self.handle = attach_adapters(transformer, [adapter])
        self.checkpointing = checkpointing
        if checkpointing:
            transformer.enable_gradient_checkpointing(self.handle.checkpoint_function())

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                features: dict[str, torch.Tensor], added: dict[str, Any]) -> torch.Tensor:
        """One transformer call; FLUX's ``noisy`` is packed (B, N, 4C). Returns the velocity prediction."""
        if self.adapter.spec.projector == "time_resampler":  # the handle runs it on each step's timesteps
            tokens = features[self.adapter.spec.features[0]].unsqueeze(1)  # (B, 1, L, H)
        else:
            tokens = self.adapter.project({k: v.unsqueeze(1) for k, v in features.items()})  # (B, 1, T, C)
        model, dtype = self.unet, self.unet.dtype
        kw: dict[str, Any] = {"hidden_states": noisy.to(dtype), "encoder_hidden_states": context.to(dtype),
                              "pooled_projections": added["pooled"].to(dtype), "return_dict": False}
        with self.handle.conditioned([AdapterInput(tokens)]):
            if "img_ids" in added:  # FLUX: the pipeline passes t / 1000
                guidance = added.get("guidance")
                return model(timestep=timesteps.to(dtype) / 1000, img_ids=added["img_ids"], txt_ids=added["txt_ids"],
                             guidance=None if guidance is None else guidance.to(dtype), **kw)[0]
            return model(timestep=timesteps.to(dtype), **kw)[0]


def dit_inputs(family: str, transformer: nn.Module, scheduler: Any, latents: torch.Tensor, context: torch.Tensor,
               pooled: torch.Tensor, features: dict[str, torch.Tensor], noise: torch.Tensor, u: torch.Tensor,
               flow: FlowSettings, guidance: float) -> dict[str, Any]:
    """Scaled latents (B, C, h, w) and the rest -> the transformer's inputs, the velocity target and the loss
    weights; FLUX's latents and target are packed alike (the loss is a mean, so packing changes nothing)."""
    f = flow_inputs(scheduler, latents, noise.to(latents), u.to(latents.device), flow)
    noisy, target = f["noisy"], f["target"]
    added: dict[str, Any] = {"pooled": pooled}
    if family == "flux":
        noisy, img_ids = pack_flux(noisy)
        target, _ = pack_flux(target)
        added.update(img_ids=img_ids, txt_ids=torch.zeros(context.shape[1], 3, device=context.device))
        if transformer.config.guidance_embeds:
            added["guidance"] = torch.full((latents.shape[0],), guidance, device=latents.device)
    return {"noisy": noisy, "timesteps": f["timesteps"], "context": context, "features": features, "added": added,
            "target": target, "weighting": f["weighting"]}


def export_dit(adapter: IPAdapter, path: Any, info: dict[str, Any]) -> Any:
    """Write the adapter as its variant is published, in safetensors: XLabs' FLUX keys, or InstantX's flat
    ``image_proj.*``/``ip_adapter.*`` keys (what diffusers' ``load_ip_adapter`` splits a safetensors file into)."""
    import json

    from ..weights.dit_formats import xlabs_state_dict
    from ..weights.io import write_safetensors

    sd = {k: v.detach().float().cpu().contiguous() for k, v in adapter.state_dict().items()}
    if adapter.spec.flavor == "xlabs":
        sd = xlabs_state_dict(sd)
    return write_safetensors(sd, path, {"format": "pt", "lookalike.train": json.dumps(info, sort_keys=True)})

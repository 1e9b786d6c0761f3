"""What is wrong with a checkpoint for a spec, told without a UNet and without allocating: missing,
unexpected and wrong-shape weights (what ``lookalike info`` reports)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..adapters.module import AttnLayer, make_ip_layer
from ..adapters.projectors import build_projector
from ..adapters.spec import AdapterSpec
from .io import first_line, section


def checkpoint_problems(spec: AdapterSpec, sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Missing, unexpected and wrong-shape weights of a checkpoint for ``spec``, without a UNet.

    ``image_proj`` is compared with the projector the spec builds (on the meta device: nothing is allocated);
    every ``ip_adapter`` layer must hold ``to_k_ip``/``to_v_ip`` of equal shape reading ``cross_attention_dim``
    features, and LoRA weights of the spec's rank.
    """
    try:
        with torch.device("meta"):
            expected = {f"image_proj.{k}": tuple(v.shape) for k, v in build_projector(spec).state_dict().items()}
    except (TypeError, ValueError, RuntimeError) as exc:
        return [f"its spec does not build a {spec.projector} projector ({first_line(exc)})"]
    problems = [f"missing {k}" for k in expected if k not in sd]
    for key, t in sd.items():
        if key.startswith("image_proj."):
            if key not in expected:
                problems.append(f"unexpected {key}")
            elif tuple(t.shape) != expected[key]:
                problems.append(f"{key} has shape {tuple(t.shape)}, expected {expected[key]}")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in section(sd, "ip_adapter").items():
        index, _, rest = key.partition(".")
        layers.setdefault(index, {})[rest] = t
    for index, weights in layers.items():
        prefix = f"ip_adapter.{index}."
        if not index.isdigit():
            problems.append(f"unexpected {prefix}* (layers are numbered)")
            continue
        kv = [weights.get("to_k_ip.weight"), weights.get("to_v_ip.weight")]
        if any(w is not None for w in kv):
            for name, w in zip(("to_k_ip", "to_v_ip"), kv):
                if w is None:
                    problems.append(f"missing {prefix}{name}.weight")
                elif w.ndim != 2 or w.shape[1] != spec.cross_attention_dim or w.shape != next(
                        x for x in kv if x is not None).shape:
                    problems.append(f"{prefix}{name}.weight has shape {tuple(w.shape)}, expected (hidden, "
                                    f"{spec.cross_attention_dim}) like its pair")
        lora = {k for k in weights if "_lora." in k}
        want = {f"to_{p}_lora.{d}.weight" for p in ("q", "k", "v", "out") for d in ("down", "up")}
        if lora and lora != want:
            problems.append(f"{prefix}: LoRA weights {sorted(want - lora) or sorted(lora - want)} missing or extra")
        unknown = set(weights) - want - _ip_keys(spec, kv[0])
        problems += [f"unexpected {prefix}{k}" for k in sorted(unknown)]
    if not any(w.get("to_k_ip.weight") is not None for w in layers.values()):
        problems.append("no ip_adapter.*.to_k_ip weights (no attention layer gets image keys)")
    return problems


def _ip_keys(spec: AdapterSpec, k_ip: torch.Tensor | None) -> set[str]:
    """The names of one layer's image-attention weights in ``spec``'s layout (DiT layers add biases, norms)."""
    if not spec.blocks or k_ip is None or k_ip.ndim != 2:
        return {"to_k_ip.weight", "to_v_ip.weight"}
    hidden = int(k_ip.shape[0])
    layer = AttnLayer(0, "layer", hidden, spec.cross_attention_dim, True, spec.blocks[0], 1)
    with torch.device("meta"):
        return set(make_ip_layer(spec, layer, True, 0).state_dict())

"""Memory options of lookalike-train: gradient checkpointing of the frozen model gives the gradients and the
adapter of a plain run; the 8-bit optimizer is refused in one sentence where bitsandbytes is missing."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_train_helpers import run_config, single_thread, weights, write_json_set

from lookalike.adapters.spec import REGISTRY
from lookalike.pipeline.tiny import tiny_pipeline
from lookalike.train_encoder import main
from lookalike.training.loop import train
from lookalike.training.step import AdapterTrainer

from helpers import random_adapter


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


def _grads(trainer: AdapterTrainer, inputs: tuple) -> tuple[dict[str, torch.Tensor], int]:
    """The adapter's gradients, and the bytes autograd kept from the forward pass for the backward."""
    trainer.adapter.zero_grad()
    kept = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainer(*inputs).pow(2).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in trainer.adapter.named_parameters()}, sum(kept)


@pytest.mark.parametrize("name", ["ip-adapter-faceid_sd15", "ip-adapter-plus_sd15"])
def test_checkpointed_frozen_blocks_give_the_same_gradients(name):
    pipe = tiny_pipeline("sd15", seed=0)
    unet = pipe.unet.requires_grad_(False)
    adapter = random_adapter(REGISTRY[name], pipe, lora=True).requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    feature = adapter.spec.features[0]
    shape = (2, 17, adapter.spec.embed_dim) if feature == "patch" else (2, adapter.spec.embed_dim)
    inputs = (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]),
              torch.randn(2, 77, unet.config.cross_attention_dim, generator=g), {feature: torch.randn(*shape, generator=g)})
    plain = AdapterTrainer(adapter, unet)
    expected, plain_bytes = _grads(plain, inputs)
    plain.handle.detach()
    checkpointed = AdapterTrainer(adapter, unet, checkpointing=True)
    assert unet.is_gradient_checkpointing
    got, checkpointed_bytes = _grads(checkpointed, inputs)
    assert checkpointed_bytes < 0.5 * plain_bytes, (checkpointed_bytes, plain_bytes)
    assert all(expected[k].abs().max() > 0 for k in expected if "to_k_ip" in k)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=1e-5)


def test_a_checkpointed_run_trains_the_adapter_of_a_plain_run(tmp_path):
    data = write_json_set(tmp_path / "data", 4, faces=True)
    common = dict(adapter="faceid", train_lora=True, lora_rank=4, steps=3, lr=1e-2)
    plain = weights(train(run_config(tmp_path, data, out="plain", **common)).adapter_path)
    checked = weights(train(run_config(tmp_path, data, out="checked", gradient_checkpointing=True,
                                       **common)).adapter_path)
    for k in plain:
        torch.testing.assert_close(checked[k], plain[k], atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_adamw8bit_without_bitsandbytes_is_one_error_line(tmp_path, capsys):
    data = write_json_set(tmp_path / "data", 2)
    assert main(["--data", str(data), "--output", str(tmp_path / "o"), "--optimizer", "adamw8bit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --optimizer adamw8bit needs bitsandbytes"), err
    assert not (tmp_path / "o").exists()

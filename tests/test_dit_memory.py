"""Big-model setups on the tiny FLUX: a GGUF-quantized transformer (diffusers' GGUF loader, Q8_0) with the
adapter kept in float32, and enable_model_cpu_offload (the handle's keys/values follow the layer's device)."""

from __future__ import annotations

import pytest
import torch
from dit_helpers import flux_kwargs, flux_pipe, gen, pooled, random_dit_adapter, save_gguf

from lookalike import Personalizer

pytest.importorskip("gguf")


def test_gguf_quantized_transformer_keeps_a_float32_adapter(tmp_path):
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig
    from diffusers.quantizers.gguf.utils import GGUFParameter

    reference = flux_pipe()
    adapter = random_dit_adapter("flux-ip", reference, seed=1)
    path = save_gguf(reference.transformer, tmp_path)
    quantized = FluxTransformer2DModel.from_single_file(
        path, config=str(tmp_path), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        torch_dtype=torch.float32)
    assert isinstance(quantized.transformer_blocks[0].attn.to_q.weight, GGUFParameter)
    pipe = flux_pipe()
    pipe.transformer = quantized
    base = pipe(generator=gen(), **flux_kwargs()).images
    p = Personalizer(pipe)
    p.load_adapter(adapter)
    assert all(t.dtype == torch.float32 for t in p.adapters[0].parameters())
    ours = p.generate(image_embeds=pooled(), generator=gen(), **flux_kwargs()).images
    off = p.generate(image_embeds=pooled(), scale=0.0, generator=gen(), **flux_kwargs()).images
    full = Personalizer(reference)
    full.load_adapter(random_dit_adapter("flux-ip", reference, seed=1))
    unquantized = full.generate(image_embeds=pooled(), generator=gen(), **flux_kwargs()).images
    assert (off == base).all()
    assert abs(ours - base).max() > 1e-3
    assert abs(ours - unquantized).max() < 0.05, "Q8_0 weights should change the image only slightly"


def test_model_cpu_offload_gives_the_same_image(tmp_path):
    pipe = flux_pipe()
    p = Personalizer(pipe)
    p.load_adapter(random_dit_adapter("flux-ip", pipe, seed=2))
    before = p.generate(image_embeds=pooled(), generator=gen(), **flux_kwargs()).images
    pipe.enable_model_cpu_offload(device="cpu")  # accelerate's hooks wrap the transformer; ours still run
    after = p.generate(image_embeds=pooled(), generator=gen(), **flux_kwargs()).images
    assert abs(before - after).max() <= 1e-6
    assert abs(after - flux_pipe()(generator=gen(), **flux_kwargs()).images).max() > 1e-3

"""Personalizer.generate with encoded prompts (one row per prompt, as training validation passes them) and over a
handle that is already attached (a training run's)."""

from __future__ import annotations

import pytest
import torch

from lookalike import Personalizer
from lookalike.adapters.attach import attach_adapters
from lookalike.adapters.spec import REGISTRY
from lookalike.errors import LookalikeError

from helpers import features_for, fresh_pipe, random_adapter

KW = dict(num_inference_steps=2, guidance_scale=5.0, height=32, width=32, output_type="np")


def _embeds(pipe, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    pos, neg = pipe.encode_prompt(prompt, "cpu", 1, True, "")
    return pos, neg


def test_prompt_embeds_rows_with_their_own_subjects_equal_each_row_alone():
    pipe = fresh_pipe("sd15")
    p = Personalizer(pipe)
    adapter = random_adapter(REGISTRY["ip-adapter-plus_sd15"], pipe)
    p.load_adapter(adapter)
    f1, f2, n = (features_for(adapter.spec, seed=s)["patch"] for s in (1, 2, 3))
    (c1, u1), (c2, u2) = _embeds(pipe, "a photo"), _embeds(pipe, "a drawing")
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    both = p.generate(image_embeds=[torch.cat([f1, f2])], negative_image_embeds=[n], prompt_embeds=torch.cat([c1, c2]),
                      negative_prompt_embeds=torch.cat([u1, u2]), latents=latents, **KW).images
    one, two = (p.generate(image_embeds=[f], negative_image_embeds=[n], prompt_embeds=c, negative_prompt_embeds=u,
                           latents=latents[i:i + 1], **KW).images for i, (f, c, u) in enumerate([(f1, c1, u1),
                                                                                               (f2, c2, u2)]))
    assert abs(both[0] - one[0]).max() <= 1e-5 and abs(both[1] - two[0]).max() <= 1e-5
    assert abs(one[0] - two[0]).max() > 1e-3


def test_a_personalizer_over_an_attached_handle_generates_as_one_that_attaches_its_own():
    pipe = fresh_pipe("sd15")
    adapter = random_adapter(REGISTRY["ip-adapter_sd15"], pipe)
    feats = features_for(adapter.spec, seed=1)["pooled"]
    own = Personalizer(pipe)
    own.load_adapter(adapter)
    expected = own.generate(prompt="a photo", image_embeds=[feats], generator=torch.Generator().manual_seed(0),
                            **KW).images
    own.detach()
    handle = attach_adapters(pipe.unet, [adapter])
    got = Personalizer(pipe, handle=handle).generate(prompt="a photo", image_embeds=[feats],
                                                     generator=torch.Generator().manual_seed(0), **KW).images
    assert abs(got - expected).max() <= 1e-6
    handle.detach()
    with pytest.raises(LookalikeError, match="not attached"):
        Personalizer(pipe, handle=handle)

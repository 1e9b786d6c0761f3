"""Attaching, conditioning and detaching: exactness guarantees of the decoupled-attention processor."""

from __future__ import annotations

import torch

from lookalike import Personalizer
from lookalike.adapters.attach import AdapterInput, attach_adapters
from lookalike.adapters.spec import REGISTRY

from helpers import features_for, fresh_pipe, random_adapter

KW = dict(prompt="a photo", num_inference_steps=3, guidance_scale=5.0, height=32, width=32, output_type="np")


def gen(pipe_or_p, **extra):
    kwargs = {**KW, **extra}
    if isinstance(pipe_or_p, Personalizer):
        return pipe_or_p.generate(generator=torch.Generator().manual_seed(0), **kwargs).images
    kwargs.pop("image_embeds", None)
    return pipe_or_p(generator=torch.Generator().manual_seed(0), **kwargs).images


def personalizer(name="ip-adapter_sd15", base="sd15"):
    pipe = fresh_pipe(base)
    p = Personalizer(pipe)
    adapter = random_adapter(REGISTRY[name], pipe)
    p.load_adapter(adapter)
    return p, adapter


def test_scale_zero_gives_exactly_the_base_pipeline_output():
    p, adapter = personalizer()
    base = gen(fresh_pipe("sd15"))
    out = gen(p, image_embeds=[features_for(adapter.spec)["pooled"]], scale=0.0)
    assert torch.equal(torch.from_numpy(out), torch.from_numpy(base))


def test_empty_timestep_window_gives_exactly_the_base_pipeline_output():
    p, adapter = personalizer()
    base = gen(fresh_pipe("sd15"))
    out = gen(p, image_embeds=[features_for(adapter.spec)["pooled"]], window=(0.4, 0.4))
    assert torch.equal(torch.from_numpy(out), torch.from_numpy(base))


def test_detach_restores_the_original_processors_and_output_exactly():
    pipe = fresh_pipe("sd15")
    before = dict(pipe.unet.attn_processors)
    p = Personalizer(pipe)
    adapter = random_adapter(REGISTRY["ip-adapter_sd15"], pipe)
    p.load_adapter(adapter)
    gen(p, image_embeds=[features_for(adapter.spec)["pooled"]])
    p.detach()
    after = pipe.unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert torch.equal(torch.from_numpy(gen(pipe)), torch.from_numpy(gen(fresh_pipe("sd15"))))


def test_unloading_adapters_gives_the_base_output():
    p, adapter = personalizer()
    p.unload_adapters()
    assert p.adapters == []
    assert torch.equal(torch.from_numpy(gen(p.pipe)), torch.from_numpy(gen(fresh_pipe("sd15"))))


def test_a_batch_with_different_subjects_equals_each_sample_alone():
    p, adapter = personalizer("ip-adapter-plus_sd15")
    f1, f2 = (features_for(adapter.spec, seed=s)["patch"] for s in (1, 2))
    n1, n2 = (features_for(adapter.spec, seed=s)["patch"] for s in (3, 4))
    gen_kw = dict(num_inference_steps=2, guidance_scale=5.0, height=32, width=32, output_type="np")
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    both = p.generate(prompt=["a photo", "a drawing"], image_embeds=[torch.cat([f1, f2])],
                      negative_image_embeds=[torch.cat([n1, n2])], latents=latents, **gen_kw).images
    one = p.generate(prompt="a photo", image_embeds=[f1], negative_image_embeds=[n1], latents=latents[:1],
                     **gen_kw).images
    two = p.generate(prompt="a drawing", image_embeds=[f2], negative_image_embeds=[n2], latents=latents[1:],
                     **gen_kw).images
    assert abs(both[0] - one[0]).max() <= 1e-5
    assert abs(both[1] - two[0]).max() <= 1e-5
    assert abs(one[0] - two[0]).max() > 1e-3


def test_timestep_window_equals_switching_the_scale_off_midway_in_diffusers(tmp_path):
    """window=(0, 0.5) over 4 steps = diffusers with the IP scale set to 0 from step 2 on (its callback recipe)."""
    from lookalike.weights.io import save_adapter

    p, adapter = personalizer()
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    feats = features_for(adapter.spec)["pooled"]
    neg = torch.zeros_like(feats)
    kw = {**KW, "num_inference_steps": 4}
    ours = p.generate(image_embeds=[feats], window=(0.0, 0.5), generator=torch.Generator().manual_seed(0),
                      **kw).images
    theirs = fresh_pipe("sd15")
    theirs.load_ip_adapter(str(tmp_path), subfolder="", weight_name=path.name, image_encoder_folder=None)

    def cut(pipe, step, t, cb):
        if step == 1:  # called after step index 1: steps 2 and 3 run without the adapter
            pipe.set_ip_adapter_scale(0.0)
        return cb

    out = theirs(ip_adapter_image_embeds=[torch.cat([neg, feats])], callback_on_step_end=cut,
                 generator=torch.Generator().manual_seed(0), **kw).images
    full = p.generate(image_embeds=[feats], generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(ours - out).max() <= 1e-5
    assert abs(ours - full).max() > 1e-4


def test_unet_output_with_adapter_equals_diffusers_unet_output(tmp_path):
    from lookalike.weights.io import save_adapter

    pipe = fresh_pipe("sdxl")
    adapter = random_adapter(REGISTRY["ip-adapter-plus_sdxl_vit-h"], pipe)
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    feats = features_for(adapter.spec, batch=2)["patch"]
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 64, generator=g)
    cond = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    handle = attach_adapters(pipe.unet, [adapter])
    with torch.no_grad(), handle.conditioned([AdapterInput(adapter.project({"patch": feats}))]):
        ours = pipe.unet(x, 500, ctx, added_cond_kwargs=cond).sample
    handle.detach()
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=path.name, image_encoder_folder=None)
    with torch.no_grad():
        theirs = pipe.unet(x, 500, ctx, added_cond_kwargs={**cond, "image_embeds": [feats]}).sample
    assert abs(ours - theirs).max() <= 1e-5


def test_image_keys_and_values_are_computed_once_per_generation_not_per_step():
    p, adapter = personalizer()
    calls = []
    layer = next(iter(v for v in adapter.ip_adapter.values() if v.has_ip))
    layer.to_k_ip.register_forward_hook(lambda *a: calls.append(1))
    gen(p, image_embeds=[features_for(adapter.spec)["pooled"]], num_inference_steps=4)
    assert len(calls) == 1


def test_cached_keys_values_follow_each_change_of_subject_scale_mask_and_batch():
    """Generations in a row with different inputs equal the same generations on a fresh pipeline."""
    p, adapter = personalizer("ip-adapter-plus_sd15")
    f = [features_for(adapter.spec, seed=s)["patch"] for s in range(3)]
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16] = 1
    calls = [dict(image_embeds=[f[0]]), dict(image_embeds=[f[1]]), dict(image_embeds=[f[1]], scale=0.3),
             dict(image_embeds=[f[1]], masks=[mask]), dict(image_embeds=[torch.cat([f[0], f[2]])],
                                                          prompt=["a", "b"])]
    negative = [torch.zeros_like(f[0])]
    in_a_row = [gen(p, negative_image_embeds=negative, **c) for c in calls]
    for c, seen in zip(calls, in_a_row):
        fresh, _ = personalizer("ip-adapter-plus_sd15")
        neg = [torch.zeros_like(c["image_embeds"][0])]
        assert torch.equal(torch.from_numpy(gen(fresh, negative_image_embeds=neg, **c)), torch.from_numpy(seen))
    assert len({float(x.sum()) for x in in_a_row}) == len(calls)


def test_prompt_keys_and_values_are_computed_once_per_generation_not_per_step():
    p, adapter = personalizer()
    cross = [m.to_k for n, m in p.pipe.unet.named_modules() if n.endswith("attn2")]
    calls = []
    for to_k in cross:
        to_k.register_forward_hook(lambda *a: calls.append(1))
    gen(p, image_embeds=[features_for(adapter.spec)["pooled"]], num_inference_steps=4)
    assert len(calls) == len(cross)  # once per cross-attention layer, not once per layer and step


def test_cached_prompt_keys_and_values_equal_fresh_ones_and_follow_in_place_edits():
    """Inside one conditioned block a second UNet call reuses the prompt's K/V: bit-identical to computing them
    afresh (a new tensor), and an in-place edit of the prompt tensor is seen."""
    pipe = fresh_pipe("sd15")
    adapter = random_adapter(REGISTRY["ip-adapter_sd15"], pipe)
    handle = attach_adapters(pipe.unet, [adapter])
    tokens = adapter.project({"pooled": features_for(adapter.spec)["pooled"]})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad(), handle.conditioned([AdapterInput(tokens)]):
        pipe.unet(x, 900, ctx)
        reused = pipe.unet(x, 500, ctx).sample
        ctx.mul_(2.0)
        edited = pipe.unet(x, 500, ctx).sample
    with torch.no_grad(), handle.conditioned([AdapterInput(tokens)]):
        fresh = pipe.unet(x, 500, ctx.clone() / 2.0).sample
        fresh_edited = pipe.unet(x, 500, ctx.clone()).sample
    assert torch.equal(reused, fresh) and torch.equal(edited, fresh_edited)
    assert not torch.equal(reused, edited)


def test_unconditional_input_and_a_reused_subject_are_projected_once_while_the_weights_are_unchanged():
    """Generations in a row project only what is new; changed weights, dtype or features project again, and
    every result equals a fresh pipeline's."""
    p, adapter = personalizer("ip-adapter-plus_sd15")
    calls = []
    adapter.image_proj.register_forward_hook(lambda *a: calls.append(1))
    f = [features_for(adapter.spec, seed=s)["patch"] for s in range(2)]
    negative = [torch.zeros_like(f[0])]

    def counted(**kw):
        calls.clear()
        return gen(p, negative_image_embeds=negative, **kw), len(calls)

    first, n_first = counted(image_embeds=[f[0]])
    again, n_again = counted(image_embeds=[f[0]])
    other, n_other = counted(image_embeds=[f[1]])
    with torch.no_grad():
        adapter.image_proj.proj_out.weight.mul_(1.5)  # an in-place update, as an optimizer step makes
    changed, n_changed = counted(image_embeds=[f[1]])
    adapter.to(torch.float64).to(torch.float32)
    _, n_moved = counted(image_embeds=[f[1]])
    assert (n_first, n_again, n_other, n_changed, n_moved) == (2, 0, 1, 2, 2)
    assert torch.equal(torch.from_numpy(first), torch.from_numpy(again))
    fresh, fresh_adapter = personalizer("ip-adapter-plus_sd15")
    fresh_adapter.load_state_dict(adapter.state_dict())
    assert torch.equal(torch.from_numpy(gen(fresh, negative_image_embeds=negative, image_embeds=[f[1]])),
                       torch.from_numpy(changed))
    assert not torch.equal(torch.from_numpy(other), torch.from_numpy(changed))


def test_nothing_is_remembered_while_gradients_are_recorded():
    pipe = fresh_pipe("sd15")
    adapter = random_adapter(REGISTRY["ip-adapter_sd15"], pipe)
    feats = {"pooled": features_for(adapter.spec)["pooled"]}
    tokens = adapter.project_once(feats)
    assert tokens.requires_grad and not adapter.__dict__.get("_projected")


def test_remembered_tokens_edited_in_place_are_projected_again():
    pipe = fresh_pipe("sd15")
    adapter = random_adapter(REGISTRY["ip-adapter_sd15"], pipe)
    feats = {"pooled": features_for(adapter.spec)["pooled"]}
    with torch.no_grad():
        first = adapter.project_once(feats)
        expected = first.clone()
        first.mul_(0.0)  # a caller scribbles on the tokens it was given
        again = adapter.project_once(feats)
    assert torch.equal(again, expected)

"""FLUX control beyond diffusers' own: true CFG with a negative image (parity), masks (diffusers ignores them),
timestep windows, a subject per sample (diffusers mixes them), exact scale 0, detach, FluxFill (no IP-Adapter in
diffusers) and img2img."""

from __future__ import annotations

import torch
from dit_helpers import flux_kwargs, flux_pipe, gen, image_and_mask, pooled, random_dit_adapter

from lookalike import Personalizer
from lookalike.weights.dit_formats import save_published

TOL = 1e-5


def loaded(tmp_path, name="flux-ip", seed=1, cls=None):
    pipe = flux_pipe(cls)
    adapter = random_dit_adapter(name, pipe, seed=seed)
    path = save_published(adapter, tmp_path / "ip_adapter.safetensors", "xlabs")
    p = Personalizer(pipe)
    p.load_adapter(str(path))
    return p, path


def test_true_cfg_with_a_negative_image_matches_diffusers(tmp_path):
    p, path = loaded(tmp_path)
    emb, neg = pooled(seed=1), pooled(seed=2)
    kw = flux_kwargs(true_cfg_scale=3.0, negative_prompt="blurry")
    ours = p.generate(image_embeds=emb, negative_image_embeds=neg, generator=gen(), **kw).images
    theirs = flux_pipe()
    theirs.load_ip_adapter(str(tmp_path), weight_name=path.name, image_encoder_pretrained_model_name_or_path=None)
    b = theirs(ip_adapter_image_embeds=[emb], negative_ip_adapter_image_embeds=[neg], generator=gen(), **kw).images
    zero_neg = p.generate(image_embeds=emb, generator=gen(), **kw).images
    assert abs(ours - b).max() <= TOL
    assert abs(ours - zero_neg).max() > 1e-3, "the negative image must matter under true CFG"


def test_scale_zero_closed_window_and_detach_give_the_exact_base(tmp_path):
    p, _ = loaded(tmp_path)
    plain = flux_pipe()(generator=gen(), **flux_kwargs()).images
    originals = dict(p.handle.original)
    assert (p.generate(image_embeds=pooled(), scale=0.0, generator=gen(), **flux_kwargs()).images == plain).all()
    closed = p.generate(image_embeds=pooled(), window=(0.5, 0.5), generator=gen(), **flux_kwargs()).images
    assert (closed == plain).all()
    full = p.generate(image_embeds=pooled(), generator=gen(), **flux_kwargs(steps=4)).images
    late = p.generate(image_embeds=pooled(), window=(0.5, 1.0), generator=gen(), **flux_kwargs(steps=4)).images
    none = flux_pipe()(generator=gen(), **flux_kwargs(steps=4)).images
    assert abs(late - full).max() > 1e-4 and abs(late - none).max() > 1e-4
    p.detach()
    procs = p.pipe.transformer.attn_processors
    assert all(procs[k] is v for k, v in originals.items())
    assert (p.pipe(generator=gen(), **flux_kwargs()).images == plain).all()


def test_masks_confine_the_image_to_its_region(tmp_path):
    p, _ = loaded(tmp_path)
    emb = pooled()
    full = p.generate(image_embeds=emb, generator=gen(), **flux_kwargs()).images
    ones = p.generate(image_embeds=emb, masks=torch.ones(1, 1, 32, 32), generator=gen(), **flux_kwargs()).images
    zeros = p.generate(image_embeds=emb, masks=torch.zeros(1, 1, 32, 32), generator=gen(), **flux_kwargs()).images
    plain = flux_pipe()(generator=gen(), **flux_kwargs()).images
    assert abs(ones - full).max() <= TOL and abs(zeros - plain).max() <= TOL
    left = torch.zeros(1, 1, 32, 32)
    left[..., :16] = 1
    half = p.generate(image_embeds=emb, masks=left, generator=gen(), **flux_kwargs()).images
    assert abs(half - full).max() > 1e-4 and abs(half - plain).max() > 1e-4


def test_a_subject_per_sample_is_each_sample_alone(tmp_path):
    """diffusers gives every FLUX sample every subject; lookalike gives each sample its own."""
    p, _ = loaded(tmp_path)
    a, b = pooled(seed=1), pooled(seed=2)
    both = p.generate(image_embeds=torch.cat([a, b]), generator=[gen(0), gen(1)],
                      **flux_kwargs(prompt=["a photo", "a cat"])).images
    first = p.generate(image_embeds=a, generator=gen(0), **flux_kwargs(prompt="a photo")).images
    second = p.generate(image_embeds=b, generator=gen(1), **flux_kwargs(prompt="a cat")).images
    assert abs(both[0] - first[0]).max() <= 1e-4 and abs(both[1] - second[0]).max() <= 1e-4
    assert abs(first[0] - p.generate(image_embeds=b, generator=gen(0), **flux_kwargs()).images[0]).max() > 1e-3


def test_flux_fill_matches_diffusers_xlabs_processor_on_its_transformer(tmp_path):
    """FluxFillPipeline has no load_ip_adapter; the reference installs diffusers' own XLabs processor and image
    projection on the Fill transformer (its loader mixin) and feeds the embeds at every step."""
    from diffusers import FluxFillPipeline

    p, path = loaded(tmp_path, cls=FluxFillPipeline)
    image, mask = image_and_mask()
    emb = pooled()
    kw = flux_kwargs(image=image, mask_image=mask, guidance_scale=30.0)
    ours = p.generate(image_embeds=emb, generator=gen(), **kw).images

    theirs = flux_pipe(FluxFillPipeline)
    from safetensors.torch import load_file

    from lookalike.weights.dit_formats import published_to_flat
    from lookalike.weights.io import section

    flat = published_to_flat(load_file(path))
    theirs.transformer._load_ip_adapter_weights([{s: section(flat, s) for s in ("image_proj", "ip_adapter")}],
                                                 low_cpu_mem_usage=False)

    def feed(pipe, step, t, kwargs):
        pipe._joint_attention_kwargs["ip_adapter_image_embeds"] = [emb]
        return {}

    b = theirs(joint_attention_kwargs={"ip_adapter_image_embeds": [emb]}, callback_on_step_end=feed,
               generator=gen(), **kw).images
    plain = flux_pipe(FluxFillPipeline)(generator=gen(), **kw).images
    assert abs(ours - b).max() <= TOL
    assert abs(ours - plain).max() > 1e-3


def test_flux_img2img_matches_diffusers(tmp_path):
    from diffusers import FluxImg2ImgPipeline

    p, path = loaded(tmp_path, cls=FluxImg2ImgPipeline)
    image, _ = image_and_mask()
    emb = pooled()
    kw = flux_kwargs(image=image, strength=0.9, steps=3)
    ours = p.generate(image_embeds=emb, generator=gen(), **kw).images
    theirs = flux_pipe(FluxImg2ImgPipeline)
    theirs.load_ip_adapter(str(tmp_path), weight_name=path.name, image_encoder_pretrained_model_name_or_path=None)
    b = theirs(ip_adapter_image_embeds=[emb], negative_ip_adapter_image_embeds=[torch.zeros_like(emb)],
               generator=gen(), **kw).images
    plain = flux_pipe(FluxImg2ImgPipeline)(generator=gen(), **kw).images
    assert abs(ours - b).max() <= TOL
    assert abs(ours - plain).max() > 1e-3

"""The DiT pipelines beyond text-to-image: FLUX inpaint and ControlNet, SD3 img2img and ControlNet.

Each equals diffusers' own ``load_ip_adapter`` path on the same random official-format weights and inputs (fp32,
CPU; all four classes carry FluxIPAdapterMixin / SD3IPAdapterMixin in diffusers 0.42) and moves the image. The
ControlNets are separate modules: the adapter conditions the transformer only (diffusers' ControlNets ignore
the image embeds too), and their calls are not denoising steps.
"""

from __future__ import annotations

import torch
from dit_helpers import (
    flux_controlnet_pipe,
    flux_kwargs,
    flux_pipe,
    gen,
    image_and_mask,
    patches,
    pooled,
    random_dit_adapter,
    sd3_controlnet_pipe,
    sd3_kwargs,
    sd3_pipe,
)

from lookalike import Personalizer
from lookalike.weights.dit_formats import save_published

TOL = 1e-5


def _flux_pair(tmp_path, make):
    """lookalike on one copy of a FLUX pipeline and diffusers' loader on another, from the same XLabs file."""
    ours = make()
    path = save_published(random_dit_adapter("flux-ip", ours, seed=1), tmp_path / "ip_adapter.safetensors", "xlabs")
    p = Personalizer(ours)
    p.load_adapter(str(path))
    theirs = make()
    theirs.load_ip_adapter(str(tmp_path), weight_name=path.name, image_encoder_pretrained_model_name_or_path=None)
    return p, theirs


def _sd3_pair(tmp_path, make):
    ours = make()
    path = save_published(random_dit_adapter("sd35-ip", ours, seed=1), tmp_path / "ip-adapter.bin", "sd3-original")
    p = Personalizer(ours)
    p.load_adapter(str(path))
    theirs = make()
    theirs.load_ip_adapter(str(tmp_path), weight_name=path.name, image_encoder_folder=None,
                           low_cpu_mem_usage=False)  # its meta-device path leaves a tensor on "meta"
    return p, theirs


def _flux_parity(p, theirs, plain, kw, emb, neg=None):
    """lookalike vs diffusers (diffusers needs a negative image embed even without true CFG: it would encode a
    black image otherwise)."""
    ours = p.generate(image_embeds=emb, negative_image_embeds=neg, generator=gen(), **kw).images
    b = theirs(ip_adapter_image_embeds=[emb], generator=gen(), **kw,
               negative_ip_adapter_image_embeds=[torch.zeros_like(emb) if neg is None else neg]).images
    base = plain(generator=gen(), **kw).images
    assert abs(ours - b).max() <= TOL
    assert abs(ours - base).max() > 1e-3, "the adapter must change the image"
    return ours


def test_flux_inpaint_matches_diffusers(tmp_path):
    from diffusers import FluxInpaintPipeline

    p, theirs = _flux_pair(tmp_path, lambda: flux_pipe(FluxInpaintPipeline))
    image, mask = image_and_mask()
    kw = flux_kwargs(image=image, mask_image=mask, strength=0.9, steps=3)
    _flux_parity(p, theirs, flux_pipe(FluxInpaintPipeline), kw, pooled())


def test_flux_controlnet_matches_diffusers_and_true_cfg(tmp_path):
    """ControlNet with and without true CFG (two transformer calls per step, one ControlNet call): the handle
    must tell the halves apart by the transformer's calls alone."""
    p, theirs = _flux_pair(tmp_path, flux_controlnet_pipe)
    control, _ = image_and_mask()
    kw = flux_kwargs(control_image=control, controlnet_conditioning_scale=0.8, steps=3)
    ours = _flux_parity(p, theirs, flux_controlnet_pipe(), kw, pooled())
    uncontrolled = p.generate(image_embeds=pooled(), generator=gen(),
                              **dict(kw, controlnet_conditioning_scale=0.0)).images
    assert abs(ours - uncontrolled).max() > 1e-3, "the tiny ControlNet must act, or the test shows nothing"
    cfg = dict(kw, true_cfg_scale=3.0, negative_prompt="blurry")
    _flux_parity(p, theirs, flux_controlnet_pipe(), cfg, pooled(), neg=pooled(seed=2))
    window = dict(kw, control_guidance_end=0.5)  # the ControlNet stops halfway; the adapter acts throughout
    _flux_parity(p, theirs, flux_controlnet_pipe(), window, pooled())


def test_sd3_img2img_matches_diffusers(tmp_path):
    from diffusers import StableDiffusion3Img2ImgPipeline

    p, theirs = _sd3_pair(tmp_path, lambda: sd3_pipe(StableDiffusion3Img2ImgPipeline))
    image, _ = image_and_mask()
    kw = sd3_kwargs(image=image, strength=0.9, num_inference_steps=3)
    emb = patches()
    ours = p.generate(image_embeds=emb, scale=0.7, generator=gen(), **kw).images
    theirs.set_ip_adapter_scale(0.7)
    b = theirs(ip_adapter_image_embeds=torch.cat([torch.zeros_like(emb), emb]), generator=gen(), **kw).images
    plain = sd3_pipe(StableDiffusion3Img2ImgPipeline)(generator=gen(), **kw).images
    assert abs(ours - b).max() <= TOL
    assert abs(ours - plain).max() > 1e-3, "the adapter must change the image"


def test_sd3_controlnet_matches_diffusers(tmp_path):
    """SD3.5's tokens depend on the timestep: they are made once per transformer call, and the ControlNet's
    call in between must not count as a step."""
    p, theirs = _sd3_pair(tmp_path, sd3_controlnet_pipe)
    control, _ = image_and_mask()
    kw = sd3_kwargs(control_image=control, controlnet_conditioning_scale=0.8, num_inference_steps=3)
    emb = patches()

    def run(call, **extra):  # the pipeline samples the control image's VAE latents from the global generator
        torch.manual_seed(0)
        return call(generator=gen(), **dict(kw, **extra)).images

    ours = run(p.generate, image_embeds=emb, scale=0.6)
    theirs.set_ip_adapter_scale(0.6)  # diffusers' SD3 processor starts at 0.5, lookalike's adapter at 1.0
    b = run(theirs, ip_adapter_image_embeds=torch.cat([torch.zeros_like(emb), emb]))
    plain = run(sd3_controlnet_pipe())
    uncontrolled = run(p.generate, image_embeds=emb, scale=0.6, controlnet_conditioning_scale=0.0)
    assert abs(ours - b).max() <= TOL
    assert abs(ours - plain).max() > 1e-3, "the adapter must change the image"
    assert abs(ours - uncontrolled).max() > 1e-3, "the tiny ControlNet must act, or the test shows nothing"

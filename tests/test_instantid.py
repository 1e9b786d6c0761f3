"""InstantID on a tiny random SDXL and a tiny random IdentityNet (a diffusers ControlNetModel), fp32 CPU.

* The adapter half (a Resampler over the 512-d ArcFace embedding) is compared with diffusers'
  load_ip_adapter in tests/test_parity_diffusers.py (the registry's every variant, instantid included).
* The IdentityNet half equals diffusers' ControlNetModel called with the face tokens as encoder_hidden_states.
* End to end equals a reference written here from the authors' published pipeline
  (InstantX/InstantID pipeline_stable_diffusion_xl_instantid.py): guidance's negative face is the zero
  embedding through the projection; the UNet's context is the prompt with the face tokens after it, the
  face tokens read by decoupled attention scaled by the adapter strength (their IPAttnProcessor); IdentityNet
  gets the kps image and the face tokens (negative half, then positive) as its context, its residuals scaled
  by its strength and added to the UNet's; classifier-free guidance as in diffusers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_instantid_keypoints import authors_draw

from lookalike import Personalizer
from lookalike.adapters.spec import get_spec
from lookalike.errors import LookalikeError
from lookalike.pipeline.identity import FaceControl, face_tokens
from lookalike.pipeline.subject import Subject
from lookalike.weights.io import save_adapter

from helpers import fresh_pipe, random_adapter, randomize

TOL = 1e-5
SIZE = 32
KPS = np.array([[20.0, 22.0], [41.0, 21.5], [31.0, 33.0], [22.5, 44.0], [40.0, 45.0]], np.float32)  # on 64x64


def tiny_identitynet(unet, seed: int = 3):
    """A ControlNetModel shaped like the tiny SDXL UNet (one x2 downsampling of the condition, as its VAE)."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    return randomize(net, seed, std=0.2).eval()  # the zero convolutions too, so its residuals are not zero


@pytest.fixture()
def instantid(tmp_path):
    """Files as the authors ship them (adapter file + ControlNetModel/ beside it), tiny, and a face subject."""
    pipe = fresh_pipe("sdxl")
    adapter = random_adapter(get_spec("instantid"), pipe, seed=5)
    path = save_adapter(adapter, tmp_path / "ip-adapter.safetensors")
    tiny_identitynet(pipe.unet).save_pretrained(tmp_path / "ControlNetModel")
    g = torch.Generator().manual_seed(7)
    face = torch.randn(1, 1, adapter.spec.embed_dim, generator=g)
    subject = Subject({"face_id": face}, {"face_id": torch.zeros_like(face)}, "instantid", "insightface-antelopev2",
                      landmarks={"kps": torch.from_numpy(KPS)[None], "size": torch.tensor([[64, 64]])})
    return tmp_path, path, subject


def ours(pipe, path, subject, **kw):
    p = Personalizer(pipe)
    p.load_adapter(str(path))
    args = dict(prompt="a photo", num_inference_steps=2, guidance_scale=5.0, height=SIZE, width=SIZE,
                output_type="np", generator=torch.Generator().manual_seed(0))
    return p, p.generate(subject=subject, **{**args, **kw}).images


def authors_reference(folder, path, subject, scale=0.8, identitynet_scale=0.8, steps=2, guidance=5.0, extra=None):
    """The authors' InstantID pipeline, step by step, on diffusers' own parts (the oracle)."""
    from diffusers import ControlNetModel
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.utils.torch_utils import randn_tensor

    pipe = fresh_pipe("sdxl")
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=path.name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    net = ControlNetModel.from_pretrained(str(folder / "ControlNetModel")).eval()
    unet, sched = pipe.unet, pipe.scheduler
    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt("a photo", device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=True, negative_prompt=None)
        face = subject.features["face_id"].reshape(1, 1, 1, -1)  # one 512-d token
        raw = torch.cat([torch.zeros_like(face), face])  # the zero embedding is the negative face
        face_tokens_ = unet.encoder_hid_proj([raw])[0].flatten(1, 2)  # (2, 16, C): [negative; positive]
        kps = KPS * np.array([SIZE / 64, SIZE / 64], np.float32)
        kps_image = Image.fromarray(authors_draw(SIZE, SIZE, kps))  # the authors hand IdentityNet a PIL image
        control = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor, do_convert_rgb=True,
                                    do_normalize=False).preprocess(kps_image, height=SIZE, width=SIZE)
        control = torch.cat([control] * 2)
        sched.set_timesteps(steps)
        shape = (1, unet.config.in_channels, SIZE // pipe.vae_scale_factor, SIZE // pipe.vae_scale_factor)
        latents = randn_tensor(shape, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
        time_ids = pipe._get_add_time_ids((SIZE, SIZE), (0, 0), (SIZE, SIZE), dtype=pe.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        added = {"text_embeds": torch.cat([npooled, pooled]), "time_ids": torch.cat([time_ids, time_ids])}
        context = torch.cat([npe, pe])
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([latents] * 2), t)
            down, mid = net(x, t, encoder_hidden_states=face_tokens_, controlnet_cond=control,
                            conditioning_scale=identitynet_scale, added_cond_kwargs=added, return_dict=False)
            if extra is not None:  # their MultiControlNetModel: every net reads the face tokens; residuals add up
                other, image, other_scale = extra
                cond = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor, do_convert_rgb=True,
                                         do_normalize=False).preprocess(image, height=SIZE, width=SIZE)
                d2, m2 = other(x, t, encoder_hidden_states=face_tokens_, controlnet_cond=torch.cat([cond] * 2),
                               conditioning_scale=other_scale, added_cond_kwargs=added, return_dict=False)
                down, mid = [a + b for a, b in zip(down, d2)], mid + m2
            noise = unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid,
                         added_cond_kwargs={**added, "image_embeds": [raw]}, return_dict=False)[0]
            uncond, cond = noise.chunk(2)
            latents = sched.step(uncond + guidance * (cond - uncond), t, latents, return_dict=False)[0]
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="np")


def test_instantid_end_to_end_equals_the_authors_pipeline(instantid):
    folder, path, subject = instantid
    p, a = ours(fresh_pipe("sdxl"), path, subject)  # defaults: scale 0.8, identitynet_scale 0.8
    b = authors_reference(folder, path, subject)
    assert a.shape == b.shape == (1, SIZE, SIZE, 3)
    assert abs(a - b).max() <= TOL
    plain = fresh_pipe("sdxl")(prompt="a photo", num_inference_steps=2, guidance_scale=5.0, height=SIZE, width=SIZE,
                               output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert abs(a - plain).max() > 1e-3
    # each half moves the image, and each strength is the one the authors' pipeline takes
    no_net = p.generate(subject=subject, prompt="a photo", num_inference_steps=2, guidance_scale=5.0, height=SIZE,
                        width=SIZE, output_type="np", generator=torch.Generator().manual_seed(0),
                        identitynet_scale=0.0).images
    assert abs(a - no_net).max() > 1e-3
    half = p.generate(subject=subject, prompt="a photo", num_inference_steps=2, guidance_scale=5.0, height=SIZE,
                      width=SIZE, output_type="np", generator=torch.Generator().manual_seed(0), scale=0.3,
                      identitynet_scale=0.5).images
    assert abs(half - authors_reference(folder, path, subject, scale=0.3, identitynet_scale=0.5)).max() <= TOL
    assert abs(half - a).max() > 1e-3


def test_identitynet_half_equals_the_controlnet_called_with_the_face_tokens(instantid):
    from diffusers import ControlNetModel

    folder, path, subject = instantid
    pipe = fresh_pipe("sdxl")
    p = Personalizer(pipe)
    name = p.load_adapter(str(path))
    net = p.identitynets[name]
    oracle = ControlNetModel.from_pretrained(str(folder / "ControlNetModel")).eval()
    adapter = p.adapters[0]
    with torch.no_grad():
        tokens = adapter.project({"face_id": subject.features["face_id"]})[:, 0]  # (1, 16, C)
        negative = adapter.project({"face_id": subject.negative["face_id"]})[:, 0]
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, 16, 16, generator=g)
        cond = torch.rand(2, 3, SIZE, SIZE, generator=g)
        prompt = torch.randn(2, 5, pipe.unet.config.cross_attention_dim, generator=g)
        added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
        with face_tokens(net, [FaceControl(tokens, negative)]):
            down, mid = net(x, 500, encoder_hidden_states=prompt, controlnet_cond=cond, conditioning_scale=0.8,
                            added_cond_kwargs=added, return_dict=False)
        ref_down, ref_mid = oracle(x, 500, encoder_hidden_states=torch.cat([negative, tokens]), controlnet_cond=cond,
                                   conditioning_scale=0.8, added_cond_kwargs=added, return_dict=False)
        with_prompt = oracle(x, 500, encoder_hidden_states=prompt, controlnet_cond=cond, conditioning_scale=0.8,
                             added_cond_kwargs=added, return_dict=False)[1]
    assert max(abs(d - r).max().item() for d, r in zip(down, ref_down)) <= TOL
    assert abs(mid - ref_mid).max().item() <= TOL
    assert abs(mid - with_prompt).max().item() > 1e-3  # the face tokens, not the prompt, reach its attention
    # the hook is gone after the block: the net reads its given context again
    again = net(x, 500, encoder_hidden_states=prompt, controlnet_cond=cond, conditioning_scale=0.8,
                added_cond_kwargs=added, return_dict=False)[1]
    assert abs(again - with_prompt).max().item() <= TOL


def test_pose_reference_subject_and_saved_face_run_no_detector(instantid, tmp_path):
    folder, path, subject = instantid
    saved = subject.save(tmp_path / "face.safetensors")
    loaded = Subject.load(saved)
    assert torch.equal(loaded.landmarks["kps"], subject.landmarks["kps"])
    p, a = ours(fresh_pipe("sdxl"), path, loaded, num_inference_steps=1)
    moved = Subject(subject.features, subject.negative, "instantid", "insightface-antelopev2",
                    landmarks={"kps": torch.from_numpy(KPS[::-1].copy() + 3)[None], "size": torch.tensor([[64, 64]])})
    kw = dict(prompt="a photo", num_inference_steps=1, height=SIZE, width=SIZE, output_type="np")
    b = p.generate(subject=loaded, pose_reference=moved, generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(a - b).max() > 1e-4  # another pose, another IdentityNet condition
    bare = Subject(subject.features, subject.negative, "instantid", "insightface-antelopev2")
    with pytest.raises(LookalikeError, match="no face keypoints"):
        p.generate(subject=bare, **kw)


def test_damaged_landmarks_and_a_foreign_identitynet_are_refused(instantid, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, path, subject = instantid
    file = subject.save(tmp_path / "face.safetensors")
    tensors = load_file(str(file))
    tensors["landmarks.kps"] = torch.full((1, 5, 2), float("nan"))
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(LookalikeError, match="'landmarks.kps' holds NaN"):  # the file reader's own check
        Subject.load(tmp_path / "bad.safetensors")
    tensors["landmarks.kps"] = torch.zeros(1, 4, 2)  # finite, but not 5 keypoints
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(LookalikeError, match="damaged face landmarks"):
        Subject.load(tmp_path / "bad.safetensors")
    sd15 = fresh_pipe("sd15")
    from diffusers import ControlNetModel

    ControlNetModel.from_unet(sd15.unet).save_pretrained(tmp_path / "sd15net")
    p = Personalizer(fresh_pipe("sdxl"))
    with pytest.raises(LookalikeError, match="made for another model"):
        p.load_adapter(str(path), identitynet=tmp_path / "sd15net")
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    moved = alone / "ip-adapter.safetensors"
    moved.write_bytes(path.read_bytes())
    with pytest.raises(LookalikeError, match="no ControlNetModel/ folder beside .*identitynet=False"):
        p.load_adapter(str(moved))  # a local file: never a silent download
    p.load_adapter(str(moved), identitynet=False)
    assert p.identitynets == {} and len(p.adapters) == 1


def test_encode_keeps_the_raw_embedding_and_keypoints_and_a_saved_face_runs_no_detector(tmp_path, monkeypatch):
    from pathlib import Path

    from skimage import data

    from lookalike.encoders.face import FaceEncoder

    from helpers import YUNET, tiny_arcface_pack

    yunet = next((p for p in (YUNET, Path(__file__).resolve().parents[3] / "shared" / YUNET.relative_to(
        YUNET.parents[2])) if p.is_file()), None)
    if yunet is None:
        pytest.skip("../shared (the YuNet model) is absent")
    pipe = fresh_pipe("sdxl")
    spec = get_spec("instantid")
    adapter = random_adapter(spec, pipe, seed=5)  # tiny widths, ArcFace's 512-d input
    path = save_adapter(adapter, tmp_path / "ip-adapter.safetensors")
    tiny_identitynet(pipe.unet).save_pretrained(tmp_path / "ControlNetModel")
    encoder = FaceEncoder.from_folder(tiny_arcface_pack(tmp_path / "pack"), detector="yunet", yunet_model=yunet)
    p = Personalizer(pipe, face_encoder=encoder)
    p.load_adapter(str(path))
    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    subject = p.encode([photo], "instantid")
    face = encoder.encode_faces([photo])[0]
    assert torch.allclose(subject.features["face_id"][0, 0], torch.from_numpy(face.embedding))  # raw, as the authors
    assert abs(face.embedding).sum() > 0 and abs(np.linalg.norm(face.embedding) - 1) > 1e-3
    assert torch.equal(subject.landmarks["kps"][0], torch.from_numpy(face.kps))
    assert subject.landmarks["size"].tolist() == [[512, 512]]
    saved = Subject.load(subject.save(tmp_path / "face.safetensors"))

    def no_detector(*args, **kwargs):
        raise AssertionError("a saved face must not run the detector")

    monkeypatch.setattr(encoder.detector, "detect", no_detector)
    image = p.generate(subject=saved, prompt="a photo", num_inference_steps=1, height=SIZE, width=SIZE,
                       output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(image).all()


def test_another_controlnet_beside_identitynet_as_in_the_authors_multi_controlnet_demo(instantid):
    folder, path, subject = instantid
    depth_net = tiny_identitynet(fresh_pipe("sdxl").unet, seed=9)
    depth = Image.fromarray(np.random.default_rng(1).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    p, a = ours(fresh_pipe("sdxl"), path, subject, controlnets=[(depth_net, depth, 0.4)], num_inference_steps=1)
    b = authors_reference(folder, path, subject, extra=(depth_net, depth, 0.4), steps=1)
    assert abs(a - b).max() <= TOL
    alone = p.generate(subject=subject, prompt="a photo", num_inference_steps=1, guidance_scale=5.0, height=SIZE,
                       width=SIZE, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert abs(a - alone).max() > 1e-3

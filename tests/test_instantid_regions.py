"""Several people in one image without blending (FaceID, FaceID-Plus v2, InstantID).

At every masked cross-attention layer, the output inside a face's region equals that of a generation with
that face alone (same layer input), so no region reads another face's tokens; IdentityNet runs once per
face and its residuals inside a region equal that face's alone. Regions also come from a layout photo's faces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_instantid import KPS, SIZE, tiny_identitynet

from lookalike import Personalizer
from lookalike.adapters.attach import AdapterHandle, downsample_mask
from lookalike.adapters.spec import get_spec
from lookalike.pipeline.identity import FaceControl, face_tokens, strip_regions
from lookalike.pipeline.subject import Subject, box_mask
from lookalike.weights.io import save_adapter

from helpers import YUNET as _YUNET
from helpers import fresh_pipe, random_adapter, tiny_arcface_pack

YUNET = next((p for p in (_YUNET, Path(__file__).resolve().parents[3] / "shared" / _YUNET.relative_to(_YUNET.parents[2]))
              if p.is_file()), _YUNET)
BOXES = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]


def face_subject(spec, seed: int, shift: float = 0.0) -> Subject:
    g = torch.Generator().manual_seed(seed)
    feats = {"face_id": torch.randn(1, 1, spec.embed_dim, generator=g)}
    if "patch" in spec.features:
        feats["patch"] = torch.randn(1, 1, 9, spec.projector_kwargs["clip_dim"], generator=g)
    neg = {k: torch.zeros_like(v) for k, v in feats.items()}
    marks = {"kps": torch.from_numpy(KPS + shift)[None], "size": torch.tensor([[64, 64]])}
    return Subject(feats, neg, spec.name, spec.encoder, landmarks=marks)


def setup(name: str, tmp_path: Path):
    spec = get_spec(name)
    pipe = fresh_pipe(spec.base)
    adapter = random_adapter(spec, pipe, seed=11)
    p = Personalizer(pipe)
    if spec.controlnet_subfolder:
        path = save_adapter(adapter, tmp_path / "ip-adapter.safetensors")
        tiny_identitynet(pipe.unet).save_pretrained(tmp_path / "ControlNetModel")
        p.load_adapter(str(path))
    else:
        p.load_adapter(adapter)
    a, b = face_subject(p.adapters[0].spec, 1), face_subject(p.adapters[0].spec, 2, shift=-6.0)
    return p, a, b


def layer_outputs(p, inputs, hidden: dict, context: torch.Tensor) -> dict:
    """Every cross-attention layer's output for the same input hidden states, under ``inputs``."""
    out = {}
    with torch.no_grad(), p.handle.conditioned(inputs):
        for layer in [x for x in p.handle.layers if x.is_cross]:
            attn = p.pipe.unet.get_submodule(layer.name.removesuffix(".processor"))
            out[layer.index] = attn(hidden[layer.index], encoder_hidden_states=context)
    return out


@pytest.mark.parametrize("name", ["ip-adapter-faceid_sd15", "ip-adapter-faceid-plusv2_sd15", "instantid"])
def test_each_region_attends_only_to_its_own_face(tmp_path, name):
    p, a, b = setup(name, tmp_path)
    kw = {"height": SIZE, "width": SIZE}
    both_embeds, both_negs, masks = p._from_subjects(None, [a, b], BOXES, kw)
    two = p.condition_inputs(both_embeds, both_negs, 0.9, masks, (0.0, 1.0))
    g = torch.Generator().manual_seed(0)
    context = torch.randn(2, 7, p.pipe.unet.config.cross_attention_dim, generator=g)
    hidden, regions = {}, {}
    for layer in [x for x in p.handle.layers if x.is_cross]:
        level = list(p.pipe.unet.config.block_out_channels).index(layer.hidden)  # the UNet level it runs at
        queries = (SIZE // p.pipe.vae_scale_factor // 2**level) ** 2
        hidden[layer.index] = torch.randn(2, queries, layer.hidden, generator=g)
        regions[layer.index] = [downsample_mask(box_mask(box, SIZE, SIZE)[None], queries)[0, :, 0] for box in BOXES]
    together = layer_outputs(p, two, hidden, context)
    for i, subject in enumerate((a, b)):
        embeds, negs, _ = p._from_subjects(subject, None, None, kw)
        alone = layer_outputs(p, p.condition_inputs(embeds, negs, 0.9, None, (0.0, 1.0)), hidden, context)
        base = layer_outputs(p, [None], hidden, context)
        for index, out in together.items():
            own, other = regions[index][i], regions[index][1 - i]
            inside = ((own - 1).abs() < 1e-6) & (other.abs() < 1e-6)
            assert inside.sum() > 0
            assert abs(out[:, inside] - alone[index][:, inside]).max() <= 1e-5
            assert abs(alone[index][:, inside] - base[index][:, inside]).max() > 1e-4  # the face moves it


def test_identitynet_runs_once_per_face_inside_its_region(tmp_path):
    p, a, b = setup("instantid", tmp_path)
    net = next(iter(p.identitynets.values()))
    adapter = p.adapters[0]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        tok = [adapter.project(s.features)[:, 0] for s in (a, b)]
        neg = [adapter.project(s.negative)[:, 0] for s in (a, b)]
        x = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=g)
        conds = [torch.rand(2, 3, SIZE, SIZE, generator=g) for _ in range(2)]
        added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
        masks = [box_mask(box, SIZE, SIZE) for box in BOXES]
        faces = [FaceControl(t, n, m) for t, n, m in zip(tok, neg, masks)]
        prompt = torch.randn(2, 5, 64, generator=g)
        with face_tokens(net, faces):  # as diffusers' MultiControlNetModel calls it: face 0, then face 1, summed
            runs = [net(x, 400, encoder_hidden_states=prompt, controlnet_cond=c, conditioning_scale=0.8,
                        added_cond_kwargs=added, return_dict=False) for c in conds]
        summed = [r0 + r1 for r0, r1 in zip([*runs[0][0], runs[0][1]], [*runs[1][0], runs[1][1]])]
        for i in range(2):
            alone = net(x, 400, encoder_hidden_states=torch.cat([neg[i], tok[i]]), controlnet_cond=conds[i],
                        conditioning_scale=0.8, added_cond_kwargs=added, return_dict=False)
            for got, ref in zip(summed, [*alone[0], alone[1]]):
                keep = torch.nn.functional.interpolate(masks[i][None, None], size=got.shape[-2:], mode="nearest")
                assert abs((got - ref) * keep).max() <= 1e-5
                assert abs(ref * keep).max() > 1e-4


def test_two_people_generate_with_each_face_in_its_region(tmp_path):
    p, a, b = setup("instantid", tmp_path)
    kw = dict(prompt="two people", num_inference_steps=1, guidance_scale=5.0, height=SIZE, width=SIZE,
              output_type="np")
    two = p.generate(subjects=[a, b], regions=BOXES, generator=torch.Generator().manual_seed(0), **kw).images
    swapped = p.generate(subjects=[b, a], regions=BOXES, generator=torch.Generator().manual_seed(0), **kw).images
    assert np.isfinite(two).all() and abs(two - swapped).max() > 1e-4
    bad = Subject({"face_id": torch.cat([a.features["face_id"]] * 2, 1)},
                  {"face_id": torch.cat([a.negative["face_id"]] * 2, 1)}, "instantid", a.encoder,
                  landmarks={"kps": torch.cat([a.landmarks["kps"]] * 2), "size": torch.cat([a.landmarks["size"]] * 2)})
    with pytest.raises(Exception, match="combine='mean'"):
        p.generate(subjects=[bad, b], regions=BOXES, generator=torch.Generator().manual_seed(0), **kw)


def test_strip_regions_split_halfway_between_faces():
    assert strip_regions([10.0, 30.0], 40) == [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    assert strip_regions([5.0], 40) == [(0.0, 0.0, 1.0, 1.0)]


@pytest.mark.skipif(not YUNET.is_file(), reason="../shared (the YuNet model) is absent")
def test_regions_come_from_the_faces_of_a_layout_photo(tmp_path, monkeypatch):
    from skimage import data

    from lookalike.encoders.face import FaceEncoder

    spec = get_spec("ip-adapter-faceid_sd15")
    pipe = fresh_pipe("sd15")
    encoder = FaceEncoder.from_folder(tiny_arcface_pack(tmp_path / "pack"), detector="yunet", yunet_model=YUNET)
    p = Personalizer(pipe, face_encoder=encoder)
    p.load_adapter(random_adapter(spec, pipe, seed=4))
    astronaut = data.astronaut()
    layout = Image.fromarray(np.concatenate([astronaut, astronaut[:, ::-1]], axis=1))  # two faces, side by side
    seen = []
    conditioned = AdapterHandle.conditioned
    monkeypatch.setattr(AdapterHandle, "conditioned", lambda self, inputs: seen.append(inputs) or conditioned(
        self, inputs))
    a, b = face_subject(p.adapters[0].spec, 1), face_subject(p.adapters[0].spec, 2)
    p.generate(subjects=[a, b], pose_reference=layout, prompt="two", num_inference_steps=1, height=32, width=64,
               output_type="np")
    masks = seen[0][0].masks[0]  # (faces, H, W)
    faces = encoder.detect(layout)
    cut = (faces[0].kps[:, 0].mean() + faces[1].kps[:, 0].mean()) / 2 / layout.width * 64
    assert masks.shape == (2, 32, 64)
    assert masks[0, :, : int(cut)].min() == 1 and masks[0, :, int(cut) + 1:].max() == 0
    assert masks[1, :, int(cut) + 1:].min() == 1 and masks[1, :, : int(cut)].max() == 0

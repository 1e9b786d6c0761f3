"""Auto layout (issue 20): regions from the prompt's own text cross-attention, subjects acting only there."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from lookalike import Personalizer
from lookalike.adapters.layout import layout_layers
from lookalike.adapters.spec import REGISTRY
from lookalike.errors import LookalikeError
from lookalike.pipeline.subject import Subject

from helpers import features_for, fresh_pipe, random_adapter

PROMPT = "a dog and a cat on a sofa"
#: The tiny character-level tokenizer: BOS, "a</w>", "d", "o", "g</w>", "a", "n", "d</w>", "a</w>", "c", "a", "t</w>"
DOG, CAT = [2, 3, 4], [9, 10, 11]
#: Queries at the layout level of the tiny UNets for 32 px images (latent 16x16): SD1.5-shaped latent/1,
#: SDXL-shaped latent/2 (the coarsest down block with cross-attention).
LEVEL = {"sd15": 256, "sdxl": 64}
VARIANT = {"sd15": "ip-adapter-plus_sd15", "sdxl": "ip-adapter-plus_sdxl_vit-h"}
KW = dict(num_inference_steps=3, guidance_scale=5.0, height=32, width=32, output_type="np")


def setup(base="sd15"):
    pipe = fresh_pipe(base)
    p = Personalizer(pipe)
    adapter = random_adapter(REGISTRY[VARIANT[base]], pipe)
    p.load_adapter(adapter)
    subjects = []
    for seed in (1, 2):
        feats = features_for(adapter.spec, seed=seed)["patch"]
        neg = features_for(adapter.spec, seed=seed + 10)["patch"]
        subjects.append(Subject({"patch": feats}, {"patch": neg}, adapter.name, "test"))
    return p, subjects


def run(p, subjects, seed=0, **extra):
    kw = {**KW, "layout_start": 0.5, **extra}
    return p.generate(PROMPT, subjects=subjects, generator=torch.Generator().manual_seed(seed), **kw)


class RecordingProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor that also stores softmax(QK^T) of cross-attention with ``queries`` positions."""

    def __init__(self, store: list, queries: int, on: list) -> None:
        super().__init__()
        self.store, self.queries, self.on = store, queries, on

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        if self.on[0] and encoder_hidden_states is not None and hidden_states.shape[1] == self.queries:
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            probs = attn.get_attention_scores(q, k, None)  # (B * heads, Q, S)
            self.store.append(probs.reshape(hidden_states.shape[0], attn.heads, *probs.shape[1:]))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_regions_equal_a_computation_by_hand_from_independently_recorded_probabilities(base):
    p, (dog, cat) = setup(base)
    out = run(p, {"dog": dog, "cat": cat})
    tok = p.pipe.tokenizer
    ids = tok(PROMPT).input_ids
    assert "".join(tok.convert_ids_to_tokens([ids[i] for i in DOG])) == "dog</w>"
    assert "".join(tok.convert_ids_to_tokens([ids[i] for i in CAT])) == "cat</w>"

    plain = fresh_pipe(base)  # plain diffusers, no lookalike: the first UNet calls run on text alone too
    store, on, calls = [], [True], []
    plain.unet.set_attn_processor(RecordingProcessor(store, LEVEL[base], on))

    def count(*_):
        calls.append(1)
        on[0] = len(calls) <= 2  # 3 steps, layout_start 0.5: steps 0 and 1 (progress 0, 1/3) are recorded

    plain.unet.register_forward_pre_hook(count)
    plain(PROMPT, generator=torch.Generator().manual_seed(0), **KW)
    assert len(store) == 2 * len(layout_layers(p.pipe.unet, p.handle.layers))

    total = sum(pr[pr.shape[0] // 2:].mean(dim=1) for pr in store)[0]  # conditional half, mean over heads: (Q, S)
    side = int(LEVEL[base] ** 0.5)
    maps = []
    for tokens in (DOG, CAT):
        m = total[:, tokens].mean(dim=1)
        m = (m - m.min()) / (m.max() - m.min())
        maps.append(F.interpolate(m.reshape(1, 1, side, side), size=(32, 32), mode="bilinear")[0, 0])
    maps = torch.stack(maps)
    best, winner = maps.max(dim=0)
    expected = [((winner == i) & (best >= 0.5)).float() for i in range(2)]
    for i, phrase in enumerate(("dog", "cat")):
        assert torch.allclose(out.attention[phrase], maps[i], atol=1e-4)
        sure = (best - 0.5).abs() > 1e-3  # positions not on the threshold's edge (float rounding)
        assert torch.equal(out.regions[phrase][sure], expected[i][sure])
        assert out.regions[phrase].shape == (32, 32) and out.regions[phrase].sum() > 0


def _capture(module):
    """Forward hook keeping the module's last (hidden_states, encoder_hidden_states, output)."""
    seen = {}

    def hook(mod, args, kwargs, output):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["context"] = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        seen["out"] = output

    seen["hook"] = module.register_forward_hook(hook, with_kwargs=True)
    return seen


def test_regions_are_disjoint_and_each_subject_acts_only_with_its_tokens_in_its_region():
    p, (dog, cat) = setup()
    layer = [x for x in layout_layers(p.pipe.unet, p.handle.layers)][0]
    attn = p.pipe.unet.get_submodule(layer.name.removesuffix(".processor"))
    seen = _capture(attn)  # its last call is at the last step, after layout_start
    out = run(p, {"dog": dog, "cat": cat}, scale=0.8)
    seen["hook"].remove()
    r_dog, r_cat = out.regions["dog"], out.regions["cat"]
    assert (r_dog * r_cat).sum() == 0 and r_dog.sum() > 0 and r_cat.sum() > 0
    assert set(torch.unique(r_dog + r_cat).tolist()) <= {0.0, 1.0}

    def alone(subject, region):
        if subject is None:
            return attn(seen["hidden"], encoder_hidden_states=seen["context"])
        inputs = p.condition_inputs([subject.features], [subject.negative], 0.8, [region[None, None]], (0.0, 1.0))
        with p.handle.conditioned(inputs):
            return attn(seen["hidden"], encoder_hidden_states=seen["context"])

    with torch.no_grad():
        text, only_dog, only_cat = alone(None, None), alone(dog, r_dog), alone(cat, r_cat)
    both = seen["out"]
    assert (both - text).abs().max() > 1e-3  # the subjects act at this layer
    assert torch.allclose(both - text, (only_dog - text) + (only_cat - text), atol=1e-5)
    from lookalike.adapters.attach import downsample_mask

    cat_small = downsample_mask(r_cat[None], both.shape[1])[0, :, 0]  # the cat's mask at this layer
    dog_small = downsample_mask(r_dog[None], both.shape[1])[0, :, 0]
    inside = (cat_small == 0) & (dog_small > 0)
    assert inside.any() and not torch.allclose(only_dog, only_cat)
    assert torch.allclose(both[:, inside], only_dog[:, inside], atol=1e-5)
    assert (both[:, inside] - text[:, inside]).abs().max() > 1e-4
    outside = (cat_small == 0) & (dog_small == 0)  # no subject's region reaches here: text alone
    if outside.any():
        assert torch.allclose(both[:, outside], text[:, outside], atol=1e-6)


def test_one_subject_with_threshold_zero_equals_the_plain_adapter_after_the_start_step():
    p, (dog, _) = setup()
    kw = {**KW, "output_type": "latent", "num_inference_steps": 5}  # latents: the VAE damps small changes
    out = run(p, {"dog": dog}, layout_threshold=0.0, layout_start=0.4, **kw)
    assert torch.equal(out.regions["dog"], torch.ones(32, 32))
    plain = p.generate(PROMPT, subject=dog, window=(0.4, 1.0), generator=torch.Generator().manual_seed(0), **kw)
    # float rounding only: the recorded layers compute attention explicitly, the plain run with SDPA
    assert (out.images - plain.images).abs().max() <= 1e-5 * plain.images.abs().max()
    base = fresh_pipe("sd15")(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    assert (out.images - base).abs().max() > 1e-3


def test_the_same_seed_gives_the_same_image_regions_and_maps():
    p, (dog, cat) = setup()
    a, b = (run(p, {"dog": dog, "cat": cat}) for _ in range(2))
    assert torch.equal(torch.from_numpy(a.images), torch.from_numpy(b.images))
    for phrase in ("dog", "cat"):
        assert torch.equal(a.regions[phrase], b.regions[phrase])
        assert torch.equal(a.attention[phrase], b.attention[phrase])


def test_each_image_of_a_batch_gets_its_own_regions_equal_to_generating_it_alone():
    p, (dog, cat) = setup()
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    both = run(p, {"dog": dog, "cat": cat}, num_images_per_prompt=2, latents=latents)
    alone = run(p, {"dog": dog, "cat": cat}, latents=latents[1:])
    assert both.regions["dog"].shape == (2, 32, 32)
    assert torch.equal(both.regions["dog"][1], alone.regions["dog"])
    assert torch.allclose(both.attention["cat"][1], alone.attention["cat"], atol=1e-6)
    assert abs(both.images[1] - alone.images[0]).max() <= 1e-5
    assert not torch.equal(both.attention["dog"][0], both.attention["dog"][1])


def test_a_phrase_missing_from_the_prompt_is_a_one_line_error():
    p, (dog, cat) = setup()
    with pytest.raises(LookalikeError, match="'horse' is not in the prompt") as err:
        run(p, {"dog": dog, "horse": cat})
    assert "\n" not in str(err.value)
    with pytest.raises(LookalikeError, match="past the"):  # one character = one token in the tiny tokenizer
        p.generate("x" * 90 + " a dog", subjects={"dog": dog}, **KW)
    with pytest.raises(LookalikeError, match="dogs"):  # a word, not part of one
        run(p, {"dogs": dog})
    with pytest.raises(LookalikeError, match="layout_start"):
        run(p, {"dog": dog}, layout_start=0.0)
    with pytest.raises(LookalikeError, match="Subject"):
        run(p, {"dog": "dog.safetensors"})


def test_non_finite_recorded_attention_is_an_error_not_empty_regions():
    from lookalike.adapters.layout import LayoutRecorder

    p, _ = setup()
    layers = layout_layers(p.pipe.unet, p.handle.layers)
    recorder = LayoutRecorder(p.handle, [DOG, CAT], layers, samples=1, start=0.5)
    probs = torch.full((2, 2, 256, 77), 1 / 77)
    probs[1, 0, 5] = float("nan")
    recorder.record(layers[0], probs)
    with pytest.raises(LookalikeError, match="NaN or Inf"):
        recorder.regions(32, 32, 0.5)


def test_the_recorder_holds_one_map_per_phrase_whatever_the_number_of_steps():
    p, (dog, cat) = setup()
    layers = len(layout_layers(p.pipe.unet, p.handle.layers))
    short = run(p, {"dog": dog, "cat": cat}, num_inference_steps=4).layout  # steps 0, 1 recorded
    long = run(p, {"dog": dog, "cat": cat}, num_inference_steps=8).layout  # steps 0..3 recorded
    assert (short.calls, long.calls) == (2 * layers, 4 * layers)  # only the layout layers, only before start
    assert short.sums.shape == long.sums.shape == (1, 2, LEVEL["sd15"])
    assert short.nbytes() == long.nbytes()


# -- the command line -------------------------------------------------------------------------------------


def _one_error(capsys, *words):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert all(w in lines[0] for w in words), lines[0]


def test_cli_subject_for_writes_disjoint_region_pngs_and_a_heatmap_per_phrase(tmp_path):
    from PIL import Image

    from lookalike import cli

    from helpers import DREAMBENCH

    out = tmp_path / "pair.png"
    code = cli.main(["generate", "--model", "tiny-random", "--steps", "3", "--layout-start", "0.5",
                     "--prompt", PROMPT, "--subject-for", f"dog={DREAMBENCH / 'dog' / '00.jpg'}",
                     "--subject-for", f"cat={DREAMBENCH / 'cat' / '00.jpg'}", "--save-regions", "--save-attention",
                     "--out", str(out)])
    assert code == 0
    names = {"pair.png", *(f"pair-{k}-{ph}.png" for k in ("region", "attention") for ph in ("dog", "cat"))}
    assert {f.name for f in tmp_path.iterdir()} == names
    with Image.open(out) as image:
        size, meta = image.size, dict(image.text)
    assert set(json.loads(meta["subject_for"])) == {"dog", "cat"} and meta["layout"] == "start=0.5,threshold=0.5"
    regions = []
    for phrase in ("dog", "cat"):
        with Image.open(tmp_path / f"pair-region-{phrase}.png") as region:
            assert region.size == size and region.mode == "L"
            regions.append(torch.from_numpy(np.asarray(region).copy()))
    assert set(torch.unique(torch.cat([r.flatten() for r in regions])).tolist()) <= {0, 255}
    assert ((regions[0] > 0) & (regions[1] > 0)).sum() == 0
    heat = [np.asarray(Image.open(tmp_path / f"pair-attention-{ph}.png").convert("RGB")) for ph in ("dog", "cat")]
    assert heat[0].shape == (size[1], size[0], 3) and abs(heat[0].astype(int) - heat[1]).max() > 0


def test_cli_layout_mistakes_are_one_error_line(tmp_path, capsys):
    from lookalike import cli

    from helpers import DREAMBENCH

    photo = DREAMBENCH / "dog" / "00.jpg"
    base = ["generate", "--model", "tiny-random", "--steps", "2", "--out", str(tmp_path / "x.png")]
    assert cli.main([*base, "--prompt", "a dog", "--reference", str(photo), "--save-regions"]) == 2
    _one_error(capsys, "--save-regions", "--subject-for")
    assert cli.main([*base, "--prompt", "a dog", "--subject-for", f"dog{photo}"]) == 2
    _one_error(capsys, "PHRASE=FILE")
    assert cli.main([*base, "--prompt", "a dog", "--subject-for", f"horse={photo}"]) == 2
    _one_error(capsys, "'horse' is not in the prompt")
    assert list(tmp_path.iterdir()) == []

"""Kolors IP-Adapter-Plus on a tiny KolorsPipeline (ChatGLM text encoder, SDXL-shaped UNet whose own
encoder_hid_proj maps the prompt to the cross-attention width): lookalike equals diffusers' load_ip_adapter."""

from __future__ import annotations

import copy

import pytest
import torch

from lookalike import Personalizer
from lookalike.adapters.spec import ENCODERS, REGISTRY
from lookalike.weights.io import detect_spec, official_state_dict

from helpers import features_for, random_adapter

TOL = 1e-5
CHATGLM = 32  # tiny ChatGLM width (Kolors: 4096); the UNet projects it to its cross-attention width
_PIPE: dict = {}


class _PositionTokenizer:
    """A tiny character-level tokenizer that also returns ``position_ids``, as ChatGLMTokenizer does (the real one
    needs sentencepiece and a downloaded vocabulary)."""

    def __init__(self) -> None:
        from lookalike.pipeline.tiny import tiny_tokenizer

        self.inner = tiny_tokenizer()

    def __len__(self) -> int:
        return len(self.inner)

    def __call__(self, text, **kwargs):
        from transformers import BatchEncoding

        out = self.inner(text, **kwargs)
        ids = out["input_ids"]
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        return BatchEncoding({"input_ids": ids, "attention_mask": out["attention_mask"], "position_ids": positions})


def _chatglm(vocab: int, seed: int = 0):
    """A 2-layer ChatGLM3-shaped encoder. Its constructor leaves weights uninitialised (skip_init), so every
    parameter gets seeded noise (norm weights around 1)."""
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    config = ChatGLMConfig(num_layers=2, padded_vocab_size=vocab, hidden_size=CHATGLM, ffn_hidden_size=64,
                           kv_channels=8, num_attention_heads=4, seq_length=256, multi_query_attention=True,
                           multi_query_group_num=2, add_qkv_bias=True, original_rope=True)
    model = ChatGLMModel(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1 + noise if "layernorm" in name else noise)
    return model


def kolors_pipe():
    """A tiny KolorsPipeline (fp32, CPU): diffusers' own class, imported from its module because the package
    export asks for sentencepiece (the real ChatGLM tokenizer's dependency) even where no tokenizer needs it."""
    if "kolors" not in _PIPE:
        from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
        from diffusers.pipelines.kolors.pipeline_kolors import KolorsPipeline

        from lookalike.pipeline.tiny import tiny_vae

        tok = _PositionTokenizer()
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, cross_attention_dim=64, encoder_hid_dim=CHATGLM,
            encoder_hid_dim_type="text_proj", projection_class_embeddings_input_dim=8 * 6 + CHATGLM).eval()
        _PIPE["kolors"] = KolorsPipeline(vae=tiny_vae(0), text_encoder=_chatglm(len(tok)), tokenizer=tok, unet=unet,
                                         scheduler=EulerDiscreteScheduler(), image_encoder=None,
                                         feature_extractor=None)
    return copy.deepcopy(_PIPE["kolors"])


def _kwargs(**extra):
    kw = dict(prompt="a photo", num_inference_steps=2, height=32, width=32, output_type="np",
              max_sequence_length=16, guidance_scale=5.0)
    kw.update(extra)
    return kw


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_kolors_ip_plus_matches_diffusers_on_kolors_pipeline(tmp_path):
    """The official nested .bin, loaded by lookalike and by diffusers' IPAdapterMixin on KolorsPipeline (which
    moves the UNet's text projection aside to make room for the image projection)."""
    ours = kolors_pipe()
    adapter = random_adapter(REGISTRY["kolors-ip-plus"], ours, seed=1)
    path = tmp_path / "ip_adapter_plus_general.bin"
    torch.save(official_state_dict(adapter), path)
    p = Personalizer(ours)
    p.load_adapter(str(path), spec=adapter.spec)
    feats = features_for(adapter.spec, seed=10)["patch"]
    neg = features_for(adapter.spec, seed=20)["patch"]
    a = p.generate(image_embeds=feats, negative_image_embeds=neg, scale=0.5, generator=gen(), **_kwargs()).images

    theirs = kolors_pipe()
    theirs.load_ip_adapter(str(tmp_path), subfolder="", weight_name=path.name, image_encoder_folder=None)
    theirs.set_ip_adapter_scale(0.5)
    b = theirs(ip_adapter_image_embeds=[torch.cat([neg, feats])], generator=gen(), **_kwargs()).images
    plain = kolors_pipe()(generator=gen(), **_kwargs()).images
    assert abs(a - b).max() <= TOL
    assert abs(a - plain).max() > 1e-3, "the adapter must change the image"
    p.unload_adapters()
    assert (p.pipe(generator=gen(), **_kwargs()).images == plain).all()


def test_full_size_kolors_file_is_named_by_the_registry():
    """A real-size Kolors Plus file (Resampler 2048 wide, 12 heads, ViT-L/14-336 input) is matched to
    kolors-ip-plus by its shapes, so it runs with the 336 px encoder, not ViT-H's (shapes only: built on meta)."""
    from lookalike.adapters.module import IPAdapter
    from lookalike.pipeline.tiny import tiny_unet

    spec = REGISTRY["kolors-ip-plus"]
    unet = tiny_unet("sdxl", cross_attention_dim=2048)
    with torch.device("meta"):
        sd = IPAdapter.for_unet(spec, unet).state_dict()
    assert tuple(sd["image_proj.proj_in.weight"].shape) == (2048, ENCODERS["clip-vit-l-14-336"].patch_dim)
    assert detect_spec(sd, filename="ip_adapter_plus_general.bin") is spec
    assert detect_spec(sd, filename="renamed.bin").encoder == "clip-vit-l-14-336"

"""Style / layout transfer: the named block sets are ComfyUI_IPAdapter_plus's, in diffusers' block names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike.adapters.attach import expand_block_scale
from lookalike.adapters.transfer import transfer_scale
from lookalike.errors import LookalikeError

# ComfyUI's weight types (IPAdapterPlus.py): transformer models numbered in the order they run -> weight.
COMFY = {
    ("style", "sd15"): {i: 1.0 for i in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)},
    ("style", "sdxl"): {6: 1.0},
    ("layout", "sd15"): {4: 0.25, 5: 1.0},
    ("layout", "sdxl"): {3: 1.0},
    ("strong-style", "sd15"): {i: 1.0 for i in (0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)},
    ("strong-style", "sdxl"): {i: 1.0 for i in (0, 1, 2, 4, 5, 6, 7, 8, 9, 10)},
}


def full_layout_unet(base: str, cross: int = 32):
    """A UNet with SD1.5's or SDXL's block layout (which blocks have attention, how many), tiny widths."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if base == "sd15":
        blocks = dict(block_out_channels=(16, 16, 32, 32),
                      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    else:
        blocks = dict(block_out_channels=(16, 16, 32), down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                      up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",))
    return UNet2DConditionModel(sample_size=16, layers_per_block=2, norm_num_groups=8, attention_head_dim=8,
                                cross_attention_dim=cross, **blocks).eval()


def run_order(unet) -> list[str]:
    """The UNet's transformer models in the order a forward pass runs them (ComfyUI's transformer_index)."""
    from diffusers import Transformer2DModel

    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: order.append(name))
             for name, m in unet.named_modules() if isinstance(m, Transformer2DModel)]
    with torch.no_grad():
        unet(torch.randn(1, 4, 16, 16), 10, encoder_hidden_states=torch.randn(1, 3, unet.config.cross_attention_dim))
    for h in hooks:
        h.remove()
    return order


@pytest.mark.parametrize("base, layers", [("sd15", 16), ("sdxl", 11)])
def test_each_transfer_scales_the_blocks_comfyui_numbers_and_zeroes_the_rest(base, layers):
    unet = full_layout_unet(base)
    order = run_order(unet)
    assert len(order) == layers  # ComfyUI's CrossAttentionPatch.layers
    for kind in ("style", "layout", "strong-style"):
        per_prefix = expand_block_scale(unet, transfer_scale(kind, base, scale=0.8))
        assert set(per_prefix) == set(order)
        nonzero = {order.index(prefix): value for prefix, value in per_prefix.items() if value}
        assert nonzero == pytest.approx({i: 0.8 * w for i, w in COMFY[(kind, base)].items()}), kind


def test_transfer_all_is_the_plain_scale_and_unknown_names_are_refused():
    assert transfer_scale("all", "sdxl", 0.7) == 0.7
    with pytest.raises(LookalikeError, match="choose one of all, style, layout, strong-style"):
        transfer_scale("colour", "sd15")
    with pytest.raises(LookalikeError, match="sd15 and sdxl"):
        transfer_scale("style", "flux")


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_cli_transfer_style_generates_as_the_api_does_with_that_scale_and_records_it(tmp_path):
    from lookalike import cli
    from lookalike.pipeline.demo import demo_adapter
    from lookalike.pipeline.output import DEFAULT_NEGATIVE
    from lookalike.pipeline.personalizer import Personalizer
    from lookalike.pipeline.subject import Subject
    from lookalike.pipeline.tiny import tiny_pipeline
    from lookalike.weights.io import save_adapter

    pipe = tiny_pipeline("sd15")
    pipe.unet = full_layout_unet("sd15")
    folder = tmp_path / "sd15-layout"
    pipe.save_pretrained(folder)
    checkpoint = save_adapter(demo_adapter("basic", pipe.unet), tmp_path / "basic.safetensors")
    photo = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(photo)
    subject = tmp_path / "s.safetensors"
    assert cli.main(["encode", "--model", "tiny-random", "--adapter", "basic", "--reference", str(photo),
                     "--out", str(subject)]) == 0

    args = ["generate", "--model", str(folder), "--adapter", str(checkpoint), "--subject", str(subject),
            "--prompt", "a dog", "--steps", "2", "--size", "32", "--seed", "4", "--scale", "0.9"]
    assert cli.main([*args, "--transfer", "style", "--out", str(tmp_path / "style.png")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "all.png")]) == 0
    assert Image.open(tmp_path / "style.png").text["transfer"] == "style"
    assert not np.array_equal(_pixels(tmp_path / "style.png"), _pixels(tmp_path / "all.png"))

    p = Personalizer.from_pretrained(folder)
    p.load_adapter(str(checkpoint))
    image = p.generate("a dog", subject=Subject.load(subject), scale=transfer_scale("style", "sd15", 0.9),
                       negative_prompt=DEFAULT_NEGATIVE, num_inference_steps=2, guidance_scale=7.5, height=32,
                       width=32, generator=torch.Generator("cpu").manual_seed(4)).images[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), _pixels(tmp_path / "style.png"))


def test_cli_transfer_on_a_unet_of_another_layout_exits_2_saying_to_use_all(tmp_path, capsys):
    from lookalike import cli

    photo = tmp_path / "ref.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(photo)
    code = cli.main(["generate", "--model", "tiny-random", "--reference", str(photo), "--prompt", "a dog",
                     "--steps", "1", "--transfer", "layout", "--out", str(tmp_path / "x.png")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --transfer layout") and "use --transfer all" in err[0]
    assert not (tmp_path / "x.png").exists()

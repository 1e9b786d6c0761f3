"""The command line on a FLUX folder: `generate --model <FLUX folder> --adapter <XLabs file>` and `info` on DiT files."""

from __future__ import annotations

import numpy as np
import torch
from dit_helpers import EMBED, flux_pipe, random_dit_adapter, sd3_pipe
from PIL import Image

from lookalike import cli
from lookalike.pipeline.subject import Subject
from lookalike.weights.dit_formats import save_published


def test_generate_on_a_flux_folder_with_an_xlabs_file(tmp_path, capsys):
    pipe = flux_pipe()
    pipe.save_pretrained(tmp_path / "flux")
    adapter = save_published(random_dit_adapter("flux-ip", pipe, seed=1), tmp_path / "ip_adapter.safetensors", "xlabs")
    feats = torch.randn(1, 1, EMBED, generator=torch.Generator().manual_seed(0))
    Subject({"pooled": feats}, {"pooled": torch.zeros_like(feats)}, "flux-ip", "clip-vit-l-14").save(
        tmp_path / "subject.safetensors")
    common = ["--model", str(tmp_path / "flux"), "--adapter", str(adapter), "--subject",
              str(tmp_path / "subject.safetensors"), "--prompt", "a photo", "--steps", "2", "--size", "32",
              "--device", "cpu", "--dtype", "float32", "--seed", "1"]
    assert cli.main(["generate", *common, "--out", str(tmp_path / "on.png")]) == 0
    assert cli.main(["generate", *common, "--scale", "0", "--out", str(tmp_path / "off.png")]) == 0
    on, off = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.float32) for n in ("on", "off"))
    assert on.shape == (32, 32, 3) and abs(on - off).max() > 1

    capsys.readouterr()
    assert cli.main(["info", str(adapter)]) == 0
    text = capsys.readouterr().out
    assert "flux-ip" in text and "flux" in text and "blocks:      2 (flux_double" in text and "tokens:      4" in text


def test_info_describes_sd35_and_instantx_files(tmp_path, capsys):
    sd3 = sd3_pipe()
    path = save_published(random_dit_adapter("sd35-ip", sd3), tmp_path / "ip-adapter.bin", "sd3-original")
    assert cli.main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "sd35-ip" in text and "sd3_joint" in text and "siglip" in text and "time_resampler" in text
    flux = flux_pipe()
    path = save_published(random_dit_adapter("flux-ip-instantx", flux), tmp_path / "x" / "ip-adapter.bin", "instantx")
    assert cli.main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "flux-ip-instantx" in text and "blocks:      4 (flux_double + flux_single" in text

"""Checkpoint reading and writing: official layouts, detection, fit checks and refusal of unsafe pickles."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from lookalike.adapters.spec import REGISTRY
from lookalike.errors import CheckpointMismatchError, LookalikeError, UnsafeCheckpointError
from lookalike.weights.io import (
    check_encoder,
    detect_spec,
    load_adapter,
    official_state_dict,
    read_checkpoint,
    save_adapter,
    spec_from_shapes,
)

from helpers import VARIANTS, fresh_pipe, random_adapter, tiny_spec


@pytest.mark.parametrize("name", VARIANTS)
def test_save_then_load_is_bit_exact_and_keeps_the_spec(tmp_path, name):
    pipe = fresh_pipe(REGISTRY[name].base)
    adapter = random_adapter(REGISTRY[name], pipe, lora=True)
    path = save_adapter(adapter, tmp_path / "x.safetensors")
    loaded = load_adapter(path, pipe.unet)
    assert loaded.spec == adapter.spec
    a, b = adapter.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_official_bin_files_load_with_variant_detected_from_shapes(tmp_path, layout):
    pipe = fresh_pipe("sd15")
    adapter = random_adapter(REGISTRY["ip-adapter-plus_sd15"], pipe)
    nested = official_state_dict(adapter)
    obj = nested if layout == "nested" else {f"{s}.{k}": v for s, d in nested.items() for k, v in d.items()}
    torch.save(obj, tmp_path / "ip-adapter-plus_sd15.bin")
    loaded = load_adapter(tmp_path / "ip-adapter-plus_sd15.bin", pipe.unet)
    assert loaded.spec.projector == "resampler" and loaded.spec.num_tokens == 16
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in adapter.state_dict().items())


@pytest.mark.parametrize("name", VARIANTS)
def test_shapes_alone_recover_the_architecture(name):
    pipe = fresh_pipe(REGISTRY[name].base)
    adapter = random_adapter(REGISTRY[name], pipe, lora=True)
    found = spec_from_shapes(adapter.state_dict())
    want = adapter.spec
    assert (found.projector, found.features, found.num_tokens if want.projector != "mlp" else 257,
            found.embed_dim, found.cross_attention_dim, found.lora_rank) == (
        want.projector, want.features, want.num_tokens, want.embed_dim, want.cross_attention_dim, want.lora_rank)
    for key in ("dim", "heads", "clip_dim", "mult"):
        assert found.projector_kwargs.get(key) == want.projector_kwargs.get(key)


def test_full_size_official_shapes_are_named_by_the_registry():
    """A real-size plus-face file without metadata is matched to its registry entry by file name and shapes."""
    from lookalike.adapters.module import IPAdapter
    from lookalike.pipeline.tiny import tiny_unet

    spec = REGISTRY["ip-adapter-plus-face_sd15"]
    adapter = IPAdapter.for_unet(spec, tiny_unet("sd15", cross_attention_dim=768))
    sd = adapter.state_dict()
    assert detect_spec(sd, filename="ip-adapter-plus-face_sd15.safetensors") is spec
    assert detect_spec(sd, filename="my-copy.safetensors").projector == "resampler"


def test_sd15_checkpoint_on_an_sdxl_unet_fails_with_a_sentence_naming_both_sizes(tmp_path):
    sd15, sdxl = fresh_pipe("sd15"), fresh_pipe("sdxl")
    path = save_adapter(random_adapter(REGISTRY["ip-adapter_sd15"], sd15), tmp_path / "a.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"makes 32-d image tokens but .* takes 64-d"):
        load_adapter(path, sdxl.unet)


def test_wrong_image_encoder_width_is_named():
    spec = REGISTRY["ip-adapter-plus_sdxl_vit-h"]
    with pytest.raises(CheckpointMismatchError, match="expects 1280-d encoder tokens; .* gives 1664-d"):
        check_encoder(spec, {"patch": 1664}, "the encoder")


def test_truncated_checkpoint_names_a_missing_weight(tmp_path):
    pipe = fresh_pipe("sd15")
    adapter = random_adapter(REGISTRY["ip-adapter_sd15"], pipe)
    sd = adapter.state_dict()
    sd.pop("ip_adapter.1.to_v_ip.weight")
    save_file(sd, str(tmp_path / "ip-adapter_sd15.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="lacks 1 weights"):
        load_adapter(tmp_path / "ip-adapter_sd15.safetensors", pipe.unet)


class _Exploit:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(TARGET).write_text('pwned')".replace(
            "TARGET", repr(str(_Exploit.target))),))


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch notes protocol 4; expected here
def test_a_crafted_pickle_is_refused_and_runs_nothing(tmp_path, protocol):
    _Exploit.target = tmp_path / "ran"
    bad = tmp_path / "evil.bin"
    with open(bad, "wb") as f:
        pickle.dump({"image_proj": {"proj.weight": _Exploit()}, "ip_adapter": {}}, f, protocol=protocol)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        read_checkpoint(bad)
    assert not (tmp_path / "ran").exists()
    with open(bad, "rb") as f:  # the same file does run code when unpickled naively: the test is real
        pickle.load(f)
    assert (tmp_path / "ran").read_text() == "pwned"


def test_damaged_files_give_a_sentence_not_a_traceback(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"not really")
    (tmp_path / "x.bin").write_bytes(b"\x00\x01garbage")
    with pytest.raises(LookalikeError, match="cannot read"):
        read_checkpoint(tmp_path / "x.safetensors")
    with pytest.raises(LookalikeError, match="not a plain tensor checkpoint"):
        read_checkpoint(tmp_path / "x.bin")
    with pytest.raises(LookalikeError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "absent.bin")


def test_a_file_without_adapter_sections_is_refused(tmp_path):
    save_file({"model.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(LookalikeError, match="not an IP-Adapter checkpoint"):
        read_checkpoint(tmp_path / "other.safetensors")


def test_lora_of_faceid_equals_merging_it_into_the_unet_weights():
    """Runtime LoRA (FaceID) equals W + up @ down merged into every to_q/k/v/out."""
    from lookalike.adapters.attach import attach_adapters
    from lookalike.adapters.module import IPAdapter

    pipe, merged = fresh_pipe("sd15"), fresh_pipe("sd15")
    spec = tiny_spec(REGISTRY["ip-adapter-faceid_sd15"], 32, lora=True)
    adapter = IPAdapter.for_unet(spec, pipe.unet)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    names = list(merged.unet.attn_processors)
    with torch.no_grad():
        for key, layer in adapter.ip_adapter.items():
            attn = merged.unet.get_submodule(names[int(key)].removesuffix(".processor"))
            for proj, lora in ((attn.to_q, layer.to_q_lora), (attn.to_k, layer.to_k_lora),
                               (attn.to_v, layer.to_v_lora), (attn.to_out[0], layer.to_out_lora)):
                proj.weight += lora.up.weight @ lora.down.weight
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 7, 32, generator=g)
    attach_adapters(pipe.unet, [adapter])
    with torch.no_grad():
        ours = pipe.unet(x, 10, ctx).sample
        want = merged.unet(x, 10, ctx).sample
    assert abs(ours - want).max() <= 1e-5
    assert abs(ours - fresh_pipe("sd15").unet(x, 10, ctx).sample).max() > 1e-3

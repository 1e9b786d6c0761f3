"""weights/hub.py against a real huggingface_hub cache layout built in tmp_path; never touches the network."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError
from safetensors.torch import load_file, save_file

from lookalike.adapters.spec import ENCODERS, REGISTRY, get_spec
from lookalike.errors import LookalikeError, MissingFileError
from lookalike.weights import hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "h94/IP-Adapter"
ENCODER_SUB = "models/image_encoder"


def _add_file(cache: Path, repo_id: str, path_in_repo: str, data: bytes, commit: str = COMMIT) -> Path:
    """Put one file into the cache the way hf_hub_download does: a blob, a snapshot symlink, refs/main."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    pointer = repo_dir / "snapshots" / commit / path_in_repo
    pointer.parent.mkdir(parents=True, exist_ok=True)
    try:
        pointer.symlink_to(Path("../" * path_in_repo.count("/") + "../../blobs") / blob.name)
    except OSError:  # no symlinks (Windows without developer mode): the cache then holds copies
        pointer.write_bytes(data)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return pointer


def _checkpoint_bytes(tmp_path: Path) -> bytes:
    """A small random safetensors file, as bytes."""
    gen = torch.Generator().manual_seed(0)
    file = tmp_path / "random.safetensors"
    save_file({"image_proj.proj.weight": torch.randn(8, 4, generator=gen)}, str(file))
    return file.read_bytes()


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode as huggingface_hub reads it (the constant is read once, at import), and no sockets."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("tests must not reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A cache holding ip-adapter_sd15 and the ViT-H image encoder of h94/IP-Adapter."""
    cache = tmp_path / "hf-cache"
    spec = REGISTRY["ip-adapter_sd15"]
    _add_file(cache, REPO, f"{spec.subfolder}/{spec.filename}", _checkpoint_bytes(tmp_path))
    _add_file(cache, REPO, f"{ENCODER_SUB}/config.json", json.dumps({"model_type": "clip_vision_model"}).encode())
    _add_file(cache, REPO, f"{ENCODER_SUB}/model.safetensors", _checkpoint_bytes(tmp_path))
    return cache


def _snapshot(cache: Path, repo_id: str = REPO) -> Path:
    return cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT


def test_registry_full_name_resolves_to_cached_file_offline(cache: Path) -> None:
    path, spec = hub.resolve_adapter_source("ip-adapter_sd15", cache_dir=cache)
    assert path == _snapshot(cache) / "models" / "ip-adapter_sd15.safetensors"
    assert spec is REGISTRY["ip-adapter_sd15"]
    assert set(load_file(str(path))) == {"image_proj.proj.weight"}


def test_short_name_with_base_resolves_to_cached_file_offline(cache: Path) -> None:
    path, spec = hub.resolve_adapter_source("basic", base="sd15", cache_dir=cache)
    assert path == _snapshot(cache) / "models" / "ip-adapter_sd15.safetensors"
    assert spec is REGISTRY["ip-adapter_sd15"]


def test_hub_path_resolves_to_cached_file_and_its_registry_spec(cache: Path) -> None:
    path, spec = hub.resolve_adapter_source("h94/IP-Adapter/models/ip-adapter_sd15.safetensors", cache_dir=cache)
    assert path == _snapshot(cache) / "models" / "ip-adapter_sd15.safetensors"
    assert spec is REGISTRY["ip-adapter_sd15"]


def test_hub_path_outside_registry_resolves_without_spec(cache: Path, tmp_path: Path) -> None:
    _add_file(cache, "someone/my-adapter", "ckpt/deep/mine.bin", b"not read here")
    path, spec = hub.resolve_adapter_source("someone/my-adapter/ckpt/deep/mine.bin", cache_dir=cache)
    assert path == _snapshot(cache, "someone/my-adapter") / "ckpt" / "deep" / "mine.bin"
    assert spec is None


def test_local_files_only_resolves_cached_file_without_offline_mode(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    path, _ = hub.resolve_adapter_source("ip-adapter_sd15", cache_dir=cache, local_files_only=True)
    assert path.name == "ip-adapter_sd15.safetensors"


def test_missing_registry_file_raises_missing_file_error_naming_file_and_download_command(cache: Path) -> None:
    with pytest.raises(MissingFileError) as info:
        hub.resolve_adapter_source("plus", base="sd15", cache_dir=cache)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "h94/IP-Adapter/models/ip-adapter-plus_sd15.safetensors" in message
    assert "`lookalike download ip-adapter-plus_sd15`" in message
    assert "`hf download h94/IP-Adapter models/ip-adapter-plus_sd15.safetensors`" in message
    assert "HF_HUB_OFFLINE" in message and "\n" not in message


def test_missing_repo_in_cache_raises_missing_file_error(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match=r"ip-adapter-faceid_sd15\.bin is not in the Hugging Face cache"):
        hub.resolve_adapter_source("faceid", base="sd15", cache_dir=tmp_path / "empty")


def test_hub_answer_file_missing_says_the_file_does_not_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    def answer_404(*args: object, **kwargs: object) -> str:
        response = httpx2.Response(404, request=httpx2.Request("HEAD", "https://huggingface.co/x"))
        raise RemoteEntryNotFoundError("404 entry not found", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", answer_404)
    with pytest.raises(MissingFileError, match=r"h94/IP-Adapter/models/x\.bin does not exist on the hub"):
        hub.resolve_adapter_source("h94/IP-Adapter/models/x.bin")


def test_hub_answer_repo_missing_says_the_repo_does_not_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    def answer_401(*args: object, **kwargs: object) -> str:
        response = httpx2.Response(401, request=httpx2.Request("HEAD", "https://huggingface.co/x"))
        raise RepositoryNotFoundError("401 repo not found", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", answer_401)
    with pytest.raises(MissingFileError, match=r"the hub has no repo nobody/nothing \(or it is private\)"):
        hub.hub_file("nobody/nothing", "a.safetensors")


def test_connection_error_says_the_hub_cannot_be_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_route(*args: object, **kwargs: object) -> str:
        raise httpx2.ConnectError("no route to host")

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_route)
    with pytest.raises(MissingFileError, match="not in the Hugging Face cache and the hub cannot be reached"):
        hub.resolve_adapter_source("ip-adapter_sdxl")


def test_local_file_resolves_to_itself_without_spec(tmp_path: Path) -> None:
    file = tmp_path / "mine.safetensors"
    file.write_bytes(_checkpoint_bytes(tmp_path))
    assert hub.resolve_adapter_source(str(file)) == (file, None)
    assert hub.resolve_adapter_source(file) == (file, None)


def test_local_path_with_tilde_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USERPROFILE", str(tmp_path))
    (tmp_path / "ip.bin").write_bytes(b"x")
    assert hub.resolve_adapter_source("~/ip.bin") == (tmp_path / "ip.bin", None)


@pytest.mark.parametrize("source", ["./missing.safetensors", "~/missing.bin", "missing.pt", "dir/missing.pth", "/no"])
def test_missing_local_path_raises_missing_file_error(source: str) -> None:
    with pytest.raises(MissingFileError, match="no such file"):
        hub.resolve_adapter_source(source)


def test_missing_local_path_object_raises_missing_file_error(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="no such file"):
        hub.resolve_adapter_source(tmp_path / "missing.safetensors")


def test_local_folder_or_non_checkpoint_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(LookalikeError, match="is a folder"):
        hub.resolve_adapter_source(str(tmp_path))
    with pytest.raises(LookalikeError, match="not a checkpoint file"):
        hub.resolve_adapter_source(str(tmp_path / "notes.txt"))


def test_unknown_name_raises_lookalike_error_listing_known_names() -> None:
    with pytest.raises(LookalikeError) as info:
        hub.resolve_adapter_source("ip-adapter-nonsense")
    message = str(info.value)
    assert not isinstance(info.value, MissingFileError)
    assert all(name in message for name in REGISTRY)
    assert "h94/IP-Adapter/models/ip-adapter_sd15.safetensors" in message and ".safetensors" in message


def test_ambiguous_short_name_without_base_asks_for_the_base() -> None:
    with pytest.raises(LookalikeError, match="name the base model"):
        hub.resolve_adapter_source("plus")


def test_adapter_for_another_base_is_refused(cache: Path) -> None:
    with pytest.raises(LookalikeError, match="is for sd15 models, not sdxl"):
        hub.resolve_adapter_source("ip-adapter_sd15", base="sdxl", cache_dir=cache)


def test_encoder_dir_returns_cached_folder_for_spec_and_name(cache: Path) -> None:
    expected = _snapshot(cache) / ENCODER_SUB
    assert hub.resolve_encoder_dir(ENCODERS["clip-vit-h-14"], cache_dir=cache) == expected
    assert hub.resolve_encoder_dir("clip-vit-h-14", cache_dir=cache) == expected
    assert (expected / "config.json").is_file()


def test_encoder_dir_returns_local_folder_as_is(tmp_path: Path) -> None:
    assert hub.resolve_encoder_dir(str(tmp_path)) == tmp_path


def test_encoder_dir_missing_raises_missing_file_error_naming_download_command(cache: Path) -> None:
    with pytest.raises(MissingFileError) as info:
        hub.resolve_encoder_dir("clip-vit-bigg-14", cache_dir=cache)
    message = str(info.value)
    assert "clip-vit-bigg-14 (h94/IP-Adapter/sdxl_models/image_encoder)" in message
    assert "`lookalike download ip-adapter_sdxl`" in message
    assert "`hf download h94/IP-Adapter --include 'sdxl_models/image_encoder/*'`" in message


def test_encoder_dir_of_uncached_repo_raises_missing_file_error(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match=r"clip-vit-h-14 .* run `lookalike download ip-adapter_sd15`"):
        hub.resolve_encoder_dir("clip-vit-h-14", cache_dir=tmp_path / "empty")


def test_encoder_dir_refuses_unknown_names_and_face_encoders() -> None:
    with pytest.raises(LookalikeError, match="clip-vit-bigg-14, clip-vit-h-14"):
        hub.resolve_encoder_dir("clip-nonsense")
    with pytest.raises(LookalikeError, match="not on the Hugging Face hub"):
        hub.resolve_encoder_dir("insightface-buffalo_l")


def test_download_returns_checkpoint_and_encoder_paths(cache: Path) -> None:
    paths = hub.download("basic", base="sd15", cache_dir=cache)
    assert paths == [_snapshot(cache) / "models" / "ip-adapter_sd15.safetensors", _snapshot(cache) / ENCODER_SUB]
    assert hub.download("ip-adapter_sd15", with_encoder=False, cache_dir=cache) == paths[:1]


def test_download_skips_face_encoders_fetched_by_insightface(cache: Path) -> None:
    spec = get_spec("faceid-plusv2", "sd15")
    _add_file(cache, "h94/IP-Adapter-FaceID", spec.filename or "", b"pickled weights")
    paths = hub.download(spec.name, cache_dir=cache)
    assert paths == [_snapshot(cache, "h94/IP-Adapter-FaceID") / spec.filename, _snapshot(cache) / ENCODER_SUB]


def test_encoder_dir_accepts_bin_only_weights(tmp_path: Path) -> None:
    cache = tmp_path / "hf-cache"
    _add_file(cache, REPO, "sdxl_models/image_encoder/config.json", b"{}")
    _add_file(cache, REPO, "sdxl_models/image_encoder/pytorch_model.bin", b"pickled weights")
    folder = hub.resolve_encoder_dir("clip-vit-bigg-14", cache_dir=cache)
    assert folder == _snapshot(cache) / "sdxl_models" / "image_encoder"

"""Registry names, hub paths and local paths to local files, through the Hugging Face cache.

Every miss becomes one :class:`~lookalike.errors.MissingFileError` sentence that names the file and
the command that fetches it; nothing here reads the environment except ``huggingface_hub`` itself
(``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``, ``HF_TOKEN``, ...).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import huggingface_hub
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..adapters.spec import (
    ENCODERS,
    REGISTRY,
    AdapterSpec,
    Base,
    EncoderSpec,
    encoder_of,
    get_spec,
    spec_names,
)
from ..errors import LookalikeError, MissingFileError

if TYPE_CHECKING:
    from typing_extensions import Unpack

#: File suffixes accepted as adapter checkpoints.
CHECKPOINT_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin", ".pt", ".pth")
#: What an encoder download fetches first: the config and safetensors weights, not the duplicate ``.bin``.
ENCODER_PATTERNS: tuple[str, ...] = ("*.json", "*.txt", "*.safetensors")

_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_PATH_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-error classes of the HTTP client huggingface_hub has imported (httpx2, httpx or requests)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "RequestException")):
        error = getattr(sys.modules.get(module), name, None)
        if isinstance(error, type) and issubclass(error, BaseException):
            found.append(error)
    return tuple(found)


_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = _transport_errors()


class HubOptions(TypedDict, total=False):
    """Keyword arguments passed through to :func:`hub_file` and ``huggingface_hub``."""

    revision: str | None
    cache_dir: str | Path | None
    local_files_only: bool | None
    token: str | bool | None


def _repo_path(spec: AdapterSpec) -> str:
    """The checkpoint's path inside its hub repo, e.g. ``models/ip-adapter_sd15.safetensors``."""
    return "/".join(p for p in (spec.subfolder, spec.filename) if p)


def _spec_at(repo_id: str, path_in_repo: str) -> AdapterSpec | None:
    """The registry entry stored at ``repo_id/path_in_repo``, if any."""
    for spec in REGISTRY.values():
        if spec.repo_id == repo_id and spec.filename and _repo_path(spec) == path_in_repo:
            return spec
    return None


def _example_adapter(encoder: EncoderSpec) -> str | None:
    """A registry adapter that uses ``encoder`` (a basic one with no other encoder first), for download hints."""
    users = [s for s in REGISTRY.values() if encoder.name in s.encoder.split("+")]
    users.sort(key=lambda s: (s.encoder != encoder.name, s.short_name != "basic", s.name))
    return users[0].name if users else None


def _unreachable(local_files_only: bool | None) -> str:
    """Why the hub was not asked: downloads switched off, or no connection."""
    if local_files_only or hf_constants.HF_HUB_OFFLINE:
        return "downloads are switched off (HF_HUB_OFFLINE=1 or local_files_only)"
    return "the hub cannot be reached"


def _hub_error(
    error: Exception, what: str, repo_id: str, fetch: str, local_files_only: bool | None
) -> LookalikeError:
    """Turn a huggingface_hub failure into one sentence naming ``what`` and how to get it."""
    if isinstance(error, GatedRepoError):
        return MissingFileError(
            f"{what} is in the gated repo {repo_id}; accept its terms at https://huggingface.co/{repo_id} "
            f"and log in with `hf auth login` (or pass token=...)"
        )
    if isinstance(error, RepositoryNotFoundError) or (
        isinstance(error, HfHubHTTPError) and getattr(error.response, "status_code", None) == 401
    ):
        return MissingFileError(
            f"the hub has no repo {repo_id} (or it is private); check the name, or log in with "
            f"`hf auth login` if you have access"
        )
    if isinstance(error, RevisionNotFoundError):
        return MissingFileError(f"{what} cannot be fetched: the hub repo {repo_id} has no such revision; check it")
    if isinstance(error, EntryNotFoundError) and not isinstance(error, LocalEntryNotFoundError):
        return MissingFileError(f"{what} does not exist on the hub (the repo does); check the file name and subfolder")
    return MissingFileError(
        f"{what} is not in the Hugging Face cache and {_unreachable(local_files_only)}; {fetch} on a machine "
        f"with network access, or pass a local path"
    )


def hub_file(
    repo_id: str,
    filename: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> Path:
    """Path of one hub file in the local cache, downloading it (with a progress bar) if needed."""
    path_in_repo = "/".join(p for p in (subfolder, filename) if p)
    spec = _spec_at(repo_id, path_in_repo)
    hf_cmd = f"`hf download {repo_id} {path_in_repo}`"
    fetch = f"run `lookalike download {spec.name}` (or {hf_cmd})" if spec else f"run {hf_cmd}"
    try:
        path = huggingface_hub.hf_hub_download(
            repo_id, filename, subfolder=subfolder or None, revision=revision, cache_dir=cache_dir,
            local_files_only=bool(local_files_only), token=token,
        )
    except HFValidationError as error:
        raise LookalikeError(f"{repo_id!r} is not a valid hub repo id ({error}); use the form org/name") from error
    except (HfHubHTTPError, EntryNotFoundError, *_TRANSPORT_ERRORS) as error:
        what = f"{repo_id}/{path_in_repo}"
        raise _hub_error(error, what, repo_id, fetch, local_files_only) from error
    return Path(path)


def _known_forms() -> str:
    """The forms ``resolve_adapter_source`` accepts, with the registry's names."""
    shorts = sorted({s.short_name for s in REGISTRY.values() if s.short_name})
    return (
        f"a local checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}), a registry name ({', '.join(spec_names())}), "
        f"a short name with a base model ({', '.join(shorts)}), or a hub path like "
        f"h94/IP-Adapter/models/ip-adapter_sd15.safetensors"
    )


def _check_base(spec: AdapterSpec, base: Base | None) -> AdapterSpec:
    """``spec`` itself, or an error when it belongs to another base model than ``base``."""
    if base is not None and spec.base != base:
        raise LookalikeError(f"adapter {spec.name} is for {spec.base} models, not {base}; pick a {base} adapter")
    return spec


def _local_file(path: Path) -> Path:
    """An existing path, checked to be a checkpoint file."""
    if path.is_dir():
        raise LookalikeError(f"{path} is a folder; pass the checkpoint file inside it")
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise LookalikeError(f"{path} is not a checkpoint file; pass a {', '.join(CHECKPOINT_SUFFIXES)} file")
    return path


def _hub_parts(source: str) -> tuple[str, str] | None:
    """``(repo_id, path_in_repo)`` for ``org/name/path/in/repo``, else ``None``."""
    parts = source.split("/")
    if len(parts) < 3 or not all(_SEGMENT.fullmatch(p) for p in parts):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


def resolve_adapter_source(
    source: str | Path, *, base: Base | None = None, **hub_kwargs: Unpack[HubOptions]
) -> tuple[Path, AdapterSpec | None]:
    """A checkpoint path (and its registry spec) from a local path, registry name or ``org/repo/path``."""
    text = str(source)
    local = Path(text).expanduser()
    if isinstance(source, Path) and not local.exists():
        raise MissingFileError(f"no such file: {local}; check the path")
    if isinstance(source, Path) or (local.is_file() and local.suffix.lower() in CHECKPOINT_SUFFIXES):
        return _local_file(local), None
    if text in REGISTRY or any(s.short_name == text for s in REGISTRY.values()):
        spec = _check_base(get_spec(text, base), base)
        if not spec.repo_id or not spec.filename:
            raise LookalikeError(f"adapter {spec.name} has no hub location; pass its local checkpoint file")
        return hub_file(spec.repo_id, spec.filename, subfolder=spec.subfolder, **hub_kwargs), spec
    if local.exists():
        return _local_file(local), None
    if text.startswith(_PATH_PREFIXES):
        raise MissingFileError(f"no such file: {local}; check the path")
    hub = _hub_parts(text)
    if hub is not None and Path(hub[1]).suffix.lower() in CHECKPOINT_SUFFIXES:
        repo_id, path_in_repo = hub
        subfolder, _, filename = path_in_repo.rpartition("/")
        spec = _spec_at(repo_id, path_in_repo)
        if spec is not None:
            _check_base(spec, base)
        return hub_file(repo_id, filename, subfolder=subfolder or None, **hub_kwargs), spec
    if local.suffix.lower() in CHECKPOINT_SUFFIXES:
        raise MissingFileError(f"no such file: {local}; check the path, or use org/repo/path/in/repo for a hub file")
    raise LookalikeError(f"unknown adapter {text!r}; pass {_known_forms()}")


def _encoder_spec(encoder: EncoderSpec | str) -> EncoderSpec | Path:
    """An ``EncoderSpec`` for a spec or ENCODERS name, or the path of an existing local folder."""
    if isinstance(encoder, EncoderSpec):
        return encoder
    if encoder in ENCODERS:
        return ENCODERS[encoder]
    local = Path(encoder).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise LookalikeError(f"{local} is a file; pass the image encoder's folder (with config.json)")
    if encoder.startswith(_PATH_PREFIXES):
        raise MissingFileError(f"no such folder: {local}; check the path")
    raise LookalikeError(
        f"unknown image encoder {encoder!r}; pass a local folder or one of: {', '.join(sorted(ENCODERS))}"
    )


def _has_weights(folder: Path) -> bool:
    """Whether ``folder`` holds a config and a weights file."""
    weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    return (folder / "config.json").is_file() and weights


def _snapshot(repo_id: str, subfolder: str, patterns: tuple[str, ...], options: HubOptions) -> Path:
    """The cached ``repo_id/subfolder`` folder fetched with ``patterns``, downloading if needed."""
    root = huggingface_hub.snapshot_download(
        repo_id, allow_patterns=[f"{subfolder}/{p}" for p in patterns], revision=options.get("revision"),
        cache_dir=options.get("cache_dir"), local_files_only=bool(options.get("local_files_only")),
        token=options.get("token"),
    )
    return Path(root) / subfolder


def resolve_encoder_dir(encoder: EncoderSpec | str, **hub_kwargs: Unpack[HubOptions]) -> Path:
    """The local folder of a CLIP image encoder (config.json and weights), from the cache or the hub."""
    found = _encoder_spec(encoder)
    if isinstance(found, Path):
        return found
    if not found.repo_id:
        raise LookalikeError(f"image encoder {found.name} is not on the Hugging Face hub; insightface fetches it")
    subfolder = found.subfolder or ""
    what = f"image encoder {found.name} ({found.repo_id}/{subfolder})"
    example = _example_adapter(found)
    hf_cmd = f"`hf download {found.repo_id} --include '{subfolder}/*'`"
    fetch = f"run `lookalike download {example}` (or {hf_cmd})" if example else f"run {hf_cmd}"
    try:
        folder = _snapshot(found.repo_id, subfolder, ENCODER_PATTERNS, hub_kwargs)
        if not _has_weights(folder):  # a repo with .bin weights only
            folder = _snapshot(found.repo_id, subfolder, ("*",), hub_kwargs)
    except HFValidationError as error:
        raise LookalikeError(f"{found.repo_id!r} is not a valid hub repo id ({error})") from error
    except (HfHubHTTPError, EntryNotFoundError, *_TRANSPORT_ERRORS) as error:
        raise _hub_error(error, what, found.repo_id, fetch, hub_kwargs.get("local_files_only")) from error
    if not _has_weights(folder):
        error = LocalEntryNotFoundError(f"{folder} has no config.json and weights")
        raise _hub_error(error, what, found.repo_id, fetch, hub_kwargs.get("local_files_only"))
    return folder


def download(
    name: str, *, base: Base | None = None, with_encoder: bool = True, **hub_kwargs: Unpack[HubOptions]
) -> list[Path]:
    """Fetch a registry adapter's checkpoint and its CLIP image encoder(s) into the cache; their paths."""
    spec = get_spec(name, base)
    if not spec.repo_id or not spec.filename:
        raise LookalikeError(f"adapter {spec.name} has no hub location, so there is nothing to download")
    paths = [hub_file(spec.repo_id, spec.filename, subfolder=spec.subfolder, **hub_kwargs)]
    if with_encoder:
        for enc in encoder_of(spec):
            if enc.repo_id is None:  # insightface models are fetched by insightface itself
                continue
            options = HubOptions(**hub_kwargs)
            if enc.repo_id != spec.repo_id:  # a revision names a commit of the adapter's repo only
                options.pop("revision", None)
            paths.append(resolve_encoder_dir(enc, **options))
    return paths

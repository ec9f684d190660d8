"""Files from the Hugging Face Hub (through huggingface_hub and its local cache): GGUF models, and
δ-mem adapters in the official release format, converted once to GGUF beside the cached release."""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
from pathlib import Path

try:
    from huggingface_hub.errors import LocalEntryNotFoundError
except ImportError:   # huggingface_hub < 0.25
    from huggingface_hub.utils import LocalEntryNotFoundError


def download_gguf(repo_id: str, filename: str = "*Q4_K_M.gguf", *, cache_dir: str | os.PathLike | None = None,
                  revision: str | None = None) -> str:
    """Local path of the one file of repo_id whose path matches the glob filename, downloading it when
    needed. With HF_HUB_OFFLINE=1 the repository's cached snapshot is searched instead of the Hub."""
    from huggingface_hub import hf_hub_download

    cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
    files = _repo_files(repo_id, cache_dir, revision)
    chosen = _the_one_match(repo_id, filename, files)
    return hf_hub_download(repo_id, chosen, cache_dir=cache_dir, revision=revision,
                           local_files_only=_offline())


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _repo_files(repo_id: str, cache_dir: str | None, revision: str | None) -> list[str]:
    """Paths of the repository's files: from the Hub, or from the cached snapshot when offline."""
    from huggingface_hub import HfApi, snapshot_download

    if not _offline():
        return HfApi().list_repo_files(repo_id, revision=revision)
    try:
        snapshot = snapshot_download(repo_id, cache_dir=cache_dir, revision=revision, local_files_only=True)
    except LocalEntryNotFoundError as e:
        raise ValueError(f"{repo_id!r} is not in the Hugging Face cache and the Hub is offline "
                         f"(HF_HUB_OFFLINE=1)") from e
    found = []
    for folder, _, names in os.walk(snapshot):
        found += [os.path.relpath(os.path.join(folder, n), snapshot).replace(os.sep, "/") for n in names]
    return found


def _the_one_match(repo_id: str, pattern: str, files: list[str]) -> str:
    matches = sorted(f for f in files if fnmatch.fnmatchcase(f, pattern))
    if len(matches) == 1:
        return matches[0]
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    if not matches:
        raise ValueError(f"no file of {repo_id!r} matches {pattern!r}; its GGUF files: "
                         f"{', '.join(ggufs) or '(none)'}")
    raise ValueError(f"{len(matches)} files of {repo_id!r} match {pattern!r}, one is needed; "
                     f"candidates: {', '.join(matches)}")


# The files of an official δ-mem release (declare-lab/delta-Mem's save_delta_mem_adapter writes the
# config and the .pt; a safetensors copy is accepted too).
ADAPTER_RELEASE_FILES = ("delta_mem_config.json", "delta_mem_adapter.pt", "delta_mem_adapter.safetensors")


def download_adapter_release(repo_id: str, *, cache_dir: str | os.PathLike | None = None,
                             revision: str | None = None) -> str:
    """Local folder of the δ-mem release repo_id (its config and weights only), downloading it when
    needed; with HF_HUB_OFFLINE=1 only the cache is searched."""
    from huggingface_hub import snapshot_download

    cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
    try:
        folder = snapshot_download(repo_id, cache_dir=cache_dir, revision=revision,
                                   allow_patterns=list(ADAPTER_RELEASE_FILES), local_files_only=_offline())
    except LocalEntryNotFoundError as e:
        raise ValueError(f"δ-mem adapter {repo_id!r} is not in the Hugging Face cache and the Hub is offline "
                         f"(HF_HUB_OFFLINE=1)") from e
    if not os.path.isfile(os.path.join(folder, ADAPTER_RELEASE_FILES[0])):
        raise ValueError(f"{repo_id!r} is not a δ-mem adapter release: it has no {ADAPTER_RELEASE_FILES[0]}")
    return folder


def adapter_gguf_from_hub(repo_id: str, model_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                          revision: str | None = None) -> str:
    """A GGUF adapter for model_path converted from the δ-mem release repo_id.

    The conversion runs once per release revision and backbone shape; its output lives in the
    release's cache folder (models--ORG--NAME/deltamem/REVISION/), so deleting the cached repository
    deletes it too. The converter checks the release against the model (layers, widths, arch)."""
    from . import __version__
    from .convert.adapter import convert_adapter, load_backbone

    release = Path(download_adapter_release(repo_id, cache_dir=cache_dir, revision=revision))
    backbone = dataclasses.asdict(dataclasses.replace(load_backbone(model_path), source=""))
    key = hashlib.sha256(json.dumps({"backbone": backbone, "pydeltamem": __version__},
                                    sort_keys=True).encode()).hexdigest()[:16]
    converted = release.parent.parent / "deltamem" / release.name / f"adapter-{backbone['arch']}-{key}.gguf"
    if not converted.is_file():
        converted.parent.mkdir(parents=True, exist_ok=True)
        convert_adapter(release, converted, base=model_path)
    return os.fspath(converted)

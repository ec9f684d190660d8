"""Model.from_pretrained against a Hugging Face cache built here, with the Hub offline (no network)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import pydeltamem
from pydeltamem.defaults import default_model_path
from pydeltamem.hub import download_gguf

REVISION = "0123456789abcdef0123456789abcdef01234567"
REPO = "example-org/tiny-chat-GGUF"


def build_hub_cache(root: Path, repo_id: str, files: dict[str, Path | bytes]) -> Path:
    """A cache folder laid out as huggingface_hub writes it:
    models--ORG--NAME/{refs/main, snapshots/REVISION/FILE}. Files are links to (or bytes of) content."""
    repo_dir = root / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(REVISION)
    snapshot = repo_dir / "snapshots" / REVISION
    for name, content in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.symlink_to(content)
    return root


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import; tell the already imported module too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def cache(tmp_path):
    return build_hub_cache(tmp_path / "hub", REPO, {
        "tiny-chat.Q4_1.gguf": Path(default_model_path()),
        "tiny-chat.Q8_0.gguf": b"not really a model",
        "tiny-chat.Q8_0-imatrix.gguf": b"not really a model either",
        "README.md": b"# tiny chat\n",
    })


def test_one_match_loads_the_model(offline, cache):
    with pydeltamem.Model.from_pretrained(REPO, "*Q4_1.gguf", cache_dir=cache, n_ctx=64, n_threads=1) as m:
        assert Path(m.model_path).name == "tiny-chat.Q4_1.gguf"
        assert str(cache) in m.model_path and REVISION in m.model_path
        assert m.n_ctx == 64   # keyword arguments reach Model()
        assert m.tokenize("Paris", add_special=False)


def test_exact_file_names_work_too(offline, cache):
    path = download_gguf(REPO, "tiny-chat.Q8_0.gguf", cache_dir=cache)
    assert Path(path).read_bytes() == b"not really a model"


def test_no_match_lists_the_repository_ggufs(offline, cache):
    with pytest.raises(ValueError) as e:
        pydeltamem.Model.from_pretrained(REPO, cache_dir=cache)   # default glob *Q4_K_M.gguf
    message = str(e.value)
    assert "*Q4_K_M.gguf" in message
    for name in ("tiny-chat.Q4_1.gguf", "tiny-chat.Q8_0.gguf", "tiny-chat.Q8_0-imatrix.gguf"):
        assert name in message
    assert "README.md" not in message


def test_several_matches_list_the_candidates(offline, cache):
    with pytest.raises(ValueError) as e:
        pydeltamem.Model.from_pretrained(REPO, "*Q8_0*.gguf", cache_dir=cache)
    message = str(e.value)
    assert "2 files" in message
    assert "tiny-chat.Q8_0.gguf" in message and "tiny-chat.Q8_0-imatrix.gguf" in message
    assert "Q4_1" not in message


def test_uncached_repository_offline_is_a_clear_error(offline, cache):
    with pytest.raises(ValueError, match="not in the Hugging Face cache"):
        download_gguf("example-org/never-downloaded", "*.gguf", cache_dir=cache)


def test_files_in_subfolders_match_by_their_path(offline, tmp_path):
    root = build_hub_cache(tmp_path / "hub", REPO, {"quants/model-Q4_K_M.gguf": b"x", "model-f16.gguf": b"y"})
    path = download_gguf(REPO, "quants/*Q4_K_M.gguf", cache_dir=root)
    assert path.endswith(os.path.join("quants", "model-Q4_K_M.gguf"))

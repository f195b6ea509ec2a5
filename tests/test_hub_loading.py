"""Loading by hub repo id, without network: a Hugging Face cache laid out by hand, offline mode on.

huggingface_hub reads HF_HUB_OFFLINE from the environment once, at import, into
`huggingface_hub.constants.HF_HUB_OFFLINE`; `constants.is_offline_mode()` returns that module attribute and the
HTTP request hook consults it on every request. So the tests patch the attribute (and the env var, for anything
that reads it later). With offline mode on, any request raises OfflineModeIsEnabled before a socket is opened.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from pathlib import Path

import pytest
import torch

from vl2edge.model.checkpoint import HUB_PATTERNS, Checkpoint, CheckpointError, resolve_checkpoint
from vl2edge.model.vl2 import DeepseekVL2

REPO = "deepseek-ai/deepseek-vl2-tiny"
COMMIT = "66c54660eae7e90c9ba259bfdf92d07d6e3ce8aa"  # the published Tiny revision (reference §0)


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert hc.is_offline_mode()
    # the patch really blocks requests (so the tests below cannot touch the network)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    with pytest.raises(OfflineModeIsEnabled):
        HfApi().repo_info(REPO)


def make_hub_cache(cache: Path, repo_id: str, commit: str, src: Path) -> Path:
    """The cache layout huggingface_hub writes: blobs by hash, snapshot files symlinked to them, refs/main."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture
def hub_cache(tmp_path, test_checkpoints):
    cache = tmp_path / "hf-cache"
    snap = make_hub_cache(cache, REPO, COMMIT, test_checkpoints["test-tiny"])
    return cache, snap


def test_repo_id_resolves_to_cached_snapshot(offline, hub_cache, tmp_path, monkeypatch):
    cache, snap = hub_cache
    monkeypatch.chdir(tmp_path)  # no local directory of that name
    path = resolve_checkpoint(REPO, cache_dir=str(cache))
    assert Path(path).resolve() == snap.resolve()
    ckpt = Checkpoint.open(REPO, cache_dir=str(cache))  # validates
    assert ckpt.dir.resolve() == snap.resolve()
    assert ckpt.config.language.num_hidden_layers == 3
    # pinned to the commit hash: found in snapshots/ directly
    assert Checkpoint.open(REPO, revision=COMMIT, cache_dir=str(cache)).dir.resolve() == snap.resolve()


def test_from_checkpoint_through_hub_cache(offline, hub_cache, test_checkpoints):
    cache, _ = hub_cache
    model = DeepseekVL2.from_checkpoint(REPO, dtype=torch.bfloat16, cache_dir=str(cache))
    local = Checkpoint.open(test_checkpoints["test-tiny"])
    w = "language.model.layers.1.mlp.experts.3.gate_proj.weight"
    assert torch.equal(model.state_dict()[w], local.tensor(w))
    assert model.dtype == torch.bfloat16


def test_unknown_repo_offline_mentions_cache(offline, hub_cache):
    cache, _ = hub_cache
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open("deepseek-ai/deepseek-vl2-huge", cache_dir=str(cache))
    msg = str(e.value)
    assert "deepseek-ai/deepseek-vl2-huge" in msg and "cache" in msg


def test_unknown_revision_offline(offline, hub_cache):
    cache, _ = hub_cache
    with pytest.raises(CheckpointError, match="cache"):
        Checkpoint.open(REPO, revision="v9", cache_dir=str(cache))


def test_repo_without_weights_in_cache(offline, tmp_path, test_checkpoints):
    """A cached snapshot holding only a pickled checkpoint is refused like a local directory."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_bytes((test_checkpoints["test-tiny"] / "config.json").read_bytes())
    (src / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    make_hub_cache(tmp_path / "cache", REPO, COMMIT, src)
    with pytest.raises(CheckpointError, match="pickled weights"):
        Checkpoint.open(REPO, cache_dir=str(tmp_path / "cache"))


# --- what a download asks for -------------------------------------------------------------------------------------

NEVER = [
    "modeling_deepseek.py", "modeling_deepseek_vl_v2.py", "configuration_deepseek.py", "siglip_vit.py",
    "deepseek_vl2/models/modeling_deepseek.py", "pytorch_model.bin", "pytorch_model-00001-of-00004.bin",
    "training_args.bin", "model.pt", "model.pth", "model.ckpt", "optimizer.pt", "model.pkl", "model.onnx",
]
NEEDED = [
    "config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "model.safetensors", "model-00001-of-000001.safetensors", "model-00004-of-000004.safetensors",
    "model.safetensors.index.json",
]


def test_download_never_requests_code_or_pickles(monkeypatch, test_checkpoints):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(test_checkpoints["test-tiny"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ckpt = Checkpoint.open(REPO, revision="main", cache_dir="/nonexistent-cache")
    assert ckpt.dir == test_checkpoints["test-tiny"]
    DeepseekVL2.from_checkpoint(REPO, cache_dir="/nonexistent-cache")

    assert len(calls) == 2
    for repo_id, kwargs in calls:
        assert repo_id == REPO
        assert kwargs["cache_dir"] == "/nonexistent-cache"
        patterns = kwargs.get("allow_patterns")
        assert patterns, "a download without allow_patterns would fetch everything, *.py and *.bin included"
        if isinstance(patterns, str):
            patterns = [patterns]
        for name in NEVER:
            assert not any(fnmatch.fnmatch(name, p) for p in patterns), (name, patterns)
        for name in NEEDED:
            assert any(fnmatch.fnmatch(name, p) for p in patterns), (name, patterns)
    assert calls[0][1]["revision"] == "main"
    assert HUB_PATTERNS == calls[0][1]["allow_patterns"]


def test_hub_errors_become_checkpoint_errors(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fail(repo_id, **kwargs):
        raise LocalEntryNotFoundError("connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(CheckpointError, match="cache"):
        Checkpoint.open(REPO)

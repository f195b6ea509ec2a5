"""Shared fixtures: synthesized test checkpoints, written once per session.

`test_checkpoints` -> {"test-tiny": Path, "test-small": Path, "test-vl2": Path}: the three small-dims presets
synthesized with SEED (test-small is sharded with an index; the other two are a single model.safetensors).
Treat these directories as read-only; to corrupt one, take a copy with `copy_checkpoint(preset)`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# One pytest process runs many engines and makes sessions of its own: onnxruntime's process-wide thread pool (which
# `vl2edge run` makes, runtime/thread_pool.py) would make it refuse every later session with its own pool. Tests of
# the shared pool run it in a subprocess (tests/test_thread_pool.py).
os.environ["VL2EDGE_SHARED_THREADS"] = "0"

SEED = 0
TEST_PRESETS = ("test-tiny", "test-small", "test-vl2")


@pytest.fixture(scope="session")
def synth_seed() -> int:
    """The seed the `test_checkpoints` were synthesized with."""
    return SEED


@pytest.fixture(scope="session")
def test_checkpoints(tmp_path_factory) -> dict[str, Path]:
    from vl2edge.model.synth import synthesize

    root = tmp_path_factory.mktemp("checkpoints")
    return {p: synthesize(root / p, p, seed=SEED, progress=False) for p in TEST_PRESETS}


def copy_checkpoint_dir(src: Path, dst: Path) -> Path:
    """A private, writable copy of a checkpoint directory (to be corrupted by a test)."""
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def copy_checkpoint(test_checkpoints, tmp_path):
    """copy_checkpoint(preset, name=None) -> Path of a fresh copy of that test checkpoint under tmp_path."""

    def make(preset: str = "test-tiny", name: str | None = None) -> Path:
        return copy_checkpoint_dir(test_checkpoints[preset], tmp_path / (name or f"copy-{preset}"))

    return make


@pytest.fixture(scope="session")
def tiny_artifact(test_checkpoints, tmp_path_factory) -> Path:
    """test-tiny exported with the CPU defaults (int4 experts, int8 elsewhere, 8-bit KV cache)."""
    from vl2edge.export.exporter import export

    return export(test_checkpoints["test-tiny"], tmp_path_factory.mktemp("artifacts") / "test-tiny-int4",
                  progress=False)


@pytest.fixture(scope="session")
def tiny_model(tiny_artifact):
    """One loaded Model of `tiny_artifact` (one request at a time; a test that changes its options restores them)."""
    import vl2edge

    return vl2edge.load(tiny_artifact, threads=1)

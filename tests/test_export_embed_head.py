"""Embedding and head graphs against the PyTorch reference."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from vl2edge.export.embedding import KEY, build_embedding_graph
from vl2edge.export.head import build_head_graph
from vl2edge.export.linear import Precision
from vl2edge.model.checkpoint import Checkpoint
from vl2edge.model.vl2 import DeepseekVL2
from vl2edge.quant.report import QualityReport


def run(g, tmp_path, feeds):
    sess = ort.InferenceSession(str(g.save(tmp_path / f"{g.name}.onnx")), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


@pytest.mark.parametrize("kind,tol", [("fp32", 0.0), ("int8", 0.01), ("int4", 0.2)])
def test_embedding_graph(test_checkpoints, tmp_path, kind, tol):
    ckpt = Checkpoint.open(test_checkpoints["test-tiny"])
    model = DeepseekVL2.from_checkpoint(test_checkpoints["test-tiny"])
    ids = np.array([0, 5, 2047, 5, 17], np.int64)
    report = QualityReport()
    g = build_embedding_graph(model.cfg, ckpt.tensor(KEY, torch.float32).numpy(), Precision(kind, 32), report=report)
    out = run(g, tmp_path, {"input_ids": ids})
    ref = model.language.model.embed_tokens(torch.as_tensor(ids)).detach().numpy()
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err <= tol + 1e-7, err
    assert ("embedding" in report.summary()) == (kind != "fp32")


@pytest.mark.parametrize("preset", ["test-tiny", "test-vl2"])
@pytest.mark.parametrize("kind,tol", [("fp32", 1e-5), ("int8", 0.05)])
def test_head_graph_takes_last_position(test_checkpoints, tmp_path, preset, kind, tol):
    ckpt = Checkpoint.open(test_checkpoints[preset])
    model = DeepseekVL2.from_checkpoint(test_checkpoints[preset])
    hidden = np.random.default_rng(0).standard_normal((1, 7, model.cfg.language.hidden_size)).astype(np.float32)
    get = lambda name: ckpt.tensor(name, torch.float32).numpy()  # noqa: E731
    out = run(build_head_graph(model.cfg, get, Precision(kind, 32)), tmp_path, {"hidden": hidden})
    with torch.inference_mode():
        ref = model.language.lm_head(model.language.model.norm(torch.as_tensor(hidden[:, -1]))).numpy()
    assert out.shape == (1, model.cfg.language.vocab_size) and out.dtype == np.float32
    assert np.abs(out - ref).max() / np.abs(ref).max() < tol
    assert out.argmax() == ref.argmax()

"""MLP graphs (dense layer 0, routed + shared experts) against the PyTorch reference, fp32 / int8 / int4."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from vl2edge.export.linear import Precision
from vl2edge.export.mlp import build_mlp_graph
from vl2edge.model.checkpoint import Checkpoint
from vl2edge.model.vl2 import DeepseekVL2
from vl2edge.quant.report import QualityReport


def router_inputs(idx: torch.Tensor, w: torch.Tensor, num_experts: int):
    probs = np.zeros((idx.shape[0], num_experts), np.float32)
    weights = np.zeros_like(probs)
    np.put_along_axis(probs, idx.numpy(), 1.0, axis=1)
    np.put_along_axis(weights, idx.numpy(), w.numpy(), axis=1)
    return probs, weights


def run_graph(g, tmp_path, feeds):
    path = g.save(tmp_path / f"{g.name}.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


@pytest.fixture(scope="module")
def loaded(test_checkpoints):
    return {p: (Checkpoint.open(d), DeepseekVL2.from_checkpoint(d)) for p, d in test_checkpoints.items()}


def reference(model, layer, hidden, mlp_in):
    with torch.inference_mode():
        mlp = model.language.model.layers[layer].mlp
        out = torch.as_tensor(hidden) + mlp(torch.as_tensor(mlp_in))
        routing = mlp.gate(torch.as_tensor(mlp_in)[0]) if hasattr(mlp, "gate") else None
    return out.numpy(), routing


CASES = [("test-tiny", 0), ("test-tiny", 1), ("test-small", 2), ("test-vl2", 1)]


@pytest.mark.parametrize("preset,layer", CASES)
@pytest.mark.parametrize("kind,tol", [("fp32", 1e-5), ("int8", None), ("int4", None)])
def test_mlp_graph_matches_reference(loaded, tmp_path, preset, layer, kind, tol):
    ckpt, model = loaded[preset]
    L = model.cfg.language
    rng = np.random.default_rng(layer)
    hidden = rng.standard_normal((1, 9, L.hidden_size)).astype(np.float32)
    mlp_in = rng.standard_normal((1, 9, L.hidden_size)).astype(np.float32)
    ref, routing = reference(model, layer, hidden, mlp_in)
    get = lambda name: ckpt.tensor(name, torch.float32).numpy()  # noqa: E731
    report = QualityReport()
    prec = Precision(kind, block_size=32, accuracy_level=0 if kind == "int4" else 4)
    g = build_mlp_graph(model.cfg, layer, get, prec, prec, np.float32, report)
    feeds = {"hidden": hidden, "mlp_in": mlp_in}
    if routing is not None:
        feeds["router_probs"], feeds["router_weights"] = router_inputs(*routing, L.n_routed_experts)
    out = run_graph(g, tmp_path, feeds)
    delta, ref_delta = out - hidden, ref - hidden  # compare the MLP's contribution, not the residual
    if tol is not None:
        assert np.abs(delta - ref_delta).max() / np.abs(ref_delta).max() < tol
        assert report.summary() == {}  # nothing was quantized
    else:
        cos = float((delta * ref_delta).sum() / np.linalg.norm(delta) / np.linalg.norm(ref_delta))
        assert cos > {"int8": 0.999, "int4": 0.97}[kind], cos
        assert set(report.summary()) & {"dense_mlp", "experts.fc1"}


def test_routed_weights_are_used_unnormalized(loaded, tmp_path):
    """Halving every router weight halves the routed part: the graph must not renormalize (the QMoE/MoE trap)."""
    ckpt, model = loaded["test-tiny"]
    L = model.cfg.language
    get = lambda name: ckpt.tensor(name, torch.float32).numpy()  # noqa: E731
    rng = np.random.default_rng(5)
    hidden = np.zeros((1, 4, L.hidden_size), np.float32)
    mlp_in = rng.standard_normal((1, 4, L.hidden_size)).astype(np.float32)
    _, (idx, w) = reference(model, 1, hidden, mlp_in)
    probs, weights = router_inputs(idx, w, L.n_routed_experts)
    for kind in ("fp32", "int4"):
        prec = Precision(kind, block_size=32, accuracy_level=0)
        g = build_mlp_graph(model.cfg, 1, get, prec, prec, np.float32)
        full = run_graph(g, tmp_path, {"hidden": hidden, "mlp_in": mlp_in, "router_probs": probs,
                                       "router_weights": weights})
        half = run_graph(g, tmp_path, {"hidden": hidden, "mlp_in": mlp_in, "router_probs": probs,
                                       "router_weights": weights / 2})
        no_routed = run_graph(g, tmp_path, {"hidden": hidden, "mlp_in": mlp_in, "router_probs": probs,
                                            "router_weights": weights * 1e-12})
        routed_full, routed_half = full - no_routed, half - no_routed
        np.testing.assert_allclose(routed_half, routed_full / 2, rtol=1e-3, atol=1e-5)

"""MLP graphs (dense layer 0, routed + shared experts) against the PyTorch reference, fp32 / int8 / int4."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from vl2edge.export.linear import Precision
from vl2edge.export.mlp import build_mlp_graph, log_weight_logits
from vl2edge.export.onnx_builder import GraphBuilder
from vl2edge.model.checkpoint import Checkpoint
from vl2edge.model.vl2 import DeepseekVL2
from vl2edge.quant.report import QualityReport
from vl2edge.contract.routing_feed import expert_graph_inputs
from vl2edge.runtime.dispatch import RoutingConfig, route


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


# --- routing inputs under each kernel's semantics (export/mlp.py, "routing_form") -------------------------------
def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def cuda_semantics(router_probs, k, normalize):
    """CUDA QMoE/MoE as onnxruntime.md §1.3 describes it: softmax over all experts, top-k, renormalized only when
    normalize_routing_weights = 1; input 14 ignored."""
    p = _softmax(router_probs.astype(np.float64))
    sel = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(p, sel, axis=1)
    return sel, w / w.sum(axis=-1, keepdims=True) if normalize else w


def cpu_default_semantics(router_probs, k):
    """CPU QMoE/MoE without input 14: top-k of router_probs, weights = softmax over those k, always."""
    sel = np.argsort(-router_probs, axis=-1, kind="stable")[:, :k]
    return sel, _softmax(np.take_along_axis(router_probs, sel, axis=1).astype(np.float64))


ROUTINGS = {
    "softmax greedy (Tiny, Small)": RoutingConfig(64, 6),
    "softmax group-limited": RoutingConfig(64, 6, method="group_limited_greedy", n_group=8, topk_group=3),
    "sigmoid noaux_tc x2.0 (VL2)": RoutingConfig(72, 6, scoring="sigmoid", method="noaux_tc", n_group=8,
                                                 topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.0),
}


@pytest.mark.parametrize("io_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("name", list(ROUTINGS))
def test_log_weights_routing_is_exact_under_every_kernel_semantics(tmp_path, name, io_dtype):
    cfg = ROUTINGS[name]
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((33, cfg.num_experts)).astype(np.float32) * 2
    bias = rng.standard_normal(cfg.num_experts).astype(np.float32) * 0.1 if cfg.method == "noaux_tc" else None
    idx, w = route(logits, cfg, bias)
    probs, weights = expert_graph_inputs(idx, w, cfg.num_experts, io_dtype)
    g = GraphBuilder("routing")
    p, wt = g.input("probs", io_dtype, ["T", cfg.num_experts]), g.input("weights", io_dtype, ["T", cfg.num_experts])
    r, total = log_weight_logits(g, p, wt, cfg.top_k, "", io_dtype)
    g.output(r, "router_probs", io_dtype, ["T", cfg.num_experts])
    g.output(total, "scale", io_dtype, ["T", 1])
    sess = ort.InferenceSession(str(g.save(tmp_path / "routing.onnx")), providers=["CPUExecutionProvider"])
    router_probs, scale = sess.run(None, {"probs": probs, "weights": weights})
    tol = 1e-5 if io_dtype == np.float32 else 2e-3
    expected = np.take_along_axis(weights.astype(np.float64), idx, axis=1)  # w as the runtime hands it over
    for sel, mix in [cuda_semantics(router_probs, cfg.top_k, 0), cuda_semantics(router_probs, cfg.top_k, 1),
                     cpu_default_semantics(router_probs, cfg.top_k)]:
        order = np.argsort(sel, axis=1)
        assert (np.take_along_axis(sel, order, 1) == np.sort(idx, axis=1)).all()  # the runtime's experts
        got = np.take_along_axis(mix, order, 1) * scale.astype(np.float64)
        want = np.take_along_axis(expected, np.argsort(idx, axis=1), 1)
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * 1e-2)
    # the 0/1 mask that the cpu form feeds would be wrong under CUDA's semantics: e / (k e + E - k) per expert
    _, mask_mix = cuda_semantics(probs.astype(np.float32), cfg.top_k, 0)
    e = np.e
    np.testing.assert_allclose(mask_mix, e / (cfg.top_k * e + cfg.num_experts - cfg.top_k), rtol=1e-6)
    assert not np.allclose(mask_mix, expected, rtol=0.05)


@pytest.mark.parametrize("preset,layer", [("test-tiny", 1), ("test-vl2", 1)])
def test_the_log_weights_form_gives_the_layer_output_of_the_cpu_form(loaded, tmp_path, preset, layer):
    """The same QMoE weights with the routing fed both ways: the CPU kernel without input 14 (the cuda target's
    form) gives what it gives with it, and both track the reference."""
    ckpt, model = loaded[preset]
    L = model.cfg.language
    rng = np.random.default_rng(11)
    hidden = rng.standard_normal((1, 7, L.hidden_size)).astype(np.float32)
    mlp_in = rng.standard_normal((1, 7, L.hidden_size)).astype(np.float32)
    ref, routing = reference(model, layer, hidden, mlp_in)
    get = lambda name: ckpt.tensor(name, torch.float32).numpy()  # noqa: E731
    prec = Precision("int4", block_size=32, accuracy_level=0)
    feeds = {"hidden": hidden, "mlp_in": mlp_in}
    feeds["router_probs"], feeds["router_weights"] = router_inputs(*routing, L.n_routed_experts)
    outs = {}
    for form in ("weights", "log_weights"):
        g = build_mlp_graph(model.cfg, layer, get, prec, prec, np.float32, routing_form=form)
        qmoe = [n for n in g.nodes if n.op_type == "QMoE"][0]
        assert bool(len(qmoe.input) > 14 and qmoe.input[14]) == (form == "weights")  # input 14: cpu form only
        outs[form] = run_graph(g, tmp_path, feeds) - hidden
    scale = np.abs(outs["weights"]).max()
    assert np.abs(outs["log_weights"] - outs["weights"]).max() / scale < 1e-5
    ref_delta = ref - hidden
    got = outs["log_weights"]
    cos = float((got * ref_delta).sum() / np.linalg.norm(got) / np.linalg.norm(ref_delta))
    assert cos > 0.97
    with pytest.raises(ValueError, match="routing_form"):
        build_mlp_graph(model.cfg, layer, get, prec, prec, np.float32, routing_form="mask")

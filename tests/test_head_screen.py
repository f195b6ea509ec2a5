"""bench/probes/head_screen.py: the int8 head cut into high and low nibbles, checked against onnxruntime's kernels,
and the residual bounds checked against the residual itself."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from vl2edge.bench.probes.head_screen import SplitHead, activations_as_kernel_sees, run, settle, table
from vl2edge.quant.blockwise import quantize_blockwise
from vl2edge.quant.pack import pack_bits, pack_matmulnbits

V, K, BLOCK = 96, 128, 32


def matmulnbits(x: np.ndarray, b: np.ndarray, scales: np.ndarray, bits: int, zero_points=None) -> np.ndarray:
    """One com.microsoft MatMulNBits node at accuracy level 4 (how the head runs on CPU), x [1, K] -> [V]."""
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales.reshape(-1).astype(np.float32), "S")]
    inputs = ["A", "B", "S"]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=K, N=V, bits=bits,
                            block_size=BLOCK, accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, V])], inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": x[None]})[0][0]


def test_the_split_and_the_kernel_activations_match_onnxruntime():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((V, K)) * 0.05).astype(np.float32)
    head = SplitHead(w)
    qt = quantize_blockwise(w, bits=8, block_size=BLOCK, symmetric=True)
    b, scales, _ = pack_matmulnbits(qt)
    u = qt.q.reshape(V, K // BLOCK, BLOCK)
    for seed in range(4):
        x = np.random.default_rng(seed).standard_normal(K).astype(np.float32) * (1 + 3 * seed)
        exact, screen, resid = head.parts(activations_as_kernel_sees(x))
        # the int8 head as onnxruntime computes it (int8 activations per block) = the probe's emulation
        int8 = matmulnbits(x, b, scales, 8)
        np.testing.assert_allclose(exact, int8, rtol=1e-5, atol=1e-5 * np.abs(int8).max())
        # two 4-bit MatMulNBits, hi (zero point 8, scale 16 s) and lo (zero point 0, scale s): screen and residual
        hi = matmulnbits(x, pack_bits(u >> 4, 4), 16 * scales, 4)
        lo = matmulnbits(x, pack_bits(u & 15, 4), scales, 4,
                         zero_points=np.zeros((V, (K // BLOCK + 1) // 2), np.uint8))
        np.testing.assert_allclose(hi, screen, rtol=1e-5, atol=1e-5 * np.abs(int8).max())
        np.testing.assert_allclose(lo, resid, rtol=1e-5, atol=1e-5 * np.abs(int8).max())
        np.testing.assert_allclose(hi + lo, int8, rtol=1e-5, atol=1e-5 * np.abs(int8).max())


def test_the_worst_case_bound_holds_and_keeps_the_argmax():
    rng = np.random.default_rng(4)
    head = SplitHead((rng.standard_normal((V, K)) * 0.05).astype(np.float32))
    for seed in range(8):
        x = activations_as_kernel_sees(np.random.default_rng(10 + seed).standard_normal(K).astype(np.float32))
        exact, screen, resid = head.parts(x)
        bounds = head.bounds(x)
        assert np.all(resid <= bounds["worst_case"] + 1e-6)
        step = settle(head, x)
        needed = screen + bounds["worst_case"] >= exact.max()
        assert needed[int(exact.argmax())]  # the best row can never be proven out
        assert step["rows_needed_worst_case"] == int(needed.sum()) >= 1
        assert step["rows_needed_8_sigma"] <= V


def test_probe_on_a_test_checkpoint(test_checkpoints):
    doc = run(test_checkpoints["test-tiny"], conversations=2, steps=3, text_only=True)
    s = doc["summary"]
    assert doc["conversations"] == 2 and s["steps"] == 6 and len(doc["per_step"]) == 6
    assert 1 <= s["worst_case"]["rows_needed_median"] <= s["vocab"]
    assert 0.5 <= s["worst_case"]["head_bytes_share_median"] <= 1.0
    assert "rows needed" in table(doc)

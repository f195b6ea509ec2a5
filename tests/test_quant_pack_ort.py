"""quant.pack: the MatMulNBits / QMoE / GatherBlockQuantized layouts, checked two ways.

1. Round trips against an independent, loop-based unpacker written here (one byte and one nibble at a time).
2. The real ops: tiny ONNX graphs run by onnxruntime CPU must reproduce numpy references on the dequantized weights.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from vl2edge.quant.blockwise import dequantize, quantize_blockwise
from vl2edge.quant.pack import (
    interleave_gate_up,
    pack_bits,
    pack_gather,
    pack_gather_block_quantized,
    pack_matmulnbits,
    pack_qmoe,
    pack_qmoe_fc1,
    pack_qmoe_fc2,
    split_gate_up,
    unpack_bits,
    unpack_gather,
    unpack_matmulnbits,
    unpack_qmoe,
)

# --- independent reference unpacking ------------------------------------------------------------------------


def ref_codes_of_byte_run(byte_run, bits: int) -> list[int]:
    """Codes stored in a run of bytes: within each byte the first element sits in the lowest bits."""
    codes = []
    for byte in byte_run:
        byte = int(byte)
        for j in range(8 // bits):
            codes.append((byte >> (j * bits)) & ((1 << bits) - 1))
    return codes


def ref_dequant_matmulnbits(b, scales, zero_points, k, bits, block_size) -> np.ndarray:
    n, k_blocks, _ = b.shape
    out = np.zeros((n, k), np.float32)
    for row in range(n):
        zps = ref_codes_of_byte_run(zero_points[row], bits) if zero_points is not None else None
        for blk in range(k_blocks):
            codes = ref_codes_of_byte_run(b[row, blk], bits)
            assert len(codes) == block_size
            zp = zps[blk] if zps is not None else 1 << (bits - 1)
            for j, code in enumerate(codes):
                if blk * block_size + j < k:
                    out[row, blk * block_size + j] = np.float32(code - zp) * scales[row, blk]
    return out


def ref_dequant_qmoe(weights, scales, zero_points, bits, block_size) -> np.ndarray:
    e_count, n, nbytes = weights.shape
    k = nbytes * 8 // bits
    out = np.zeros((e_count, n, k), np.float32)
    for e in range(e_count):
        row_zps = ref_codes_of_byte_run(zero_points[e], bits) if zero_points is not None and block_size == 0 else None
        for row in range(n):
            codes = ref_codes_of_byte_run(weights[e, row], bits)
            for j, code in enumerate(codes):
                if block_size == 0:
                    scale, zp = scales[e, row], (row_zps[row] if row_zps else 1 << (bits - 1))
                else:
                    blk = j // block_size
                    scale = scales[e, row, blk]
                    zp = (ref_codes_of_byte_run(zero_points[e, row], bits)[blk] if zero_points is not None
                          else 1 << (bits - 1))
                out[e, row, j] = np.float32(code - zp) * scale
    return out


def ref_dequant_gather(data, scales, zero_points, bits, block_size) -> np.ndarray:
    v, nbytes = data.shape
    d = nbytes * 8 // bits
    out = np.zeros((v, d), np.float32)
    for row in range(v):
        codes = ref_codes_of_byte_run(data[row], bits)
        zps = ref_codes_of_byte_run(zero_points[row], bits) if zero_points is not None else None
        for j, code in enumerate(codes):
            blk = j // block_size
            zp = zps[blk] if zps is not None else 1 << (bits - 1)
            out[row, j] = np.float32(code - zp) * scales[row, blk]
    return out


def gaussian(shape, seed=0, std=1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * std).astype(np.float32)


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --- bit packing ----------------------------------------------------------------------------------------------


def test_pack_bits_nibble_order():
    np.testing.assert_array_equal(pack_bits(np.array([1, 2, 3, 4, 5], np.uint8), 4), [0x21, 0x43, 0x05])
    np.testing.assert_array_equal(pack_bits(np.array([1, 2, 3, 0, 3], np.uint8), 2), [0b00111001, 0b11])
    np.testing.assert_array_equal(pack_bits(np.array([7, 200], np.uint8), 8), [7, 200])


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), rows=st.integers(1, 4), n=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_pack_unpack_bits_property(bits, rows, n, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, (rows, n)).astype(np.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (rows, -(-n * bits // 8))
    np.testing.assert_array_equal(unpack_bits(packed, bits, n), codes)
    assert [ref_codes_of_byte_run(r, bits)[:n] for r in packed] == codes.tolist()


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), block_size=st.sampled_from([16, 32, 64, 128]), n=st.integers(1, 5),
       k=st.integers(1, 300), symmetric=st.booleans(), seed=st.integers(0, 2**16))
def test_matmulnbits_pack_unpack_property(bits, block_size, n, k, symmetric, seed):
    qt = quantize_blockwise(gaussian((n, k), seed), bits=bits, block_size=block_size, symmetric=symmetric)
    b, scales, zp = pack_matmulnbits(qt)
    back = unpack_matmulnbits(b, scales, zp, k=k, bits=bits, block_size=block_size)
    np.testing.assert_array_equal(back.q, qt.q)
    np.testing.assert_array_equal(back.scales, qt.scales)
    assert back.symmetric == symmetric
    if not symmetric:
        np.testing.assert_array_equal(back.zero_points, qt.zero_points)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), block_size=st.sampled_from([0, 16, 32, 64]), e=st.integers(1, 3),
       n=st.integers(1, 6), k_blocks=st.integers(1, 4), symmetric=st.booleans(), seed=st.integers(0, 2**16))
def test_qmoe_and_gather_pack_unpack_property(bits, block_size, e, n, k_blocks, symmetric, seed):
    k = (block_size or 16) * k_blocks
    qt = quantize_blockwise(gaussian((e, n, k), seed), bits=bits, block_size=block_size, symmetric=symmetric)
    back = unpack_qmoe(*pack_qmoe(qt), bits=bits, block_size=block_size)
    np.testing.assert_array_equal(back.q, qt.q)
    np.testing.assert_array_equal(dequantize(back), dequantize(qt))
    if block_size:
        d = k - 3 * (8 // bits)  # a partial last block, still a whole number of bytes
        g = quantize_blockwise(gaussian((n, d), seed), bits=bits, block_size=block_size, symmetric=symmetric)
        back = unpack_gather(*pack_gather(g), bits=bits, block_size=block_size)
        np.testing.assert_array_equal(back.q, g.q)
        np.testing.assert_array_equal(dequantize(back), dequantize(g))


# --- layouts against the loop-based reference ---------------------------------------------------------------

LAYOUT_CASES = [(bits, bs, sym) for bits in (4, 8) for bs in (32, 64, 128) for sym in (True, False)]


@pytest.mark.parametrize("bits,block_size,symmetric", LAYOUT_CASES)
def test_matmulnbits_layout(bits, block_size, symmetric):
    n, k = 6, 200  # K % block != 0: MatMulNBits allows a partial last block
    qt = quantize_blockwise(gaussian((n, k), 1), bits=bits, block_size=block_size, symmetric=symmetric)
    b, scales, zp = pack_matmulnbits(qt)
    k_blocks = -(-k // block_size)
    assert b.shape == (n, k_blocks, block_size * bits // 8) and b.dtype == np.uint8
    assert scales.shape == (n, k_blocks) and scales.dtype == np.float32
    assert (zp is None) == symmetric
    if not symmetric:
        assert zp.shape == (n, -(-k_blocks * bits // 8)) and zp.dtype == np.uint8
    np.testing.assert_array_equal(ref_dequant_matmulnbits(b, scales, zp, k, bits, block_size), dequantize(qt))
    # the padding of the partial last block holds the zero point, i.e. dequantizes to 0
    pad_codes = ref_codes_of_byte_run(b[0, -1], bits)[k - (k_blocks - 1) * block_size:]
    assert set(pad_codes) == {int(qt.zero_points_or_default()[0, -1])}


def test_matmulnbits_rejects_what_the_op_cannot_express():
    w = gaussian((4, 64))
    for block_size in (0, 24, 8):  # row-wise, not a power of 2, below 16
        with pytest.raises(ValueError):
            pack_matmulnbits(quantize_blockwise(w, bits=4, block_size=block_size))


@pytest.mark.parametrize("bits,block_size,symmetric", [(4, 32, True), (4, 64, False), (8, 32, False),
                                                       (8, 64, True), (4, 0, True), (4, 0, False), (8, 0, False)])
def test_qmoe_fc1_layout_interleaves_gate_and_up(bits, block_size, symmetric):
    e, i, h = 2, 3, 64
    gate, up = gaussian((e, i, h), 2), gaussian((e, i, h), 3) + 10.0  # up rows are recognizable by their offset
    weights, scales, zp = pack_qmoe_fc1(gate, up, bits=bits, block_size=block_size, symmetric=symmetric)
    assert weights.shape == (e, 2 * i, h * bits // 8) and weights.dtype == np.uint8
    if block_size:
        assert scales.shape == (e, 2 * i, h // block_size)
        if not symmetric:
            assert zp.shape == (e, 2 * i, -(-(h // block_size) * bits // 8))
    else:
        assert scales.shape == (e, 2 * i)
        if not symmetric:
            assert zp.shape == (e, -(-2 * i * bits // 8))  # row-wise zero points are packed along N
    fc1 = ref_dequant_qmoe(weights, scales, zp, bits, block_size)
    tol = 0.15 if bits == 4 else 0.01
    for j in range(i):  # row 2j is gate row j, row 2j+1 is up row j, compared with the float originals
        assert rel(fc1[:, 2 * j], gate[:, j]) < tol
        assert rel(fc1[:, 2 * j + 1], up[:, j]) < tol
    g, u = split_gate_up(fc1)
    np.testing.assert_array_equal(np.stack([g, u], 2).reshape(fc1.shape), fc1)
    np.testing.assert_array_equal(fc1, dequantize(unpack_qmoe(weights, scales, zp, bits=bits, block_size=block_size)))


@pytest.mark.parametrize("bits,block_size,symmetric", [(4, 32, False), (8, 64, True), (4, 0, False)])
def test_qmoe_fc2_layout(bits, block_size, symmetric):
    down = gaussian((2, 8, 128), 4)  # [E, H, I]
    weights, scales, zp = pack_qmoe_fc2(down, bits=bits, block_size=block_size, symmetric=symmetric)
    assert weights.shape == (2, 8, 128 * bits // 8)
    qt = quantize_blockwise(down, bits=bits, block_size=block_size, symmetric=symmetric)
    np.testing.assert_array_equal(ref_dequant_qmoe(weights, scales, zp, bits, block_size), dequantize(qt))


def test_qmoe_rejects_partial_blocks_and_interleave_checks_shapes():
    with pytest.raises(ValueError):  # QMoE needs K % block_size == 0
        pack_qmoe(quantize_blockwise(gaussian((2, 4, 96)), bits=4, block_size=64))
    with pytest.raises(ValueError):
        interleave_gate_up(gaussian((2, 4, 8)), gaussian((2, 5, 8)))


@pytest.mark.parametrize("bits,block_size,symmetric", LAYOUT_CASES)
def test_gather_layout(bits, block_size, symmetric):
    v, d = 5, 200  # D % block != 0 is fine for GatherBlockQuantized (no per-block padding)
    table = gaussian((v, d), 5)
    data, scales, zp = pack_gather_block_quantized(table, bits=bits, block_size=block_size, symmetric=symmetric)
    k_blocks = -(-d // block_size)
    assert data.shape == (v, d * bits // 8) and scales.shape == (v, k_blocks)
    if not symmetric:
        assert zp.shape == (v, -(-k_blocks * bits // 8))
    qt = quantize_blockwise(table, bits=bits, block_size=block_size, symmetric=symmetric)
    np.testing.assert_array_equal(ref_dequant_gather(data, scales, zp, bits, block_size), dequantize(qt))


# --- onnxruntime ----------------------------------------------------------------------------------------------


def run_op(op: str, inputs: list[str], attrs: dict, feeds: dict, consts: dict, out_shape) -> np.ndarray:
    """One com.microsoft node; `inputs` in schema order ('' = absent optional); consts become initializers."""
    graph_inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                    for name, a in feeds.items()]
    node = helper.make_node(op, inputs, ["y"], domain="com.microsoft", **attrs)
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
    graph = helper.make_graph([node], "g", graph_inputs, [output],
                              initializer=[numpy_helper.from_array(a, name) for name, a in consts.items()])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10  # onnx 1.23's default (14) is newer than ORT 1.31 accepts
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # tiny graphs; be kind to a shared 2-core machine
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("bits,block_size,symmetric", LAYOUT_CASES)
def test_ort_matmulnbits(bits, block_size, symmetric):
    m, n, k = 3, 24, 200  # odd K: partial last block
    w, a = gaussian((n, k), 6), gaussian((m, k), 7)
    qt = quantize_blockwise(w, bits=bits, block_size=block_size, symmetric=symmetric)
    assert (qt.scales < 0).any() == (symmetric and bits < 8)  # 4-bit symmetric: blocks whose extreme is > 0
    b, scales, zp = pack_matmulnbits(qt)
    consts = {"B": b, "scales": scales} | ({} if zp is None else {"zero_points": zp})
    inputs = ["A", "B", "scales"] + ([] if zp is None else ["zero_points"])
    expected = a @ dequantize(qt).T
    attrs = dict(K=k, N=n, bits=bits, block_size=block_size)
    # accuracy_level 0: fp32 activations (4-bit fp32 kernel, 8-bit dequantize path) -> fp32 rounding only
    # (measured 1-4e-7).
    exact = run_op("MatMulNBits", inputs, attrs | {"accuracy_level": 0}, {"A": a}, consts, (m, n))
    assert exact.shape == (m, n)
    assert rel(exact, expected) < 1e-5
    # accuracy_level 4: A is quantized to int8 per block at run time (measured ~0.5%).
    fast = run_op("MatMulNBits", inputs, attrs | {"accuracy_level": 4}, {"A": a}, consts, (m, n))
    assert rel(fast, expected) < 0.02


# QMoE: E=8 experts, top-6, hidden 128, inter 64 (both multiples of every block size tested), 3 tokens.
E, H, I, T, TOP_K = 8, 128, 64, 3, 6


def silu(x):
    return x / (1.0 + np.exp(-x))


def softmax(x):
    p = np.exp(x - x.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def moe_reference(x, logits, gate, up, down, renormalize: bool) -> np.ndarray:
    """DeepSeek-VL2 Tiny/Small routing (softmax over ALL experts, greedy top-k, weights NOT renormalized),
    or with renormalize=True the softmax over the top-k (what ORT's CPU QMoE does without router_weights)."""
    probs = softmax(logits.astype(np.float64))
    out = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        top = np.argsort(-probs[t])[:TOP_K]
        weights = probs[t, top] / (probs[t, top].sum() if renormalize else 1.0)
        for e, p in zip(top, weights):
            out[t] += p * (down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])))
    return out


@pytest.fixture(scope="module")
def moe_problem():
    gate, up = gaussian((E, I, H), 10, 0.1), gaussian((E, I, H), 11, 0.1)
    down = gaussian((E, H, I), 12, 0.1)
    x = gaussian((T, H), 13)
    # Flat-ish logits: the top-6 of 8 then hold ~90% of the mass (not ~100%), so renormalizing shows.
    logits = gaussian((T, E), 14, 0.5)
    return x, logits, gate, up, down


def run_qmoe(problem, bits, block_size, symmetric, with_router_weights=True, accuracy_level=0):
    x, logits, gate, up, down = problem
    fc1 = quantize_blockwise(interleave_gate_up(gate, up), bits=bits, block_size=block_size, symmetric=symmetric)
    fc2 = quantize_blockwise(down, bits=bits, block_size=block_size, symmetric=symmetric)
    assert (fc1.scales < 0).any() == (symmetric and bits < 8)  # the kernels must take negative 4-bit scales
    (w1, s1, z1), (w2, s2, z2) = pack_qmoe(fc1), pack_qmoe(fc2)
    inputs = ["x", "router_probs", "fc1_w", "fc1_s", "", "fc2_w", "fc2_s", "", "", "", "", "", "", ""]
    consts = {"fc1_w": w1, "fc1_s": s1, "fc2_w": w2, "fc2_s": s2}
    if not symmetric:
        inputs[11], inputs[12] = "fc1_zp", "fc2_zp"
        consts |= {"fc1_zp": z1, "fc2_zp": z2}
    feeds = {"x": x, "router_probs": logits}
    if with_router_weights:
        inputs.append("router_weights")  # input 14
        feeds["router_weights"] = softmax(logits).astype(np.float32)
    attrs = dict(k=TOP_K, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                 expert_weight_bits=bits, normalize_routing_weights=0, accuracy_level=accuracy_level)
    if block_size:
        attrs["block_size"] = block_size
    y = run_op("QMoE", inputs, attrs, feeds, consts, x.shape)
    g, u = split_gate_up(dequantize(fc1))
    return y, (x, logits, g, u, dequantize(fc2))


# Which CPU kernel runs decides the tolerance: block-wise 8-bit has no fp32 kernel and always quantizes the
# activations to int8 (measured 1.0-1.5% relative), as does block-wise 4-bit at accuracy_level 4 (~1.3%);
# block-wise 4-bit at level 0 and every row-wise config dequantize and run in fp32 (measured ~3e-7).
QMOE_CASES = [  # bits, block_size, symmetric, accuracy_level, tolerance
    (4, 32, True, 0, 1e-5), (4, 64, True, 0, 1e-5), (8, 32, True, 0, 0.03), (8, 64, True, 0, 0.03),
    (4, 64, True, 4, 0.03), (4, 0, True, 0, 1e-5), (8, 0, True, 0, 1e-5),
    (4, 64, False, 0, 1e-5), (8, 32, False, 0, 0.03), (4, 0, False, 0, 1e-5),
]


@pytest.mark.parametrize("bits,block_size,symmetric,accuracy_level,tol", QMOE_CASES)
def test_ort_qmoe_matches_deepseek_routing(moe_problem, bits, block_size, symmetric, accuracy_level, tol):
    y, deq = run_qmoe(moe_problem, bits, block_size, symmetric, accuracy_level=accuracy_level)
    assert y.shape == (T, H)
    assert rel(y, moe_reference(*deq, renormalize=False)) < tol


@pytest.mark.parametrize("bits,block_size", [(4, 64), (4, 0)])
def test_ort_qmoe_routing_trap_without_router_weights(moe_problem, bits, block_size):
    """Without input 14 the CPU kernel weights the top-k by a softmax over the top-k logits (renormalized, sum 1),
    whatever normalize_routing_weights says. DeepSeek-VL2 Tiny/Small weight by the softmax over ALL experts
    (sum < 1), so an export that omits router_weights is silently wrong by the factor 1/sum(top-k probs)."""
    y, deq = run_qmoe(moe_problem, bits, block_size, True, with_router_weights=False)
    deepseek, renormalized = moe_reference(*deq, renormalize=False), moe_reference(*deq, renormalize=True)
    assert rel(y, renormalized) < 1e-5
    assert rel(y, deepseek) > 0.05  # measured 0.115: here the top-6 hold 88-91% of the probability mass
    with_weights, _ = run_qmoe(moe_problem, bits, block_size, True, with_router_weights=True)
    assert rel(with_weights, deepseek) < 1e-5


@pytest.mark.parametrize("bits,block_size,symmetric", [(4, 32, True), (4, 64, False), (4, 128, True),
                                                       (8, 32, False), (8, 64, True), (8, 128, False)])
def test_ort_gather_block_quantized(bits, block_size, symmetric):
    v, d = 40, 200  # partial last block; 7 blocks of 32 (odd count: the packed zero points end in half a byte)
    table = gaussian((v, d), 15)
    qt = quantize_blockwise(table, bits=bits, block_size=block_size, symmetric=symmetric)
    assert (qt.scales < 0).any() == (symmetric and bits < 8)
    data, scales, zp = pack_gather(qt)
    indices = np.array([[0, 7, 39], [3, -1, 40]], np.int64)  # -1 = last row; 40 is out of range -> zeros
    consts = {"data": data, "scales": scales} | ({} if zp is None else {"zero_points": zp})
    inputs = ["data", "indices", "scales"] + ([] if zp is None else ["zero_points"])
    y = run_op("GatherBlockQuantized", inputs, dict(bits=bits, block_size=block_size, gather_axis=0,
                                                    quantize_axis=1), {"indices": indices}, consts, (2, 3, d))
    rows = dequantize(qt)
    expected = np.stack([rows[[0, 7, 39]], np.stack([rows[3], rows[-1], np.zeros(d, np.float32)])])
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-7)

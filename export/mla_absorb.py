"""MLA's absorbed per-head products: W_UK folded into the query, W_UV applied to the attended latents.

kv_b_proj [nh * (nope + v), r] viewed [nh, nope + v, r] holds both: W_UK = rows [:nope] of each head, W_UV = rows
[nope:]. The absorbed form multiplies per head:
  q_lat[h] = q_nope[h] @ W_UK[h]        [M, nope] @ [nope, r]
  out[h]   = ctx[h] @ W_UV[h]^T         [M, r] @ [r, v]
as batched MatMuls over the head axis ([nh, M, K] @ [nh, K, N]), M = tokens.

Two stored forms (`absorbed_weights`):
  fp32 / fp16 (unquantized artifacts, and fp16/CUDA graphs): [nh, K, N] at io dtype, one batched MatMul.
  int8 (fp32 graphs whose attention linears are quantized): codes int8 [nh, K, N], symmetric, one fp32 scale per
    head and output column, scales [nh, 1, N]; w = codes * scale. Read in place from the mapped file, never packed.
    A decode step (M = 1) quantizes its activations [nh, 1, K] to uint8 per tensor (DynamicQuantizeLinear) and
    multiplies on MatMulInteger (MLAS u8s8, VNNI), then scales by a_scale * w_scale; a prefill chunk dequantizes
    the weight (DequantizeLinear, one block along K) and runs the fp32 batched MatMul, so its activations keep
    full precision (a chunk's per-tensor scale would span all of its tokens).
Why int8: in fp32 the two weights are 8 MiB per layer, read whole at every step (216 MB per Small decode step, 15.7
ms for 27 layers at 2 threads) and resident as mapped pages. int8 reads a quarter and halves the time (8.1 ms; 27
real-dims layers in sequence, alternated in one process, 2026-12-01, docs/design.md). Rejected, measured the same way: a
per-head MatMulNBits (16 GEMVs per weight), 10.8 ms; one MatMulNBits over all heads' weights keeping the diagonal,
16.2 ms (its M = 16 runs the fp32 path, 16 times the work); dequantizing at every step, 72.8 ms.
Fidelity (bench/fidelity.py against the fp32 reference, int4 and int8 artifacts of test-small and test-vl2): the mean
logit cosine moved by at most 1e-5 against fp32 W_UK/W_UV, top-1 agreement by one near-tie step either way.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class AbsorbedWeight(NamedTuple):
    """One of the two weights as graph initializer names: `weight` [nh, K, N] (io dtype or int8 codes) and, for
    int8, `scales` [nh, 1, N] fp32 (None for an unquantized weight)."""

    weight: str
    scales: str | None
    k: int


INT8_DESCRIPTION = {"kind": "int8", "scales": "fp32 per head and output column, symmetric",
                    "decode_activations": "uint8 per tensor, dynamic (MatMulInteger)",
                    "prefill": "weights dequantized, fp32 MatMul"}


def quantized_form(prec, io_dtype) -> bool:
    """Whether W_UK / W_UV are stored int8: in fp32 graphs whose attention linears are quantized."""
    return prec.bits is not None and np.dtype(io_dtype) == np.float32


def quantize_per_head_column(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [nh, K, N] -> (codes int8 [nh, K, N] in [-127, 127], scales fp32 [nh, 1, N]); w ~= codes * scales."""
    w = np.asarray(w, np.float32)
    scales = np.abs(w).max(axis=1, keepdims=True) / 127.0
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    codes = np.clip(np.rint(w / scales), -127, 127).astype(np.int8)
    return codes, scales


def absorbed_weights(g, pfx: str, w_kvb: np.ndarray, nope: int, quantized: bool, io_dtype, report=None):
    """Initializers of W_UK [nh, nope, r] and W_UV^T [nh, r, v] from kv_b_proj viewed [nh, nope + v, r]."""
    w_uk = w_kvb[:, :nope]
    w_uv_t = w_kvb[:, nope:].transpose(0, 2, 1)
    out = []
    for name, w in ((pfx + "self_attn.w_uk", w_uk), (pfx + "self_attn.w_uv_t", w_uv_t)):
        w = np.ascontiguousarray(w, np.float32)
        if not quantized:
            out.append(AbsorbedWeight(g.const(name, w.astype(io_dtype)), None, w.shape[1]))
            continue
        codes, scales = quantize_per_head_column(w)
        if report is not None:
            report.add("attention.kv_b", name, w, codes.astype(np.float32) * scales)
        out.append(AbsorbedWeight(g.const(name + ".int8", codes), g.const(name + ".scales", scales), w.shape[1]))
    return out


def absorb(b, x: str, w: AbsorbedWeight, decoding: bool, hint: str) -> str:
    """x [nh, M, K] @ w [nh, K, N] -> [nh, M, N] in builder `b` (a graph or an If branch)."""
    if w.scales is None:
        return b.op("MatMul", [x, w.weight], hint=hint)
    if not decoding:
        dense = b.op("DequantizeLinear", [w.weight, w.scales], hint=hint + "_dequant", axis=1, block_size=w.k)
        return b.op("MatMul", [x, dense], hint=hint)
    qx, x_scale, x_zero = b.op("DynamicQuantizeLinear", [x], n_out=3, hint=hint + "_quant_act")
    acc = b.op("MatMulInteger", [qx, w.weight, x_zero], hint=hint + "_int")
    scale = b.op("Mul", [w.scales, x_scale], hint=hint + "_scale")
    return b.op("Mul", [b.op("Cast", [acc], hint=hint + "_acc", to=1), scale], hint=hint)

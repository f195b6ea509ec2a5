"""The 8-bit MLA latent cache: its layout, and the decode products that read it without dequantizing it.

Why: a decode step of MLA reads each layer's whole latent cache twice (scores, then the attended latents). At 4000
cached tokens on real-dims Small that is 2 x 9.2 MB per layer in fp32, 500 MB per step for 27 layers, and it is what
makes a step grow with context. At one byte per value the products run on MLAS's integer GEMMs instead, and the
cache's resident size drops 4x (255 -> 64 MB at 4096 tokens).

Layout (written here and nowhere else): per token the row [c_kv | k_pe] (width kv_lora_rank + qk_rope_head_dim) as
uint8 codes round(x / scale) + 128, saturated to [0, 255] (QuantizeLinear); one static fp32 scale per channel
(`scales` [width]), measured at export time (export/kv_calibration.latent_scales). uint8 with zero point 128 rather
than int8 because the scores product needs the cache as MatMulInteger's A, and MLAS's fast x86 kernels take an
unsigned A (measured at 4000 tokens, real Small dims, 2 threads: u8 A x s8 B 319 us per layer, s8 A x s8 B 1351 us).

Decode (T = 1), with q [nh, width] the absorbed queries:
  scores: the softmax scale and the per-channel scales are folded into q (one constant), which is then quantized to
    int8 per head (per tensor was 3.5x the error: the heads' ranges differ); MatMulInteger(cache u8 - 128, q8^T)
    -> [P, nh] int32, times the per-head scale.
  attended latents: p = exp(s - m) lies in [0, 1] (m is the row's max), so it is quantized statically with
    scale 1/255 to uint8; MatMulInteger(p8, cache u8 - 128) -> [nh, width] int32, times scales / 255. The softmax's
    denominator stays the fp32 sum of p (closer to the reference than the sum of the rounded p, measured).
A prefill chunk dequantizes the prefix once (DequantizeLinear per channel) and attends in fp32.
"""

from __future__ import annotations

import numpy as np

ZERO_POINT = 128
QMAX = 127


def quantize_latent(x: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The rule the graph writes rows with (QuantizeLinear, round half to even): x [..., width] -> uint8 codes."""
    return np.clip(np.rint(x / scales) + ZERO_POINT, 0, 255).astype(np.uint8)


def dequantize_latent(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return (codes.astype(np.float32) - ZERO_POINT) * scales


class LatentCodec:
    """The constants of one layer's 8-bit latent cache in graph `g` (shared by the If's branches); softmax_scale is
    the attention's, folded into the queries' channel scales."""

    def __init__(self, g, layer_name: str, scales: np.ndarray, softmax_scale: float):
        scales = np.asarray(scales, np.float32)
        width = scales.shape[0]
        self.scales = g.const(layer_name + ".latent_scales", scales)
        self.q_scales = g.const(layer_name + ".latent_q_scales", scales * np.float32(softmax_scale))
        self.zero_u8 = g.const(layer_name + ".zero_u8", np.array(0, np.uint8))
        self.zero = g.const(layer_name + ".latent_zero", np.full(width, ZERO_POINT, np.uint8))
        self.zero_scalar = g.const(layer_name + ".latent_zero_scalar", np.array(ZERO_POINT, np.uint8))
        self.ctx_scales = g.const(layer_name + ".latent_ctx_scales", (scales / 255).astype(np.float32))

    def write(self, b, rows: str, out_name: str) -> str:
        """fp32 rows [T, width] -> the uint8 codes the cache stores, as the op's own output `out_name` (the graph
        output bound over the cache's rows: no copy)."""
        # saturates to [0, 255]; the calibration's headroom keeps the calibration's rows inside [-127, 127] + 128
        return b.op("QuantizeLinear", [rows, self.scales, self.zero], out_names=[out_name], axis=1)

    def read(self, b, codes: str) -> str:
        """uint8 codes [P, width] -> fp32 rows (a prefill chunk's copy of the prefix)."""
        return b.op("DequantizeLinear", [codes, self.scales, self.zero], hint="latent_dequant", axis=1)

    def scores(self, b, past: str, q: str) -> str:
        """q [nh, width] (before the softmax scale) against the cached codes [P, width] -> scaled scores [nh, P]."""
        qs = b.op("Mul", [q, self.q_scales], hint="q_cache_scaled")
        ax1 = b.const("q_absmax_axis", np.array([1], np.int64))
        q_scale = b.op("Div", [b.op("ReduceMax", [b.op("Abs", [qs]), ax1], keepdims=1),
                               b.const("q_qmax", np.array(QMAX, np.float32))], hint="q_head_scale")  # [nh, 1]
        # an all-zero head (scale 0) would divide by zero; the smallest normal float keeps its codes 0
        q_scale = b.op("Max", [q_scale, b.const("q_scale_floor", np.array(np.finfo(np.float32).tiny, np.float32))])
        q8 = b.op("Cast", [b.op("Clip", [b.op("Round", [b.op("Div", [qs, q_scale])]),
                                         b.const("q_lo", np.array(-QMAX, np.float32)),
                                         b.const("q_hi", np.array(QMAX, np.float32))])], hint="q_int8", to=3)
        acc = b.op("MatMulInteger", [past, b.op("Transpose", [q8], perm=[1, 0]), self.zero_scalar],
                   hint="scores_past_int")  # [P, nh]
        return b.op("Mul", [b.op("Cast", [b.op("Transpose", [acc], perm=[1, 0])], to=1),
                            q_scale], hint="scores_past")  # [nh, P]

    def attend(self, b, p: str, past: str) -> str:
        """p [nh, P] in [0, 1] against the cached codes -> sum_t p[h, t] * row_t, [nh, width] fp32."""
        p8 = b.op("QuantizeLinear", [p, b.const("p_scale", np.array(1 / 255, np.float32)), self.zero_u8],
                  hint="p_uint8")
        acc = b.op("MatMulInteger", [p8, past, self.zero_u8, self.zero_scalar], hint="ctx_past_int")
        return b.op("Mul", [b.op("Cast", [acc], to=1), self.ctx_scales], hint="ctx_past")

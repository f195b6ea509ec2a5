"""The 8-bit MLA latent cache: its layout, and the decode products that read it without dequantizing it.

Why: a decode step of MLA reads each layer's whole latent cache twice (scores, then the attended latents). At 4000
cached tokens on real-dims Small that is 2 x 9.2 MB per layer in fp32, 500 MB per step for 27 layers, and it is what
makes a step grow with context. At one byte per value the products run on MLAS's integer GEMMs instead, and the
cache's resident size drops 4x (255 -> 64 MB at 4096 tokens).

Layout (written here and nowhere else): per token the row [c_kv | k_pe] (width kv_lora_rank + qk_rope_head_dim) as
uint8 codes round(x / (chan * tok)) + 128, and beside them that token's scale `tok` (fp32, a second buffer
[max_len, 1]):
  chan [width]  a static per-channel equalizer measured at export (export/kv_calibration.latent_scales): it only
                evens out the channels' ranges (c_kv's normed channels and k_pe's rotated pairs differ) so that one
                scale per token fits them all; it never clips anything;
  tok           max over the row of |x / chan| / 127, computed when the row is written: the codes always span the
                row's own range, whatever the calibration saw. A user's input that drives the latents beyond the
                calibration set's range widens its rows' scales instead of saturating them.
(Until format 5 the scale was static per channel with 25% headroom: rows beyond it clipped, and every later token
of every head read the clipped latent; a held-out checkpoint lost 0.012 of worst cosine and 0.06 of top-1 to it.)
uint8 with zero point 128 rather than int8 because the scores product needs the cache as MatMulInteger's A, and
MLAS's fast x86 kernels take an unsigned A (measured at 4000 tokens, real Small dims, 2 threads: u8 A x s8 B 319 us
per layer, s8 A x s8 B 1351 us).

Decode (T = 1), with q [nh, width] the absorbed queries:
  scores: the softmax scale and chan are folded into q (one constant), which is then quantized to int8 per head (per
    tensor was 3.5x the error: the heads' ranges differ); MatMulInteger(cache u8 - 128, q8^T) -> [P, nh] int32,
    times each row's token scale and each head's query scale.
  attended latents: p = exp(s - m) lies in [0, 1] (m is the row's max); p * tok (the token scales folded in) is
    quantized to uint8 with one scale per head (its max / 255); MatMulInteger(p8, cache u8 - 128) -> [nh, width]
    int32, times the head's scale and chan. The softmax's denominator stays the fp32 sum of p.
A prefill chunk dequantizes the prefix once (codes - 128) * chan * tok and attends in fp32.
"""

from __future__ import annotations

import numpy as np

ZERO_POINT = 128
QMAX = 127
TINY = np.float32(np.finfo(np.float32).tiny)  # the scale of an all-zero row (or head): its codes stay 0


def token_scales(x: np.ndarray, chan: np.ndarray) -> np.ndarray:
    """x [T, width] -> each row's scale [T, 1]: max |x / chan| / 127."""
    return np.maximum(np.abs(x / chan).max(-1, keepdims=True) / QMAX, TINY).astype(np.float32)


def quantize_latent(x: np.ndarray, chan: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rule the graph writes rows with: x [T, width] -> (uint8 codes [T, width], token scales [T, 1])."""
    tok = token_scales(x, chan)
    return np.clip(np.rint(x / chan / tok) + ZERO_POINT, 0, 255).astype(np.uint8), tok


def dequantize_latent(codes: np.ndarray, tok: np.ndarray, chan: np.ndarray) -> np.ndarray:
    return (codes.astype(np.float32) - ZERO_POINT) * chan * tok


class LatentCodec:
    """The constants of one layer's 8-bit latent cache in graph `g` (shared by the If's branches); softmax_scale is
    the attention's, folded into the queries' channel scales."""

    def __init__(self, g, layer_name: str, chan: np.ndarray, softmax_scale: float, heads: int):
        chan = np.asarray(chan, np.float32)
        width = chan.shape[0]
        self.zero_heads = g.const(layer_name + ".zero_u8_heads", np.zeros(heads, np.uint8))
        self.chan = g.const(layer_name + ".latent_chan", chan)
        self.inv_chan = g.const(layer_name + ".latent_inv_chan", (1 / chan).astype(np.float32))
        self.q_scales = g.const(layer_name + ".latent_q_scales", chan * np.float32(softmax_scale))
        self.zero_u8 = g.const(layer_name + ".zero_u8", np.array(0, np.uint8))
        self.zero = g.const(layer_name + ".latent_zero", np.full(width, ZERO_POINT, np.uint8))
        self.zero_scalar = g.const(layer_name + ".latent_zero_scalar", np.array(ZERO_POINT, np.uint8))

    @staticmethod
    def _row_scale(b, x: str, axis: int, qmax: float, hint: str, out: str | None = None) -> str:
        """max |x| along `axis` / qmax, kept as a [.., 1] column, floored at TINY (`out`: the output's own name)."""
        m = b.op("ReduceMax", [b.op("Abs", [x]), b.const(hint + "_axis", np.array([axis], np.int64))], keepdims=1)
        return b.op("Max", [b.op("Div", [m, b.const(hint + "_qmax", np.array(qmax, np.float32))]),
                            b.const(hint + "_floor", np.array(TINY, np.float32))],
                    **({"out_names": [out]} if out else {"hint": hint}))

    def write(self, b, rows: str, out_codes: str, out_scales: str) -> None:
        """fp32 rows [T, width] -> the uint8 codes and the token scales [T, 1] the cache stores, as the ops' own
        outputs (graph outputs bound over the cache's rows: no copy)."""
        y = b.op("Mul", [rows, self.inv_chan], hint="latent_equalized")
        tok = self._row_scale(b, y, 1, QMAX, "latent_tok", out=out_scales)
        codes = b.op("Add", [b.op("Round", [b.op("Div", [y, tok])]), b.const("latent_zp_f", np.array(ZERO_POINT,
                                                                                                      np.float32))])
        lo, hi = b.const("latent_lo", np.array(0, np.float32)), b.const("latent_hi", np.array(255, np.float32))
        b.op("Cast", [b.op("Clip", [codes, lo, hi])], out_names=[out_codes], to=2)

    def read(self, b, codes: str, tok: str) -> str:
        """uint8 codes [P, width] and their token scales [P, 1] -> fp32 rows (a prefill chunk's copy of the prefix)."""
        rows = b.op("DequantizeLinear", [codes, self.chan, self.zero], hint="latent_dequant", axis=1)
        return b.op("Mul", [rows, tok], hint="latent_rows_read")

    def scores(self, b, past: str, tok: str, q: str) -> str:
        """q [nh, width] (before the softmax scale) against the cached codes [P, width] with their token scales
        [P, 1] -> scaled scores [nh, P]."""
        qs = b.op("Mul", [q, self.q_scales], hint="q_cache_scaled")
        q_scale = self._row_scale(b, qs, 1, QMAX, "q_head_scale")  # [nh, 1]
        q8 = b.op("Cast", [b.op("Clip", [b.op("Round", [b.op("Div", [qs, q_scale])]),
                                         b.const("q_lo", np.array(-QMAX, np.float32)),
                                         b.const("q_hi", np.array(QMAX, np.float32))])], hint="q_int8", to=3)
        acc = b.op("MatMulInteger", [past, b.op("Transpose", [q8], perm=[1, 0]), self.zero_scalar],
                   hint="scores_past_int")  # [P, nh]
        per_token = b.op("Mul", [b.op("Cast", [acc], to=1), tok], hint="scores_past_tok")  # [P, nh]
        return b.op("Mul", [b.op("Transpose", [per_token], perm=[1, 0]), q_scale], hint="scores_past")  # [nh, P]

    def attend(self, b, p: str, past: str, tok: str) -> str:
        """p [nh, P] in [0, 1] against the cached codes and token scales -> sum_t p[h, t] * row_t, [nh, width]."""
        pt = b.op("Mul", [p, b.op("Transpose", [tok], perm=[1, 0])], hint="p_tok")  # [nh, P]
        p_scale = self._row_scale(b, pt, 1, 255.0, "p_head_scale")  # [nh, 1]
        # one pass: QuantizeLinear with a scale per head (axis 0), round half to even like np.rint
        p8 = b.op("QuantizeLinear", [pt, b.op("Reshape", [p_scale, b.const("p_scale_1d", np.array([-1], np.int64))]),
                                     self.zero_heads], hint="p_uint8", axis=0)
        acc = b.op("MatMulInteger", [p8, past, self.zero_u8, self.zero_scalar], hint="ctx_past_int")
        return b.op("Mul", [b.op("Mul", [b.op("Cast", [acc], to=1), self.chan]), p_scale], hint="ctx_past")

"""Block-wise integer quantization of weight matrices along their last axis (K).

A weight W[..., N, K] is laid out like a torch Linear weight and like ORT's MatMulNBits B: rows are output
features, K is the reduction axis. K is cut into blocks of `block_size` consecutive elements, each with its own
scale (and zero point); `block_size=0` means row-wise, one block spanning all of K. Leading axes (e.g. experts,
[E, N, K]) are batch axes and are quantized independently.

Codes are unsigned, q in [0, 2^bits - 1], and dequantize as  w ~ (q - zp) * scale,  which is the formula every
ORT op in pack.py uses.

  symmetric   zp is implicit and equal to 2^(bits-1) (8 for 4-bit, 128 for 8-bit). That is the default zero point
              of MatMulNBits, QMoE and uint8 GatherBlockQuantized, so symmetric weights need no zero-point input.
              8-bit: scale = absmax / 127, the grid -127..127 around zp; +absmax and -absmax are both exact and
              code 0 (-128) is never produced. The 256th level would make the step 0.8% finer: not worth changing
              the codes of every int8 artifact.
              2- and 4-bit: the block's largest-magnitude weight m is put on the far end of the uneven grid
              -2^(bits-1)..2^(bits-1)-1, scale = m / -2^(bits-1) (negative when m > 0), as ORT's own MLAS Q4
              quantizer and llama.cpp's Q4_0 do. At 4 bits that is 16 levels instead of 15: the step is absmax/8,
              not absmax/7, and the relative RMS error of Gaussian blocks of 32 / 64 / 128 falls from 9.7 / 10.8 /
              11.7 % to 8.6 / 9.5 / 10.3 % (Laplace, Student-t(3): the same ~12 %). The price is on the other side
              of zero: a weight near -m there lands on code 2^(bits-1)-1 and can be off by up to |scale|, not
              |scale| / 2.
  asymmetric  range [lo, hi] = [min(w, 0), max(w, 0)] per block, scale = (hi - lo) / (2^bits - 1),
              zp = round(-lo / scale) clipped to the code range. The range must contain 0 because an unsigned zp
              in [0, 2^bits-1] can only describe grids that contain 0.

With round-to-nearest (RTN), asymmetric and 8-bit symmetric give |w - dequant(w)| <= scale / 2 for every element
(asymmetric: the rounded zp shifts the grid by at most scale/2, and values clipped at the edge move by at most that
shift); 2/4-bit symmetric gives <= |scale| / 2 on the side of m and <= |scale| on the other.

K not a multiple of block_size: the last block is padded with zeros for the statistics. Zeros never widen the
range (absmax, and lo <= 0 <= hi), so padding does not change any scale; the returned codes are [.., K] again.

All-zero blocks get scale 0 (dequantize to exact 0) and are divided by 1 instead, never by 0.

method="clip_search" additionally tries, per block, shrinking the range by each factor in CLIP_FACTORS and keeps
the one with the lowest squared error. It trades a few large (clipped) errors for a finer grid; the RTN bound
above then no longer holds element-wise, only the block's total squared error is guaranteed not to get worse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPPORTED_BITS = (2, 4, 8)  # the widths MatMulNBits / QMoE / GatherBlockQuantized accept for uint8 storage
# Range shrink factors tried by clip_search (1.0 = plain RTN, so the search can never do worse than RTN).
CLIP_FACTORS = tuple(np.round(np.arange(1.0, 0.59, -0.05), 2))


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous
class QuantizedTensor:
    """Unpacked block-wise quantized weight; see the module docstring for the formula.

    q            uint8 [..., N, K]   one code per weight (not bit-packed; pack.py does that per op layout)
    scales       float32 [..., N, k_blocks]
    zero_points  uint8 [..., N, k_blocks], or None for symmetric (= 2^(bits-1) everywhere)
    bits         2, 4 or 8
    block_size   block length along K; 0 = row-wise (k_blocks = 1)
    symmetric    True iff zero_points is None
    """

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int
    symmetric: bool

    @property
    def k(self) -> int:
        return self.q.shape[-1]

    @property
    def block(self) -> int:
        """The effective block length along K (K itself when row-wise)."""
        return self.block_size or self.k

    @property
    def k_blocks(self) -> int:
        return self.scales.shape[-1]

    def zero_points_or_default(self) -> np.ndarray:
        """Zero points as an explicit uint8 [..., N, k_blocks] array (the implicit 2^(bits-1) if symmetric)."""
        if self.zero_points is not None:
            return self.zero_points
        return np.full(self.scales.shape, 1 << (self.bits - 1), dtype=np.uint8)


def _blocked(x: np.ndarray, block: int, fill=0) -> np.ndarray:
    """[..., K] -> [..., k_blocks, block], padding the tail of the last block with `fill`."""
    k = x.shape[-1]
    k_blocks = -(-k // block)
    pad = k_blocks * block - k
    if pad:
        x = np.concatenate([x, np.full(x.shape[:-1] + (pad,), fill, dtype=x.dtype)], axis=-1)
    return x.reshape(x.shape[:-1] + (k_blocks, block))


def _scale_and_zero_point(lo, hi, bits: int, symmetric: bool, scale_dtype):
    """Per-block (scale, zp) for the range [lo, hi] (lo <= 0 <= hi); zp is a float array in both modes. The scale
    is negative for a 2/4-bit symmetric block whose largest-magnitude weight is positive."""
    qmax = (1 << bits) - 1
    if symmetric and bits < 8:  # the signed extreme onto code 0 (= -2^(bits-1) around zp); see the module docstring
        scale = np.where(-lo >= hi, lo, hi) / -(1 << (bits - 1))
    elif symmetric:
        scale = np.maximum(-lo, hi) / ((1 << (bits - 1)) - 1)
    else:
        scale = (hi - lo) / qmax
    # Round the scale to the storage precision first, so that codes are computed against the scale the runtime
    # will actually see (casting fp32 scales to fp16 afterwards would silently shift every dequantized value).
    scale = scale.astype(scale_dtype).astype(np.float32)
    if symmetric:
        zp = np.full(scale.shape, 1 << (bits - 1), dtype=np.float32)
    else:
        zp = np.clip(np.rint(-lo / _safe(scale)), 0, qmax)
    return scale, zp


def _safe(scale: np.ndarray) -> np.ndarray:
    """The divisor for all-zero blocks (scale 0): any non-zero value works since every w there is 0."""
    return np.where(scale == 0, np.float32(1), scale)


def _rtn(wb: np.ndarray, lo, hi, bits: int, symmetric: bool, scale_dtype):
    """Round-to-nearest of blocked weights wb [..., k_blocks, block] for the range [lo, hi].

    Returns (scale, zp, codes, squared error per block); codes and zp still float.
    """
    scale, zp = _scale_and_zero_point(lo, hi, bits, symmetric, scale_dtype)
    codes = np.clip(np.rint(wb / _safe(scale)[..., None]) + zp[..., None], 0, (1 << bits) - 1)
    err = np.square((codes - zp[..., None]) * scale[..., None] - wb).sum(axis=-1)
    return scale, zp, codes, err


CHUNK_ELEMENTS = 1 << 23  # rows are quantized independently; chunking bounds the float temporaries (~10x input)


def quantize_blockwise(w, bits: int = 4, block_size: int = 32, symmetric: bool = True, method: str = "rtn",
                       scale_dtype=np.float32) -> QuantizedTensor:
    """Quantize w [..., N, K] block-wise along K. See the module docstring for the conventions.

    scale_dtype: the dtype the scales will be stored in (np.float16 for fp16 graphs); scales are rounded to it and
    returned as float32 holding exactly representable values, so a later cast is lossless.
    Large tensors are processed CHUNK_ELEMENTS at a time (whole rows), with identical results.
    """
    w = np.asarray(w)
    k = w.shape[-1] if w.ndim else 0
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(k, 1))
    if w.ndim < 2 or w.size <= CHUNK_ELEMENTS:
        return _quantize(w, bits, block_size, symmetric, method, scale_dtype)
    flat = w.reshape(-1, k)
    parts = [_quantize(flat[i:i + rows_per_chunk], bits, block_size, symmetric, method, scale_dtype)
             for i in range(0, flat.shape[0], rows_per_chunk)]
    lead = w.shape[:-1]
    q = np.concatenate([p.q for p in parts]).reshape(*lead, k)
    scales = np.concatenate([p.scales for p in parts]).reshape(*lead, -1)
    zp = None if symmetric else np.concatenate([p.zero_points for p in parts]).reshape(*lead, -1)
    return QuantizedTensor(q=q, scales=scales, zero_points=zp, bits=bits, block_size=block_size, symmetric=symmetric)


def _quantize(w, bits: int, block_size: int, symmetric: bool, method: str, scale_dtype) -> QuantizedTensor:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if block_size < 0:
        raise ValueError(f"block_size must be >= 0 (0 = row-wise), got {block_size}")
    if method not in ("rtn", "clip_search"):
        raise ValueError(f"method must be 'rtn' or 'clip_search', got {method!r}")
    w = np.asarray(w, dtype=np.float32)
    if w.ndim < 1 or w.shape[-1] == 0:
        raise ValueError(f"need a non-empty last axis, got shape {w.shape}")
    k = w.shape[-1]
    wb = _blocked(w, block_size or k)
    lo = np.minimum(wb.min(axis=-1), 0)
    hi = np.maximum(wb.max(axis=-1), 0)

    scale, zp, codes, err = _rtn(wb, lo, hi, bits, symmetric, scale_dtype)
    if method == "clip_search":
        for f in CLIP_FACTORS[1:]:  # CLIP_FACTORS[0] == 1.0 is the RTN candidate above
            f = np.float32(f)
            c_scale, c_zp, c_codes, c_err = _rtn(wb, lo * f, hi * f, bits, symmetric, scale_dtype)
            better = c_err < err  # per block
            scale, zp, err = (np.where(better, c, b) for c, b in ((c_scale, scale), (c_zp, zp), (c_err, err)))
            codes = np.where(better[..., None], c_codes, codes)

    q = codes.reshape(codes.shape[:-2] + (-1,))[..., :k].astype(np.uint8)
    return QuantizedTensor(q=q, scales=scale.astype(np.float32),
                           zero_points=None if symmetric else zp.astype(np.uint8),
                           bits=bits, block_size=block_size, symmetric=symmetric)


def dequantize(qt: QuantizedTensor) -> np.ndarray:
    """(q - zp) * scale, float32 [..., N, K]; large tensors row-chunked like quantize_blockwise."""
    if qt.q.ndim >= 2 and qt.q.size > CHUNK_ELEMENTS:
        k = qt.k
        rows = max(1, CHUNK_ELEMENTS // k)
        q2, s2 = qt.q.reshape(-1, k), qt.scales.reshape(-1, qt.scales.shape[-1])
        z2 = None if qt.zero_points is None else qt.zero_points.reshape(-1, qt.zero_points.shape[-1])
        out = np.empty(q2.shape, np.float32)
        for i in range(0, q2.shape[0], rows):
            part = QuantizedTensor(q=q2[i:i + rows], scales=s2[i:i + rows],
                                   zero_points=None if z2 is None else z2[i:i + rows], bits=qt.bits,
                                   block_size=qt.block_size, symmetric=qt.symmetric)
            out[i:i + rows] = dequantize(part)
        return out.reshape(qt.q.shape)
    qb = _blocked(qt.q.astype(np.float32), qt.block)
    zp = qt.zero_points_or_default().astype(np.float32)
    w = (qb - zp[..., None]) * qt.scales[..., None]
    return w.reshape(w.shape[:-2] + (-1,))[..., :qt.k]

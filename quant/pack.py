"""The byte layouts of ORT's quantized-weight ops, written and read from a QuantizedTensor (blockwise.py).

Every layout here shares one bit order, "low bits first" along the packed axis: with bits b, element j of a run
goes to byte j // (8/b) at bit offset (j % (8/b)) * b. For 4-bit: element 2i -> low nibble, 2i+1 -> high nibble.
8-bit is one code per byte. Dequantization is always (q - zp) * scale, zp defaulting to 2^(bits-1) when the
zero-points input is absent (all three ops agree on that for uint8 storage; symmetric weights rely on it).

MatMulNBits (com.microsoft)              Y = A @ dequant(B).T, W [N, K]
  B            uint8 [N, k_blocks, block_size*bits/8]   packed along K inside each block; k_blocks = ceil(K/block);
                                                        a partial last block is padded with its zero-point code
  scales       [N, k_blocks]
  zero_points  uint8 [N, ceil(k_blocks*bits/8)]         packed along k_blocks (same bit order); None if symmetric
  attributes   K, N, bits, block_size (power of 2, >= 16); row-wise is not expressible (use block_size = K)

QMoE (com.microsoft), per expert e a row-major [N, K] matrix, exactly like MatMulNBits B without the block axis
  weights      uint8 [E, N, K*bits/8]                   packed along K; K must be a multiple of block_size
  scales       [E, N, K/block_size]   or row-wise [E, N]
  zero_points  block-wise uint8 [E, N, ceil((K/block_size)*bits/8)]   packed along the blocks
               row-wise   uint8 [E, ceil(N*bits/8)]                   packed along N (the rows!)
  fc1 (swiglu_fusion=1): N = 2*I with gate and up rows INTERLEAVED: row 2j = gate row j, row 2j+1 = up row j; the
               scales and zero points follow their rows, which happens by itself because the interleaved matrix is
               quantized as a whole (quantization is per row). K = hidden.
  fc2:         [E, H, I] (down_proj), N = hidden, K = inter.

GatherBlockQuantized (com.microsoft), uint8 data, gather_axis 0, quantize_axis = last (1 for a 2-D table)
  data         uint8 [V, D*bits/8]                      packed along D, NO per-block padding (D*bits/8 integral)
  scales       [V, ceil(D/block_size)]
  zero_points  uint8 [V, ceil(ceil(D/block_size)*bits/8)] packed along the blocks; None if symmetric
  attributes   bits, block_size (power of 2, >= 16), gather_axis 0, quantize_axis 1

DynamicQuantizeMatMul (com.microsoft)    Y = dequant(A) @ dequant(B), A quantized at run time to uint8 per tensor
  B            int8 [K, N]                              W TRANSPOSED, one signed code per byte (code - 128 of the
                                                        symmetric uint8 form), row-wise quantized W (block_size 0)
  b_scale      float32 [N]                              one scale per output channel
  b_zero_point omitted (0: symmetric)

Scales come back float32; a caller building an fp16 graph casts them (quantize with scale_dtype=np.float16 to make
that cast exact). `unpack_*` invert `pack_*` back to a QuantizedTensor (then blockwise.dequantize).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .blockwise import QuantizedTensor, quantize_blockwise


class PackedWeights(NamedTuple):
    """The three initializers of one quantized weight, in op input order."""

    data: np.ndarray  # uint8
    scales: np.ndarray  # float32
    zero_points: np.ndarray | None  # packed uint8, None for symmetric (op default 2^(bits-1))


# --- bit order shared by all layouts -------------------------------------------------------------------------

def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., n] (each < 2^bits) -> bytes [..., ceil(n*bits/8)], low bits first; the tail is 0-padded."""
    codes = np.asarray(codes, dtype=np.uint8)
    per_byte = 8 // bits
    if per_byte == 1:
        return codes.copy()
    n = codes.shape[-1]
    n_bytes = -(-n // per_byte)
    padded = np.zeros(codes.shape[:-1] + (n_bytes * per_byte,), dtype=np.uint8)
    padded[..., :n] = codes
    groups = padded.reshape(codes.shape[:-1] + (n_bytes, per_byte))
    out = np.zeros(groups.shape[:-1], dtype=np.uint8)
    for j in range(per_byte):  # element j of each group -> bits [j*bits, (j+1)*bits)
        out |= groups[..., j] << np.uint8(j * bits)
    return out


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of pack_bits: bytes [..., m] -> uint8 codes [..., n]."""
    packed = np.asarray(packed, dtype=np.uint8)
    per_byte = 8 // bits
    if per_byte == 1:
        return packed[..., :n].copy()
    mask = np.uint8((1 << bits) - 1)
    parts = [(packed >> np.uint8(j * bits)) & mask for j in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (-1,))[..., :n]


def _check_bits(bits: int) -> None:
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")


def _check_block(block_size: int, op: str) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"{op} needs block_size a power of 2 >= 16, got {block_size}")


def _from_parts(q, scales, zp_unpacked, bits, block_size) -> QuantizedTensor:
    return QuantizedTensor(q=q, scales=np.asarray(scales, dtype=np.float32), zero_points=zp_unpacked,
                           bits=bits, block_size=block_size, symmetric=zp_unpacked is None)


# --- MatMulNBits ---------------------------------------------------------------------------------------------

def pack_matmulnbits(qt: QuantizedTensor) -> PackedWeights:
    """QuantizedTensor of W [N, K] -> (B [N, k_blocks, blob], scales [N, k_blocks], zero_points or None)."""
    _check_bits(qt.bits)
    _check_block(qt.block_size, "MatMulNBits")
    if qt.q.ndim != 2:
        raise ValueError(f"MatMulNBits weights are 2-D [N, K], got {qt.q.shape}")
    n, k = qt.q.shape
    k_blocks, block = qt.k_blocks, qt.block_size
    zp = qt.zero_points_or_default()
    # Pad the partial last block with its own zero point, so the padding dequantizes to exactly 0 even if a kernel
    # reads it (A has only K columns, so nothing should multiply it anyway).
    q = np.empty((n, k_blocks * block), dtype=np.uint8)
    q[:, :k] = qt.q
    q[:, k:] = zp[:, -1:]
    b = pack_bits(q.reshape(n, k_blocks, block), qt.bits)
    zero_points = None if qt.symmetric else pack_bits(qt.zero_points, qt.bits)
    return PackedWeights(b, qt.scales.astype(np.float32), zero_points)


def pack_dynamic_quantize_matmul(qt: QuantizedTensor) -> PackedWeights:
    """Row-wise symmetric 8-bit QuantizedTensor of W [N, K] -> (B int8 [K, N], b_scale [N], None)."""
    if qt.bits != 8 or not qt.symmetric or qt.k_blocks != 1 or qt.q.ndim != 2:
        raise ValueError("DynamicQuantizeMatMul takes a 2-D, 8-bit, symmetric, row-wise quantized weight "
                         f"(got bits {qt.bits}, symmetric {qt.symmetric}, {qt.k_blocks} blocks, shape {qt.q.shape})")
    signed = (qt.q.astype(np.int16) - 128).astype(np.int8)
    return PackedWeights(np.ascontiguousarray(signed.T), qt.scales[:, 0].astype(np.float32), None)


def unpack_matmulnbits(b, scales, zero_points, *, k: int, bits: int, block_size: int) -> QuantizedTensor:
    """Inverse of pack_matmulnbits (zero_points None = symmetric)."""
    b = np.asarray(b, dtype=np.uint8)
    n, k_blocks, _ = b.shape
    q = unpack_bits(b, bits, block_size).reshape(n, k_blocks * block_size)[:, :k]
    zp = None if zero_points is None else unpack_bits(zero_points, bits, k_blocks)
    return _from_parts(q, scales, zp, bits, block_size)


# --- QMoE ----------------------------------------------------------------------------------------------------

def interleave_gate_up(gate, up) -> np.ndarray:
    """gate, up [E, I, H] -> fc1 [E, 2I, H] with row 2j = gate row j, row 2j+1 = up row j (swiglu_fusion=1)."""
    gate, up = np.asarray(gate), np.asarray(up)
    if gate.shape != up.shape or gate.ndim != 3:
        raise ValueError(f"gate and up must both be [E, I, H], got {gate.shape} and {up.shape}")
    e, i, h = gate.shape
    return np.stack([gate, up], axis=2).reshape(e, 2 * i, h)


def split_gate_up(fc1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of interleave_gate_up: fc1 [E, 2I, ...] -> (gate [E, I, ...], up [E, I, ...])."""
    return fc1[:, 0::2], fc1[:, 1::2]


def pack_qmoe(qt: QuantizedTensor) -> PackedWeights:
    """QuantizedTensor of stacked expert weights [E, N, K] -> QMoE (weights, scales, zero_points or None)."""
    _check_bits(qt.bits)
    if qt.q.ndim != 3:
        raise ValueError(f"QMoE weights are 3-D [E, N, K], got {qt.q.shape}")
    e, n, k = qt.q.shape
    if (k * qt.bits) % 8:
        raise ValueError(f"QMoE needs K*bits/8 integral, got K={k}, bits={qt.bits}")
    weights = pack_bits(qt.q, qt.bits)
    if qt.block_size == 0:
        scales = qt.scales[..., 0]
        zp = None if qt.symmetric else pack_bits(qt.zero_points[..., 0], qt.bits)  # packed along N
    else:
        _check_block(qt.block_size, "QMoE")
        if k % qt.block_size:
            raise ValueError(f"QMoE needs K a multiple of block_size, got K={k}, block_size={qt.block_size}")
        scales = qt.scales
        zp = None if qt.symmetric else pack_bits(qt.zero_points, qt.bits)  # packed along the blocks
    return PackedWeights(weights, scales.astype(np.float32), zp)


def unpack_qmoe(weights, scales, zero_points, *, bits: int, block_size: int) -> QuantizedTensor:
    """Inverse of pack_qmoe (block_size 0 = row-wise; zero_points None = symmetric)."""
    weights = np.asarray(weights, dtype=np.uint8)
    e, n, nbytes = weights.shape
    q = unpack_bits(weights, bits, nbytes * 8 // bits)
    scales = np.asarray(scales, dtype=np.float32)
    if block_size == 0:
        scales = scales[..., None]
        zp = None if zero_points is None else unpack_bits(zero_points, bits, n)[..., None]
    else:
        zp = None if zero_points is None else unpack_bits(zero_points, bits, scales.shape[-1])
    return _from_parts(q, scales, zp, bits, block_size)


def pack_qmoe_fc1(gate, up, *, bits: int = 4, block_size: int = 64, symmetric: bool = True,
                  method: str = "rtn", scale_dtype=np.float32) -> PackedWeights:
    """gate_proj, up_proj [E, I, H] (lists of [I, H] work too) -> interleaved fc1 [E, 2I, H*bits/8] etc."""
    fc1 = interleave_gate_up(np.asarray(gate, dtype=np.float32), np.asarray(up, dtype=np.float32))
    return pack_qmoe(quantize_blockwise(fc1, bits, block_size, symmetric, method, scale_dtype))


def pack_qmoe_fc2(down, *, bits: int = 4, block_size: int = 64, symmetric: bool = True,
                  method: str = "rtn", scale_dtype=np.float32) -> PackedWeights:
    """down_proj [E, H, I] (or a list of [H, I]) -> fc2 [E, H, I*bits/8] etc."""
    down = np.asarray(down, dtype=np.float32)
    return pack_qmoe(quantize_blockwise(down, bits, block_size, symmetric, method, scale_dtype))


# --- GatherBlockQuantized ------------------------------------------------------------------------------------

def pack_gather(qt: QuantizedTensor) -> PackedWeights:
    """QuantizedTensor of a table [V, D] -> GatherBlockQuantized (data, scales, zero_points or None)."""
    _check_bits(qt.bits)
    _check_block(qt.block_size, "GatherBlockQuantized")
    if qt.q.ndim != 2:
        raise ValueError(f"GatherBlockQuantized tables are 2-D [V, D], got {qt.q.shape}")
    if (qt.k * qt.bits) % 8:
        raise ValueError(f"GatherBlockQuantized needs D*bits/8 integral, got D={qt.k}, bits={qt.bits}")
    zp = None if qt.symmetric else pack_bits(qt.zero_points, qt.bits)
    return PackedWeights(pack_bits(qt.q, qt.bits), qt.scales.astype(np.float32), zp)


def unpack_gather(data, scales, zero_points, *, bits: int, block_size: int) -> QuantizedTensor:
    """Inverse of pack_gather (zero_points None = symmetric)."""
    data = np.asarray(data, dtype=np.uint8)
    scales = np.asarray(scales, dtype=np.float32)
    q = unpack_bits(data, bits, data.shape[-1] * 8 // bits)
    zp = None if zero_points is None else unpack_bits(zero_points, bits, scales.shape[-1])
    return _from_parts(q, scales, zp, bits, block_size)


def pack_gather_block_quantized(table, *, bits: int = 4, block_size: int = 128, symmetric: bool = True,
                                method: str = "rtn", scale_dtype=np.float32) -> PackedWeights:
    """Embedding table [V, D] -> GatherBlockQuantized initializers (quantized along D)."""
    return pack_gather(quantize_blockwise(table, bits, block_size, symmetric, method, scale_dtype))

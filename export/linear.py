"""Emitting a Linear layer (y = x W^T + b) at a chosen precision.

int8-dynamic (CPU, fp32 I/O): com.microsoft DynamicQuantizeMatMul, W int8 per output channel and the activations
quantized to uint8 per tensor at run time: ORT's u8s8 QGEMM, which uses AMX/VNNI. At M = 729 (a vision tile) it was
4x faster than MatMulNBits int8 (whose M > 1 path runs at fp32 GEMM speed), but one scale for a whole activation
tensor is fragile with outlier channels, so export/vision_calibration.py picks it per layer on measured error.

fp32 / fp16: MatMul with W^T as an initializer. int8 / int4: com.microsoft MatMulNBits with W block-quantized by
quant/ (symmetric, so no zero-point input: the op's default 2^(bits-1) is the symmetric code origin). On CPU the
8-bit kernel is only fast with accuracy_level 4 (int8 activations); at level 0 it dequantizes every call
(../shared/reference/onnxruntime.md §1.2), so the CPU default is 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..quant.blockwise import dequantize, quantize_blockwise
from ..quant.pack import pack_dynamic_quantize_matmul, pack_matmulnbits
from ..quant.report import QualityReport
from .onnx_builder import MS_DOMAIN, GraphBuilder


DYNAMIC = "int8-dynamic"


@dataclass(frozen=True)
class Precision:
    kind: str = "fp32"  # fp32 | fp16 | int8 | int4 | int8-dynamic
    block_size: int = 32
    accuracy_level: int | None = 4  # None: no attribute (QMoE before onnxruntime 1.31, contract/ort_compat.py)

    @property
    def bits(self) -> int | None:
        return {"int8": 8, "int4": 4}.get(self.kind)

    def describe(self) -> dict:
        d = {"kind": self.kind}
        if self.kind == DYNAMIC:
            return {**d, "weights": "int8 per output channel, symmetric", "activations": "uint8 per tensor, dynamic"}
        if self.bits:
            d.update(block_size=self.block_size, accuracy_level=self.accuracy_level, symmetric=True,
                     grid=GRIDS[self.bits])
        return d


# The symmetric code grids quant/blockwise.py writes (around the ops' default zero point 2^(bits-1)), recorded in the
# manifest: artifacts exported before the 4-bit grid took its 16th level have no record.
GRIDS = {8: "-127..127, scale = absmax / 127", 4: "-8..7, scale = the block's signed extreme / -8"}


def emit_linear(g: GraphBuilder, x: str, weight: np.ndarray, prec: Precision, io_dtype, hint: str,
                bias: np.ndarray | None = None, report: QualityReport | None = None,
                report_kind: str | None = None) -> str:
    """x [..., K] -> [..., N] for a torch-layout weight [N, K]."""
    weight = np.asarray(weight, dtype=np.float32)
    n, k = weight.shape
    if prec.kind == DYNAMIC:
        if np.dtype(io_dtype) != np.float32:
            raise ValueError("int8-dynamic (DynamicQuantizeMatMul) needs fp32 I/O")
        qt = quantize_blockwise(weight, bits=8, block_size=0, symmetric=True)
        if report is not None:
            report.add(report_kind or hint, hint, weight, dequantize(qt))
        packed = pack_dynamic_quantize_matmul(qt)
        inputs = [x, g.const(f"{hint}.qweight_t", packed.data), g.const(f"{hint}.scales", packed.scales)]
        if bias is not None:
            inputs += ["", g.const(f"{hint}.bias", bias.astype(np.float32))]  # b_zero_point omitted
        return g.op("DynamicQuantizeMatMul", inputs, domain=MS_DOMAIN, hint=hint)
    if prec.bits is None:
        w = g.const(f"{hint}.weight_t", weight.T.astype(io_dtype))
        y = g.op("MatMul", [x, w], hint=hint)
        if bias is not None:
            y = g.op("Add", [y, g.const(f"{hint}.bias", bias.astype(io_dtype))], hint=f"{hint}_bias")
        return y
    scale_dtype = np.float16 if np.dtype(io_dtype) == np.float16 else np.float32
    qt = quantize_blockwise(weight, bits=prec.bits, block_size=prec.block_size, symmetric=True,
                            scale_dtype=scale_dtype)
    packed = pack_matmulnbits(qt)
    if report is not None:
        report.add(report_kind or hint, hint, weight, dequantize(qt))
    inputs = [x, g.const(f"{hint}.qweight", packed.data), g.const(f"{hint}.scales", packed.scales.astype(io_dtype))]
    if bias is not None:
        inputs += ["", "", g.const(f"{hint}.bias", bias.astype(io_dtype))]  # zero_points, g_idx omitted
    return g.op("MatMulNBits", inputs, domain=MS_DOMAIN, hint=hint, K=k, N=n, bits=prec.bits,
                block_size=prec.block_size, accuracy_level=prec.accuracy_level)

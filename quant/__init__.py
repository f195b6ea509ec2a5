"""vl2edge.quant: weight quantization and ORT weight layouts, pure numpy (no torch, no onnx).

  blockwise  quantize_blockwise / dequantize / QuantizedTensor: block-wise (or row-wise) int2/4/8 along K
  pack       the byte layouts of MatMulNBits, QMoE (interleaved SwiGLU fc1) and GatherBlockQuantized,
             with unpackers back to QuantizedTensor
  report     QualityReport: rel_err / cosine / max_abs_err per tensor, summarized per tensor kind as JSON

Submodules are imported on demand: `from vl2edge.quant.pack import pack_matmulnbits`.
"""

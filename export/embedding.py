"""Token-embedding graph: input_ids [T] -> embeddings io [T, H].

fp32 / fp16: Gather from the table. int8 / int4: com.microsoft GatherBlockQuantized over a uint8 table quantized
along the hidden axis (gather_axis 0, quantize_axis 1; symmetric, so the op's default zero point 2^(bits-1) is
the code origin). The 129,280 x 1280 Tiny table is 662 MB in fp32 and 166 MB in int8. The runtime then writes
the image embeddings into the `<image>` slots (reference §4d).
"""

from __future__ import annotations

import numpy as np

from ..model.config import VL2Config
from ..quant.blockwise import dequantize, quantize_blockwise
from ..quant.pack import pack_gather
from ..quant.report import QualityReport
from .linear import Precision
from .onnx_builder import MS_DOMAIN, GraphBuilder

KEY = "language.model.embed_tokens.weight"


def build_embedding_graph(cfg: VL2Config, table: np.ndarray, prec: Precision, io_dtype=np.float32,
                          report: QualityReport | None = None) -> GraphBuilder:
    V, H = cfg.language.vocab_size, cfg.language.hidden_size
    g = GraphBuilder("embedding")
    ids = g.input("input_ids", np.int64, ["T"])
    if prec.bits is None:
        out = g.op("Gather", [g.const("embed_tokens", table.astype(io_dtype)), ids], hint="embed", axis=0)
    else:
        scale_dtype = np.float16 if np.dtype(io_dtype) == np.float16 else np.float32
        qt = quantize_blockwise(table, bits=prec.bits, block_size=prec.block_size, symmetric=True,
                                scale_dtype=scale_dtype)
        if report is not None:
            report.add("embedding", KEY, table, dequantize(qt))
        packed = pack_gather(qt)
        out = g.op("GatherBlockQuantized", [g.const("embed_tokens.qdata", packed.data), ids,
                                            g.const("embed_tokens.scales", packed.scales.astype(io_dtype))],
                   domain=MS_DOMAIN, hint="embed", bits=prec.bits, block_size=prec.block_size, gather_axis=0,
                   quantize_axis=1)
    g.output(out, "embeddings", io_dtype, ["T", H])
    return g

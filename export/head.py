"""Head graph: final RMSNorm + lm_head on the LAST position only -> fp32 logits [1, V].

During prefill only the last position's logits are needed; slicing before the norm keeps the 129,280-wide
projection to one row per chunk. Logits are always fp32 (the reference casts them too).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..model.config import VL2Config
from ..quant.report import QualityReport
from .linear import Precision, emit_linear
from .onnx_builder import GraphBuilder


def build_head_graph(cfg: VL2Config, get: Callable[[str], np.ndarray], prec: Precision, io_dtype=np.float32,
                     report: QualityReport | None = None) -> GraphBuilder:
    L = cfg.language
    g = GraphBuilder("head")
    hidden = g.input("hidden", io_dtype, [1, "T", L.hidden_size])
    last = g.op("Slice", [hidden, g.const("start", np.array([-1], np.int64)),
                          g.const("end", np.array([np.iinfo(np.int64).max], np.int64)),
                          g.const("axis", np.array([1], np.int64))], hint="last_position")
    x = g.op("Reshape", [last, g.const("shape", np.array([1, L.hidden_size], np.int64))], hint="last_2d")
    x = g.rms_norm(x, get("language.model.norm.weight"), L.rms_norm_eps, io_dtype, "final_norm")
    logits = emit_linear(g, x, get("language.lm_head.weight"), prec, io_dtype, "lm_head", report=report,
                         report_kind="lm_head")
    if np.dtype(io_dtype) != np.float32:
        logits = g.op("Cast", [logits], hint="logits_fp32", to=1)
    g.output(logits, "logits", np.float32, [1, L.vocab_size])
    return g

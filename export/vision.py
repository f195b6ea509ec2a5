"""The vision graph: pixel tiles -> projected image tokens (SigLIP tower + 2x2 downsample MLP projector).

Reference: ../shared/reference/deepseek-vl2.md §1a, §4d; the PyTorch model it must match is model/vision.py +
model/projector.py (`model.projector(model.vision(px))`).

What the graph computes, per tile:
  Conv 3->C, kernel = stride = 14 (384 px -> 27x27 patches; the last 6 px are never seen), flatten row-major,
  + learned pos_embed [1, 729, C];
  L pre-norm blocks:  x += proj(attn(LN1(x)));  x += fc2(gelu_tanh(fc1(LN2(x))))    (LayerNorm eps 1e-6,
    qkv Linear with bias, rows q | k | v each heads x head_dim, softmax attention with scale head_dim^-0.5, no mask);
  final LayerNorm;
  projector: the 27x27 grid zero-padded to 28x28 (bottom row, right column), non-overlapping 2x2 windows unfolded
  CHANNEL-MAJOR (feature = c*4 + dy*2 + dx, as F.unfold; tokens row-major over 14x14), Linear -> exact (erf) GELU
  -> Linear.  The attention-pool head (`vision.attn_pool.*`) is never run by the model and is not in the graph.

I/O contract:
  input   pixel_values  io_dtype [tiles, 3, 384, 384]   (tiles = symbolic batch dim; normalized pixels)
  output  image_embeds  io_dtype [tiles, 196, D]        (D = projector n_embed = LLM hidden size)
All Linear layers (qkv, proj, fc1, fc2, projector.layers.0/2) go through export.linear.emit_linear, so one Precision
switches the whole graph between fp32 (parity), int8/int4 MatMulNBits (CPU; accuracy_level 4) and fp16 (CUDA). The
patch conv, pos_embed and LayerNorm parameters stay in io_dtype (they are < 0.2% of the weights). With a
QualityReport, quantized weights are recorded under the kinds "vision.attn" (qkv, proj), "vision.mlp" (fc1, fc2)
and "projector".

Op choices (opset 21 + com.microsoft). Attention: com.microsoft MultiHeadAttention by default (attention="mha"),
or attention="plain" (MatMul -> Softmax -> MatMul with Reshape/Transpose head split, the softmax scale folded into
the q rows of the qkv weight and bias) for execution providers without MHA. Measured with
`python -m vl2edge.bench.probes.vision_tile_latency --attn-only --reps 15`: the attention core alone (q, k, v
[n, 729, 1152] -> [n, 729, 1152], 16 heads x 72), ORT 1.31.1 CPU, 2 intra-op threads, variants interleaved, on a
shared 2-core Xeon (AVX-512/AMX) under load ~3; ms per tile, median (min):
                      fp32 n=1      fp32 n=2      fp16 io n=1   fp16 io n=2
    mha               41.7 (25.6)   30.3 (25.3)   37.3 (27.1)   30.9 (24.2)
    plain             47.2 (34.2)   38.0 (33.1)   78.4 (52.6)   47.1 (39.8)
    ONNX Attention-23 46.3 (30.7)   30.4 (26.1)   62.0 (52.8)   47.3 (39.2)   (needs opset 23: not used)
  MHA was the fastest or tied in every run (three runs; the others agree). Its CPU kernel is fp32-only
  (onnxruntime.md §1.5), but ORT inserts Casts around it for fp16 io and it still beats the fp16 plain ops, which
  ORT CPU also runs through fp32 fallbacks; CUDA has fp16 MHA. So one choice serves fp32 and fp16 io.
  For scale: the attention core is ~25-30 ms of the ~115 ms a block costs per tile; the four Linears are the rest
  (a whole tile is ~3-4 s fp32 at n=2, see bench/probes/vision_tile_latency.py).
  GELU: ONNX Gelu-20 with approximate="tanh" in the blocks, exact ("none") in the projector. LayerNorm: ONNX
  LayerNormalization (axis -1, eps 1e-6; ORT fuses only the last residual Add into SkipLayerNormalization since
  the others feed two consumers; the unfused Adds are < 1% of a block's time, not worth a contrib op).
  Projector unfold: Reshape [n,27,27,C] -> Pad (0,1) on H and W -> Reshape [n,14,2,14,2,C] (n, i, dy, j, dx, c)
  -> Transpose (0,1,3,5,2,4) = (n, i, j, c, dy, dx) -> Reshape [n,196,4C]: exactly F.unfold's channel-major order.
Precision notes (same box, M = 729 x n rows per Linear): int8 MatMulNBits (block 32, accuracy_level 4) is only
~1.0-1.3x faster than the fp32 MatMul (~1.5x with block 128), so on CPU the int8 vision graph is about as fast as
fp32 (within this box's noise) while 4x smaller; com.microsoft DynamicQuantizeMatMul (per-column int8 weights,
per-tensor dynamic uint8 activations) measured 4-5x faster than fp32 per Linear but is not a Precision kind here
(its per-tensor activation scale is untested against SigLIP's activation outliers).

`weights` is either a Mapping {checkpoint name: fp32 numpy array} or a callable get(name) -> np.ndarray; the
callable form lets a caller stream tensors from a Checkpoint one at a time, e.g.
  build_vision_graph(cfg, lambda n: ckpt.tensor(n, torch.float32).numpy(), Precision("int8"))
Only `vision.*` (minus `vision.attn_pool.*`) and `projector.layers.*` tensors are read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from ..model.config import VL2Config
from ..quant.report import QualityReport
from .linear import DYNAMIC, Precision, emit_linear
from .onnx_builder import MS_DOMAIN, GraphBuilder

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embeds"
BATCH_DIM = "tiles"
PART_INPUT, PART_OUTPUT = "tokens", "tokens_out"  # between the parts of a split tower
LN_EPS = 1e-6
ATTENTION_KINDS = ("mha", "plain")

WeightSource = Mapping[str, np.ndarray] | Callable[[str], np.ndarray]


def _getter(weights: WeightSource) -> Callable[[str], np.ndarray]:
    get = weights if callable(weights) else weights.__getitem__
    return lambda name: np.asarray(get(name), dtype=np.float32)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


LinearPrecision = Precision | Callable[[str], Precision]


def _at(prec: LinearPrecision, hint: str) -> Precision:
    """prec is one Precision for every Linear, or a function of the Linear's name (per-layer choices)."""
    return prec(hint) if callable(prec) else prec


def layer_norm(g: GraphBuilder, x: str, get, prefix: str, io_dtype) -> str:
    w = g.const(f"{prefix}.weight", get(prefix + ".weight").astype(io_dtype))
    b = g.const(f"{prefix}.bias", get(prefix + ".bias").astype(io_dtype))
    return g.op("LayerNormalization", [x, w, b], hint=prefix, axis=-1, epsilon=LN_EPS)


def attention_block(g: GraphBuilder, x: str, get, prefix: str, width: int, heads: int, prec: LinearPrecision,
                    io_dtype, attention: str, report: QualityReport | None) -> str:
    """Self-attention of one block on x [n, T, C] (already normalized) -> proj output [n, T, C]."""
    hd = width // heads
    scale = float(hd) ** -0.5
    w_qkv, b_qkv = get(prefix + "qkv.weight"), get(prefix + "qkv.bias")
    if attention == "plain":  # fold the softmax scale into the q rows (k, v rows untouched)
        w_qkv, b_qkv = w_qkv.copy(), b_qkv.copy()
        w_qkv[:width] *= scale
        b_qkv[:width] *= scale
    qkv = emit_linear(g, x, w_qkv, _at(prec, prefix + "qkv"), io_dtype, prefix + "qkv", bias=b_qkv, report=report,
                      report_kind="vision.attn")
    q, k, v = g.op("Split", [qkv, g.const(f"{prefix}split", _i64(width, width, width))], n_out=3,
                   hint=prefix + "qkv_split", axis=-1)
    if attention == "mha":
        o = g.op("MultiHeadAttention", [q, k, v], domain=MS_DOMAIN, hint=prefix + "mha", num_heads=heads,
                 scale=scale)
    else:
        heads_shape = g.const(f"{prefix}heads_shape", _i64(0, 0, heads, hd))
        qh = g.op("Transpose", [g.op("Reshape", [q, heads_shape], hint=prefix + "q_heads")], perm=[0, 2, 1, 3],
                  hint=prefix + "q_bnsh")
        kt = g.op("Transpose", [g.op("Reshape", [k, heads_shape], hint=prefix + "k_heads")], perm=[0, 2, 3, 1],
                  hint=prefix + "k_bnhs")
        vh = g.op("Transpose", [g.op("Reshape", [v, heads_shape], hint=prefix + "v_heads")], perm=[0, 2, 1, 3],
                  hint=prefix + "v_bnsh")
        p = g.op("Softmax", [g.op("MatMul", [qh, kt], hint=prefix + "scores")], axis=-1, hint=prefix + "probs")
        o = g.op("Transpose", [g.op("MatMul", [p, vh], hint=prefix + "ctx")], perm=[0, 2, 1, 3],
                 hint=prefix + "ctx_bsnh")
        o = g.op("Reshape", [o, g.const(f"{prefix}merge_shape", _i64(0, 0, width))], hint=prefix + "ctx_merged")
    return emit_linear(g, o, get(prefix + "proj.weight"), _at(prec, prefix + "proj"), io_dtype, prefix + "proj",
                       bias=get(prefix + "proj.bias"), report=report, report_kind="vision.attn")


def mlp_block(g: GraphBuilder, x: str, get, prefix: str, prec: LinearPrecision, io_dtype,
              report: QualityReport | None) -> str:
    h = emit_linear(g, x, get(prefix + "fc1.weight"), _at(prec, prefix + "fc1"), io_dtype, prefix + "fc1",
                    bias=get(prefix + "fc1.bias"), report=report, report_kind="vision.mlp")
    h = g.op("Gelu", [h], approximate="tanh", hint=prefix + "gelu")
    return emit_linear(g, h, get(prefix + "fc2.weight"), _at(prec, prefix + "fc2"), io_dtype, prefix + "fc2",
                       bias=get(prefix + "fc2.bias"), report=report, report_kind="vision.mlp")


def vision_block(g: GraphBuilder, x: str, get, i: int, width: int, heads: int, prec: LinearPrecision, io_dtype,
                 attention: str, report: QualityReport | None) -> str:
    b = f"vision.blocks.{i}."
    a = attention_block(g, layer_norm(g, x, get, b + "norm1", io_dtype), get, b + "attn.", width, heads, prec,
                        io_dtype, attention, report)
    x = g.op("Add", [x, a], hint=b + "attn_residual")
    m = mlp_block(g, layer_norm(g, x, get, b + "norm2", io_dtype), get, b + "mlp.", prec, io_dtype, report)
    return g.op("Add", [x, m], hint=b + "mlp_residual")


def projector(g: GraphBuilder, x: str, get, cfg: VL2Config, prec: LinearPrecision, io_dtype,
              report: QualityReport | None) -> str:
    """[n, side*side, C] -> [n, out*out, D], out = ceil(side / r); the F.unfold channel-major feature order."""
    v, p = cfg.vision, cfg.projector
    side, r, c = v.grid, p.downsample_ratio, v.width
    pad = -side % r
    out = (side + pad) // r
    grid = g.op("Reshape", [x, g.const("projector.grid_shape", _i64(0, side, side, c))], hint="projector.grid")
    if pad:  # zeros after the last row and the last column (pads: begins of n,H,W,C then ends of n,H,W,C)
        grid = g.op("Pad", [grid, g.const("projector.pads", _i64(0, 0, 0, 0, 0, pad, pad, 0))],
                    hint="projector.pad", mode="constant")
    win = g.op("Reshape", [grid, g.const("projector.win_shape", _i64(0, out, r, out, r, c))],
               hint="projector.windows")  # (n, i, dy, j, dx, c)
    win = g.op("Transpose", [win], perm=[0, 1, 3, 5, 2, 4], hint="projector.unfold")  # (n, i, j, c, dy, dx)
    feats = g.op("Reshape", [win, g.const("projector.feat_shape", _i64(0, out * out, c * r * r))],
                 hint="projector.features")
    h = emit_linear(g, feats, get("projector.layers.0.weight"), prec, io_dtype, "projector.layers.0",
                    bias=get("projector.layers.0.bias"), report=report, report_kind="projector")
    h = g.op("Gelu", [h], approximate="none", hint="projector.gelu")
    return emit_linear(g, h, get("projector.layers.2.weight"), prec, io_dtype, "projector.layers.2",
                       bias=get("projector.layers.2.bias"), report=report, report_kind="projector")


def build_vision_graph(cfg: VL2Config, weights: WeightSource, prec: Precision, io_dtype=np.float32,
                       report: QualityReport | None = None, attention: str = "mha",
                       dynamic: frozenset[str] = frozenset(), blocks: range | None = None) -> GraphBuilder:
    """The vision + projector graph (see the module docstring). `attention`: "mha" (default) | "plain".
    `dynamic`: names of block Linears ("vision.blocks.3.mlp.fc1") emitted as int8-dynamic instead of `prec`
    (export/vision_calibration.py chooses them); the projector always uses `prec`.
    blocks: a part of the tower (all blocks by default): the patch embedding only when it starts at 0, the final
    norm and the projector only when it ends at the last block; between parts the tokens [tiles, 729, width] flow
    as PART_INPUT / PART_OUTPUT. The parts in order compute what the whole graph does (the engine runs them one
    session at a time where the language model must stay loaded: runtime/engine.py encode_images)."""
    if dynamic:
        block_prec = lambda hint: Precision(DYNAMIC) if hint in dynamic else prec  # noqa: E731
    else:
        block_prec = prec
    io_dtype = np.dtype(io_dtype)
    if io_dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"io_dtype must be float32 or float16, got {io_dtype}")
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
    v = cfg.vision
    if v.width % v.heads:
        raise ValueError(f"vision width {v.width} is not a multiple of heads {v.heads}")
    blocks = range(v.layers) if blocks is None else blocks
    if not (0 <= blocks.start < blocks.stop <= v.layers and blocks.step == 1):
        raise ValueError(f"blocks {blocks} is not a run of the tower's {v.layers} blocks")
    get = _getter(weights)
    s = v.image_size
    g = GraphBuilder("vision")
    if blocks.start == 0:
        px = g.input(INPUT_NAME, io_dtype, [BATCH_DIM, 3, s, s])
        # patch embed: Conv -> [n, C, 27, 27] -> [n, C, 729] -> [n, 729, C] (row-major over the grid) + pos_embed
        w = g.const("vision.patch_embed.proj.weight", get("vision.patch_embed.proj.weight").astype(io_dtype))
        b = g.const("vision.patch_embed.proj.bias", get("vision.patch_embed.proj.bias").astype(io_dtype))
        x = g.op("Conv", [px, w, b], hint="vision.patch_embed", kernel_shape=[v.patch_size] * 2,
                 strides=[v.patch_size] * 2)
        x = g.op("Reshape", [x, g.const("vision.patch_flat_shape", _i64(0, v.width, -1))], hint="vision.patch_flat")
        x = g.op("Transpose", [x], perm=[0, 2, 1], hint="vision.patch_tokens")
        x = g.op("Add", [x, g.const("vision.pos_embed", get("vision.pos_embed").astype(io_dtype))],
                 hint="vision.pos")
    else:
        x = g.input(PART_INPUT, io_dtype, [BATCH_DIM, v.grid * v.grid, v.width])

    for i in blocks:
        x = vision_block(g, x, get, i, v.width, v.heads, block_prec, io_dtype, attention, report)
    if blocks.stop < v.layers:
        g.output(x, PART_OUTPUT, io_dtype, [BATCH_DIM, v.grid * v.grid, v.width])
        return g
    x = layer_norm(g, x, get, "vision.norm", io_dtype)

    y = projector(g, x, get, cfg, prec, io_dtype, report)
    side = cfg.tokens_per_tile_side
    g.output(y, OUTPUT_NAME, io_dtype, [BATCH_DIM, side * side, cfg.projector.n_embed])
    return g

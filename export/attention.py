"""Per-layer attention graphs: RMSNorm -> attention over an in-place KV cache -> o_proj -> residual -> RMSNorm.

One graph per decoder layer, over a preallocated cache of `max_len` positions that is never copied; attention
reads only the first past_len + T positions (cost grows with the real context, not with max_len). Three forms
(manifest attention.kind), all bound by contract/cache.py's `bind_cache` (the format's contract):
  mha_gqa (Tiny) and mla_absorbed_gqa (MLA, fp16/CUDA): ONE com.microsoft GroupQueryAttention (GQA) node appends the
    new tokens IN PLACE: the caller binds the same OrtValue to the past_* input and the present_* output(s)
    (reference: ../shared/reference/onnxruntime.md §1.4).
  mla_latent_matmul (MLA, fp32/CPU): the graph reads the valid prefix and outputs the new rows, which the caller
    binds at the buffer's row past_len, so they land in place too (see _mla_latent).
`run_attention_step` / `AttentionSession` below do the binding.

Graph I/O contract (the runtime depends on it)
----------------------------------------------
inputs
  hidden                 io    [1, T, H]   residual stream entering the layer
  position_ids           int64 [1, T]      past_len .. past_len + T - 1
  seqlens_k              int32 [1]         past_len + T - 1
  total_sequence_length  int32 []          past_len + T
  MHA (Tiny):      past_key, past_value    io [1, kvH, max_len, head_dim]   (two buffers; int8 with kv_scales)
  MLA (Small/VL2): past_latent             mla_absorbed_gqa: io [1, 1, max_len, kv_lora_rank + qk_rope_head_dim]
                   (one graph input feeding both past_key and past_value of GQA); mla_latent_matmul: io (uint8
                   with kv_scales) [past_len, kv_lora_rank + qk_rope_head_dim], the buffer's first past_len rows
outputs
  hidden_out             io    [1, T, H]   hidden + o_proj(attention(RMSNorm_in(hidden)))
  mlp_in                 io    [1, T, H]   RMSNorm_post(hidden_out)
  router_logits          float32 [T, E]    MoE layers only (cfg.language.is_moe_layer(layer)):
                                           float32(mlp_in) @ gate^T with the unquantized fp32 router weight
  MHA: present_key, present_value          bind to the same OrtValues as past_key / past_value
  MLA GQA: present_latent_key, present_latent_value   BOTH bind to the same OrtValue as past_latent
  MLA latent: latent_new         io [T, width]   bound at the address of the buffer's row past_len (uint8 codes
                                                 for an 8-bit cache, export/latent_cache.py)
"io" is the graph's io_dtype (float32 or float16); H = hidden_size; E = n_routed_experts.

Cache layouts (identical to model/language.py KVCache, so a reference cache and an ORT cache compare directly)
  MHA: past_key[0] == KVCache.k[layer][0], past_value[0] == KVCache.v[layer][0]: RoPE'd keys, plain values, BNSH.
  MLA: past_latent[0, 0] == KVCache.latent[layer][0]: per token [c_kv normed (kv_lora_rank) | k_pe rotated
       (qk_rope_head_dim)], the rope part in the reference's DE-INTERLEAVED order (even dims, then odd dims).

MHA (Tiny): q/k/v projections fused into one linear whose output is GQA's packed QKV; GQA applies rotate-half RoPE
(do_rotary=1, rotary_interleaved=0) from cos/sin initializers [max_len, head_dim/2] built like
model/language.rope_cos_sin (fp32 angles, theta from the config); scale 1/sqrt(head_dim). GQA derives the rotary
positions from seqlens_k (past = seqlens_k + 1 - T), which is right for prefill, decode and a chunk after decode
(checked: identical to passing position_ids), so the MHA graph declares position_ids but does not read it.

MLA (Small, VL2), absorbed form as a multi-query attention with head size kv_lora_rank + rope (576) and ONE kv head:
  key = value = [c_kv | k_pe_rot] per token, which is exactly what is cached, so past_key and past_value (and both
  presents) may alias one buffer. Query per head = [q_nope @ W_UK | q_pe_rot]; scores = q_lat.c_kv + q_pe.k_pe,
  the reference's score, scaled by 1/sqrt(qk_nope + qk_rope) (1/sqrt(192); the 576 head size would give the wrong
  default). Output per head = probs @ [c_kv | k_pe]; its first kv_lora_rank channels are the attended latents, the
  rest is discarded; then @ W_UV^T per head -> o_proj. W_UK / W_UV are the two row blocks of kv_b_proj viewed
  [heads, nope + v, kv_lora_rank], batched MatMul initializers at io dtype, or int8 per head and column in an fp32
  graph whose linears are quantized (export/mla_absorb.py).
  RoPE runs OUTSIDE GQA (do_rotary=0, com.microsoft RotaryEmbedding on q_pe and k_pe): GQA would rotate K but not
  V, and here K and V are one buffer. The checkpoint's interleaved-pair convention (pairs (x_2i, x_2i+1) rotated
  by frequency i) is realised like the reference: the rows of q_proj's rope part (per head) and of
  kv_a_proj_with_mqa's rope part are permuted to de-interleaved order (exact, also after quantization, which is
  per row), then rotate-half RoPE is applied; q_pe and k_pe get the same permutation, so scores are unchanged.
  mla_latent_matmul computes the same scores and outputs, with two GEMMs over the prefix when decoding and with
  this GQA (over a copy of the prefix plus the chunk) for a prefill chunk (_mla_latent).

Projections go through linear.emit_linear at `prec` (report kinds "attention.qkv" (MLA: q_proj and
kv_a_proj_with_mqa fused into one linear), "attention.o"); norms through GraphBuilder.rms_norm (eps from the
config; kv_a_layernorm 1e-6, the class default the official code builds it with).

run_attention_step / AttentionSession (tests and probes) need only numpy and onnxruntime (the graph builder's onnx
import is deferred to build_attention_graph); the cache buffers and their binding are contract/cache.py's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ..contract.cache import (MHA_GQA, MLA_GQA, MLA_LATENT, ONNX_TYPE_DTYPES, bind_cache, bind_step_inputs,
                              cache_ortvalues, cache_shapes, session_attention_kind)
from ..model.config import LanguageConfig, VL2Config

if TYPE_CHECKING:
    from ..quant.report import QualityReport
    from .linear import Precision
    from .onnx_builder import GraphBuilder

KV_A_NORM_EPS = 1e-6  # kv_a_layernorm is built with the RMSNorm class default, not rms_norm_eps (same value)


def _lang(cfg: VL2Config | LanguageConfig) -> LanguageConfig:
    return cfg.language if isinstance(cfg, VL2Config) else cfg


def rope_tables(dim: int, theta: float, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_len, dim/2] (fp32) for positions 0..max_len-1, bit-compatible with
    model/language.rope_cos_sin: inv_freq = 1 / fp32(theta ** (2i/dim)), angles = fp32(position * inv_freq)."""
    expo = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = np.float32(1.0) / (theta ** expo.astype(np.float64)).astype(np.float32)
    angles = np.arange(max_len, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def deinterleave_perm(d: int) -> np.ndarray:
    """Index permutation (0, 2, ..., d-2, 1, 3, ..., d-1): model/language.deinterleave as a gather."""
    return np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])


# --- the graph ---------------------------------------------------------------------------------------------------

def build_attention_graph(cfg: VL2Config, layer: int, get: Callable[[str], np.ndarray], prec: Precision,
                          io_dtype=np.float32, max_len: int = 4096,
                          report: QualityReport | None = None,
                          kv_scales: tuple[np.ndarray, np.ndarray] | np.ndarray | None = None) -> GraphBuilder:
    """The attention half of decoder layer `layer` (see the module docstring for the I/O contract).
    `get(name)` returns a checkpoint tensor (e.g. 'language.model.layers.0.self_attn.o_proj.weight') as fp32 numpy.
    kv_scales (export/kv_calibration.py; fp32 I/O only, the CPU kernels): an 8-bit cache. MHA: (k_scale, v_scale),
    each [kv_heads, head_dim], an int8 cache read by GroupQueryAttention; MLA: the latent's per-channel scales
    [kv_lora_rank + qk_rope_head_dim], a uint8 cache (export/latent_cache.py)."""
    from .linear import emit_linear
    from .onnx_builder import GraphBuilder
    L = _lang(cfg)
    io_dtype = np.dtype(io_dtype)
    if io_dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"io_dtype must be float32 or float16, not {io_dtype}")
    if not 0 <= layer < L.num_hidden_layers:
        raise ValueError(f"layer {layer} out of range for {L.num_hidden_layers} layers")
    H = L.hidden_size
    pfx = f"language.model.layers.{layer}."
    g = GraphBuilder(f"attention_{layer}")

    hidden = g.input("hidden", io_dtype, [1, "T", H])
    position_ids = g.input("position_ids", np.int64, [1, "T"])
    seqlens_k = g.input("seqlens_k", np.int32, [1])
    total = g.input("total_sequence_length", np.int32, [])

    x = g.rms_norm(hidden, get(pfx + "input_layernorm.weight"), L.rms_norm_eps, io_dtype,
                   hint=pfx + "input_layernorm")
    if kv_scales is not None and io_dtype != np.float32:
        raise ValueError("an 8-bit KV cache needs fp32 I/O (the CPU kernels)")
    build = _mha if not L.use_mla else _mla_gqa if mla_form(io_dtype) == MLA_GQA else _mla_latent
    attn, presents, cache_shape = build(g, L, pfx, get, prec, io_dtype, max_len, report, x, position_ids,
                                        seqlens_k, total, **({"kv_scales": kv_scales} if kv_scales is not None else {}))
    cache_dtype = io_dtype if kv_scales is None else np.uint8 if L.use_mla else np.int8
    o = emit_linear(g, attn, get(pfx + "self_attn.o_proj.weight"), prec, io_dtype, hint=pfx + "self_attn.o_proj",
                    report=report, report_kind="attention.o")
    g.op("Add", [hidden, o], out_names=["hidden_out"])
    g.output("hidden_out", "hidden_out", io_dtype, [1, "T", H])
    mlp_in = g.rms_norm("hidden_out", get(pfx + "post_attention_layernorm.weight"), L.rms_norm_eps, io_dtype,
                        hint="mlp_in")
    g.output(mlp_in, "mlp_in", io_dtype, [1, "T", H])

    if L.is_moe_layer(layer):
        E = L.n_routed_experts
        r_in = mlp_in if io_dtype == np.float32 else g.op("Cast", [mlp_in], hint="mlp_in_fp32", to=1)
        gate_t = g.const(pfx + "mlp.gate.weight_t", np.asarray(get(pfx + "mlp.gate.weight"), np.float32).T)
        logits = g.op("MatMul", [r_in, gate_t], hint="router_matmul")
        g.op("Reshape", [logits, g.const("router_shape", np.array([-1, E], np.int64))], out_names=["router_logits"])
        g.output("router_logits", "router_logits", np.float32, ["T", E])
    for name in presents:  # the ops' own outputs, no Identity: the bound cache buffer is written in place
        if name == "latent_scale_new":  # the 8-bit latent cache's token scales (export/latent_cache.py)
            g.output(name, name, np.float32, ["T", 1])
        else:
            g.output(name, name, cache_dtype, cache_shape)
    return g




def mla_form(io_dtype) -> str:
    """Which MLA attention an fp32 (CPU) or fp16 (CUDA) graph gets; see the module docstring."""
    return MLA_LATENT if np.dtype(io_dtype) == np.float32 else MLA_GQA


def attention_kind(cfg: VL2Config | LanguageConfig, io_dtype) -> str:
    """The manifest's attention.kind for this model and I/O dtype."""
    return mla_form(io_dtype) if _lang(cfg).use_mla else MHA_GQA


def _mha(g, L, pfx, get, prec, io_dtype, max_len, report, x, position_ids, seqlens_k, total, kv_scales=None):
    from .linear import emit_linear
    from .onnx_builder import MS_DOMAIN
    nh, kvh, hd = L.num_attention_heads, L.num_key_value_heads, L.head_dim
    if hd % 2:
        raise ValueError(f"head_dim {hd} must be even for RoPE")
    a = pfx + "self_attn."
    w_qkv = np.concatenate([get(a + "q_proj.weight"), get(a + "k_proj.weight"), get(a + "v_proj.weight")], axis=0)
    qkv = emit_linear(g, x, w_qkv, prec, io_dtype, hint=a + "qkv_proj", report=report, report_kind="attention.qkv")
    cos, sin = rope_tables(hd, L.rope_theta, max_len)
    cache_shape = [1, kvh, max_len, hd]
    cache_dtype = np.int8 if kv_scales is not None else io_dtype
    past_k = g.input("past_key", cache_dtype, cache_shape)
    past_v = g.input("past_value", cache_dtype, cache_shape)
    inputs = [qkv, "", "", past_k, past_v, seqlens_k, total,
              g.const("rope_cos", cos.astype(io_dtype)), g.const("rope_sin", sin.astype(io_dtype))]
    quant = {}
    if kv_scales is not None:  # int8 cache, one static scale per (kv head, channel): export/kv_calibration.py
        k_scale, v_scale = (np.asarray(s, np.float32).reshape(kvh, 1, hd) for s in kv_scales)
        inputs += ["", "", "", g.const(pfx + "k_scale", k_scale), g.const(pfx + "v_scale", v_scale)]
        quant = dict(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
    out = g.op("GroupQueryAttention", inputs,
               n_out=3, domain=MS_DOMAIN, hint="gqa", out_names=["attn", "present_key", "present_value"],
               num_heads=nh, kv_num_heads=kvh, scale=float(L.softmax_scale), do_rotary=1, rotary_interleaved=0,
               **quant)
    return out[0], out[1:], cache_shape


def _mla_query_and_latent(g, L, pfx, get, prec, io_dtype, max_len, report, x, position_ids):
    """An MLA layer's query parts q_nope [T, nh, nope] and rotated q_pe [T, nh, rope], its new cache rows
    (c_kv normed, k_pe rotated; [1, T, r] and [1, T, rope]) and its absorbed weights W_UK, W_UV^T
    (export/mla_absorb.py: int8 when the attention linears are quantized in an fp32 graph, else io dtype)."""
    from .linear import emit_linear
    from .mla_absorb import absorbed_weights, quantized_form
    from .onnx_builder import MS_DOMAIN
    if L.q_lora_rank is not None:
        raise NotImplementedError("q_lora_rank is set: no DeepSeek-VL2 checkpoint compresses q (all set it null)")
    nh, nope, rope, v, r = (L.num_attention_heads, L.qk_nope_head_dim, L.qk_rope_head_dim, L.v_head_dim,
                            L.kv_lora_rank)
    qhd = nope + rope
    a = pfx + "self_attn."
    i64 = lambda *xs: np.array(xs, np.int64)  # noqa: E731
    perm = deinterleave_perm(rope)

    # q_proj with each head's rope rows de-interleaved (the reference's deinterleave(q_pe), folded into the rows),
    # and kv_a_proj_with_mqa with its rope rows de-interleaved likewise: both read x, so they are ONE linear over
    # their stacked rows (one weight stream, one kernel call; per-row block quantization changes no value)
    w_q = np.asarray(get(a + "q_proj.weight"), np.float32).reshape(nh, qhd, -1).copy()
    w_q[:, nope:] = w_q[:, nope:][:, perm]
    w_kva = np.asarray(get(a + "kv_a_proj_with_mqa.weight"), np.float32).copy()
    w_kva[r:] = w_kva[r:][perm]
    q_kv = emit_linear(g, x, np.concatenate([w_q.reshape(nh * qhd, -1), w_kva]), prec, io_dtype,
                       hint=a + "q_kv_a_proj", report=report, report_kind="attention.qkv")
    q, c_kv, k_pe = g.op("Split", [q_kv, g.const("q_kv_split", i64(nh * qhd, r, rope))], n_out=3, hint="q_kv_split",
                         axis=2)
    q_nope, q_pe = g.op("Split", [g.op("Reshape", [q, g.const("q_shape", i64(0, 0, nh, qhd))]), g.const(
        "q_split", i64(nope, rope))], n_out=2, hint="q_split", axis=3)
    q_nope = g.op("Reshape", [q_nope, g.const("qn_shape", i64(-1, nh, nope))])  # [T, nh, nope]

    w_kvb = np.asarray(get(a + "kv_b_proj.weight"), np.float32).reshape(nh, nope + v, r)
    w_uk, w_uv_t = absorbed_weights(g, pfx, w_kvb, nope, quantized_form(prec, io_dtype), io_dtype, report)

    cos, sin = rope_tables(rope, L.rope_theta, max_len)
    cos_c, sin_c = g.const("rope_cos", cos.astype(io_dtype)), g.const("rope_sin", sin.astype(io_dtype))
    q_pe = g.op("Reshape", [q_pe, g.const("qpe_shape", i64(1, -1, nh * rope))])
    q_pe = g.op("RotaryEmbedding", [q_pe, position_ids, cos_c, sin_c], domain=MS_DOMAIN, hint="q_rope",
                interleaved=0)
    q_pe = g.op("Reshape", [q_pe, g.const("qpe_heads", i64(-1, nh, rope))])  # [T, nh, rope]

    # the new cache rows: [RMSNorm(c_kv) | RoPE(k_pe)]
    c_kv = g.rms_norm(c_kv, get(a + "kv_a_layernorm.weight"), KV_A_NORM_EPS, io_dtype, hint=a + "kv_a_layernorm")
    k_pe = g.op("RotaryEmbedding", [k_pe, position_ids, cos_c, sin_c], domain=MS_DOMAIN, hint="k_rope",
                interleaved=0)
    return (q_nope, q_pe), (c_kv, k_pe), (w_uk, w_uv_t)


def _absorbed_query(b, L, q_nope, q_pe, w_uk, decoding):
    """[q_nope @ W_UK | q_pe] per head, in builder b: [T, nh, r + rope], matching the cache's [c_kv | k_pe]."""
    from .mla_absorb import absorb
    q_lat = absorb(b, b.op("Transpose", [q_nope], perm=[1, 0, 2]), w_uk, decoding, hint="q_absorb")  # [nh, T, r]
    return b.op("Concat", [b.op("Transpose", [q_lat], perm=[1, 0, 2]), q_pe], axis=2)


def _attended_latents_to_heads(b, L, ctx, w_uv_t, decoding):
    """ctx [T * nh, r] (row t * nh + h: head h's attended latents at token t) @ W_UV^T per head -> [1, T, nh * v],
    in builder b."""
    from .mla_absorb import absorb
    nh, r = L.num_attention_heads, L.kv_lora_rank
    i64 = lambda *xs: np.array(xs, np.int64)  # noqa: E731
    ctx = b.op("Transpose", [b.op("Reshape", [ctx, b.const("ctx_heads", i64(-1, nh, r))])], perm=[1, 0, 2])
    o = absorb(b, ctx, w_uv_t, decoding, hint="v_absorb")  # [nh, T, v]
    o = b.op("Transpose", [o], perm=[1, 0, 2])
    return b.op("Reshape", [o, b.const("attn_shape", i64(1, -1, nh * L.v_head_dim))])


def _mla_gqa(g, L, pfx, get, prec, io_dtype, max_len, report, x, position_ids, seqlens_k, total):
    from .onnx_builder import MS_DOMAIN
    nh, r, width = L.num_attention_heads, L.kv_lora_rank, L.kv_lora_rank + L.qk_rope_head_dim
    i64 = lambda *xs: np.array(xs, np.int64)  # noqa: E731
    (q_nope, q_pe), (c_kv, k_pe), (w_uk, w_uv_t) = _mla_query_and_latent(g, L, pfx, get, prec, io_dtype, max_len,
                                                                         report, x, position_ids)
    q_full = _absorbed_query(g, L, q_nope, q_pe, w_uk, decoding=False)
    q_full = g.op("Reshape", [q_full, g.const("q_full_shape", i64(1, -1, nh * width))])
    latent = g.op("Concat", [c_kv, k_pe], axis=2, hint="latent_new")  # [1, T, r + rope]
    cache_shape = [1, 1, max_len, width]
    past = g.input("past_latent", io_dtype, cache_shape)
    out = g.op("GroupQueryAttention", [q_full, latent, latent, past, past, seqlens_k, total], n_out=3,
               domain=MS_DOMAIN, hint="gqa", out_names=["attn", "present_latent_key", "present_latent_value"],
               num_heads=nh, kv_num_heads=1, scale=float(L.softmax_scale), do_rotary=0)
    # attended latents = the first r channels of each head's output
    ctx = g.op("Reshape", [out[0], g.const("ctx_shape", i64(-1, width))])
    ctx = g.op("Slice", [ctx, g.const("ctx_start", i64(0)), g.const("ctx_end", i64(r)), g.const("ctx_axis", i64(1))])
    return _attended_latents_to_heads(g, L, ctx, w_uv_t, decoding=False), out[1:], cache_shape


def _mla_latent(g, L, pfx, get, prec, io_dtype, max_len, report, x, position_ids, seqlens_k, total,
                kv_scales=None):
    """MLA over the latent cache that the graph reads but never writes: `past_latent` is the cache's valid prefix
    [P, width] (bound read-only over the buffer's first P rows) and `latent_new` [T, width] is bound over the next T
    rows, so the new rows land in the buffer with no copy. An If on T picks the attention, and with it the form of
    the absorbed products (export/mla_absorb.py: int8 weights meet uint8 activations when decoding, are dequantized
    for a chunk):

    decode (T = 1): plain GEMMs, all heads' queries as one [nh, width] matrix against the prefix, so the step reads
      the cache once per product (twice in all) where GQA with one KV head reads it once per query head (measured at
      4000 cached tokens on real-dims Small: 2.6 vs 5.7 ms per layer). Softmax is taken jointly over the two parts
      (past, new) without concatenating them: m = max over both, p = exp(s - m), ctx = (p_past @ past + p_new @ new)
      / sum p.
    prefill chunk (T > 1): GroupQueryAttention over a copy of the prefix plus the chunk (its non-shared-buffer mode),
      whose per-head fused softmax keeps a chunk's [T, P + T] scores in cache; the GEMM form's elementwise passes over
      all heads' scores at once made 3.9k-token prefill 14% slower and its peak RSS 0.4 GB higher (measured). Copying
      the prefix once per chunk costs little next to the chunk's work.
    kv_scales [width]: the cache holds uint8 codes with a scale per token (export/latent_cache.py; kv_scales is its
    per-channel equalizer): the new rows are written quantized with their scales (`latent_scale_new` [T, 1], bound
    over the scale buffer's next rows like `latent_new`; `past_latent_scale` [P, 1] the prefix's), the decode
    products read the codes on integer GEMMs, a prefill chunk dequantizes the prefix it copies anyway."""
    from .latent_cache import LatentCodec
    from .onnx_builder import MS_DOMAIN
    nh, r, width = L.num_attention_heads, L.kv_lora_rank, L.kv_lora_rank + L.qk_rope_head_dim
    i64 = lambda *xs: np.array(xs, np.int64)  # noqa: E731
    (q_nope, q_pe), (c_kv, k_pe), (w_uk, w_uv_t) = _mla_query_and_latent(g, L, pfx, get, prec, io_dtype, max_len,
                                                                         report, x, position_ids)
    latent = g.op("Concat", [c_kv, k_pe], axis=2, hint="latent_cat")  # [1, T, width]
    scale = float(L.softmax_scale)
    codec = None if kv_scales is None else LatentCodec(g, pfx + "self_attn", kv_scales, scale, nh)
    new = g.op("Reshape", [latent, g.const("latent_rows", i64(-1, width))],
               **({"out_names": ["latent_new"]} if codec is None else {"hint": "latent_rows"}))  # [T, width] fp32
    if codec is not None:
        codec.write(g, new, "latent_new", "latent_scale_new")
    past = g.input("past_latent", io_dtype if codec is None else np.uint8, ["P", width])
    past_tok = None if codec is None else g.input("past_latent_scale", np.float32, ["P", 1])
    t = g.op("Squeeze", [g.op("Shape", [new], start=0, end=1)])
    decoding = g.op("Equal", [t, g.const("one", np.array(1, np.int64))], hint="decoding")

    # decode: T = 1, so the query rows are the nh heads and nothing needs a causal mask
    d = g.branch("decode")
    q = d.op("Reshape", [_absorbed_query(d, L, q_nope, q_pe, w_uk, decoding=True), d.const("q_rows", i64(nh, width))],
             hint="q_rows")  # [nh, width]
    # The cache is the product's A, streamed row by row as it lies, and the small [nh, width] queries its B: MLAS
    # packs B before multiplying, and packing the [P, width] cache instead (as B of q @ past^T) made this product
    # 1.5x slower at 4000 cached tokens (0.62 vs 0.41 ms, real Small dims, 2 threads). The [P, nh] result is
    # transposed, a copy of nh * P floats against the P * width read. MatMul, not Gemm: ORT's GemmTransposeFusion
    # rewrites Transpose(Gemm(past, q^T)) back into Gemm(q, past^T).
    if codec is None:
        q_t = d.op("Transpose", [d.op("Mul", [q, d.const("scale", np.array(scale, io_dtype))])], perm=[1, 0])
        s_past = d.op("Transpose", [d.op("MatMul", [past, q_t], hint="scores_past")], perm=[1, 0])  # [nh, P]
    else:
        s_past = codec.scores(d, past, past_tok, q)  # the softmax scale folded into its query scales
    s_new = d.op("Gemm", [q, new], hint="scores_new", transB=1, alpha=scale)  # [nh, 1]
    # positive axes: ORT 1.31 reduces an empty [nh, 0] (P = 0) along axis 1 to [nh, 1] of -inf (max) and 0 (sum),
    # as ONNX specifies, but along axis -1 to an empty [nh, 0]
    ax1 = d.const("axis1", i64(1))
    m = d.op("Max", [d.op("ReduceMax", [s_past, ax1], keepdims=1), s_new], hint="row_max")  # [nh, 1]
    p_past = d.op("Exp", [d.op("Sub", [s_past, m])], hint="p_past")  # [nh, P]
    p_new = d.op("Exp", [d.op("Sub", [s_new, m])], hint="p_new")  # [nh, 1]
    den = d.op("Add", [d.op("ReduceSum", [p_past, ax1], keepdims=1), p_new], hint="denominator")
    ctx_past = d.op("MatMul", [p_past, past], hint="ctx_past") if codec is None else codec.attend(d, p_past, past,
                                                                                                  past_tok)
    ctx = d.op("Add", [ctx_past, d.op("Mul", [p_new, new], hint="ctx_new")])
    ctx = d.op("Div", [d.op("Slice", [ctx, d.const("ctx_start", i64(0)), d.const("ctx_end", i64(r)),
                                      d.const("ctx_axis", i64(1))]), den])  # [nh, r]
    d.output(_attended_latents_to_heads(d, L, ctx, w_uv_t, decoding=True), "attn_decode", io_dtype,
             [1, 1, nh * L.v_head_dim])

    # prefill chunk: GQA, one KV head of width 576, reading [past | chunk] (RoPE already applied outside)
    p = g.branch("prefill")
    q_full = p.op("Reshape", [_absorbed_query(p, L, q_nope, q_pe, w_uk, decoding=False),
                              p.const("q_packed", i64(1, -1, nh * width))])
    past_rows = past if codec is None else codec.read(p, past, past_tok)
    past4 = p.op("Reshape", [past_rows, p.const("past_4d", i64(1, 1, -1, width))])
    attn = p.op("GroupQueryAttention", [q_full, latent, latent, past4, past4, seqlens_k, total], n_out=3,
                domain=MS_DOMAIN, hint="gqa", num_heads=nh, kv_num_heads=1, scale=scale, do_rotary=0)[0]
    ctx = p.op("Slice", [p.op("Reshape", [attn, p.const("ctx_rows", i64(-1, width))]), p.const("ctx_start_p", i64(0)),
                         p.const("ctx_end_p", i64(r)), p.const("ctx_axis_p", i64(1))])  # [T * nh, r]
    p.output(_attended_latents_to_heads(p, L, ctx, w_uv_t, decoding=False), "attn_prefill", io_dtype,
             [1, "T", nh * L.v_head_dim])

    attn = g.op("If", [decoding], hint="attention", then_branch=d.graph_proto(), else_branch=p.graph_proto())
    return attn, ["latent_new"] + ([] if codec is None else ["latent_scale_new"]), ["T", width]


# --- running one step (the cache and its binding are the contract's: contract/cache.py) ---------------

def run_attention_step(session, buffers: Sequence, hidden: np.ndarray, past_len: int):
    """Run one attention graph on `hidden` [1, T, H] at positions past_len .. past_len+T-1, appending to the cache
    in place. `buffers`: this layer's cache OrtValues (MHA [key, value], MLA [latent]; numpy arrays are wrapped,
    sharing memory). Returns (hidden_out, mlp_in, router_logits or None) as numpy arrays."""
    import onnxruntime as ort

    buffers = [b if isinstance(b, ort.OrtValue) else cache_ortvalues([b])[0] for b in buffers]
    in_types = {i.name: i.type for i in session.get_inputs()}
    out_names = [o.name for o in session.get_outputs()]
    hidden = np.ascontiguousarray(hidden, dtype=ONNX_TYPE_DTYPES[in_types["hidden"]])
    if hidden.ndim != 3 or hidden.shape[0] != 1:
        raise ValueError(f"hidden must be [1, T, H], got {hidden.shape}")
    t = hidden.shape[1]
    max_len = buffers[0].shape()[2]
    if past_len < 0 or past_len + t > max_len:
        raise ValueError(f"{past_len} + {t} tokens do not fit the cache of {max_len}")
    kind = session_attention_kind(session)
    scaled = "past_latent_scale" in in_types  # the 8-bit latent cache's token scales (export/latent_cache.py)
    if len(buffers) != (2 if kind == MHA_GQA or scaled else 1):
        what = ("two cache buffers (key, value)" if kind == MHA_GQA else "two cache buffers (latent codes, token "
                "scales)" if scaled else "one cache buffer (latent)")
        raise ValueError(f"a {kind} layer has {what}")

    b = session.io_binding()
    bind_step_inputs(b, hidden, past_len)
    results = ["hidden_out", "mlp_in"] + (["router_logits"] if "router_logits" in out_names else [])
    for name in results:  # bound first: get_outputs() returns them first, in this order
        b.bind_output(name)
    bind_cache(b, kind, buffers, past_len, t)
    session.run_with_iobinding(b)
    # get_outputs (OrtValues, in binding order), not copy_outputs_to_cpu: that would copy the whole cache too
    outs = [v.numpy() for v in b.get_outputs()[:len(results)]]
    return outs[0], outs[1], (outs[2] if len(results) == 3 else None)


class AttentionSession:
    """One layer's attention graph with its cache: `step(hidden, past_len)` -> (hidden_out, mlp_in, router_logits).

    `model`: path, serialized bytes or onnx.ModelProto. `buffers`: this layer's cache (numpy arrays, shared with
    the OrtValues; see cache_ortvalues) or OrtValues; fresh zeroed numpy buffers when omitted."""

    def __init__(self, model, cfg: VL2Config | LanguageConfig, max_len: int, buffers: Sequence | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",), sess_options=None):
        import onnxruntime as ort

        if hasattr(model, "SerializeToString"):
            model = model.SerializeToString()
        self.session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options,
                                            providers=list(providers))
        io = ONNX_TYPE_DTYPES[next(i.type for i in self.session.get_inputs() if i.name == "hidden")]
        if buffers is None:
            buffers = [np.zeros(s, io) for s in cache_shapes(cfg, max_len)]
        self.arrays = [b for b in buffers if isinstance(b, np.ndarray)]  # keep the memory alive
        self.buffers = [b if isinstance(b, ort.OrtValue) else cache_ortvalues([b])[0] for b in buffers]

    def step(self, hidden: np.ndarray, past_len: int):
        return run_attention_step(self.session, self.buffers, hidden, past_len)

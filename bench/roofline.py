"""The decode roofline: bytes that must be read from memory per decoded token, and the best rate they allow.

A decode step reads every weight it uses once (at batch 1 nothing is reused across tokens: the weights do not fit
the caches) plus the KV cache up to the current context. So, at context C:

    bytes(C)   = active weight bytes + C * cache bytes per token
    best rate  = measured read bandwidth / bytes(C)          tokens/s
    fraction   = measured rate / best rate

Active weights per token, at their STORED size (quantized codes + block scales; no zero points: symmetric):
  per layer     attention projections (MHA: fused qkv + o; MLA: q (or q_a + q_b), kv_a, W_UK/W_UV at io dtype or
                int8 (manifest quantization.mla_absorbed), o),
                the router (fp32 [E, H]) on MoE layers, and the norms;
  dense layers  the gated MLP (gate, up, down);
  MoE layers    top-k routed experts (k x gate/up/down at the experts' precision) + the shared experts;
  head          final norm + lm_head (the whole [V, H] matrix: every logit is computed);
  embedding     one row.
Vision is not part of a decode step. Precisions come from the artifact's manifest["quantization"] (kind,
block_size per group: experts, linear, embedding, lm_head); `reference_plan(dtype)` gives the PyTorch reference's
(everything at fp32 or bf16, the router fp32).

Stored bytes of a [N, K] weight: fp32 4NK, fp16/bf16 2NK; intB with block b: N * ceil(K/b) * (b*B/8) codes + N *
ceil(K/b) scales at the scale dtype (fp32 with fp32 I/O, fp16 with fp16 I/O).
"""

from __future__ import annotations

import math

from ..model.config import LanguageConfig, VL2Config

DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2}


def matrix_bytes(n: int, k: int, prec: dict, scale_bytes: int = 4) -> int:
    """Stored bytes of an [n, k] weight at `prec` ({"kind": fp32|fp16|bf16|int8|int4, "block_size": b})."""
    kind = prec["kind"]
    if kind in DTYPE_BYTES:
        return n * k * DTYPE_BYTES[kind]
    bits = {"int8": 8, "int4": 4}.get(kind)
    if bits is None:
        raise ValueError(f"unknown precision kind {kind!r}")
    b = int(prec["block_size"])
    blocks = math.ceil(k / b)
    return n * blocks * (b * bits // 8) + n * blocks * scale_bytes


def _lang(cfg) -> LanguageConfig:
    return cfg.language if isinstance(cfg, VL2Config) else cfg


def attention_shapes(L: LanguageConfig) -> list[tuple[int, int]]:
    """[N, K] of the quantizable attention projections of one layer."""
    H, nh = L.hidden_size, L.num_attention_heads
    if not L.use_mla:
        kvh, hd = L.num_key_value_heads, L.head_dim
        return [((nh + 2 * kvh) * hd, H), (H, nh * hd)]
    shapes = []
    if L.q_lora_rank is None:
        shapes.append((nh * L.q_head_dim, H))
    else:
        shapes += [(L.q_lora_rank, H), (nh * L.q_head_dim, L.q_lora_rank)]
    shapes += [(L.kv_lora_rank + L.qk_rope_head_dim, H), (H, nh * L.v_head_dim)]
    return shapes


def active_weight_bytes(cfg, plan: dict, io_bytes: int = 4, routed: int | None = None) -> dict:
    """Bytes read per decoded token, by part. `plan`: {"experts", "linear", "embedding", "lm_head"} -> precision
    dicts (manifest["quantization"]). io_bytes: the I/O dtype's size (norms, scales, MLA's W_UK/W_UV).
    routed: routed experts counted per MoE layer (default the top-k; n_routed_experts gives the stored total)."""
    L = _lang(cfg)
    routed = L.num_experts_per_tok if routed is None else routed
    H = L.hidden_size
    scale = io_bytes
    lin = lambda n, k: matrix_bytes(n, k, plan["linear"], scale)  # noqa: E731
    parts = {"attention": 0, "router": 0, "dense_mlp": 0, "routed_experts": 0, "shared_experts": 0, "norms": 0}
    for i in range(L.num_hidden_layers):
        parts["attention"] += sum(lin(n, k) for n, k in attention_shapes(L))
        parts["norms"] += 2 * H * io_bytes
        if L.use_mla:  # W_UK, W_UV: io dtype, or int8 codes + an fp32 scale per head and output column
            nh, r, nope, v = L.num_attention_heads, L.kv_lora_rank, L.qk_nope_head_dim, L.v_head_dim
            int8 = plan.get("mla_absorbed", {}).get("kind") == "int8"
            parts["attention"] += nh * (nope + v) * r * (1 if int8 else io_bytes) + (nh * (r + v) * 4 if int8 else 0)
            parts["norms"] += L.kv_lora_rank * io_bytes + (L.q_lora_rank or 0) * io_bytes
        if L.is_moe_layer(i):
            I = L.moe_intermediate_size
            parts["router"] += L.n_routed_experts * H * 4
            expert = 2 * matrix_bytes(I, H, plan["experts"], scale) + matrix_bytes(H, I, plan["experts"], scale)
            parts["routed_experts"] += routed * expert
            S = L.shared_intermediate_size
            if S:
                parts["shared_experts"] += 2 * lin(S, H) + lin(H, S)
        else:
            I = L.intermediate_size
            parts["dense_mlp"] += 2 * lin(I, H) + lin(H, I)
    parts["lm_head"] = matrix_bytes(L.vocab_size, H, plan["lm_head"], scale) + H * io_bytes
    parts["embedding_row"] = matrix_bytes(1, H, plan["embedding"], scale)
    parts["total"] = sum(parts.values())
    return parts


def cache_bytes_per_token(cfg, dtype_bytes: int) -> int:
    """KV cache bytes per token, all layers (MHA: 2 * kv_heads * head_dim; MLA: kv_lora_rank + rope)."""
    return _lang(cfg).cache_elements_per_token * dtype_bytes


def reference_plan(dtype: str) -> dict:
    """The PyTorch reference: every weight at `dtype` (fp32 | bf16)."""
    p = {"kind": {"float32": "fp32", "bfloat16": "bf16"}.get(dtype, dtype)}
    return {"experts": p, "linear": p, "embedding": p, "lm_head": p, "vision": p}


def decode_roofline(weight_bytes: int, cache_bytes_per_tok: int, contexts, bandwidth: float,
                    measured: dict | None = None) -> list[dict]:
    """Per context: bytes per token, best tokens/s at `bandwidth` bytes/s, and the fraction a measured rate
    ({context: tokens/s}) reaches."""
    rows = []
    for c in contexts:
        total = weight_bytes + c * cache_bytes_per_tok
        best = bandwidth / total if bandwidth and total else None
        got = (measured or {}).get(c)
        rows.append({"context": c, "weight_bytes": weight_bytes, "kv_bytes": c * cache_bytes_per_tok,
                     "bytes_per_token": total, "best_tokens_per_s": best,
                     "measured_tokens_per_s": got,
                     "fraction": (got / best) if (got is not None and best) else None})
    return rows

"""The issue's targets, evaluated on a bench document (checked here and reported; never asserted by tests).

For real-dims `tiny` on a 2-core CPU, the INT4 runtime (precision "int4") against the PyTorch fp32 eager reference:

  decode_speedup     INT4 decode tokens/s >= 5 x the reference fp32's, at the smallest context both measured
                     (the reference's rate there bounded by its fastest at any longer context: reference_rate_bound)
  decode_roofline    INT4 decode >= 50% of the roofline's best rate, at that context
  ttft_ratio         INT4 time to first token (640x480 + question) <= 0.4 x the reference fp32's
  decode_4k_vs_512   INT4 decode step time at the largest context (4k) <= 1.15 x that at 512 (at the smallest
                     context when 512 was not measured)
  peak_rss           INT4 runtime peak RSS over the whole workload <= 2.5 GB (10^9 bytes)

For real-dims `small` (issue 10; no reference: its weights do not fit this machine's memory), the INT4 runtime
alone:

  decode_512         INT4 decode >= 10 tokens/s at 512 context
  decode_2k          INT4 decode >= 8 tokens/s at 2k context
  decode_4k_vs_512   as above
  prefill            INT4 prefill >= 28 tokens/s
  peak_rss           INT4 runtime peak RSS over the whole workload <= 9.5 GB

Each target -> {"id", "description", "metric", "value", "op", "threshold", "unit", "passed", "detail"}; "passed" is
None when the run lacks what it needs (no int4 precision, --no-reference, a failed measurement). The set is chosen
by the model's dims (model_of); any other model is evaluated against tiny's, and the document's "targets" section
says `applies` False.
"""

from __future__ import annotations

PRECISION = "int4"
REFERENCE = "float32"
GB = 10**9

TARGETS = {
    "decode_speedup": (">=", 5.0, "x", "INT4 decode >= 5x the PyTorch fp32 eager reference"),
    "decode_roofline": (">=", 0.5, "fraction", "INT4 decode >= 50% of the roofline (measured bandwidth / bytes "
                                               "per token)"),
    "ttft_ratio": ("<=", 0.4, "x", "time to first token, 640x480 image + question, <= 0.4x the reference fp32"),
    "decode_4k_vs_512": ("<=", 1.15, "x", "INT4 decode step time at 4k context within 15% of that at 512"),
    "peak_rss": ("<=", 2.5 * GB, "bytes", "peak RSS of the INT4 runtime <= 2.5 GB"),
}


def _ok(rec) -> bool:
    return isinstance(rec, dict) and "error" not in rec


def _decode_at(rec: dict, context: int) -> dict | None:
    return next((d for d in rec.get("decode", []) if d["context"] == context), None)


def check(op: str, value: float | None, threshold: float) -> bool | None:
    if value is None:
        return None
    return value >= threshold if op == ">=" else value <= threshold


SMALL_TARGETS = {
    "decode_512": (">=", 10.0, "tokens/s", "Small INT4 decode >= 10 tokens/s at 512 context"),
    "decode_2k": (">=", 8.0, "tokens/s", "Small INT4 decode >= 8 tokens/s at 2k context"),
    "decode_4k_vs_512": TARGETS["decode_4k_vs_512"],
    "prefill": (">=", 28.0, "tokens/s", "Small INT4 prefill >= 28 tokens/s"),
    "peak_rss": ("<=", 9.5 * GB, "bytes", "peak RSS of the Small INT4 runtime <= 9.5 GB"),
}


def _target(tid: str, value, detail: str, table: dict = TARGETS) -> dict:
    op, threshold, unit, description = table[tid]
    return {"id": tid, "description": description, "value": value, "op": op, "threshold": threshold, "unit": unit,
            "passed": check(op, value, threshold), "detail": detail}


def reference_rate_bound(ref: dict, context: int) -> float:
    """The reference's decode tokens/s at `context`, taken as the fastest it measured at `context` or any longer
    one. A step at a longer context reads strictly more (the same weights plus a longer cache), so a faster figure
    there means the shorter-context measurement was disturbed (observed on this shared 2-core VM: fp32 reference
    284.7 ms/token @512 but 204.5 @2048 in one run, 245.2 / 174.9 @512 / @1024 in another). Using the bound can only
    lower our speedup, never flatter it."""
    return max(d["tokens_per_s"] for d in ref["decode"] if d["context"] >= context)


def evaluate_small(doc: dict, precision: str = PRECISION) -> list[dict]:
    rt = doc.get("runtime", {}).get(precision)
    if not _ok(rt):
        why = f"no {precision} runtime measurement" + (f" ({rt['error']})" if isinstance(rt, dict) else "")
        return [_target(t, None, why, SMALL_TARGETS) for t in SMALL_TARGETS]
    out = []
    for tid, c in (("decode_512", 512), ("decode_2k", 2048)):
        d = _decode_at(rt, c)
        out.append(_target(tid, d and d["tokens_per_s"], f"{d['ms_per_token']:.1f} ms/token @{c}" if d else
                           f"no decode measurement @{c}", SMALL_TARGETS))
    out.append(next(t for t in _evaluate_tiny(doc, precision, REFERENCE) if t["id"] == "decode_4k_vs_512"))
    p = rt["prefill"]
    out.append(_target("prefill", p["tokens_per_s"], f"{p['tokens']} tokens in chunks of {p.get('chunk_size')}",
                       SMALL_TARGETS))
    peak = rt["memory"]["peak_rss_bytes"]
    out.append(_target("peak_rss", peak, f"{peak / GB:.2f} GB peak ({rt['memory']['rss_after_load_bytes'] / GB:.2f} "
                                         f"GB after load; artifact {rt['artifact_bytes'] / GB:.2f} GB, KV cache "
                                         f"{rt['memory']['kv_cache_bytes'] / GB:.2f} GB)", SMALL_TARGETS))
    return out


def precision_for(runtime: dict) -> str:
    """The measured precision the INT4 targets judge: "int4" when the run has it, else the first other INT4 export
    it measured (e.g. "int4-dense4-head8", Small's memory plan), else "int4" (then reported as missing)."""
    if PRECISION in runtime:
        return PRECISION
    return next((p for p in runtime if p.startswith(PRECISION + "-")), PRECISION)


def evaluate(doc: dict, precision: str = PRECISION, reference: str = REFERENCE,
             config: dict | None = None) -> list[dict]:
    """The target set of the model whose config.json is `config`: small's, or tiny's for anything else."""
    if model_of(config or {}) == "small":
        return evaluate_small(doc, precision)
    return _evaluate_tiny(doc, precision, reference)


def _evaluate_tiny(doc: dict, precision: str = PRECISION, reference: str = REFERENCE) -> list[dict]:
    rt = doc.get("runtime", {}).get(precision)
    ref = doc.get("reference", {}).get(reference)
    out = []
    if not _ok(rt):
        why = f"no {precision} runtime measurement" + (f" ({rt['error']})" if isinstance(rt, dict) else "")
        return [_target(t, None, why) for t in TARGETS]

    contexts = sorted(d["context"] for d in rt["decode"])
    both = sorted(set(contexts) & {d["context"] for d in ref["decode"]}) if _ok(ref) else []
    c0 = both[0] if both else None

    roof = doc.get("roofline", {})
    rt_roof = roof.get("runtime", {}).get(precision)
    ref_roof = roof.get("reference", {}).get(reference)

    def row_at(r, c):
        return next((x for x in (r or {}).get("rows", []) if x["context"] == c), None)

    # decode speedup vs the reference
    if c0 is not None:
        a, b = _decode_at(rt, c0)["tokens_per_s"], reference_rate_bound(ref, c0)
        others = ", ".join(f"@{c}: {_decode_at(rt, c)['tokens_per_s'] / _decode_at(ref, c)['tokens_per_s']:.2f}x"
                           for c in both)
        detail = f"@{c0}: {a:.2f} vs {b:.2f} tokens/s ({others})"
        if b > _decode_at(ref, c0)["tokens_per_s"]:
            detail += f"; reference @{c0} measured {_decode_at(ref, c0)['tokens_per_s']:.2f} tokens/s, slower than " \
                      f"at a longer context, so its fastest longer-context rate is used"
        ra, rb = row_at(rt_roof, c0), row_at(ref_roof, c0)
        if ra and rb:  # what two equally bandwidth-bound implementations would show
            detail += f"; bytes per token {rb['bytes_per_token'] / 1e6:.0f} vs {ra['bytes_per_token'] / 1e6:.0f} MB " \
                      f"= {rb['bytes_per_token'] / ra['bytes_per_token']:.2f}x"
        out.append(_target("decode_speedup", a / b, detail))
    else:
        out.append(_target("decode_speedup", None, f"no reference {reference} decode measurement"))

    # roofline fraction
    row = row_at(rt_roof, c0 or contexts[0])
    if row and row["fraction"] is not None:
        out.append(_target("decode_roofline", row["fraction"],
                           f"@{row['context']}: {row['measured_tokens_per_s']:.2f} of {row['best_tokens_per_s']:.2f} "
                           f"tokens/s best ({row['bytes_per_token'] / 1e6:.0f} MB/token at "
                           f"{doc['roofline']['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s)"))
    else:
        out.append(_target("decode_roofline", None, "no roofline (bandwidth not measured)"))

    # time to first token
    if _ok(ref):
        a, b = rt["ttft"]["ttft_s"], ref["ttft"]["ttft_s"]
        out.append(_target("ttft_ratio", a / b, f"{a:.2f} s vs {b:.2f} s ({rt['ttft']['prompt_tokens']} prompt tokens, "
                                                f"{rt['ttft']['vision_tiles']} tiles)"))
    else:
        out.append(_target("ttft_ratio", None, f"no reference {reference} measurement"))

    # long context
    hi = contexts[-1]
    lo = 512 if 512 in contexts else contexts[0]  # the target's base; the smallest context when 512 was not measured
    if hi > lo:
        a, b = _decode_at(rt, hi)["ms_per_token"], _decode_at(rt, lo)["ms_per_token"]
        detail = f"{a:.1f} ms @{hi} (from {_decode_at(rt, hi)['start']}) vs {b:.1f} ms @{lo}"
        rh, rl = row_at(rt_roof, hi), row_at(rt_roof, lo)
        if rh and rl:  # the KV cache read grows with the context
            detail += f"; bytes per token {rh['bytes_per_token'] / 1e6:.0f} vs {rl['bytes_per_token'] / 1e6:.0f} MB " \
                      f"= {rh['bytes_per_token'] / rl['bytes_per_token']:.2f}x (KV cache {rh['kv_bytes'] / 1e6:.0f} MB " \
                      f"@{hi})"
        out.append(_target("decode_4k_vs_512", a / b, detail))
    else:
        out.append(_target("decode_4k_vs_512", None, "one context only"))

    peak = rt["memory"]["peak_rss_bytes"]
    out.append(_target("peak_rss", peak, f"{peak / GB:.2f} GB peak ({rt['memory']['rss_after_load_bytes'] / GB:.2f} GB "
                                         f"after load; artifact {rt['artifact_bytes'] / GB:.2f} GB, KV cache "
                                         f"{rt['memory']['kv_cache_bytes'] / GB:.2f} GB)"))
    return out


_TINY_KEYS = ("hidden_size", "num_hidden_layers", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
              "vocab_size")


def model_of(config: dict) -> str | None:
    """"tiny" or "small" when this config.json has that preset's real dims and all its layers, else None."""
    from ..model.presets import preset_config

    lm = config.get("language_config", {})
    for name in ("tiny", "small"):
        p = preset_config(name)
        if all(lm.get(k) == p["language_config"][k] for k in _TINY_KEYS) and \
                config.get("vision_config", {}).get("width") == p["vision_config"]["width"]:
            return name
    return None


def applies(config: dict) -> bool:
    """Are the evaluated targets the ones stated for this model (real-dims tiny or small, all layers)?"""
    return model_of(config) is not None

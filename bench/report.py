"""The bench document (JSON, stable schema), its readable table, and its plots.

Schema (SCHEMA_VERSION 1). Times in seconds unless a key says ms; sizes in bytes; rates in tokens/s. A "summary"
is {"median", "min", "max", "p10", "p90", "mean", "stdev", "n"} over repeats (bench/stats.py). Keys are only ever
added within a schema version; renaming or removing one bumps it.

  schema_version       1
  generator            "vl2edge.bench"
  created_utc          ISO 8601
  command              the command line (or the run_bench call) that produced it
  mode                 "full" | "quick" | "custom"
  model                {"name", "source": "preset"|"directory", "layers", "seed", "checkpoint", "config": {
                        "hidden_size", "num_hidden_layers", "n_routed_experts", "num_experts_per_tok",
                        "vocab_size", "use_mla", "vision_width", "vision_layers"}}
  machine              {"cpu_model", "cpu_flags", "logical_cores", "usable_cores", "memory_bytes", "os", "python",
                        "numpy", "onnxruntime", "torch", "ort_providers_available", "provider", "threads",
                        "load_average_start", "load_average_end", "bandwidth": {"bytes_per_s" (the best sample:
                        the roofline's ceiling), "threads_1_bytes_per_s", "threads_<n>_bytes_per_s", "array_bytes",
                        "repeats", "samples": [{the same keys + "load_average"}: at the start and after each
                        measurement process]}}
  workload             bench/workload.py Workload.as_dict(): image sizes, repeats, contexts, steps, ...
  runtime              {precision: record | {"error"}}, precision in int4 | int8 | fp32 (| fp16 on CUDA); record:
      precision, artifact, artifact_bytes, artifact_created_utc (its manifest's mtime: which exporter made it),
      quantization (manifest), provider, threads, thread_pool (runtime/thread_pool.py), max_len,
      ort_intra_op_spinning, transient_vision, low_memory,
      cpu_arena ("kept", "shrunk per prefill chunk" (low memory: Engine shrink_arena) or "none"), load_s, wall_s
      vision           [{"size": [w, h], "grid": [tw, th], "tiles", "image_tokens", "image_s": summary,
                         "preprocess_s": summary, "ms_per_image", "ms_per_tile"}]
      prefill          {"tokens", "chunk_size", "s": summary, "tokens_per_s", "stages_s": {stage: s}}
      ttft             {"image", "question", "prompt_tokens", "vision_tiles", "s": summary, "ttft_s",
                        "breakdown_s": {"preprocess_s", "vision_s", "embed_s", "prefill_s"}}
      decode           [{"context", "start", "end", "steps", "warmup", "repeats", "step_s": summary,
                         "ms_per_token", "tokens_per_s", "stages_ms": {"attention", "dispatch", "experts", "layers"
                         (fused layer graphs), "head", "embed", "python_overhead"}}]
      memory           {"peak_rss_bytes", "rss_after_load_bytes", "kv_cache_bytes", "phases": {phase: {"rss",
                        "anon", "file", "peak"}}}
      load_average     1/5/15-minute load averages at "start", "after_vision", "after_prefill", "after_ttft", "end"
      expert_cache     null, or with --expert-cache: {"budget", "capacity" (experts), "prefetch", "read_mode", and
                        runtime/expert_cache.py ExpertCacheStats.as_dict(): hits, prefetch_hits, misses, hit_rate,
                        prefetch_hit_rate, evictions, prefetched, prediction_rate, bytes_read, load_s, wait_s}
  reference            {dtype: record | {"error"}}, dtype in float32 | bfloat16: as a runtime record without
                       artifact*/quantization/provider/max_len/ort_intra_op_spinning and without stages; plus
                       "dtype", "checkpoint", "device", "omp_wait_policy", "weight_bytes"; decode rows carry
                       "cache_fill": "random";
                       ttft breakdown_s = {"preprocess_s", "vision_and_embed_s", "prefill_s"}
  ratios               {precision: {dtype: {"decode_speedup": {context: x}, "prefill_speedup", "ttft_ratio",
                        "vision_speedup": {"WxH": x}, "peak_rss_ratio"}}}; speedup = reference time / runtime
                        time (> 1: the runtime is faster); ttft_ratio and peak_rss_ratio = runtime / reference
  roofline             {"bandwidth_bytes_per_s", "runtime": {precision: {"weight_bytes": {part: bytes},
                        "cache_bytes_per_token", "rows": [{"context", "weight_bytes", "kv_bytes", "bytes_per_token",
                        "best_tokens_per_s", "measured_tokens_per_s", "fraction"}]}}, "reference": {dtype: same}}
  targets              {"applies": bool, "model": "tiny"|"small" (whose target set), "precision": "int4",
                        "reference": "float32", "results": [see
                        bench/targets.py], "passed": n, "failed": n, "unknown": n}
  plots                {"decode_latency": file name, "decode_stages": file name} (beside the JSON), absent
                       entries when matplotlib is missing
  errors               ["..."]: measurements that failed (their records hold {"error"})
  skipped              ["..."]: measurements not attempted, with why (a reference whose weights exceed the memory
                       this machine has: bench/runner.reference_does_not_fit)
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from . import roofline, targets
from .stats import ratio

SCHEMA_VERSION = 1
JSON_NAME = "bench.json"
TABLE_NAME = "bench.txt"
PLOT_DECODE = "decode_latency.png"
PLOT_STAGES = "decode_stages.png"
STAGE_ORDER = ("attention", "dispatch", "experts", "layers", "head", "embed", "python_overhead")


def _ok(rec) -> bool:
    return isinstance(rec, dict) and "error" not in rec


# --- derived sections -------------------------------------------------------------------------------------------
def compute_ratios(runtime: dict, reference: dict) -> dict:
    out = {}
    for prec, rt in runtime.items():
        if not _ok(rt):
            continue
        out[prec] = {}
        for dtype, ref in reference.items():
            if not _ok(ref):
                continue
            ref_dec = {d["context"]: d for d in ref["decode"]}
            ref_vis = {tuple(v["size"]): v for v in ref["vision"]}
            out[prec][dtype] = {
                "decode_speedup": {str(d["context"]): ratio(ref_dec[d["context"]]["ms_per_token"], d["ms_per_token"])
                                   for d in rt["decode"] if d["context"] in ref_dec},
                "prefill_speedup": ratio(rt["prefill"]["tokens_per_s"], ref["prefill"]["tokens_per_s"]),
                "ttft_ratio": ratio(rt["ttft"]["ttft_s"], ref["ttft"]["ttft_s"]),
                "vision_speedup": {f"{v['size'][0]}x{v['size'][1]}": ratio(ref_vis[tuple(v["size"])]["ms_per_image"],
                                                                           v["ms_per_image"])
                                   for v in rt["vision"] if tuple(v["size"]) in ref_vis},
                "peak_rss_ratio": ratio(rt["memory"]["peak_rss_bytes"], ref["memory"]["peak_rss_bytes"]),
            }
    return out


def compute_roofline(config: dict, runtime: dict, reference: dict, bandwidth: float | None) -> dict:
    from ..model.config import VL2Config

    cfg = VL2Config.from_dict(config)
    out = {"bandwidth_bytes_per_s": bandwidth, "runtime": {}, "reference": {}}
    for prec, rt in runtime.items():
        if not _ok(rt):
            continue
        io = 2 if rt["quantization"]["experts"]["kind"] == "fp16" or rt.get("provider") == "cuda" else 4
        w = roofline.active_weight_bytes(cfg, rt["quantization"], io_bytes=io)
        kv = 1 if rt["quantization"].get("kv_cache", {}).get("kind") == "int8" else io
        per_tok = roofline.cache_bytes_per_token(cfg, kv)
        measured = {d["context"]: d["tokens_per_s"] for d in rt["decode"]}
        out["runtime"][prec] = {"weight_bytes": w, "cache_bytes_per_token": per_tok,
                                "rows": roofline.decode_roofline(w["total"], per_tok, sorted(measured), bandwidth,
                                                                 measured)}
    for dtype, ref in reference.items():
        if not _ok(ref):
            continue
        nbytes = roofline.DTYPE_BYTES[dtype]
        w = roofline.active_weight_bytes(cfg, roofline.reference_plan(dtype), io_bytes=nbytes)
        per_tok = roofline.cache_bytes_per_token(cfg, nbytes)
        measured = {d["context"]: d["tokens_per_s"] for d in ref["decode"]}
        out["reference"][dtype] = {"weight_bytes": w, "cache_bytes_per_token": per_tok,
                                   "rows": roofline.decode_roofline(w["total"], per_tok, sorted(measured), bandwidth,
                                                                    measured)}
    return out


def config_summary(config: dict) -> dict:
    lm, vis = config.get("language_config", {}), config.get("vision_config", {})
    return {"hidden_size": lm.get("hidden_size"), "num_hidden_layers": lm.get("num_hidden_layers"),
            "n_routed_experts": lm.get("n_routed_experts"), "num_experts_per_tok": lm.get("num_experts_per_tok"),
            "vocab_size": lm.get("vocab_size"), "use_mla": lm.get("use_mla", True),
            "vision_width": vis.get("width"), "vision_layers": vis.get("layers")}


def build_document(*, command: str, mode: str, model: dict, config: dict, machine: dict, workload: dict,
                   runtime: dict, reference: dict, skipped: list[str] | None = None) -> dict:
    """Assemble the document from the measurements (the derived sections are computed here)."""
    bandwidth = (machine.get("bandwidth") or {}).get("bytes_per_s")
    doc = {
        "schema_version": SCHEMA_VERSION,
        "generator": "vl2edge.bench",
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "mode": mode,
        "model": {**model, "config": config_summary(config)},
        "machine": machine,
        "workload": workload,
        "runtime": runtime,
        "reference": reference,
        "ratios": compute_ratios(runtime, reference),
        "roofline": compute_roofline(config, runtime, reference, bandwidth),
        "plots": {},
        "errors": [f"{side} {k}: {v['error']}" for side, recs in (("runtime", runtime), ("reference", reference))
                   for k, v in recs.items() if not _ok(v)],
        "skipped": list(skipped or []),
    }
    judged = targets.precision_for(runtime)
    results = targets.evaluate(doc, precision=judged, config=config)
    doc["targets"] = {"applies": targets.applies(config), "model": targets.model_of(config) or "tiny",
                      "precision": judged,
                      "reference": targets.REFERENCE, "results": results,
                      "passed": sum(r["passed"] is True for r in results),
                      "failed": sum(r["passed"] is False for r in results),
                      "unknown": sum(r["passed"] is None for r in results)}
    return doc


# --- the table --------------------------------------------------------------------------------------------------
def _f(x, fmt="{:.2f}", none="-"):
    return none if x is None else fmt.format(x)


def _gb(n):
    """Bytes, human-readable in decimal units (GB = 10^9)."""
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def render_table(doc: dict) -> str:
    m, mach = doc["model"], doc["machine"]
    bw = (mach.get("bandwidth") or {}).get("bytes_per_s")
    bw_samples = [x["bytes_per_s"] / 1e9 for x in (mach.get("bandwidth") or {}).get("samples", [])]
    lines = [
        f"vl2edge bench ({doc['mode']}) - model {m['name']} ({m['config']['num_hidden_layers']} layers"
        f"{', truncated' if m.get('layers') else ''}), {doc['created_utc']}",
        f"machine: {mach.get('cpu_model')}, {mach.get('usable_cores')} cores, provider {mach.get('provider')}, "
        f"{mach.get('threads')} threads, ORT {mach.get('onnxruntime')}, torch {mach.get('torch')}",
        f"read bandwidth {_f(None if bw is None else bw / 1e9)} GB/s (best of {len(bw_samples)} probes: "
        f"{', '.join(f'{x:.1f}' for x in bw_samples)}); load average {mach.get('load_average_start')} -> "
        f"{mach.get('load_average_end')}",
        f"command: {doc['command']}",
        "",
    ]
    cols = [(f"{p}", doc["runtime"][p]) for p in doc["runtime"]] + \
           [(f"ref {d}", doc["reference"][d]) for d in doc["reference"]]
    good = [(n, r) for n, r in cols if _ok(r)]
    rows: list[tuple[str, list[str]]] = []

    def add(label, fn):
        vals = []
        for _, r in good:
            try:
                vals.append(fn(r))
            except (KeyError, TypeError, StopIteration, ZeroDivisionError):
                vals.append("-")
        rows.append((label, vals))

    add("artifact / weights on disk", lambda r: _gb(r.get("artifact_bytes", r.get("weight_bytes"))))
    add("load (s)", lambda r: _f(r["load_s"], "{:.1f}"))
    add("peak RSS", lambda r: _gb(r["memory"]["peak_rss_bytes"]))
    add("RSS after load", lambda r: _gb(r["memory"]["rss_after_load_bytes"]))
    sizes = [tuple(v["size"]) for v in good[0][1]["vision"]] if good else []
    for s in sizes:
        add(f"vision {s[0]}x{s[1]} ms/image (ms/tile)",
            lambda r, s=s: (lambda v: f"{v['ms_per_image']:.0f} ({v['ms_per_tile']:.0f})")(
                next(v for v in r["vision"] if tuple(v["size"]) == s)))
    add("prefill tokens/s", lambda r: _f(r["prefill"]["tokens_per_s"], "{:.1f}"))
    add("TTFT 640x480 + question (s)", lambda r: _f(r["ttft"]["ttft_s"]))
    contexts = sorted({d["context"] for _, r in good for d in r["decode"]})
    for c in contexts:
        add(f"decode @{c} tokens/s (ms/token)",
            lambda r, c=c: (lambda d: f"{d['tokens_per_s']:.2f} ({d['ms_per_token']:.1f})")(
                next(d for d in r["decode"] if d["context"] == c)))
    roof = doc.get("roofline", {})
    if bw and contexts:
        c = contexts[0]

        def roof_cell(r):
            key = ("runtime", r["precision"]) if "precision" in r else ("reference", r["dtype"])
            row = next(x for x in roof[key[0]][key[1]]["rows"] if x["context"] == c)
            return f"{row['best_tokens_per_s']:.1f} / {100 * row['fraction']:.0f}%"

        add(f"roofline @{c}: best tokens/s / reached", roof_cell)
        add("weights read per token", lambda r: _gb(
            (roof["runtime"][r["precision"]] if "precision" in r else roof["reference"][r["dtype"]])
            ["weight_bytes"]["total"]))
    w0 = max([len("")] + [len(lbl) for lbl, _ in rows]) + 2
    widths = [max(len(n), *(len(v[i]) for _, v in rows)) + 2 for i, (n, _) in enumerate(good)]
    lines.append("".ljust(w0) + "".join(n.rjust(wd) for (n, _), wd in zip(good, widths)))
    for label, vals in rows:
        lines.append(label.ljust(w0) + "".join(v.rjust(wd) for v, wd in zip(vals, widths)))

    for prec, per in doc.get("ratios", {}).items():
        for dtype, r in per.items():
            dec = ", ".join(f"@{c} {x:.2f}x" for c, x in r["decode_speedup"].items() if x is not None)
            lines.append(f"{prec} vs ref {dtype}: decode speedup {dec}; prefill {_f(r['prefill_speedup'])}x; TTFT "
                         f"ratio {_f(r['ttft_ratio'])}; peak RSS ratio {_f(r['peak_rss_ratio'])}")
    for prec, rt in doc["runtime"].items():
        if _ok(rt) and rt["decode"]:
            d = rt["decode"][0]
            # records from before fused layers have no "layers"
            st = ", ".join(f"{k} {d['stages_ms'].get(k, 0.0):.1f}" for k in STAGE_ORDER)
            lines.append(f"{prec} decode step @{d['context']} ({d['ms_per_token']:.1f} ms): {st} ms")
    if doc.get("targets"):
        lines += _targets_lines(doc["targets"])
    for e in doc.get("skipped", []):
        lines.append(f"SKIPPED: {e}")
    for e in doc.get("errors", []):
        lines.append(f"ERROR: {e}")
    return "\n".join(lines) + "\n"


def _targets_lines(t: dict) -> list[str]:
    """The targets' table. A target stated for real dims is no verdict on another model (a test preset, a truncated
    one): its figure is shown, marked "info", not PASS or FAIL."""
    small = t.get("model") == "small"
    lines = ["", f"targets of {t.get('model', 'tiny')} ({t['precision']}"
                 f"{'' if small else ' vs reference ' + t['reference']}"
                 f"{'' if t['applies'] else '; stated for real-dims tiny, all layers: not judged on this model'}):"]
    for r in t["results"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[r["passed"]] if t["applies"] else "info"
        val = "-" if r["value"] is None else (f"{r['value'] / 1e9:.2f} GB" if r["unit"] == "bytes" else
                                             f"{r['value']:.2f}")
        thr = f"{r['threshold'] / 1e9:.2f} GB" if r["unit"] == "bytes" else f"{r['threshold']:g}"
        lines.append(f"  [{mark}] {r['description']}: {val} (needs {r['op']} {thr}); {r['detail']}")
    return lines


# --- plots ------------------------------------------------------------------------------------------------------
def write_plots(doc: dict, out_dir: Path) -> dict:
    """decode latency vs context (per precision, reference, and the roofline's best per precision) and the
    per-stage breakdown of a decode step. Returns {"decode_latency": name, "decode_stages": name}; {} without
    matplotlib (the `bench` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    out_dir = Path(out_dir)
    plots = {}
    title = f"{doc['model']['name']} ({doc['model']['config']['num_hidden_layers']} layers), " \
            f"{doc['machine'].get('threads')} threads, {doc['machine'].get('provider')}"

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series = [(p, r, "-o") for p, r in doc["runtime"].items()] + \
             [(f"reference {d}", r, "--s") for d, r in doc["reference"].items()]
    colors, contexts = {}, set()
    for name, rec, style in series:
        if not _ok(rec) or not rec["decode"]:
            continue
        xs = [d["context"] for d in rec["decode"]]
        ys = [d["ms_per_token"] for d in rec["decode"]]
        lo = [max(0.0, d["ms_per_token"] - d["step_s"]["p10"] * 1e3) for d in rec["decode"]]
        hi = [max(0.0, d["step_s"]["p90"] * 1e3 - d["ms_per_token"]) for d in rec["decode"]]
        line = ax.errorbar(xs, ys, yerr=[lo, hi], fmt=style, capsize=3, label=name)
        colors[name] = line[0].get_color()
        contexts.update(xs)
    for prec, roof in doc.get("roofline", {}).get("runtime", {}).items():
        rows = [r for r in roof["rows"] if r["best_tokens_per_s"]]
        if rows:
            ax.plot([r["context"] for r in rows], [1e3 / r["best_tokens_per_s"] for r in rows], ":",
                    color=colors.get(prec, "gray"), label=f"{prec} roofline (best possible)")
    ax.set_xscale("log", base=2)
    if contexts:
        ax.set_xticks(sorted(contexts), [str(c) for c in sorted(contexts)])
        ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode step (ms/token), median, p10-p90")
    ax.set_title(f"decode latency vs context - {title}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / PLOT_DECODE, dpi=110)
    plt.close(fig)
    plots["decode_latency"] = PLOT_DECODE

    bars = [(f"{p}\n@{d['context']}", d["stages_ms"]) for p, r in doc["runtime"].items() if _ok(r)
            for d in r["decode"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(bars) + 2), 4.8))
    bottom = [0.0] * len(bars)
    for stage in STAGE_ORDER:
        vals = [max(0.0, b[1].get(stage, 0.0)) for b in bars]
        ax.bar(range(len(bars)), vals, bottom=bottom, label=stage)
        bottom = [x + y for x, y in zip(bottom, vals)]
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("ms per decode step (mean of timed steps)")
    ax.set_title(f"where a decode step goes - {title}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / PLOT_STAGES, dpi=110)
    plt.close(fig)
    plots["decode_stages"] = PLOT_STAGES
    return plots


def write_outputs(doc: dict, out_dir: str | Path) -> Path:
    """bench.json, bench.txt and the PNGs into out_dir; returns the JSON's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc["plots"] = write_plots(doc, out_dir)
    (out_dir / TABLE_NAME).write_text(render_table(doc))
    path = out_dir / JSON_NAME
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path

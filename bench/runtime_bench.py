"""The ONNX runtime on one exported artifact: the workload of bench/workload.py, measured in THIS process.

Run it in a fresh process (bench/isolated.py does) so that its peak RSS is its own.

What is timed (seconds; summaries from bench/stats.py):
  vision    per image size: Engine.encode_images on the processor's tiles (the graph, in the engine's default
            batches, as the engine runs them), and separately the processor's preprocessing (decode, resize, tile, normalize).
  prefill   Engine.prefill of `prefill_tokens` filler embeddings into an empty cache (chunks of chunk_size).
  ttft      Model.generate(question, [640x480 image], max_new_tokens=1, reuse_cache=False): its own ttft_s
            (request start -> first token: preprocess + vision + embed + prefill + sampling).
  decode    Engine.decode(token) per step at each context (greedy: the next token is the argmax, outside the
            timed call); per-stage seconds from Engine.timings over the timed steps, and python_overhead =
            step wall - the stages' sum (the Python glue between the timed sections: inputs, bindings, loops).
  memory    RSS after load and after each phase, the peak (VmHWM) of the whole run, the KV cache's bytes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from . import memory
from .machine import load_average
from .prepare import precision_name
from .stats import summarize
from .workload import Workload, decode_start, filler_ids, synthetic_image

STAGES = ("attention", "dispatch", "experts", "layers", "head", "embed")


def dir_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _mtime_utc(path: Path) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).isoformat(timespec="seconds")


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


def bench_vision(model, w: Workload, repeats: int, progress: bool, label: str) -> list[dict]:
    eng, proc = model.engine, model.processor
    rows = []
    warm = False
    for size in w.image_sizes:
        image = synthetic_image(*size)
        pre, vis = [], []
        inp = None
        for r in range(repeats + (0 if warm else 1)):
            t0 = time.perf_counter()
            inp = proc("<image>\n" + w.question, images=[image])
            t1 = time.perf_counter()
            eng.encode_images(inp.pixel_values)
            t2 = time.perf_counter()
            if not warm:  # the first call of the run is the warm-up
                warm = True
                continue
            pre.append(t1 - t0)
            vis.append(t2 - t1)
        tiles = int(len(inp.pixel_values))
        grid = [int(x) for x in inp.images_spatial_crop[0]]
        s = summarize(vis)
        rows.append({"size": list(size), "grid": grid, "tiles": tiles, "image_tokens": int(inp.num_image_tokens[0]),
                     "image_s": s, "preprocess_s": summarize(pre), "ms_per_image": s["median"] * 1e3,
                     "ms_per_tile": s["median"] * 1e3 / tiles})
        _log(progress, f"{label}: vision {size[0]}x{size[1]} ({grid[0]}x{grid[1]}, {tiles} tiles): "
                       f"{s['median'] * 1e3 / tiles:.0f} ms/tile, {s['median']:.2f} s/image")
    return rows


def _stage_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in STAGES}


def bench_prefill(model, w: Workload, progress: bool, label: str) -> dict:
    eng, proc = model.engine, model.processor
    ids = filler_ids(proc.encode, w.prefill_tokens)
    times, stages = [], {k: 0.0 for k in STAGES}
    for r in range(w.prefill_repeats + 1):
        eng.reset()
        emb = eng.embed(ids)
        before = eng.timings.as_dict()
        t0 = time.perf_counter()
        eng.prefill(emb, w.chunk_size)
        dt = time.perf_counter() - t0
        if r == 0:
            continue
        times.append(dt)
        for k, v in _stage_delta(before, eng.timings.as_dict()).items():
            stages[k] += v / w.prefill_repeats
    eng.reset()
    s = summarize(times)
    _log(progress, f"{label}: prefill {w.prefill_tokens} tokens: {w.prefill_tokens / s['median']:.1f} tokens/s")
    return {"tokens": w.prefill_tokens, "chunk_size": w.chunk_size, "s": s,
            "tokens_per_s": w.prefill_tokens / s["median"], "stages_s": stages}


def bench_ttft(model, w: Workload, progress: bool, label: str) -> dict:
    image = synthetic_image(*w.ttft_image)
    runs = []
    for _ in range(w.ttft_repeats):
        r = model.generate(w.question, images=[image], max_new_tokens=1, reuse_cache=False)
        runs.append(r)
    model.reset()
    t = [r.timings for r in runs]
    s = summarize(x["ttft_s"] for x in t)
    breakdown = {k: summarize(x[k] for x in t)["median"] for k in ("preprocess_s", "vision_s", "embed_s", "prefill_s")}
    _log(progress, f"{label}: TTFT {w.ttft_image[0]}x{w.ttft_image[1]} + question ({runs[0].prompt_tokens} tokens): "
                   f"{s['median']:.2f} s")
    return {"image": list(w.ttft_image), "question": w.question, "prompt_tokens": runs[0].prompt_tokens,
            "vision_tiles": t[0]["vision_tiles"], "s": s, "ttft_s": s["median"], "breakdown_s": breakdown}


def bench_decode(model, w: Workload, progress: bool, label: str) -> list[dict]:
    """Rounds (decode_repeats of them), each measuring every context from the longest down to the shortest: the
    cache only rewinds (truncate), so a round fills it again up to the longest context first. Why rounds and not
    each context's repeats in a row: this VM's speed drifts by ~8% between minutes, and the 4k-vs-512 target is a
    ratio of two contexts. Measured in blocks minutes apart, one run put the 512 step at 28.4 ms (the artifact's
    usual is 21.5-24.8) and reported the 4k step within 15% of it, against the bytes it reads (1.21x). In rounds,
    a drift falls on every context alike."""
    eng, proc = model.engine, model.processor
    fill = filler_ids(proc.encode, eng.max_len)
    contexts = sorted(set(w.contexts))
    starts = {ctx: decode_start(ctx, eng.max_len, w.decode_warmup, w.decode_steps) for ctx in contexts}
    steps = {ctx: [] for ctx in contexts}
    stages = {ctx: {k: 0.0 for k in STAGES} for ctx in contexts}
    eng.reset()
    for _ in range(w.decode_repeats):
        for ctx in reversed(contexts):
            start = starts[ctx]
            if eng.length > start:
                eng.truncate(start)
            elif eng.length < start:
                eng.prefill(eng.embed(fill[eng.length:start]), w.chunk_size)
            tok = int(fill[start])
            for i in range(w.decode_warmup + w.decode_steps):
                before = eng.timings.as_dict()
                t0 = time.perf_counter()
                logits = eng.decode(tok)
                dt = time.perf_counter() - t0
                if i >= w.decode_warmup:
                    steps[ctx].append(dt)
                    for k, v in _stage_delta(before, eng.timings.as_dict()).items():
                        stages[ctx][k] += v
                tok = int(np.argmax(logits))
    rows = []
    for ctx in contexts:
        n = len(steps[ctx])
        s = summarize(steps[ctx])
        stages_ms = {k: v / n * 1e3 for k, v in stages[ctx].items()}
        stages_ms["python_overhead"] = sum(steps[ctx]) / n * 1e3 - sum(stages_ms.values())
        rows.append({"context": ctx, "start": starts[ctx], "end": starts[ctx] + w.decode_warmup + w.decode_steps,
                     "steps": w.decode_steps, "warmup": w.decode_warmup, "repeats": w.decode_repeats,
                     "step_s": s, "ms_per_token": s["median"] * 1e3, "tokens_per_s": 1.0 / s["median"],
                     "stages_ms": stages_ms})
        _log(progress, f"{label}: decode @{ctx} (from {starts[ctx]}): {s['median'] * 1e3:.1f} ms/token "
                       f"({1 / s['median']:.1f} tokens/s)")
    eng.reset()
    return rows


def bench_runtime(artifact: str | Path, threads: int | None, provider: str | None, workload: Workload,
                  progress: bool = True, transient_vision: bool = False, low_memory: bool = False,
                  expert_cache: str | None = None) -> dict:
    """The whole workload on one artifact. Returns the "runtime" record of the report schema (bench/report.py).
    transient_vision: the engine loads the vision graph per image and releases it after (runtime/engine.py);
    low_memory: `load(low_memory=True)`, and the workload's prefill chunks are the model's (256 on Tiny, 128 on
    Small); expert_cache: `load(expert_cache=...)`, the cache's figures in the record's "expert_cache"."""
    from ..runtime.api import load
    from ..runtime.thread_pool import wanted

    t_start = time.perf_counter()
    load_start = load_average()
    phases = {"start": memory.rss()}
    t0 = time.perf_counter()
    model = load(artifact, provider=provider, threads=threads, verify="size", transient_vision=transient_vision,
                 low_memory=low_memory, expert_cache=expert_cache, shared_threads=wanted(False))
    if low_memory:
        workload = workload.with_(chunk_size=model.chunk_size)
    load_s = time.perf_counter() - t0
    phases["loaded"] = memory.rss()
    m = model.engine.artifact.manifest
    precision = precision_name(m["quantization"])
    label = f"runtime {precision}"
    _log(progress, f"{label}: loaded {artifact} in {load_s:.1f} s, RSS {phases['loaded']['rss'] / 2**30:.2f} GiB")
    out = {
        "precision": precision,
        "artifact": str(artifact),
        "artifact_bytes": dir_bytes(artifact),
        "artifact_created_utc": _mtime_utc(Path(artifact) / "manifest.json"),
        "quantization": m["quantization"],
        "provider": model.provider,
        "threads": threads,
        "thread_pool": model.engine.thread_pool,
        "max_len": model.max_len,
        "ort_intra_op_spinning": model.engine._opts.get_session_config_entry("session.intra_op.allow_spinning") == "1",
        "transient_vision": transient_vision,
        "low_memory": low_memory,
        "cpu_arena": model.engine.arena_policy,  # "kept", "shrunk per prefill chunk" (low_memory) or "none"
        "load_s": load_s,
    }
    loads = {"start": load_start}
    out["vision"] = bench_vision(model, workload, workload.vision_repeats, progress, label)
    phases["after_vision"], loads["after_vision"] = memory.rss(), load_average()
    out["prefill"] = bench_prefill(model, workload, progress, label)
    phases["after_prefill"], loads["after_prefill"] = memory.rss(), load_average()
    out["ttft"] = bench_ttft(model, workload, progress, label)
    phases["after_ttft"], loads["after_ttft"] = memory.rss(), load_average()
    out["decode"] = bench_decode(model, workload, progress, label)
    phases["after_decode"] = memory.rss()
    cache = model.engine.expert_cache
    out["expert_cache"] = None if cache is None else {
        "budget": cache.budget, "capacity": cache.capacity, "prefetch": model.engine.expert_prefetch,
        "read_mode": cache.read_mode, **cache.stats.as_dict()}
    out["memory"] = {"peak_rss_bytes": phases["after_decode"]["peak"],
                     "rss_after_load_bytes": phases["loaded"]["rss"],
                     "kv_cache_bytes": model.engine.cache_nbytes(),
                     "phases": phases}
    out["load_average"] = {**loads, "end": load_average()}
    out["wall_s"] = time.perf_counter() - t_start
    return out

"""Resident memory: this process's RSS from /proc, its peak, and a probe of ONNX Runtime session options.

Peak RSS is only meaningful in a fresh process (a parent that already ran other models keeps their pages), so the
bench measures each precision in its own subprocess (bench/isolated.py) and reads the figures below there.

  rss()           {"rss", "anon", "file", "peak"} in bytes: VmRSS, RssAnon, RssFile, VmHWM of /proc/self/status
  reset_peak()    restart VmHWM from the current RSS (write "5" to /proc/self/clear_refs), for per-phase peaks
  malloc_trim()   give glibc's free heap pages back to the OS; returns whether it ran

RSS counts file pages that are mapped and resident (an mmap'd external-data file) as well as anonymous memory
(copies, prepacked weights, the ORT arena, the KV cache): "anon" and "file" say which.

The probe (`python -m vl2edge.bench.memory ARTIFACT`) opens the runtime's Engine in a fresh subprocess once per
variant (VARIANTS: session options, and two engine-level changes) and records RSS after load, after glibc's
malloc_trim, and after a small workload (one 640x480 image through the vision graph, a --context-token prefill,
16 decode steps), plus the peak and each phase's time:

  python -m vl2edge.bench.memory ~/.cache/vl2edge/bench/artifacts/tiny-seed0-int4-b64 --threads 2
  python -m vl2edge.bench.memory ART --variants default,no_prepack --no-vision --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from ..runtime.engine import malloc_trim

_FIELDS = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "VmHWM": "peak"}


def rss() -> dict[str, int]:
    """This process's resident memory in bytes (Linux; zeros elsewhere)."""
    out = {v: 0 for v in _FIELDS.values()}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in _FIELDS:
                    out[_FIELDS[key]] = int(rest.split()[0]) * 1024
    except OSError:
        import resource

        out["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def reset_peak() -> bool:
    """Restart the peak (VmHWM) from the current RSS. False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --- the session-options probe ------------------------------------------------------------------------------------
# name -> what differs from the Engine's defaults: session config entries ("entries"), SessionOptions attributes
# ("attrs"), and two engine-level options: "vision_batch" (tiles per vision call; the engine's CPU default is 1) and
# "transient_vision" (Engine(transient_vision=True): the vision session exists only while images are encoded, and
# the language model's sessions are created after it; "vision_alone": and released while later images are encoded),
# and "prefill_chunk" (tokens per prefill chunk, default 512).
# Each runs in its own process.
VARIANTS: dict[str, dict] = {
    "default": {},
    "no_prepack": {"entries": {"session.disable_prepacking": "1"}},
    "init_device_allocator": {"entries": {"session.use_device_allocator_for_initializers": "1"}},
    "no_arena": {"attrs": {"enable_cpu_mem_arena": False}},
    "init_device_allocator+no_arena": {"entries": {"session.use_device_allocator_for_initializers": "1"},
                                       "attrs": {"enable_cpu_mem_arena": False}},
    "no_prepack+no_arena": {"entries": {"session.disable_prepacking": "1"}, "attrs": {"enable_cpu_mem_arena": False}},
    "vision_batch4": {"vision_batch": 4},
    "transient_vision": {"transient_vision": True},
    "no_prepack+transient_vision": {"entries": {"session.disable_prepacking": "1"}, "transient_vision": True},
    # load(low_memory=True); prefill_chunk None: the model's low-memory chunk (runtime.api.low_memory_chunk_size)
    "low_memory": {"transient_vision": True, "vision_alone": True, "shrink_arena": True, "prefill_chunk": None},
    # the low-memory mode before commit 8e03ac8 (2026-12-01): no arena, malloc's threshold at 1 MiB (runtime.engine.return_large_blocks)
    "low_memory_no_arena": {"transient_vision": True, "vision_alone": True, "arena": False, "prefill_chunk": None},
}


def _mb(n: int) -> float:
    return round(n / 2**20, 1)


def _probe_child(artifact: str, variant: str, threads: int | None, vision: bool, decode_steps: int,
                 context: int = 1024) -> dict:
    """Runs in the fresh subprocess."""
    import numpy as np

    from ..runtime.api import low_memory_chunk_size
    from ..runtime.engine import Engine
    from ..runtime.processor import Processor
    from .workload import filler_ids, synthetic_image

    v = VARIANTS[variant]
    entries, attrs = v.get("entries", {}), v.get("attrs", {})

    class ProbeEngine(Engine):
        def _session(self, file, *data_of):
            if not getattr(self, "_probe_applied", False):
                for opts in {id(o): o for o in (self._opts, self._vision_opts)}.values():
                    for k, val in entries.items():
                        opts.add_session_config_entry(k, val)
                    for k, val in attrs.items():
                        setattr(opts, k, val)
                self._probe_applied = True
            return super()._session(file, *data_of)

    steps = {"start": rss()}
    t0 = time.perf_counter()
    eng = ProbeEngine(artifact, provider="cpu", threads=threads, verify="size",
                      transient_vision=v.get("transient_vision", False), vision_alone=v.get("vision_alone", False),
                      arena=v.get("arena", True), shrink_arena=v.get("shrink_arena", False))
    load_s = time.perf_counter() - t0
    steps["loaded"] = rss()
    malloc_trim()
    steps["loaded_trimmed"] = rss()
    proc = Processor.from_dir(artifact)
    timings = {"load_s": round(load_s, 2)}
    if vision:
        inp = proc("<image>\nWhat is in the image?", images=[synthetic_image(640, 480)])
        t0 = time.perf_counter()
        eng.encode_images(inp.pixel_values, batch=v.get("vision_batch"))
        timings["vision_s"] = round(time.perf_counter() - t0, 2)
        steps["after_vision"] = rss()
    ids = filler_ids(proc.encode, context)
    t0 = time.perf_counter()
    chunk = v.get("prefill_chunk", 512)
    if chunk is None:
        chunk = low_memory_chunk_size(eng.config.language.num_attention_heads, eng.max_len)
    logits = eng.prefill(eng.embed(ids), chunk)
    timings["prefill_s"] = round(time.perf_counter() - t0, 2)
    steps["after_prefill"] = rss()
    t0 = time.perf_counter()
    for _ in range(decode_steps):
        logits = eng.decode(int(np.argmax(logits)))
    timings["decode_ms"] = round((time.perf_counter() - t0) / max(decode_steps, 1) * 1e3, 1)
    steps["after_decode"] = rss()
    malloc_trim()
    steps["end_trimmed"] = rss()
    return {"variant": variant, "entries": entries, "attrs": {k: str(val) for k, val in attrs.items()},
            "engine": {k: v[k] for k in ("vision_batch", "transient_vision", "vision_alone") if k in v}
            | {"prefill_chunk": chunk},
            "context": context,
            "timings": timings, "cache_mb": _mb(eng.cache_nbytes()),
            "rss_mb": {k: {f: _mb(val) for f, val in r.items()} for k, r in steps.items()}}


def probe(artifact: str, variants: list[str], threads: int | None = 2, vision: bool = True,
          decode_steps: int = 16, context: int = 1024) -> list[dict]:
    """One fresh subprocess per variant; returns their records (an "error" key where one failed)."""
    out = []
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; choose from {sorted(VARIANTS)}")
        cmd = [sys.executable, "-m", "vl2edge.bench.memory", artifact, "--child", v, "--decode-steps",
               str(decode_steps), "--context", str(context)] + (["--threads", str(threads)] if threads else []) + ([] if vision else
                                                                                        ["--no-vision"])
        r = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode or not lines:
            out.append({"variant": v, "error": (r.stderr or r.stdout).strip().splitlines()[-5:]})
        else:
            out.append(json.loads(lines[-1]))
        print(_line(out[-1]), file=sys.stderr, flush=True)
    return out


def _line(rec: dict) -> str:
    if "error" in rec:
        return f"{rec['variant']:32s} ERROR {rec['error']}"
    r = rec["rss_mb"]
    end = r["end_trimmed"]
    t = rec["timings"]
    return (f"{rec['variant']:36s} loaded {r['loaded']['rss']:6.0f} MB (anon {r['loaded']['anon']:5.0f}, file "
            f"{r['loaded']['file']:4.0f})  end {end['rss']:5.0f} MB  peak {end['peak']:5.0f} MB | load "
            f"{t['load_s']} s, vision {t.get('vision_s', '-')} s, prefill {t['prefill_s']} s, decode "
            f"{t['decode_ms']} ms/token")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--context", type=int, default=1024, help="prefill this many tokens before decoding")
    ap.add_argument("--no-vision", action="store_true")
    ap.add_argument("--json", default=None, help="write the records here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_probe_child(a.artifact, a.child, a.threads, not a.no_vision, a.decode_steps, a.context)),
              flush=True)
        return
    recs = probe(a.artifact, a.variants.split(","), a.threads, not a.no_vision, a.decode_steps, a.context)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(recs, f, indent=2)


if __name__ == "__main__":
    main()

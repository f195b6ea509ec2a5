"""Soak of the perception loop: N answered frames of a synthetic camera faster than the model through Model.watch
(latest frame wins), sampling the process's resident memory, threads and open files and each frame's latency.

    python -m vl2edge.bench.watch_soak                       # 1,000 frames on test-tiny (synthesized and exported once)
    python -m vl2edge.bench.watch_soak ART --frames 1000 --out soak.json

Verdicts, counted from the end of a warm-up (the first 100 answered frames: onnxruntime's arenas and Python's
allocator settle there):
  rss_growth_mb       RSS at the end less RSS after the warm-up: < 20 MB
  threads, open files no more at the end than after the warm-up
  latency drift       median frame -> answer of the last 100 frames over that of the 100 after the warm-up: <= 1.3
                      (a median: single slow frames on a shared machine are not drift)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .scene_video import scene_frame

WARMUP = 100
RSS_GROWTH_MB = 20.0
DRIFT = 1.3
PROMPT = "<image>\n<|ref|>the red mug<|/ref|>."


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def threads() -> int:
    return len(os.listdir("/proc/self/task"))  # every native thread, onnxruntime's and FFmpeg's too


def camera(fps: float, width: int, height: int, period: int = 40):
    """Endless frames at `fps`: the scene's 40 distinct frames, each a fresh array as a driver would hand over."""
    frames = [scene_frame(k, width, height, period) for k in range(period)]
    t0 = time.perf_counter()
    k = 0
    while True:
        delay = t0 + k / fps - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield frames[k % period].copy()
        k += 1


def soak(model, frames: int = 1000, fps: float = 100.0, width: int = 64, height: int = 48,
         max_new_tokens: int = 3, sample_every: int = 50, progress: bool = False) -> dict:
    """Run the soak on a loaded Model; returns the document (samples, latencies, verdicts)."""
    if frames <= WARMUP + 100:
        raise ValueError(f"--frames must be > {WARMUP + 100} (the warm-up and a window of 100 after it)")
    samples, latency, compute = [], [], []
    t0 = time.perf_counter()
    with model.watch(camera(fps, width, height), PROMPT, max_frames=frames, max_new_tokens=max_new_tokens) as w:
        for n, a in enumerate(w, 1):
            latency.append(a.frame_to_answer_s)
            compute.append(sum(v for k, v in a.stages.items() if k not in ("read_s", "wait_s")))
            del a  # nothing of an answer is kept but its numbers
            if n % sample_every == 0 or n == WARMUP:
                samples.append({"frame": n, "rss_mb": rss_bytes() / 2**20, "threads": threads(),
                                "python_threads": threading.active_count(), "open_files": open_files(),
                                "t_s": time.perf_counter() - t0})
                if progress:
                    s = samples[-1]
                    print(f"frame {n}: RSS {s['rss_mb']:.1f} MB, {s['threads']} threads, {s['open_files']} files, "
                          f"median answer {np.median(latency[-sample_every:]) * 1e3:.1f} ms", file=sys.stderr)
        summary = w.summary()
    after = time.perf_counter()
    base = next(s for s in samples if s["frame"] == WARMUP)
    end = samples[-1]
    first = float(np.median(latency[WARMUP:WARMUP + 100]))
    last = float(np.median(latency[-100:]))
    doc = {
        "frames": frames, "fps": fps, "frame_size": [width, height], "max_new_tokens": max_new_tokens,
        "wall_s": after - t0, "samples": samples,
        "summary": {k: v for k, v in summary.items() if k != "type"},
        "latency_ms": {"median_after_warmup": first * 1e3, "median_last_100": last * 1e3,
                       "p90_all": float(np.percentile(latency, 90)) * 1e3,
                       "compute_median_after_warmup": float(np.median(compute[WARMUP:WARMUP + 100])) * 1e3,
                       "compute_median_last_100": float(np.median(compute[-100:])) * 1e3},
    }
    checks = [
        ("rss_growth_mb", end["rss_mb"] - base["rss_mb"], "<", RSS_GROWTH_MB),
        ("threads_growth", end["threads"] - base["threads"], "<=", 0),
        ("open_files_growth", end["open_files"] - base["open_files"], "<=", 0),
        ("latency_drift", last / first, "<=", DRIFT),
    ]
    doc["checks"] = [{"check": name, "value": v, "relation": rel, "bar": bar,
                      "ok": v < bar if rel == "<" else v <= bar} for name, v, rel, bar in checks]
    doc["ok"] = all(c["ok"] for c in doc["checks"])
    return doc


def table(doc: dict) -> str:
    s = doc["summary"]
    lines = [f"watch soak: {doc['frames']} answered frames of a {doc['fps']:g} fps synthetic camera "
             f"({doc['frame_size'][0]}x{doc['frame_size'][1]}) in {doc['wall_s']:.1f} s; "
             f"{s['frames_read']} read, {s['frames_dropped']} dropped; end: {s['end_reason']}",
             f"frame -> answer median {doc['latency_ms']['median_after_warmup']:.1f} ms after the warm-up, "
             f"{doc['latency_ms']['median_last_100']:.1f} ms over the last 100"]
    lines += [f"  {'ok  ' if c['ok'] else 'FAIL'} {c['check']}: {c['value']:.3g} (needs {c['relation']} {c['bar']})"
              for c in doc["checks"]]
    return "\n".join(lines)


def _default_artifact() -> Path:
    """test-tiny, synthesized and exported once into $VL2EDGE_CACHE (as `vl2edge demo` does)."""
    cache = Path(os.environ.get("VL2EDGE_CACHE", Path.home() / ".cache" / "vl2edge"))
    ckpt = cache / "checkpoints" / "test-tiny-seed0"
    art = cache / "artifacts" / "test-tiny-seed0-int4-b32"
    if not (art / "manifest.json").is_file():
        from ..export.exporter import export
        from ..model.synth import synthesize

        if not (ckpt / "config.json").is_file():
            synthesize(ckpt, "test-tiny", seed=0, force=True, progress=False)
        export(ckpt, art, experts="int4", block_size=32, force=True, progress=False)
    return art


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vl2edge.bench.watch_soak", description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", nargs="?", default=None, help="exported artifact (default: test-tiny, made once)")
    p.add_argument("--frames", type=int, default=1000, help="answered frames (default 1000)")
    p.add_argument("--fps", type=float, default=100.0, help="the synthetic camera's rate (default 100)")
    p.add_argument("--size", default="64x48", help="frame WIDTHxHEIGHT (default 64x48: one tile)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the JSON document here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    from ..runtime.api import load

    w, h = (int(v) for v in args.size.lower().split("x"))
    model = load(args.artifact or _default_artifact(), threads=args.threads)
    doc = soak(model, frames=args.frames, fps=args.fps, width=w, height=h, progress=not args.quiet)
    doc["artifact"] = str(model.artifact_dir)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))
    print(table(doc))
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""One intra-op thread pool for the whole process instead of one per session.

An engine is 3 + 2 x layers sessions run one after another (3 + layers with fused layers, export/fused_layer.py),
~85 parallel kernels per decode step on real-dims Tiny. With a pool per session every kernel wakes a different
sleeping thread; with onnxruntime's global pool (ort.set_global_thread_pool_sizes +
SessionOptions.use_per_session_threads = False) the same worker serves every session and its brief spin between
kernels finds the next one. Real-dims Tiny int4, 2 threads, 2026-12-03,
processes alternated, three decode runs of 64 tokens each, tokens/s: per-session pools 59.2 / 58.1 / 56.9, 57.7 /
53.5 / 54.5, 55.4 / 50.5 / 52.6; the global pool 57.6 / 67.4 / 63.5, 61.3 / 70.1 / 68.7, 54.7 / 63.8 / 61.1
(round by round 1.09-1.21x). docs/benchmarks.md has the same-run comparison with llama.cpp.

The global pool spins briefly between kernels (onnxruntime's default for it; Python cannot change it) but it is ONE
worker thread per extra core, where spinning per-session pools are 25 (engine.py: 782 ms/token with them). An engine
with the expert cache keeps per-session pools: there the spinning worker takes the core the cache's loader threads
need (engine.py has the figures).

onnxruntime fixes the global pool's size at its first use, and once it exists it refuses every session that asks
for its own pool. So a library does not make it behind its caller's back: `vl2edge run`, `vl2edge serve`, the
bench's runtime processes and `bench.peer` (processes the runtime owns) ask for it, an API caller opts in
(load(shared_threads=True)), and every session the runtime makes gets its threads through `apply_threads`, which
joins the shared pool wherever this process has one. VL2EDGE_SHARED_THREADS=0 keeps per-session pools in those
commands (=1 asks for the shared pool where they would not). The first caller's thread count wins; an engine that
asked for another warns, and Engine.thread_pool says which pool its sessions got.
"""

from __future__ import annotations

import os
import threading

import onnxruntime as ort

ENV = "VL2EDGE_SHARED_THREADS"

_lock = threading.Lock()
_size: int | None = None  # the shared pool's threads once this process made it (0: onnxruntime's default)


def wanted(default: bool) -> bool:
    """Whether a command asks for the shared pool: VL2EDGE_SHARED_THREADS ("0" / "1") if set, else `default`."""
    value = os.environ.get(ENV, "").strip()
    if value in ("", "0", "1"):
        return default if not value else value == "1"
    raise ValueError(f"{ENV}={value!r}: use 0 (per-session pools) or 1 (one shared pool)")


def share_threads(threads: int | None) -> int:
    """Make the process-wide pool with `threads` intra-op threads (None: onnxruntime's default, one per core) unless
    this process has made it already. Returns its size (0: the default)."""
    global _size
    with _lock:
        if _size is None:
            ort.set_global_thread_pool_sizes(int(threads or 0), 1)
            _size = int(threads or 0)
        return _size


def pool_size() -> int | None:
    """The shared pool's size if this process made it, else None."""
    return _size


def describe_threads(threads: int | None) -> str:
    """Which pool a session asking for `threads` gets in this process, in words."""
    if _size is not None:
        return f"shared ({_size or 'default'} threads)"
    return f"per session ({threads or 'default'} threads)"


def apply_threads(opts: ort.SessionOptions, threads: int | None) -> str:
    """Give a session's options their threads: the shared pool where this process has one (onnxruntime then
    refuses a session's own pool), else a pool of `threads` of its own. Returns describe_threads."""
    if _size is not None:
        opts.use_per_session_threads = False
    elif threads:
        opts.intra_op_num_threads = threads
    return describe_threads(threads)

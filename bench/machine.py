"""The machine a run was taken on: CPU, cores, memory, library versions, provider, threads, load, and its measured
memory read bandwidth (the roofline's ceiling).

Bandwidth: a streaming read of a float32 array much larger than the last-level cache (default 1 GiB; this
machine's VM reports a 300 MiB L3), reduced by numpy's `np.maximum.reduce` (SIMD, memory-bound: 11.8 GB/s here
where `np.add.reduce`'s pairwise summation is compute-bound at 5.8 GB/s; it releases the GIL): once with one thread
and once split over `threads` Python threads, each the best of `repeats` passes after one untimed pass. Best-of, not median: the ceiling is what the hardware can do when nobody else is using
it; the load average recorded beside each sample says how busy the machine was.

A second ceiling is onnxruntime's own: `measure_gemv_bandwidth` times one MatMulNBits GEMV over a weight much larger
than the cache (8-bit, accuracy level 4, as the decode step's int8 projections and head run), so a decode step's
effective rate can be compared with what the kernel it mostly runs streams at the same threads.
"""

from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD features that matter to the kernels (avx2, avx512*, amx*, vnni)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(x for x in flags if x.startswith(("avx", "amx", "fma")) or "vnni" in x)
    except OSError:
        pass
    return []


def _meminfo_bytes(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_total_bytes() -> int | None:
    return _meminfo_bytes("MemTotal")


def memory_available_bytes() -> int | None:
    """What the kernel says a new process can use without swapping (MemAvailable)."""
    return _meminfo_bytes("MemAvailable")


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _read(chunks: list[np.ndarray], pool: ThreadPoolExecutor | None) -> None:
    if pool is None:
        for c in chunks:
            np.maximum.reduce(c)
    else:
        list(pool.map(np.maximum.reduce, chunks))


def measure_bandwidth(threads: int = 1, size_mb: int = 1024, repeats: int = 5, single_thread: bool = True) -> dict:
    """Best read bandwidth in bytes/s with 1 thread (unless single_thread=False) and with `threads` threads (and the
    load average then)."""
    n = size_mb * 2**20 // 4
    a = np.ones(n, np.float32)  # written once: every page is resident before timing
    out = {"array_bytes": a.nbytes, "repeats": repeats}
    for k in sorted({max(1, threads)} | ({1} if single_thread else set())):
        chunks = np.array_split(a, k)
        pool = ThreadPoolExecutor(k) if k > 1 else None
        try:
            _read(chunks, pool)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                _read(chunks, pool)
                best = min(best, time.perf_counter() - t0)
        finally:
            if pool is not None:
                pool.shutdown()
        out[f"threads_{k}_bytes_per_s"] = a.nbytes / best
    out["bytes_per_s"] = max(v for k, v in out.items() if k.endswith("_bytes_per_s"))
    out["load_average"] = load_average()
    del a
    return out


def measure_gemv_bandwidth(threads: int = 1, bits: int = 8, k: int = 2048, block_size: int = 64,
                           size_mb: int = 256, repeats: int = 7) -> dict:
    """Best rate (bytes/s of codes + scales) of one com.microsoft MatMulNBits x[1, k] @ W[k, n]^T, W sized to
    `size_mb`. The weights are random codes: a GEMV's speed does not depend on their values."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    blob, blocks = block_size * bits // 8, -(-k // block_size)
    n = size_mb * 2**20 // (blocks * blob)
    codes = np.random.default_rng(0).integers(0, 256, (n, blocks, blob), dtype=np.uint8)
    scales = np.full((n, blocks), 0.01, np.float32)
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block_size, accuracy_level=4)
    graph = helper.make_graph([node], "gemv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(codes, "w"), numpy_helper.from_array(scales, "s")])
    model = helper.make_model(graph, ir_version=10,  # onnxruntime 1.31 refuses IR 14
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    from ..runtime.thread_pool import apply_threads

    opts = ort.SessionOptions()
    apply_threads(opts, threads)  # as the Engine's sessions get theirs (the process's shared pool where it has one)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del model, graph
    x = np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)
    session.run(None, {"x": x})
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, {"x": x})
        best = min(best, time.perf_counter() - t0)
    return {"bytes_per_s": (codes.nbytes + scales.nbytes) / best, "weight_bytes": codes.nbytes + scales.nbytes,
            "bits": bits, "k": k, "n": n, "block_size": block_size, "threads": threads, "repeats": repeats,
            "load_average": load_average()}


def bandwidth_summary(samples: list[dict]) -> dict:
    """Several probes taken through a run (the machine's load changes): the best is the roofline's ceiling (what the
    hardware gives when nobody else is using it); every sample is kept with its load average."""
    best = max(samples, key=lambda s: s["bytes_per_s"])
    return {**{k: v for k, v in best.items() if k != "load_average"}, "samples": samples}


def machine_info(threads: int | None, provider: str = "cpu", bandwidth: bool = True, size_mb: int = 1024) -> dict:
    import onnxruntime as ort

    info = {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": memory_total_bytes(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "ort_providers_available": ort.get_available_providers(),
        "provider": provider,
        "threads": threads,
        "load_average_start": load_average(),
    }
    try:  # the version without importing it
        from importlib.metadata import version

        info["torch"] = version("torch")
    except Exception:
        info["torch"] = None
    if bandwidth:
        info["bandwidth"] = bandwidth_summary([measure_bandwidth(threads or 1, size_mb=size_mb)])
    return info

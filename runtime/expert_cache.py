"""Routed experts streamed from the artifact through a pool of prepacked expert sessions with a byte budget.

A MoE layer's routed experts are most of DeepSeek-VL2's weights (Small: 64 x 26 of them, 6 per token and layer),
and QMoE prepacks every one of them at session load. With `expert_cache=BYTES` the engine never loads the MoE
graphs: each MoE layer runs its "shared" graph (hidden + shared experts, export/expert_cache.py) and then the
experts the runtime chose, each as its own single-expert QMoE session made from the artifact's template with that
expert's four slices handed over as external initializers (ONNX Runtime prepacks them as it does the full layer's).
A session stays in a least-recently-used pool while the pool's resident cost fits the budget; a miss reads the
expert's bytes (four reads from layerNN_moe.onnx.data with O_DIRECT, around the page cache, so it holds no second
copy for a memory cgroup to count; where a filesystem refuses O_DIRECT, pread then POSIX_FADV_DONTNEED on the
ranges) and makes its session.

Why sessions per expert (one real-dims Small MoE layer, int4 block 128, 2 threads, 2026-12-03; docs/design.md):
  QMoE over the 64 experts, prepacked               decode 0.94-1.05 ms per token, session 715 ms to make
  QMoE over 8 slots whose weights are graph inputs  18.7 ms (no prepacking: dequantize + SGEMM every call)
  QMoE with prepacking disabled (mapped weights)    44 ms, and it reads the whole layer
  six single-expert sessions, prepacked             1.29 ms per token (0.09 ms per expert), 2.3-4.2 ms to make one
The output is the same arithmetic as the layer's QMoE, expert by expert (max relative difference 1.4e-7 there, the
summation order); whether an expert is resident never changes which experts run or how: a budget only moves where
the weights live, so tokens are identical across budgets.

Budget: what one cached expert costs resident is ONNX Runtime's prepacked copy (MLAS's layout, with a block sum
per block), its block scales (kept) and the session: RESIDENT_FACTOR x the expert's stored bytes, measured on
real-dims Tiny (docs/design.md). Each expert session has its own intra-op pool, which
sleeps between runs (no spinning).
"""

from __future__ import annotations

import mmap
import os
import re
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

RESIDENT_FACTOR = 1.7  # resident bytes per cached expert / its stored bytes: 1.66 measured on real-dims Tiny
READERS = 8  # concurrent expert reads
_ALIGN = 4096  # O_DIRECT: offsets, lengths and buffers on this boundary
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*$")
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


class ExpertCacheError(ValueError):
    """An expert-cache request this artifact or this budget cannot serve."""


def parse_size(text: str | int) -> int:
    """'3G', '512M', '1.5GiB', 1000000 -> bytes (binary units: 3G = 3 * 2**30, as `free -g` and cgroups count)."""
    if isinstance(text, int):
        size = text
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise ExpertCacheError(f"expert cache size {text!r}: give bytes with an optional K/M/G/T suffix, "
                                   f"e.g. 3G or 512M")
        size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise ExpertCacheError(f"expert cache size {text!r} must be positive")
    return size


def memory_limit_bytes() -> int | None:
    """The memory this process may use: its cgroup's limit (v2 or v1) when there is one, else MemAvailable."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            try:  # cgroup v1: the group this process is in, when it is not the root
                for line in open("/proc/self/cgroup"):
                    parts = line.strip().split(":")
                    if len(parts) == 3 and "memory" in parts[1].split(",") and parts[2] != "/":
                        own = f"/sys/fs/cgroup/memory{parts[2]}/memory.limit_in_bytes"
                        text = open(own).read().strip()
            except OSError:
                pass
            return int(text)
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class ExpertCacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_read: int = 0
    load_s: float = 0.0

    def as_dict(self) -> dict:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / total if total else None,
                "evictions": self.evictions, "bytes_read": self.bytes_read, "load_s": round(self.load_s, 3)}


class ExpertCache:
    """The pool of expert sessions of one engine. `run(layer, x, idx, weights)` computes the routed experts' sum for
    tokens x [T, H] (idx, weights [T, k] from the runtime's dispatch)."""

    def __init__(self, artifact, budget: int, threads: int | None, io_dtype, providers=("CPUExecutionProvider",)):
        routed = artifact.manifest["graphs"].get("routed_experts")
        if routed is None:
            raise ExpertCacheError(
                f"{artifact.dir} has no expert-cache index (graphs.routed_experts): CPU artifacts with int4/int8 "
                f"experts carry it when exported by a vl2edge that writes it (this one); export the checkpoint "
                f"again, or run without --expert-cache")
        self.artifact = artifact
        self.template = artifact.path(routed["template"]["file"]).read_bytes()
        self.layers = {int(k): v for k, v in routed["layers"].items()}
        self.expert_bytes = int(routed["expert_bytes"])
        self.resident_cost = int(self.expert_bytes * RESIDENT_FACTOR)
        self.budget = int(budget)
        if self.budget < self.resident_cost * _top_k(artifact):
            raise ExpertCacheError(
                f"expert cache of {self.budget / 2**20:.0f} MiB holds fewer experts than one token uses in a layer "
                f"({_top_k(artifact)} x {self.resident_cost / 2**20:.1f} MiB); give at least "
                f"{self.resident_cost * _top_k(artifact) / 2**20:.0f}M")
        self.io_dtype = np.dtype(io_dtype)
        self.providers = list(providers)
        self.threads = threads
        self.slots: OrderedDict[tuple[int, int], tuple[ort.InferenceSession, list[np.ndarray]]] = OrderedDict()
        self.stats = ExpertCacheStats()
        self._fds: dict[str, tuple[int, bool]] = {}  # data file -> (descriptor, O_DIRECT)
        self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="vl2edge-expert-read")
        self.read_mode = "O_DIRECT" if hasattr(os, "O_DIRECT") else "pread + POSIX_FADV_DONTNEED"

    @property
    def capacity(self) -> int:
        """How many experts the budget holds."""
        return self.budget // self.resident_cost

    def resident_bytes(self) -> int:
        return len(self.slots) * self.resident_cost

    def close(self) -> None:
        self._readers.shutdown()
        self.slots.clear()
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # --- one expert ---------------------------------------------------------------------------------------------
    def _open(self, name: str) -> tuple[int, bool]:
        """The data file's descriptor, opened with O_DIRECT where the filesystem allows it (reads then bypass the
        page cache: no second copy for a memory cgroup to count, no reclaim to pay for it)."""
        got = self._fds.get(name)
        if got is None:
            path = self.artifact.path(name)
            direct = getattr(os, "O_DIRECT", 0)
            try:
                got = (os.open(path, os.O_RDONLY | direct), bool(direct))
            except OSError:  # tmpfs and some others refuse O_DIRECT
                got = (os.open(path, os.O_RDONLY), False)
                self.read_mode = "pread + POSIX_FADV_DONTNEED (O_DIRECT refused)"
            self._fds[name] = got
        return got

    def _pread(self, name: str, at: int, n: int) -> np.ndarray:
        fd, direct = self._open(name)
        if direct:
            start, end = at - at % _ALIGN, -(-(at + n) // _ALIGN) * _ALIGN
            buf = mmap.mmap(-1, end - start)  # page-aligned, as O_DIRECT wants
            try:
                got = os.preadv(fd, [buf], start)
            except OSError:  # the filesystem took the flag at open and refuses the read: buffered from now on
                os.close(fd)
                self._fds[name] = (os.open(self.artifact.path(name), os.O_RDONLY), False)
                self.read_mode = "pread + POSIX_FADV_DONTNEED (O_DIRECT refused)"
                return self._pread(name, at, n)
            if got < at - start + n:
                raise ExpertCacheError(f"{name}: {n} bytes at {at} are cut short: the artifact is damaged")
            return np.frombuffer(buf, np.uint8, count=n, offset=at - start)
        buf = np.empty(n, np.uint8)
        if os.preadv(fd, [buf], at) != n:
            raise ExpertCacheError(f"{name}: {n} bytes at {at} are cut short: the artifact is damaged")
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, at, n, os.POSIX_FADV_DONTNEED)
        return buf

    def _read(self, layer: int, expert: int) -> list[np.ndarray]:
        entry = self.layers[layer]
        arrays = []
        for t in entry["tensors"].values():
            shape, dtype = [1, *t["shape"][1:]], np.dtype(t["dtype"])
            n = int(np.prod(shape)) * dtype.itemsize
            arrays.append(self._pread(entry["data"], t["offset"] + expert * n, n).view(dtype).reshape(shape))
        return arrays

    def _load(self, layer: int, expert: int, arrays: list[np.ndarray] | None = None):
        t0 = time.perf_counter()
        arrays = arrays if arrays is not None else self._read(layer, expert)
        self.stats.bytes_read += self.expert_bytes
        opts = ort.SessionOptions()
        if self.threads:  # 2 threads against 1 on real-dims Tiny: prefill 153 vs 119 tok/s, decode the same
            opts.intra_op_num_threads = self.threads
        # one QMoE node: nothing to optimize, and a miss is mostly session creation (~1.4 of ~2.7 ms per miss)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # no arena: a session's arena would keep the high-water mark of its largest run (a prompt's tokens through
        # one expert) for as long as the session is cached; real-dims Tiny, a 3,988-token prompt with every expert
        # cached: peak RSS 13.1 GB with the default arena
        opts.enable_cpu_mem_arena = False
        # its own pool, asleep between runs: ONNX Runtime's global pool would force every session of the process
        # onto it (use_per_session_threads must then be false everywhere), the engine's and other engines' too
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        names = list(self.layers[layer]["tensors"])
        opts.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
        session = ort.InferenceSession(self.template, opts, providers=self.providers)
        self.stats.load_s += time.perf_counter() - t0
        # QMoE copies the 4-bit/8-bit weights into MLAS's packed layout at load and never reads ours again (freed
        # and overwritten, 16 real-dims Tiny experts computed the same); the block scales, a tenth of the bytes,
        # are kept in case a kernel reads them in place
        return session, [a for name, a in zip(names, arrays) if "scales" in name]

    def session(self, layer: int, expert: int, arrays: list[np.ndarray] | None = None) -> ort.InferenceSession:
        key = (layer, expert)
        slot = self.slots.get(key)
        if slot is not None:
            self.slots.move_to_end(key)
            self.stats.hits += 1
            return slot[0]
        self.stats.misses += 1
        while self.slots and self.resident_bytes() + self.resident_cost > self.budget:
            self.slots.popitem(last=False)
            self.stats.evictions += 1
        slot = self._load(layer, expert, arrays)
        self.slots[key] = slot
        return slot[0]

    # --- a layer's routed experts -------------------------------------------------------------------------------
    def run(self, layer: int, x: np.ndarray, idx: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """sum_k weights[t, k] * expert_{idx[t, k]}(x[t]) for every token t: x [T, H] -> [T, H] (io dtype).

        Experts run in ascending id, each over the tokens that chose it: a prefill chunk reads each of its
        experts once, and the experts the token needs are resident while it runs."""
        x = np.ascontiguousarray(x, dtype=self.io_dtype)
        y = np.zeros_like(x)
        experts = np.unique(idx)
        missing = [int(e) for e in experts if (layer, int(e)) not in self.slots]
        batches = {batch[0]: batch for batch in (missing[i:i + READERS] for i in range(0, len(missing), READERS))}
        read: dict[int, list[np.ndarray]] = {}
        for expert in experts:
            batch = batches.get(int(expert))
            if batch and len(batch) > 1:  # READERS misses read at once: the disk's queue depth sets the rate
                t0 = time.perf_counter()
                read.update(zip(batch, self._readers.map(lambda e: self._read(layer, e), batch)))
                self.stats.load_s += time.perf_counter() - t0
            rows, cols = np.nonzero(idx == expert)
            w = weights[rows, cols].astype(self.io_dtype).reshape(-1, 1)
            session = self.session(layer, int(expert), read.pop(int(expert), None))
            out = session.run(None, {"x": x[rows], "router_probs": np.ones_like(w), "router_weights": w})[0]
            y[rows] += out  # a token chooses an expert at most once: rows are distinct
        return y


def _top_k(artifact) -> int:
    lang = artifact.manifest["source"]["config"].get("language_config", {})
    return int(lang.get("num_experts_per_tok") or 1)

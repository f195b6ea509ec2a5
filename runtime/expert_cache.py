"""Routed experts streamed from the artifact through a pool of prepacked expert sessions with a byte budget.

A MoE layer's routed experts are most of DeepSeek-VL2's weights (Small: 64 x 26 of them, 6 per token and layer),
and QMoE prepacks every one of them at session load. With `expert_cache=BYTES` the engine never loads the MoE
graphs: each MoE layer runs its "shared" graph (hidden + shared experts, export/expert_cache.py) and then the
experts the runtime chose, each as its own single-expert QMoE session made from the artifact's template with that
expert's four slices handed over as external initializers (ONNX Runtime prepacks them as it does the full layer's).
A session stays in a least-recently-used pool while the pool's resident cost fits the budget; a miss reads the
expert's bytes (four reads from layerNN_moe.onnx.data with O_DIRECT, around the page cache, so it holds no second
copy for a memory cgroup to count; where a filesystem refuses O_DIRECT, pread then POSIX_FADV_DONTNEED on the
ranges) and makes its session, on one of LOADERS threads: a layer's misses load side by side (one's read beside
another's prepacking), starting AHEAD experts before they run, while the resident ones run.

Prefetch (decode): while layer L runs, the engine applies layer L+1's router (its RMSNorm weight and gate, read from
expert_routers.safetensors, written beside the index) to L's residual stream and hands the prediction to
`prefetch`, whose loads start once L's own have; L+1 then finds them resident or in flight. The prediction only
decides what is loaded early, never what runs.

Why sessions per expert (one real-dims Small MoE layer, int4 block 128, 2 threads, 2026-12-03; docs/design.md):
  QMoE over the 64 experts, prepacked               decode 0.94-1.05 ms per token, session 715 ms to make
  QMoE over 8 slots whose weights are graph inputs  18.7 ms (no prepacking: dequantize + SGEMM every call)
  QMoE with prepacking disabled (mapped weights)    44 ms, and it reads the whole layer
  six single-expert sessions, prepacked             1.29 ms per token (0.09 ms per expert), 2.3-4.2 ms to make one
The output is the same arithmetic as the layer's QMoE, expert by expert (max relative difference 1.4e-7 there, the
summation order); whether an expert is resident never changes which experts run or how: a budget only moves where
the weights live, so tokens are identical across budgets.

Budget: what one cached expert costs resident is ONNX Runtime's prepacked copy (MLAS's layout, with a block sum
per block), the block scales and the session: RESIDENT_FACTOR x the expert's stored bytes, with malloc
returning large freed blocks (MMAP_THRESHOLD); loads in flight count as resident. Each expert session has its own
intra-op pool, which sleeps between runs (no spinning).
"""

from __future__ import annotations

import mmap
import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file

from .thread_pool import apply_threads

# resident bytes per cached expert / its stored bytes, with malloc's mmap threshold at MMAP_THRESHOLD: 1.13 measured
# at Small's expert shapes, 1.18 at Tiny's (a session's prepacked weights, its kept scales, the session)
RESIDENT_FACTOR = 1.2
# malloc maps blocks of this size or more and unmaps them when freed (engine.return_large_blocks): ONNX Runtime copies
# an expert's four tensors at session load and frees the copy once it has prepacked them; at glibc's default
# (dynamic) threshold those freed blocks stay in the heap, between live ones, and a cached expert cost 1.62-1.64x
# its bytes instead of 1.13-1.18x (both shapes, 60 sessions)
MMAP_THRESHOLD = 256 << 10
LOADERS = 4  # expert loads in flight at once: a read (I/O) and a session (CPU; ONNX Runtime releases the GIL)
AHEAD = 8  # a layer's loads start this many experts ahead of the one being run
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


def memory_limit_bytes(proc: str = "/proc", cgroup_fs: str = "/sys/fs/cgroup") -> int | None:
    """The memory this process may use: the smallest of its memory cgroup's limit (v2 `memory.max` or v1
    `memory.limit_in_bytes` of the group /proc/self/cgroup names, and of the hierarchy's root) and MemAvailable."""
    files = [f"{cgroup_fs}/memory.max", f"{cgroup_fs}/memory/memory.limit_in_bytes"]
    try:
        for line in open(f"{proc}/self/cgroup"):
            number, controllers, path = (line.rstrip("\n").split(":", 2) + ["", ""])[:3]
            if number == "0" and not controllers:  # v2: one unified hierarchy
                files.append(f"{cgroup_fs}{path.rstrip('/')}/memory.max")
            elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
                files.append(f"{cgroup_fs}/memory{path.rstrip('/')}/memory.limit_in_bytes")
    except OSError:
        pass
    limits = []
    for path in files:
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max" (v2) and v1's near-2^63 mean no limit
            limits.append(int(text))
    try:
        for line in open(f"{proc}/meminfo"):
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    return min(limits) if limits else None


@dataclass
class ExpertCacheStats:
    hits: int = 0  # experts resident when their layer ran
    prefetch_hits: int = 0  # experts a prediction had started loading (resident or still in flight)
    misses: int = 0  # experts loaded on demand
    evictions: int = 0
    prefetched: int = 0  # loads a prediction started
    predicted: int = 0  # decode expert uses at layers with a prediction, and how many the prediction named
    predicted_right: int = 0
    bytes_read: int = 0
    load_s: float = 0.0  # reads and sessions, summed over the loaders
    wait_s: float = 0.0  # the engine waiting for loads: what the misses cost the step

    def as_dict(self) -> dict:
        total = self.hits + self.prefetch_hits + self.misses
        rate = lambda n, d: n / d if d else None  # noqa: E731
        return {"hits": self.hits, "prefetch_hits": self.prefetch_hits, "misses": self.misses,
                "hit_rate": rate(self.hits, total), "prefetch_hit_rate": rate(self.prefetch_hits, total),
                "evictions": self.evictions, "prefetched": self.prefetched,
                "prediction_rate": rate(self.predicted_right, self.predicted), "bytes_read": self.bytes_read,
                "load_s": round(self.load_s, 3), "wait_s": round(self.wait_s, 3)}


class ExpertCache:
    """The pool of expert sessions of one engine. `run(layer, x, idx, weights)` computes the routed experts' sum for
    tokens x [T, H] (idx, weights [T, k] from the runtime's dispatch); `prefetch(layer, experts)` starts loading
    what a prediction says a later layer will use; `router(layer)` is that layer's router, for the prediction.

    Loads run on LOADERS threads (a read, then a session), so a layer's misses overlap each other and the experts
    already resident run meanwhile. Only the engine's thread touches the pool: a load hands back its session and the
    engine's thread files it."""

    def __init__(self, artifact, budget: int, threads: int | None, io_dtype, providers=("CPUExecutionProvider",)):
        routed = artifact.manifest["graphs"].get("routed_experts")
        if routed is None:
            raise ExpertCacheError(
                f"{artifact.dir} has no expert-cache index (graphs.routed_experts): CPU artifacts with int4/int8 "
                f"experts carry it when exported by a vl2edge that writes it (this one); export the checkpoint "
                f"again, or run without --expert-cache")
        self.artifact, self.routed = artifact, routed
        self.template = artifact.path(routed["template"]["file"]).read_bytes()
        self.layers = {int(k): v for k, v in routed["layers"].items()}
        # every layer's four tensors have the same shapes: (name, one expert's shape, dtype, bytes)
        self._pieces = [(name, [1, *t["shape"][1:]], np.dtype(t["dtype"]),
                         int(np.prod(t["shape"][1:])) * np.dtype(t["dtype"]).itemsize)
                        for name, t in next(iter(self.layers.values()))["tensors"].items()]
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
        self.slots: OrderedDict[tuple[int, int], ort.InferenceSession] = OrderedDict()
        self.loading: dict[tuple[int, int], Future] = {}  # started loads, filed into `slots` when taken or done
        self._from_prefetch: set[tuple[int, int]] = set()  # prefetched, not yet used
        self._predictions: dict[int, set[int]] = {}  # layer -> the experts its prediction named
        self._routers: dict[str, np.ndarray] = {}
        self.eps = float(artifact.manifest["source"]["config"].get("language_config", {}).get("rms_norm_eps", 1e-6))
        self.stats = ExpertCacheStats()
        self._fds: dict[str, tuple[int, bool]] = {}  # data file -> (descriptor, O_DIRECT)
        self._fd_lock = threading.Lock()
        self._local = threading.local()  # a loader thread's read buffer
        self._loaders = ThreadPoolExecutor(LOADERS, thread_name_prefix="vl2edge-expert-load")
        self._release = weakref.finalize(self, _release, self._loaders, self._fds, self._fd_lock)
        self.read_mode = "O_DIRECT" if hasattr(os, "O_DIRECT") else "pread + POSIX_FADV_DONTNEED"

    @property
    def capacity(self) -> int:
        """How many experts the budget holds."""
        return self.budget // self.resident_cost

    @property
    def predicts(self) -> bool:
        """Whether the artifact's index has the routers the prefetch predicts with (exports since it was added)."""
        return "routers" in self.routed

    def resident_bytes(self) -> int:
        """The pool's cost, loads in flight counted as resident (room is made before a load starts)."""
        return (len(self.slots) + len(self.loading)) * self.resident_cost

    def close(self) -> None:
        """Drop the pool, stop the loaders, close the data files (also done when the cache is collected)."""
        self.slots.clear()
        self.loading.clear()
        self._release()

    # --- one expert's bytes ---------------------------------------------------------------------------------------
    def _open(self, name: str) -> tuple[int, bool]:
        """The data file's descriptor, opened with O_DIRECT where the filesystem allows it (reads then bypass the
        page cache: no second copy for a memory cgroup to count, no reclaim to pay for it)."""
        with self._fd_lock:
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

    def _buffered(self, name: str) -> int:
        """The filesystem took O_DIRECT at open and refuses the read: buffered reads of `name` from now on."""
        with self._fd_lock:
            fd, direct = self._fds[name]
            if direct:
                self._fds[name] = (os.open(self.artifact.path(name), os.O_RDONLY), False)
                self.read_mode = "pread + POSIX_FADV_DONTNEED (O_DIRECT refused)"
            return self._fds[name][0]

    def _buffer(self) -> mmap.mmap:
        """This loader thread's read buffer, page-aligned (O_DIRECT) and touched once, reused by every load of the
        thread: ONNX Runtime copies the initializers add_external_initializers hands it when it makes the session
        (every release from 1.20.1 to 1.32.0: a buffer overwritten afterwards changes no output;
        tests/test_expert_cache.py checks it for the expert sessions), so no read buffer outlives its session's
        creation. A fresh buffer per load cost a page fault per 4 KiB read."""
        buf = getattr(self._local, "buf", None)
        if buf is None:
            size = sum(-(-n // _ALIGN) * _ALIGN + _ALIGN for _, _, _, n in self._pieces)
            buf = self._local.buf = mmap.mmap(-1, size)
            buf.write(bytes(size))
        return buf

    def _pread(self, name: str, at: int, n: int, buf: mmap.mmap, into: int) -> tuple[np.ndarray, int]:
        """n bytes at `at` of data file `name`, read into buf from `into` (aligned): (array view, bytes used)."""
        fd, direct = self._open(name)
        start = at - at % _ALIGN if direct else at
        end = -(-(at + n) // _ALIGN) * _ALIGN if direct else at + n
        try:
            got = os.preadv(fd, [memoryview(buf)[into:into + end - start]], start)
        except OSError:
            if not direct:
                raise
            self._buffered(name)
            return self._pread(name, at, n, buf, into)
        if got < at - start + n:
            raise ExpertCacheError(f"{name}: {n} bytes at {at} are cut short: the artifact is damaged")
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, at, n, os.POSIX_FADV_DONTNEED)
        return np.frombuffer(buf, np.uint8, count=n, offset=into + at - start), end - start

    def _read(self, layer: int, expert: int) -> list[np.ndarray]:
        """The expert's four tensors as views into this thread's buffer (valid until its next read)."""
        entry, buf, into = self.layers[layer], self._buffer(), 0
        arrays = []
        for name, shape, dtype, n in self._pieces:
            a, used = self._pread(entry["data"], entry["tensors"][name]["offset"] + expert * n, n, buf, into)
            arrays.append(a.view(dtype).reshape(shape))
            into += -(-used // _ALIGN) * _ALIGN
        return arrays

    def _load(self, layer: int, expert: int):
        """Read one expert and make its session (on a loader thread): the session and the seconds it took."""
        t0 = time.perf_counter()
        arrays = self._read(layer, expert)
        opts = ort.SessionOptions()
        # 2 threads against 1 on real-dims Tiny: prefill 153 vs 119 tok/s, decode the same; the process's shared
        # pool where it has one (runtime/thread_pool.py: onnxruntime then refuses a session's own)
        apply_threads(opts, self.threads)
        # one QMoE node: nothing to optimize, and a miss is mostly session creation (~1.4 of ~2.7 ms per miss)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # no arena: a session's arena would keep the high-water mark of its largest run (a prompt's tokens through
        # one expert) for as long as the session is cached; real-dims Tiny, a 3,988-token prompt with every expert
        # cached: peak RSS 13.1 GB with the default arena
        opts.enable_cpu_mem_arena = False
        # its own pool (where it has one) asleep between runs
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_external_initializers([name for name, *_ in self._pieces],
                                       [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
        session = ort.InferenceSession(self.template, opts, providers=self.providers)
        return session, time.perf_counter() - t0

    # --- the pool ---------------------------------------------------------------------------------------------
    def _file(self, key: tuple[int, int], future: Future) -> None:
        """A finished load into the pool (most recently used)."""
        session, seconds = future.result()
        self.stats.load_s += seconds
        self.stats.bytes_read += self.expert_bytes
        self.slots[key] = session

    def _settle(self) -> None:
        """File the loads that have finished (a prediction's loads nobody has asked for yet)."""
        for key in [k for k, f in self.loading.items() if f.done()]:
            self._file(key, self.loading.pop(key))

    def _make_room(self, wait: bool) -> bool:
        """Evict the least recently used until one more expert fits; with `wait`, when every slot is a load in
        flight, wait for the oldest and file it (a demand load must start). False: no room (a prediction waits)."""
        while self.resident_bytes() + self.resident_cost > self.budget:
            if self.slots:
                old, _ = self.slots.popitem(last=False)
                self._from_prefetch.discard(old)
                self.stats.evictions += 1
            elif wait and self.loading:
                key = next(iter(self.loading))
                self._file(key, self.loading.pop(key))
            else:
                return False
        return True

    def _start(self, layer: int, expert: int, prefetch: bool = False) -> None:
        """Start loading an expert that is neither resident nor loading."""
        key = (layer, expert)
        if key in self.slots or key in self.loading or not self._make_room(wait=not prefetch):
            return
        self.loading[key] = self._loaders.submit(self._load, layer, expert)
        if prefetch:
            self._from_prefetch.add(key)
            self.stats.prefetched += 1

    def session(self, layer: int, expert: int) -> ort.InferenceSession:
        """The expert's session: resident, in flight (waited for) or loaded now."""
        key = (layer, expert)
        prefetched = key in self._from_prefetch
        self._from_prefetch.discard(key)
        resident = key in self.slots
        if resident:
            self.slots.move_to_end(key)
        else:
            self._start(layer, expert)
            t0 = time.perf_counter()
            self._file(key, self.loading.pop(key))
            self.stats.wait_s += time.perf_counter() - t0
        if prefetched:
            self.stats.prefetch_hits += 1
        elif resident:
            self.stats.hits += 1
        else:
            self.stats.misses += 1
        return self.slots[key]

    # --- prediction -------------------------------------------------------------------------------------------
    def router(self, layer: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Layer `layer`'s post-attention RMSNorm weight [H] and router [H, E] (fp32) from the index's routers file
        (read once, all layers); None where the index has none (exports before the prefetch)."""
        if not self.predicts:
            return None
        if not self._routers:
            self._routers = load_file(str(self.artifact.path(self.routed["routers"])))
        return self._routers[f"{layer}.norm"], self._routers[f"{layer}.gate_t"]

    def router_logits(self, layer: int, hidden: np.ndarray) -> np.ndarray | None:
        """Layer `layer`'s router applied to a hidden state [T, H] of an earlier layer (its residual stream): the
        prediction the prefetch loads by (Fate, HybriMoE and ktransformers use the same signal)."""
        r = self.router(layer)
        if r is None:
            return None
        norm, gate_t = r
        h = np.asarray(hidden, np.float32).reshape(-1, gate_t.shape[0])
        h = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + self.eps) * norm
        return h @ gate_t

    def prefetch(self, layer: int, experts) -> None:
        """Start loading the experts a prediction names for `layer` (those not resident or loading), as far as the
        budget has room without waiting; remembered to count how often the prediction was right."""
        named = sorted({int(e) for e in np.asarray(experts).reshape(-1)})
        self._predictions[layer] = set(named)
        for e in named:
            self._start(layer, e, prefetch=True)

    # --- a layer's routed experts -------------------------------------------------------------------------------
    def run(self, layer: int, x: np.ndarray, idx: np.ndarray, weights: np.ndarray,
            then: tuple[int, np.ndarray] | None = None) -> np.ndarray:
        """sum_k weights[t, k] * expert_{idx[t, k]}(x[t]) for every token t: x [T, H] -> [T, H] (io dtype).

        Experts run in ascending id (the sum's order never depends on what was resident), each over the tokens that
        chose it: a prefill chunk reads each of its experts once. The loads of the next AHEAD experts run
        meanwhile. `then` = (later layer, experts): a prediction, loaded once this layer's own loads have started."""
        self._settle()
        x = np.ascontiguousarray(x, dtype=self.io_dtype)
        y = np.zeros_like(x)
        experts = [int(e) for e in np.unique(idx)]
        predicted = self._predictions.pop(layer, None)
        if predicted is not None:
            self.stats.predicted += len(experts)
            self.stats.predicted_right += len(predicted.intersection(experts))
        for e in experts[:AHEAD]:
            self._start(layer, e)
        if then is not None:
            self.prefetch(*then)
        for j, expert in enumerate(experts):
            if j + AHEAD < len(experts):
                self._start(layer, experts[j + AHEAD])
            rows, cols = np.nonzero(idx == expert)
            w = weights[rows, cols].astype(self.io_dtype).reshape(-1, 1)
            out = self.session(layer, expert).run(None, {"x": x[rows], "router_probs": np.ones_like(w),
                                                         "router_weights": w})[0]
            y[rows] += out  # a token chooses an expert at most once: rows are distinct
        # a wrong prediction's experts stay cached; used later they are ordinary hits
        self._from_prefetch = {key for key in self._from_prefetch if key[0] != layer}
        return y


def _release(loaders: ThreadPoolExecutor, fds: dict, lock: threading.Lock) -> None:
    """What a cache holds outside Python's memory: its loader threads and its data files' descriptors."""
    loaders.shutdown(wait=False, cancel_futures=True)
    with lock:
        for fd, _ in fds.values():
            os.close(fd)
        fds.clear()


def _top_k(artifact) -> int:
    lang = artifact.manifest["source"]["config"].get("language_config", {})
    return int(lang.get("num_experts_per_tok") or 1)

"""Routed experts streamed from the artifact through a pool of prepacked expert sessions with a byte budget.

A MoE layer's routed experts are most of DeepSeek-VL2's weights (Small: 64 x 26 of them, 6 per token and layer),
and QMoE prepacks every one of them at session load. With `expert_cache=BYTES` the engine never loads the MoE
graphs: each MoE layer runs its "shared" graph (hidden + shared experts, export/expert_cache.py) and then the
experts the runtime chose, each as its own single-expert QMoE session made from the artifact's template with that
expert's four slices handed over as external initializers (ONNX Runtime prepacks them as it does the full layer's).
A session stays in a least-recently-used pool while the pool's resident cost fits the budget; a miss reads the
expert's bytes (four preads from layerNN_moe.onnx.data, then POSIX_FADV_DONTNEED on the ranges, so the page
cache does not hold a second copy that a memory cgroup would count) and makes its session.

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

import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

RESIDENT_FACTOR = 1.7  # resident bytes per cached expert / its stored bytes: 1.66 measured on real-dims Tiny
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
    per_layer_misses: dict[int, int] = field(default_factory=dict)

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
        self._fds: dict[str, int] = {}
        self.read_mode = "pread + POSIX_FADV_DONTNEED" if hasattr(os, "posix_fadvise") else "pread"

    @property
    def capacity(self) -> int:
        """How many experts the budget holds."""
        return self.budget // self.resident_cost

    def resident_bytes(self) -> int:
        return len(self.slots) * self.resident_cost

    def close(self) -> None:
        self.slots.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # --- one expert ---------------------------------------------------------------------------------------------
    def _read(self, layer: int, expert: int) -> list[np.ndarray]:
        entry = self.layers[layer]
        fd = self._fds.get(entry["data"])
        if fd is None:
            fd = self._fds[entry["data"]] = os.open(self.artifact.path(entry["data"]), os.O_RDONLY)
        arrays = []
        for name, t in entry["tensors"].items():
            shape, dtype = [1, *t["shape"][1:]], np.dtype(t["dtype"])
            n = int(np.prod(shape)) * dtype.itemsize
            at = t["offset"] + expert * n
            buf = np.empty(n, np.uint8)
            got = os.preadv(fd, [buf], at)
            if got != n:
                raise ExpertCacheError(f"{entry['data']}: expert {expert} of layer {layer} is cut short ({got} of {n} "
                                       f"bytes at {at}): the artifact is damaged")
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, at, n, os.POSIX_FADV_DONTNEED)
            arrays.append(buf.view(dtype).reshape(shape))
            self.stats.bytes_read += n
        return arrays

    def _load(self, layer: int, expert: int):
        t0 = time.perf_counter()
        arrays = self._read(layer, expert)
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

    def session(self, layer: int, expert: int) -> ort.InferenceSession:
        key = (layer, expert)
        slot = self.slots.get(key)
        if slot is not None:
            self.slots.move_to_end(key)
            self.stats.hits += 1
            return slot[0]
        self.stats.misses += 1
        self.stats.per_layer_misses[layer] = self.stats.per_layer_misses.get(layer, 0) + 1
        while self.slots and self.resident_bytes() + self.resident_cost > self.budget:
            self.slots.popitem(last=False)
            self.stats.evictions += 1
        slot = self._load(layer, expert)
        self.slots[key] = slot
        return slot[0]

    # --- a layer's routed experts -------------------------------------------------------------------------------
    def run(self, layer: int, x: np.ndarray, idx: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """sum_k weights[t, k] * expert_{idx[t, k]}(x[t]) for every token t: x [T, H] -> [T, H] (io dtype).

        Experts run in ascending id, each over the tokens that chose it: a prefill chunk reads each of its
        experts once, and the experts the token needs are resident while it runs."""
        x = np.ascontiguousarray(x, dtype=self.io_dtype)
        y = np.zeros_like(x)
        for expert in np.unique(idx):
            rows, cols = np.nonzero(idx == expert)
            w = weights[rows, cols].astype(self.io_dtype).reshape(-1, 1)
            out = self.session(layer, int(expert)).run(None, {"x": x[rows], "router_probs": np.ones_like(w),
                                                               "router_weights": w})[0]
            y[rows] += out  # a token chooses an expert at most once: rows are distinct
        return y


def _top_k(artifact) -> int:
    lang = artifact.manifest["source"]["config"].get("language_config", {})
    return int(lang.get("num_experts_per_tok") or 1)

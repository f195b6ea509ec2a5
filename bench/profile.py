"""Where a decode step goes, op by op: ONNX Runtime's own profiler over the engine's sessions.

  python -m vl2edge.bench.profile ARTIFACT --context 512 --steps 16 [--threads 2] [--json out.json]
  python -m vl2edge.bench.profile ARTIFACT --context 0 --chunk 512 --steps 3      # a prefill chunk instead

Opens the runtime's Engine with SessionOptions.enable_profiling on every session, fills the cache to --context
with filler tokens, runs --warmup then --steps decode steps, and keeps only the node events inside the last
--steps runs of each session (the prefill's and the warm-up's runs are dropped). Prints, per step: time per op type
and per graph kind (attention, mlp, moe, head, embedding), the sum of kernel time against the step's wall time (the rest is ORT's per-run
overhead and our Python), and for the weight-reading ops the bytes they read per step and the rate that implies.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..export.fused_layer import MLP_PREFIX


def _graph_kind(file: str, node: str = "", moe: bool = False) -> str:
    """attention, mlp, moe, head, embedding: a split layer's kind is in its file name; a fused layer's nodes
    (export/fused_layer.py) are the attention graph's, the routing's, or under MLP_PREFIX the MLP graph's."""
    if re.fullmatch(r"layer\d+\.onnx", Path(file).name):
        if node.startswith(MLP_PREFIX):
            return "moe" if moe else "mlp"
        return "routing" if node.startswith("route_") else "attention"
    m = re.match(r"layer\d+_(\w+)\.onnx", Path(file).name)
    return m.group(1) if m else Path(file).stem


def _decode_events(profile: Path, runs: int) -> list[dict]:
    events = json.loads(profile.read_text())
    model_runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])[-runs:]
    windows = [(r["ts"], r["ts"] + r["dur"]) for r in model_runs]
    out = []
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            if any(a <= e["ts"] <= b for a, b in windows):
                out.append(e)
    return out


def profile_decode(artifact: str, context: int = 512, steps: int = 16, threads: int | None = 2,
                   keep: bool = False, chunk: int = 1, warmup: int = 4) -> dict:
    """chunk 1: decode steps; chunk > 1: `steps` prefill chunks of that many tokens, each appended at `context`
    (the cache is rewound between them). warmup: steps run first and left out, so that the measured ones do not
    pay for first touches (weights of experts the prefill did not route to, arena growth). keep: leave ORT's raw
    profile files (one JSON per session) in the returned profile_dir."""
    from ..runtime.engine import Engine
    from ..runtime.processor import Processor
    from .workload import filler_ids

    tmp = Path(tempfile.mkdtemp(prefix="vl2edge-profile-"))
    files: dict[str, str] = {}

    class ProfilingEngine(Engine):
        def _session(self, file, *data_of):
            for opts in (self._opts, self._vision_opts):
                opts.enable_profiling = True
                opts.profile_file_prefix = str(tmp / Path(file).stem)
            sess = super()._session(file, *data_of)
            files[id(sess)] = file
            return sess

    from ..runtime.thread_pool import wanted

    # the pool `vl2edge run` uses (runtime/thread_pool.py) unless VL2EDGE_SHARED_THREADS=0
    eng = ProfilingEngine(artifact, provider="cpu", threads=threads, verify="size", shared_threads=wanted(True))
    proc = Processor.from_dir(artifact)
    fill = filler_ids(proc.encode, context + max(chunk, 1) + warmup)
    logits = eng.prefill(eng.embed(fill[:context]), 512)
    walls = []
    for _ in range(warmup + steps):  # only the last `steps` runs of each session are read below
        if chunk > 1:
            eng.truncate(context)
            x = eng.embed(fill[context:context + chunk])
            t0 = time.perf_counter()
            logits = eng.forward(x)
        else:
            tok = int(np.argmax(logits))
            t0 = time.perf_counter()
            logits = eng.decode(tok)
        walls.append(time.perf_counter() - t0)
    walls = walls[warmup:]
    eng.load_language()
    sessions = [(eng.embedding, False), (eng.head, False)] + [
        (s, layer.moe) for layer in eng.layers for s in layer.sessions]
    by_op, by_graph, by_node = defaultdict(float), defaultdict(float), defaultdict(float)
    for sess, moe in sessions:
        path = Path(sess.end_profiling())
        for e in _decode_events(path, steps):
            op = e.get("args", {}).get("op_name", "?")
            kind = _graph_kind(files[id(sess)], e.get("name", ""), moe)
            us = e["dur"] / steps
            by_op[op] += us
            by_graph[kind] += us
            by_node[f"{kind}:{op}"] += us
    if not keep:
        shutil.rmtree(tmp, ignore_errors=True)
    wall_us = float(np.median(walls)) * 1e6
    return {"artifact": artifact, "context": context, "steps": steps, "warmup": warmup, "chunk": chunk,
            "threads": threads, "cache_length": eng.length,
            "step_wall_us_median": wall_us, "step_wall_us_mean": float(np.mean(walls)) * 1e6,
            "kernel_us_per_step": sum(by_op.values()),
            "by_op_us": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
            "by_graph_us": dict(sorted(by_graph.items(), key=lambda kv: -kv[1])),
            "by_graph_op_us": dict(sorted(by_node.items(), key=lambda kv: -kv[1])),
            "profile_dir": str(tmp) if keep else None}


def weight_read_rates(artifact: str, prof: dict) -> dict:
    """GB/s implied by the bytes each weight-reading (graph kind, op) pair reads per step (roofline.py's model)."""
    from ..model.config import VL2Config
    from . import roofline

    m = json.loads((Path(artifact) / "manifest.json").read_text())
    cfg = VL2Config.from_dict(m["source"]["config"])
    L = cfg.language
    b = roofline.active_weight_bytes(cfg, m["quantization"])
    n_moe = sum(L.is_moe_layer(i) for i in range(L.num_hidden_layers))
    attn_proj = b["attention"]
    per = {
        "head:MatMulNBits": b["lm_head"],
        "moe:QMoE": b["routed_experts"],
        "moe:MatMulNBits": b["shared_experts"],
        "mlp:MatMulNBits": b["dense_mlp"],
        "attention:MatMulNBits": attn_proj,
        # the cache at its stored width (int8 since the int8 KV cache; the manifest says), not fp32
        "attention:GroupQueryAttention": prof["context"] * m["attention"].get(
            "cache_bytes_per_token", L.cache_elements_per_token * 4),
    }
    out = {}
    for key, nbytes in per.items():
        us = prof["by_graph_op_us"].get(key)
        if us:
            out[key] = {"bytes_per_step": nbytes, "us_per_step": us, "GB_per_s": nbytes / us / 1e3}
    out["_moe_layers"] = n_moe
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=1, help="1: decode steps; N > 1: prefill chunks of N tokens")
    ap.add_argument("--warmup", type=int, default=4, help="steps run first and left out of the figures")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", action="store_true", help="keep ORT's raw profile files")
    a = ap.parse_args(argv)
    prof = profile_decode(a.artifact, a.context, a.steps, a.threads, a.keep, a.chunk, a.warmup)
    w = prof["step_wall_us_median"]
    what = "decode" if a.chunk == 1 else f"prefill chunk of {a.chunk}"
    print(f"{what} @{a.context}: step {w / 1e3:.1f} ms (median of {a.steps}, after {a.warmup} left out), "
          f"ORT kernels {prof['kernel_us_per_step'] / 1e3:.1f} ms ({100 * prof['kernel_us_per_step'] / w:.0f}%)")
    for title, d in (("by graph", prof["by_graph_us"]), ("by op", prof["by_op_us"]),
                     ("by graph:op", prof["by_graph_op_us"])):
        print(f"  {title}:")
        for k, us in list(d.items())[:12]:
            print(f"    {k:34s} {us / 1e3:7.2f} ms  {100 * us / w:5.1f}%")
    if a.chunk == 1:
        prof["weight_read_rates"] = weight_read_rates(a.artifact, prof)
        print("  weight-reading ops (bytes read per step / kernel time):")
        for k, r in prof["weight_read_rates"].items():
            if not k.startswith("_"):
                print(f"    {k:34s} {r['bytes_per_step'] / 1e6:8.1f} MB in {r['us_per_step'] / 1e3:6.2f} ms = "
                      f"{r['GB_per_s']:6.1f} GB/s")
    if a.json:
        Path(a.json).write_text(json.dumps(prof, indent=2))
    if prof["profile_dir"]:
        print(f"  (raw profiles in {prof['profile_dir']})", file=sys.stderr)


if __name__ == "__main__":
    main()

"""One measurement in a fresh Python process: its peak RSS is its own, and its memory is gone when it ends.

  run_isolated("runtime", {...}) -> the record bench_runtime returns, or {"error": ...} if the child failed
                                  (an exception, or killed: out of memory shows as signal 9)

The child is `python -m vl2edge.bench.isolated SPEC.json OUT.json`; its progress lines go to our stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from .workload import Workload


def _child(kind: str, args: dict) -> dict:
    w = Workload.from_dict(args.pop("workload"))
    if kind == "runtime":
        from .runtime_bench import bench_runtime

        return bench_runtime(args["artifact"], args.get("threads"), args.get("provider"), w,
                             progress=args.get("progress", True), transient_vision=args.get("transient_vision", False),
                             low_memory=args.get("low_memory", False), expert_cache=args.get("expert_cache"))
    if kind == "reference":
        from .reference_bench import bench_reference

        return bench_reference(args["checkpoint"], args["dtype"], args.get("threads"), w, args.get("max_len"),
                               progress=args.get("progress", True))
    raise ValueError(f"unknown measurement {kind!r}")


def run_isolated(kind: str, args: dict, in_process: bool = False, env: dict | None = None) -> dict:
    """Run a measurement (kind "runtime" or "reference") in a subprocess, with `env` added to its environment.
    in_process=True runs it here instead (debugging; its memory figures are then polluted by whatever this process
    holds, and `env` is not applied)."""
    if in_process:
        return _child(kind, json.loads(json.dumps(args)))
    with tempfile.TemporaryDirectory(prefix="vl2edge-bench-") as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps({"kind": kind, "args": args}))
        r = subprocess.run([sys.executable, "-m", "vl2edge.bench.isolated", str(spec), str(out)],
                           env={**os.environ, **(env or {})},
                           stdout=subprocess.PIPE, text=True)
        if out.is_file():
            return json.loads(out.read_text())
        why = f"exit status {r.returncode}" if r.returncode >= 0 else f"killed by signal {-r.returncode}"
        if r.returncode == -9:
            why += " (out of memory?)"
        return {"error": f"the {kind} measurement failed: {why}", "output": (r.stdout or "")[-2000:]}


def main(argv=None) -> int:
    spec_path, out_path = (argv or sys.argv[1:])[:2]
    spec = json.loads(Path(spec_path).read_text())
    from ..runtime.thread_pool import ENV

    os.environ.setdefault(ENV, "1")  # a process of its own: the runtime as `vl2edge run` runs it
    try:
        result = _child(spec["kind"], spec["args"])
    except Exception as e:  # reported in the JSON document, not a traceback in the middle of the run
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

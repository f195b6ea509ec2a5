"""runtime/thread_pool.py: the process-wide intra-op pool. It is fixed per process and makes onnxruntime refuse
sessions with their own pool, so the shared side runs in a subprocess; this process keeps per-session pools
(conftest.py sets VL2EDGE_SHARED_THREADS=0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vl2edge.runtime import thread_pool
from vl2edge.runtime.engine import Engine

SHARED = r"""
import json, sys, warnings
import numpy as np
from vl2edge.runtime.engine import Engine
from vl2edge.bench.machine import measure_gemv_bandwidth

art, ids = sys.argv[1], json.loads(sys.argv[2])
def greedy(engine):
    engine.reset()
    logits = engine.prefill(engine.embed(np.asarray(ids)[None]))
    out, rows = [], []
    for _ in range(6):
        row = np.asarray(logits).reshape(-1, np.asarray(logits).shape[-1])[-1]
        out.append(int(np.argmax(row))); rows.append(row.tolist())
        logits = engine.decode(out[-1])
    return out, rows
e = Engine(art, threads=2, verify="size", shared_threads=True)
tokens, rows = greedy(e)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    other = Engine(art, threads=1, verify="size")  # another count, no flag: the process's pool all the same
cached = Engine(art, threads=2, verify="size", expert_cache=2**30)  # the expert cache's sessions join it too
cached_tokens, _ = greedy(cached)
gemv = measure_gemv_bandwidth(2, size_mb=1, repeats=1)["bytes_per_s"]  # the bench's own session joins it too
print(json.dumps({"pool": e.thread_pool, "other": other.thread_pool, "warned": [str(w.message) for w in caught],
                  "tokens": tokens, "rows": rows, "cached_tokens": cached_tokens, "gemv": gemv}))
"""


@pytest.fixture(scope="module")
def artifact(test_checkpoints, tmp_path_factory):
    from vl2edge.export.exporter import export

    return export(test_checkpoints["test-tiny"], tmp_path_factory.mktemp("pool") / "tiny", progress=False)


def test_the_shared_pool_gives_the_per_session_pools_logits(artifact):
    ids = [5, 17, 42, 99, 3, 250, 7]
    env = {**os.environ, thread_pool.ENV: "0"}  # the flag alone asks for it
    p = subprocess.run([sys.executable, "-c", SHARED, str(artifact), json.dumps(ids)], capture_output=True,
                       text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["pool"] == "shared (2 threads)" and got["other"] == "shared (2 threads)"
    assert got["gemv"] > 0
    assert not got["warned"]  # the flag was not given to the second engine: nothing asked, nothing to warn about

    mine = Engine(artifact, threads=2, verify="size")  # this process: its own pools, as before
    assert mine.thread_pool == "per session (2 threads)"
    mine.reset()
    logits = mine.prefill(mine.embed(np.asarray(ids)[None]))
    tokens, rows = [], []
    for _ in range(6):
        row = np.asarray(logits).reshape(-1, np.asarray(logits).shape[-1])[-1]
        tokens.append(int(np.argmax(row)))
        rows.append(row)
        logits = mine.decode(tokens[-1])
    assert got["tokens"] == tokens
    # the same kernels with the same number of threads: the same partition of the work, the same bits
    np.testing.assert_array_equal(np.asarray(got["rows"], np.float32), np.asarray(rows, np.float32))
    assert got["cached_tokens"] == tokens


def test_a_second_count_in_a_process_warns(artifact):
    code = ("import warnings, sys\nfrom vl2edge.runtime.engine import Engine\n"
            "Engine(sys.argv[1], threads=2, verify='size', shared_threads=True)\n"
            "with warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n"
            "    e = Engine(sys.argv[1], threads=1, verify='size', shared_threads=True)\n"
            "print(e.thread_pool, '|', [str(x.message) for x in w])")
    p = subprocess.run([sys.executable, "-c", code, str(artifact)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, thread_pool.ENV: "0"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("shared (2 threads) |") and "has 2 threads in this process" in p.stdout


def test_the_environment_switch(monkeypatch):
    for value, default, expected in (("", True, True), ("", False, False), ("0", True, False), ("1", False, True)):
        monkeypatch.setenv(thread_pool.ENV, value)
        assert thread_pool.wanted(default) is expected
    monkeypatch.setenv(thread_pool.ENV, "yes")
    with pytest.raises(ValueError, match="VL2EDGE_SHARED_THREADS='yes': use 0"):
        thread_pool.wanted(True)

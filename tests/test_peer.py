"""bench/peer.py's alternation and llama-bench parsing, with a stand-in executable that answers like llama-bench
(`-o json`). The real comparison is the bench command against ../shared/peer-llamacpp's build, not a test."""

from __future__ import annotations

import json
import os
import stat
import sys

import numpy as np
import pytest

from vl2edge.bench import peer, step_bytes

STAND_IN = r'''#!{python}
import json, os, sys
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps({{"argv": args, "ld": os.environ.get("LD_LIBRARY_PATH", "")}}) + "\n")
if {fail!r}:
    sys.stderr.write("error: failed to load model\n"); sys.exit(1)
get = lambda flag: args[args.index(flag) + 1]
p, n, depths = int(get("-p")), int(get("-n")), [int(d) for d in get("-d").split(",")]
records = []
for d in depths:
    records.append({{"n_prompt": p, "n_gen": 0, "n_depth": d, "avg_ts": 200.0 - d / 100, "samples_ts": [1.0]}})
    if {drop_decode!r} and d:
        continue
    records.append({{"n_prompt": 0, "n_gen": n, "n_depth": d, "avg_ts": 40.0 - d / 1000, "samples_ts": [1.0]}})
print(json.dumps(records))
'''


def stand_in(tmp_path, fail=False, drop_decode=False):
    path = tmp_path / "bin" / "llama-bench"
    path.parent.mkdir(exist_ok=True)
    log = tmp_path / "calls.jsonl"
    path.write_text(STAND_IN.format(python=sys.executable, log=str(log), fail=fail, drop_decode=drop_decode))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    gguf = tmp_path / "model.gguf"
    if not gguf.exists():
        write_gguf(gguf)
    return path, gguf, log


def write_gguf(path, layers=2, experts=4, used=2, heads=2, head_dim=4, hidden=8, vocab=16):
    """A small GGUF in llama.cpp's layout (gguf's own writer): fp32 tensors, so every size is easy to count."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "deepseek2")
    w.add_block_count(layers)
    for key, value in {"expert_count": experts, "expert_used_count": used, "attention.head_count": heads,
                       "attention.head_count_kv": heads, "attention.key_length": head_dim,
                       "attention.value_length": head_dim, "embedding_length": hidden}.items():
        w.add_uint32(f"deepseek2.{key}", value)
    w.add_tensor("token_embd.weight", np.zeros((vocab, hidden), np.float32))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((hidden, hidden), np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", np.zeros((experts, hidden, hidden), np.float32))
    w.add_tensor("output.weight", np.zeros((vocab, hidden), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def artifact(test_checkpoints, tmp_path_factory):
    from vl2edge.export.exporter import export

    return export(test_checkpoints["test-tiny"], tmp_path_factory.mktemp("peer") / "tiny", progress=False)


def test_rounds_alternate_and_the_ratio_is_per_round(artifact, tmp_path, monkeypatch):
    import vl2edge.runtime.engine as engine_mod

    loads = []
    real_init = engine_mod.Engine.__init__
    monkeypatch.setattr(engine_mod.Engine, "__init__",
                        lambda self, *a, **k: loads.append(1) or real_init(self, *a, **k))
    binary, gguf, log = stand_in(tmp_path)
    doc = peer.run(artifact, binary, gguf, threads=1, depths=[0, 64], decode_tokens=4, prefill=32, rounds=3,
                   progress=False, ceiling_mb=(16, 8))
    assert doc["order"] == ["ours", "theirs", "theirs", "ours", "ours", "theirs"]
    assert len(loads) == 1 + 3  # the check that the depths fit, then a fresh engine in every round
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 3
    argv = calls[0]["argv"]
    assert argv[argv.index("-t") + 1] == "1" and argv[argv.index("-p") + 1] == "32"
    assert argv[argv.index("-n") + 1] == "4" and argv[argv.index("-d") + 1] == "0,64" and "json" in argv
    assert calls[0]["ld"].split(":")[0] == str(binary.parent)  # its shared libraries sit beside it
    rows = {r["measure"]: r for r in doc["rows"]}
    assert set(rows) == {"prefill", "decode@0", "decode@64"}
    assert rows["prefill"]["theirs"]["rounds"] == [200.0] * 3  # depth 0's pp, not depth 64's
    assert rows["decode@64"]["theirs"]["median"] == pytest.approx(40.0 - 0.064)
    for r in rows.values():
        assert r["ours"]["median"] > 0
        paired = [a / b for a, b in zip(r["ours"]["rounds"], r["theirs"]["rounds"])]
        assert r["ratio"]["rounds"] == pytest.approx(paired)
        assert r["ratio"]["range"][0] <= r["ratio"]["median"] <= r["ratio"]["range"][1]
    text = peer.table(doc)
    assert "| decode 4 at depth 64 |" in text and "×" in text
    # bytes per token at the timed steps' mean context, and the rates they imply against each round's ceilings
    assert set(doc["ceilings"]) == {"stream", "gemv_int8"} and len(doc["ceilings"]["stream"]["rounds"]) == 3
    for d in (0, 64):
        r = rows[f"decode@{d}"]
        ctx = peer.mean_context(d, 4)
        assert ctx["ours"] == max(d, 1) + peer.WARMUP_STEPS + 1.5 and ctx["theirs"] == d + 1.5
        assert r["bytes_per_token"]["ours"] == step_bytes.artifact_step_bytes(artifact, round(ctx["ours"]))
        assert r["bytes_per_token"]["theirs"] == step_bytes.gguf_step_bytes(gguf, round(ctx["theirs"]))
        total = r["bytes_per_token"]["ours"]["total"]
        assert r["ours_bytes_per_s"]["rounds"] == pytest.approx([total * t for t in r["ours"]["rounds"]])
        assert r["ours_of_stream"]["rounds"] == pytest.approx(
            [x / c for x, c in zip(r["ours_bytes_per_s"]["rounds"], doc["ceilings"]["stream"]["rounds"])])
        # the ratio at 100% of the stream: that round's stream over our bytes, against their tokens/s
        assert r["ratio_at_stream"]["rounds"] == pytest.approx(
            [c / total / t for c, t in zip(doc["ceilings"]["stream"]["rounds"], r["theirs"]["rounds"])])
    assert "prefill" in rows and "bytes_per_token" not in rows["prefill"]
    assert "| depth 64 |" in text and "streaming read" in text and "ratio at 100% of stream" in text


def test_llama_bench_failures_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no llama-bench binary"):
        peer.llama_bench(tmp_path / "none", tmp_path / "m.gguf", 2, 32, 4, [0])
    binary, gguf, _ = stand_in(tmp_path, fail=True)
    with pytest.raises(RuntimeError, match="llama-bench failed .*failed to load model"):
        peer.llama_bench(binary, gguf, 2, 32, 4, [0])
    binary, gguf, _ = stand_in(tmp_path, drop_decode=True)
    with pytest.raises(RuntimeError, match=r"lacks \['decode@64'\]"):
        peer.llama_bench(binary, gguf, 2, 32, 4, [0, 64])


def test_depths_beyond_the_artifact_are_refused_before_anything_runs(artifact, tmp_path):
    binary, gguf, log = stand_in(tmp_path)
    with pytest.raises(ValueError, match="do not fit"):
        peer.run(artifact, binary, gguf, depths=[10 ** 6], progress=False)
    assert not log.exists() or not log.read_text()
    assert os.access(binary, os.X_OK)

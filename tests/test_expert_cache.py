"""The expert cache (runtime/expert_cache.py): routed experts read from the artifact into a pool of expert sessions
with a byte budget. The budget moves where the weights live, never which experts run or how: tokens are identical
across budgets and agree with the layer's own QMoE; the pool keeps to its budget; a prompt reads each layer's
experts once; routing traces round-trip and replay as the cache behaves."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

import vl2edge
from vl2edge.bench import expert_replay
from vl2edge.export.exporter import export
from vl2edge.runtime.expert_cache import RESIDENT_FACTOR, ExpertCacheError, memory_limit_bytes, parse_size
from vl2edge.runtime.routing_trace import load_trace, save_trace

PROMPT = "<image>\nDescribe the scene and the red ball."
NEW = 10


@pytest.fixture(scope="module")
def artifacts(test_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("ec")
    return {"test-tiny": export(test_checkpoints["test-tiny"], root / "tiny", experts="int4", progress=False),
            "test-small": export(test_checkpoints["test-small"], root / "small", experts="int4", progress=False),
            "test-vl2": export(test_checkpoints["test-vl2"], root / "vl2", experts="int8", progress=False)}


@pytest.fixture(scope="module")
def scene():
    im = Image.new("RGB", (640, 480), (200, 210, 190))
    ImageDraw.Draw(im).ellipse([380, 60, 560, 240], fill=(220, 30, 30))
    return im


def smallest_budget(art) -> int:
    m = json.loads((art / "manifest.json").read_text())
    k = m["source"]["config"]["language_config"]["num_experts_per_tok"]
    return int(m["graphs"]["routed_experts"]["expert_bytes"] * RESIDENT_FACTOR) * k


@pytest.mark.parametrize("preset", ["test-tiny", "test-small", "test-vl2"])
def test_tokens_do_not_depend_on_the_budget_and_match_qmoe(artifacts, scene, preset):
    art = artifacts[preset]
    full = vl2edge.load(art)
    r_qmoe = full.generate(PROMPT, images=[scene], max_new_tokens=NEW)
    runs = {}
    for budget in ("1G", smallest_budget(art)):
        m = vl2edge.load(art, expert_cache=budget)
        runs[budget] = (m.generate(PROMPT, images=[scene], max_new_tokens=NEW), m.engine.expert_cache)
    (big, big_cache), (small, small_cache) = runs.values()
    assert big.token_ids == small.token_ids
    assert small_cache.stats.evictions > 0 and big_cache.stats.evictions == 0
    assert small_cache.stats.misses > big_cache.stats.misses
    # the same arithmetic as the layer's QMoE, expert by expert (only the summation order differs)
    assert big.token_ids == r_qmoe.token_ids


def test_one_thread_gives_the_qmoe_paths_logits_bit_for_bit(artifacts, scene):
    """With one intra-op thread QMoE adds a token's experts in ascending id into one buffer, as the cache does, and
    the layer's output is hidden + (routed + shared) on both paths: prompt and decode logits are identical, not
    merely close. The cache path's logits do not depend on the thread count (an expert session holds one expert, whose
    sum one thread makes); QMoE's do: with more threads it adds per-thread partial sums, another association."""
    art = artifacts["test-small"]
    runs = []
    for cache, threads in ((None, 1), ("1G", 1), ("1G", 2)):
        # the QMoE path with numpy's routing between the layer's two graphs, as the cache path routes
        m = vl2edge.load(art, threads=threads, expert_cache=cache, fused_layers=False)
        eng, inputs = m.engine, m.prepare(PROMPT, images=[scene])
        logits = [eng.prefill(eng.embed(inputs.input_ids, inputs.pixel_values, inputs.images_seq_mask,
                                        inputs.images_spatial_crop), chunk_size=128)]
        for _ in range(4):
            logits.append(eng.decode(int(logits[-1].argmax())))
        runs.append(np.stack(logits))
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[1], runs[2])  # each expert's sum is one thread's: the same at any count


def test_the_moe_graphs_are_never_loaded_and_the_pool_keeps_its_budget(artifacts, scene):
    art = artifacts["test-small"]
    budget = smallest_budget(art) + 1
    m = vl2edge.load(art, expert_cache=budget)
    eng = m.engine
    seen = []
    run = eng.expert_cache.run

    def watched(*a, **k):
        out = run(*a, **k)
        seen.append(eng.expert_cache.resident_bytes())
        return out

    eng.expert_cache.run = watched
    m.generate(PROMPT, images=[scene], max_new_tokens=NEW)
    assert max(seen) <= budget
    for layer in eng.layers:
        names = {i.name for i in layer.mlp.get_inputs()}
        assert "router_probs" not in names  # a MoE layer runs its shared graph; no QMoE session exists
    assert sum(layer.cached for layer in eng.layers) == 2


def test_a_prompt_reads_each_layers_experts_once(artifacts, scene):
    """Layer-major prefill: with room for every expert, the prompt's misses are its distinct (layer, expert)
    pairs, although the prompt spans several prefill chunks."""
    m = vl2edge.load(artifacts["test-small"], expert_cache="1G")
    eng = m.engine
    eng.routing_trace = []
    inputs = m.prepare(PROMPT, images=[scene])
    eng.prefill(eng.embed(inputs.input_ids, inputs.pixel_values, inputs.images_seq_mask,
                          inputs.images_spatial_crop), chunk_size=128)
    assert len(inputs.input_ids) > 4 * 128
    distinct = {(layer, int(e)) for layer, idx in eng.routing_trace for e in np.unique(idx)}
    assert eng.expert_cache.stats.misses == len(distinct)
    assert len(eng.routing_trace) == 2  # one record per MoE layer for the whole prompt


def test_a_prefill_stopped_between_layers_keeps_nothing_of_the_prompt(artifacts, scene):
    m = vl2edge.load(artifacts["test-small"], expert_cache="1G")
    eng = m.engine
    x = eng.embed(m.prepare("Hello there.").input_ids)
    calls = []
    assert eng.prefill(x, chunk_size=4, stop=lambda: calls.append(1) or True) is None
    assert eng.length == 0 and calls


def test_trace_round_trip_and_replay(tmp_path, artifacts, scene):
    m = vl2edge.load(artifacts["test-tiny"])
    m.engine.routing_trace = []
    m.generate(PROMPT, images=[scene], max_new_tokens=4)
    L = m.engine.config.language
    path = save_trace(tmp_path / "t.npz", m.engine.routing_trace, L.n_routed_experts, L.num_hidden_layers)
    records, experts, layers = load_trace(path)
    assert (experts, layers) == (L.n_routed_experts, L.num_hidden_layers)
    assert [(a, b.tolist()) for a, b in records] == [(a, b.tolist()) for a, b in m.engine.routing_trace]
    moe = len({layer for layer, _ in records})
    all_in = expert_replay.replay(records, moe * experts)
    distinct = len({(layer, int(e)) for layer, idx in records for e in np.unique(idx)})
    assert all_in["misses"] == distinct  # everything fits: only first touches miss


def test_replay_is_lru_and_prefetch_hides_misses():
    one = lambda *e: (0, np.array([e]))  # noqa: E731  one record of layer 0 touching experts e
    records = [one(1), one(2), one(1), one(3), one(2)]
    r = expert_replay.replay(records, capacity=2)
    assert (r["hits"], r["misses"]) == (1, 4)  # 1 2 | 1 hit | 3 evicts 2 | 2 evicts 1
    perfect = expert_replay.replay(records, capacity=2, prefetch_accuracy=1.0)
    assert perfect["misses"] == 1 and perfect["read_ahead"] == perfect["read_ahead_used"] == 3
    uniform = expert_replay.synthetic_trace("uniform", 4, 16, 2, 200)
    skewed = expert_replay.synthetic_trace("skewed", 4, 16, 2, 200)
    rate = lambda rec: expert_replay.replay(rec, 16)["hit_rate"]  # noqa: E731  a quarter of the experts
    assert rate(skewed) > rate(uniform) + 0.1


def test_the_bench_reports_the_cache(artifacts):
    from vl2edge.bench.runtime_bench import bench_runtime
    from vl2edge.bench.workload import Workload

    rec = bench_runtime(artifacts["test-small"], 2, "cpu", Workload.tiny(), progress=False, expert_cache="1G")
    ec = rec["expert_cache"]
    assert ec["budget"] == 2**30 and ec["prefetch"] is True and ec["misses"] > 0 and ec["hits"] > 0
    one = json.loads((artifacts["test-small"] / "manifest.json").read_text())["graphs"]["routed_experts"]["expert_bytes"]
    assert ec["misses"] * one <= ec["bytes_read"] <= (ec["misses"] + ec["prefetched"]) * one


@pytest.mark.parametrize("layout", ["v1", "v2", "none"])
def test_the_memory_limit_is_the_own_cgroups(tmp_path, layout):
    """auto sizes the cache from the group this process is in (a v1 root says 'no limit' while the group has one)."""
    proc, fs = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal: 24000000 kB\nMemAvailable: 20000000 kB\n")
    if layout == "v1":
        (proc / "self" / "cgroup").write_text("5:devices:/\n4:memory:/capped-7\n1:cpu:/\n")
        (fs / "memory" / "capped-7").mkdir(parents=True)
        (fs / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
        (fs / "memory" / "capped-7" / "memory.limit_in_bytes").write_text(f"{6 * 2**30}\n")
        assert memory_limit_bytes(str(proc), str(fs)) == 6 * 2**30
    elif layout == "v2":
        (proc / "self" / "cgroup").write_text("0::/app.slice/x\n")
        (fs / "app.slice" / "x").mkdir(parents=True)
        (fs / "memory.max").write_text("max\n")
        (fs / "app.slice" / "x" / "memory.max").write_text(f"{2**30}\n")
        assert memory_limit_bytes(str(proc), str(fs)) == 2**30
    else:
        (proc / "self" / "cgroup").write_text("0::/\n")
        assert memory_limit_bytes(str(proc), str(fs)) == 20000000 * 1024


def test_sizes_and_refusals(artifacts, tmp_path):
    assert parse_size("3G") == 3 * 2**30 and parse_size("512M") == 512 * 2**20 and parse_size(1000) == 1000
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    for bad in ("12Q", "-1G", "0", "lots"):
        with pytest.raises(ExpertCacheError):
            parse_size(bad)
    with pytest.raises(ExpertCacheError, match="fewer experts than one token uses"):
        vl2edge.load(artifacts["test-small"], expert_cache=1000)
    no_index = tmp_path / "fp32"
    export(_checkpoint_of(artifacts["test-small"]), no_index, experts="fp32", progress=False)
    with pytest.raises(ExpertCacheError, match="no expert-cache index"):
        vl2edge.load(no_index, expert_cache="1G")
    out = subprocess.run([sys.executable, "-m", "vl2edge.cli", "run", str(artifacts["test-small"]), "--prompt", "Hi",
                          "--expert-cache", "12Q"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "12Q" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("preset", ["test-small", "test-vl2"])
def test_prefetch_predicts_with_the_graphs_own_router_and_never_changes_tokens(artifacts, scene, preset):
    """The routers file is the attention graphs' router: applied to a layer's own residual stream it gives the
    router logits the graph computes. Predicting the next layer's experts loads some early and changes no token."""
    art = artifacts[preset]
    m = vl2edge.load(art, expert_cache="1G")
    eng, cache = m.engine, m.engine.expert_cache
    assert cache.predicts and eng.expert_prefetch
    x = np.random.default_rng(0).standard_normal((1, 3, eng.config.language.hidden_size)).astype(np.float32)
    for i, layer in enumerate(eng.layers):
        if layer.cached:
            outs = eng._attention(i, layer, x, 0, 3, "cpu")
            np.testing.assert_allclose(cache.router_logits(i, outs[0].numpy()), outs[2].numpy(), rtol=1e-4, atol=1e-5)
    budget = smallest_budget(art) + int(smallest_budget(art) / 2)  # room for a prediction beside a step's experts
    runs = {}
    for prefetch in (True, False):
        m = vl2edge.load(art, expert_cache=budget, expert_prefetch=prefetch)
        runs[prefetch] = (m.generate(PROMPT, images=[scene], max_new_tokens=NEW).token_ids,
                          m.engine.expert_cache.stats)
    (with_tokens, with_stats), (without_tokens, without_stats) = runs[True], runs[False]
    assert with_tokens == without_tokens
    assert with_stats.prefetched > 0 and with_stats.predicted > 0 and with_stats.prefetch_hits > 0
    assert 0 < with_stats.predicted_right <= with_stats.predicted
    assert without_stats.prefetched == without_stats.prefetch_hits == without_stats.predicted == 0


def test_a_session_does_not_read_the_buffer_its_expert_was_read_into(artifacts):
    """A loader thread reads every expert into one reused buffer: ONNX Runtime must have copied (and prepacked)
    what it needs by the time the session exists."""
    eng = vl2edge.load(artifacts["test-small"], expert_cache="1G").engine
    cache = eng.expert_cache
    session, _ = cache._load(1, 3)
    x = np.random.default_rng(1).standard_normal((4, eng.config.language.hidden_size)).astype(np.float32)
    feeds = {"x": x, "router_probs": np.ones((4, 1), np.float32), "router_weights": np.ones((4, 1), np.float32)}
    before = session.run(None, feeds)[0]
    buf = cache._buffer()
    buf[:] = np.random.default_rng(2).integers(0, 256, len(buf), dtype=np.uint8).tobytes()
    np.testing.assert_array_equal(session.run(None, feeds)[0], before)
    assert np.abs(before).max() > 0


def test_a_collected_cache_closes_its_files_and_threads(artifacts, scene):
    import gc
    import os

    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    m = vl2edge.load(artifacts["test-small"], expert_cache="1G")
    m.generate(PROMPT, images=[scene], max_new_tokens=2)
    cache = m.engine.expert_cache
    fds, loaders = set(cache._fds.values()), cache._loaders
    assert fds
    before = open_fds()
    del m, cache
    gc.collect()
    assert open_fds() <= before - len(fds)
    assert loaders._shutdown


def test_an_index_without_routers_runs_without_prediction(artifacts, scene, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(artifacts["test-small"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    routers = manifest["graphs"]["routed_experts"].pop("routers")
    del manifest["files"][routers]
    (old / routers).unlink()
    (old / "manifest.json").write_text(json.dumps(manifest))
    m = vl2edge.load(old, expert_cache="1G")
    assert not m.engine.expert_prefetch and m.engine.expert_cache.router(1) is None
    tokens = m.generate(PROMPT, images=[scene], max_new_tokens=NEW).token_ids
    assert tokens == vl2edge.load(artifacts["test-small"], expert_cache="1G").generate(
        PROMPT, images=[scene], max_new_tokens=NEW).token_ids
    assert m.engine.expert_cache.stats.prefetched == 0


def test_the_index_adds_no_weight_bytes(artifacts):
    art = artifacts["test-small"]
    m = json.loads((art / "manifest.json").read_text())
    routed = m["graphs"]["routed_experts"]
    assert sorted(routed["layers"]) == ["1", "2"]
    assert routed["routers"] in m["files"]  # the one addition: every MoE layer's router again, for the prefetch
    for i, entry in routed["layers"].items():
        assert not (art / f"layer{int(i):02d}_shared.onnx.data").exists()  # its weights are the MoE graph's
        assert entry["shared"]["file"] in m["files"]
        data = (art / entry["data"]).stat().st_size
        for t in entry["tensors"].values():
            assert t["offset"] + int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize <= data


def _checkpoint_of(art):
    return json.loads((art / "manifest.json").read_text())["source"]["checkpoint"]

"""bench/step_bytes.py: the bytes a decode step reads, counted from the artifact's initializers, against the
config-derived count of bench/roofline.py (written from the shapes, not from the files), and from a GGUF against
sizes counted by hand."""

from __future__ import annotations

import json

import pytest

from vl2edge.bench import roofline, step_bytes
from vl2edge.model.config import VL2Config

from test_peer import write_gguf  # tests/ is on sys.path (rootdir-relative, no package)


@pytest.fixture(scope="module")
def artifacts(test_checkpoints, tmp_path_factory):
    from vl2edge.export.exporter import export

    root = tmp_path_factory.mktemp("step-bytes")
    return {p: export(test_checkpoints[p], root / p, experts="int4", progress=False)
            for p in ("test-tiny", "test-small")}


@pytest.mark.parametrize("preset", ["test-tiny", "test-small"])  # MHA + GQA; MLA with the latent cache
def test_artifact_count_agrees_with_the_config_derived_count(artifacts, preset):
    art = artifacts[preset]
    manifest = json.loads((art / "manifest.json").read_text())
    cfg = VL2Config.from_dict(json.loads((art / "config.json").read_text()))
    derived = roofline.active_weight_bytes(cfg, manifest["quantization"], io_bytes=4)
    counted = step_bytes.artifact_step_bytes(art, 0)
    assert counted["routed_experts"] == derived["routed_experts"]  # k of E experts per MoE layer
    assert counted["embedding"] == derived["embedding_row"]  # one row, not the table
    # the files also hold the graphs' small int64 constants (split sizes, shapes): a few bytes each
    for part, by_config in (("dense_mlp", "dense_mlp"), ("shared_experts", "shared_experts"), ("head", "lm_head")):
        assert 0 <= counted[part] - derived[by_config] <= 64 * cfg.language.num_hidden_layers, part
    # attention: the projections, norms and router by both counts; the files add one row of each rope table and
    # the small constants the graphs carry
    rest = derived["attention"] + derived["router"] + derived["norms"]
    assert rest <= counted["attention"] <= rest * 1.02 + 4096
    assert derived["total"] <= counted["total"] <= derived["total"] * 1.02 + 8192


def test_context_and_routing_enter_the_count(artifacts):
    art = artifacts["test-small"]
    manifest = json.loads((art / "manifest.json").read_text())
    base, deep = step_bytes.artifact_step_bytes(art, 0), step_bytes.artifact_step_bytes(art, 100)
    assert deep["kv_cache"] == 100 * manifest["attention"]["cache_bytes_per_token"]
    assert deep["total"] - base["total"] == deep["kv_cache"]
    cfg = json.loads((art / "config.json").read_text())["language_config"]
    moe_layers = sum(1 for e in manifest["graphs"]["layers"] if e.get("moe"))
    all_experts = step_bytes.artifact_step_bytes(art, 0, [cfg["n_routed_experts"]] * moe_layers)
    assert all_experts["routed_experts"] * cfg["num_experts_per_tok"] == \
        base["routed_experts"] * cfg["n_routed_experts"]


def test_gguf_count_by_hand(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, layers=2, experts=4, used=2, heads=2, head_dim=4, hidden=8, vocab=16)
    got = step_bytes.gguf_step_bytes(path, context=10)
    assert got["embedding"] == 8 * 4  # one fp32 row of 8
    assert got["routed_experts"] == 2 * (4 * 8 * 8 * 4) * 2 // 4  # two layers, 2 of 4 experts
    assert got["other_weights"] == 2 * 8 * 8 * 4  # attn_q whole
    assert got["output"] == 16 * 8 * 4
    assert got["kv_cache"] == 2 * (2 * (4 + 4) * 2) * 10  # layers x heads x (K + V dims) x f16 x context
    assert got["total"] == sum(v for k, v in got.items() if k != "total")

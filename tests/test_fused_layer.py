"""export/fused_layer.py: a graph per decoder layer that routes itself, against the two graphs and numpy's routing."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
from PIL import Image

from vl2edge.export.exporter import export
from vl2edge.export.fused_layer import fusable
from vl2edge.model.config import VL2Config
from vl2edge.runtime.engine import Engine
from vl2edge.runtime.processor import Processor


@pytest.fixture(scope="module")
def int4(test_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    return {p: export(test_checkpoints[p], root / p, experts="int4", progress=False)
            for p in ("test-tiny", "test-small")}


def run(engine: Engine, inp, steps: int) -> tuple[list[int], np.ndarray, dict]:
    """Greedy tokens and every logit of a prompt (with an image) and `steps` decode steps; the experts counted."""
    logits = [engine.prefill(engine.embed(inp.input_ids, inp.pixel_values, inp.images_seq_mask,
                                          inp.images_spatial_crop))]
    tokens = [int(np.argmax(logits[-1]))]
    for _ in range(steps):
        logits.append(engine.decode(tokens[-1]))
        tokens.append(int(np.argmax(logits[-1])))
    return tokens, np.stack(logits), engine.expert_counts.as_dict()


@pytest.mark.parametrize("preset", ["test-tiny", "test-small"])
def test_a_fused_layer_computes_what_the_two_graphs_and_numpys_routing_do(test_checkpoints, int4, preset):
    art = int4[preset]
    image = Image.new("RGB", (640, 480), (180, 40, 40))
    inp = Processor.from_dir(art)("<image>\nWhat is on the table?", images=[image])
    fused, split = Engine(art), Engine(art, fused_layers=False)
    assert all(layer.fused is not None and layer.attention is None for layer in fused.layers)
    assert all(layer.fused is None for layer in split.layers)
    f_tokens, f_logits, f_counts = run(fused, inp, 12)
    s_tokens, s_logits, s_counts = run(split, inp, 12)
    assert f_counts == s_counts and sum(map(sum, f_counts.values())) > 0  # the same experts, token by token counted
    assert f_tokens == s_tokens
    # the weights are onnxruntime's softmax instead of numpy's: the same to the last bits, which the 8-bit cache
    # may turn into a code now and then
    np.testing.assert_allclose(f_logits, s_logits, rtol=0, atol=2e-3 * np.abs(s_logits).max())
    assert fused.timings.layers > 0 and fused.timings.attention == fused.timings.experts == 0
    # the routing trace records the fused layers' choices as the split layers' (cli's --trace-routing)
    fused.reset(), split.reset()
    fused.routing_trace, split.routing_trace = [], []
    fused.prefill(fused.embed(inp.input_ids[:20])), split.prefill(split.embed(inp.input_ids[:20]))
    assert [i for i, _ in fused.routing_trace] == [i for i, _ in split.routing_trace]
    for (_, a), (_, b) in zip(fused.routing_trace, split.routing_trace, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_fused_graphs_add_no_weight_bytes(int4):
    art = int4["test-tiny"]
    m = json.loads((art / "manifest.json").read_text())
    for i, entry in enumerate(m["graphs"]["layers"]):
        assert entry["layer"]["file"] == f"layer{i:02d}.onnx" and entry["layer"]["file"] in m["files"]
        model = onnx.load(str(art / entry["layer"]["file"]), load_external_data=False)
        data = {kv.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                for kv in t.external_data if kv.key == "location"}
        assert data == {f"{entry['attention']['file']}.data", f"{entry['mlp']['file']}.data"}
        assert [o["name"] for o in entry["layer"]["outputs"]][0] == "hidden_out"
        assert ("expert_ids" in [o["name"] for o in entry["layer"]["outputs"]]) == entry["moe"]
    assert not list(art.glob("layer??.onnx.data"))


def test_only_softmax_greedy_unnormalized_routing_in_the_weights_form_fuses(test_checkpoints, tmp_path):
    L = VL2Config.from_dict(json.loads((test_checkpoints["test-tiny"] / "config.json").read_text())).language
    assert fusable(L, "weights") and not fusable(L, "log_weights")
    assert not fusable(replace(L, topk_method="group_limited_greedy"), "weights")
    assert not fusable(replace(L, norm_topk_prob=True), "weights")
    assert not fusable(replace(L, scoring_func="sigmoid", topk_method="noaux_tc"), "weights")
    assert fusable(replace(L, n_routed_experts=0), "log_weights")  # dense layers only: nothing to route
    # an artifact with unquantized experts (MoE op, "log_weights") keeps two graphs per layer
    fp32 = export(test_checkpoints["test-tiny"], tmp_path / "fp32", experts="fp32", progress=False)
    assert not any("layer" in e for e in json.loads((fp32 / "manifest.json").read_text())["graphs"]["layers"])

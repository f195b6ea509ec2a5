"""The runtime's numpy dispatch against hand-computed cases and against the reference's torch routing."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from vl2edge.model.config import VL2Config
from vl2edge.model.presets import preset_config
from vl2edge.model.routing import route as torch_route
from vl2edge.contract.routing_feed import expert_graph_inputs
from vl2edge.runtime.dispatch import ExpertCounts, RoutingConfig, route, weights_of


def lang(preset, **over):
    return dataclasses.replace(VL2Config.from_dict(preset_config(preset)).language, **over)


def logit(p):
    return math.log(p / (1 - p))


def test_softmax_greedy_unnormalized_hand_case():
    cfg = RoutingConfig(num_experts=6, top_k=2)
    idx, w = route(np.log([[0.4, 0.3, 0.1, 0.1, 0.05, 0.05]]), cfg)
    assert idx.tolist() == [[0, 1]]
    np.testing.assert_allclose(w, [[0.4, 0.3]], atol=1e-6)


def test_ties_go_to_the_lower_expert_index():
    cfg = RoutingConfig(num_experts=6, top_k=3)
    idx, w = route(np.zeros((2, 6)), cfg)  # all equal
    assert idx.tolist() == [[0, 1, 2], [0, 1, 2]]
    np.testing.assert_allclose(w, 1 / 6, atol=1e-7)
    idx, _ = route(np.log([[0.1, 0.3, 0.1, 0.3, 0.1, 0.1]]), cfg)
    assert idx.tolist() == [[1, 3, 0]]


def test_vl2_bias_selects_but_does_not_weight():
    cfg = RoutingConfig(num_experts=4, top_k=2, scoring="sigmoid", method="noaux_tc", norm_topk_prob=True,
                        routed_scaling_factor=2.0)
    idx, w = route(np.array([[logit(p) for p in (0.9, 0.8, 0.7, 0.6)]]), cfg, np.array([0, 0, 0.25, 0]))
    assert sorted(idx[0].tolist()) == [0, 2]
    got = dict(zip(idx[0].tolist(), w[0].tolist()))
    assert got[0] == pytest.approx(1.125, abs=1e-5) and got[2] == pytest.approx(0.875, abs=1e-5)
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        route(np.zeros((1, 4)), cfg)


def test_group_limited_noaux_tc_hand_case():
    cfg = RoutingConfig(num_experts=8, top_k=2, scoring="sigmoid", method="noaux_tc", n_group=4, topk_group=2,
                        norm_topk_prob=True)
    idx, _ = route(np.array([[logit(p) for p in (0.95, 0.1, 0.6, 0.6, 0.55, 0.55, 0.2, 0.2)]]), cfg, np.zeros(8))
    assert sorted(idx[0].tolist()) == [2, 3]


@pytest.mark.parametrize("preset,over", [
    ("tiny", {}), ("small", {}), ("vl2", {}),
    ("test-vl2", {}),  # 4 groups, keep 2
    ("tiny", {"topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3}),
    ("tiny", {"norm_topk_prob": True, "routed_scaling_factor": 1.5}),
])
def test_matches_reference_routing_on_random_logits(preset, over):
    L = lang(preset, **over)
    cfg = RoutingConfig.from_language_config(L)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((200, L.n_routed_experts)).astype(np.float32) * 2
    bias = rng.standard_normal(L.n_routed_experts).astype(np.float32) * 0.1 if L.topk_method == "noaux_tc" else None
    idx, w = route(logits, cfg, bias)
    tidx, tw = torch_route(torch.as_tensor(logits), L, None if bias is None else torch.as_tensor(bias))
    order, torder = np.argsort(idx, axis=1), np.argsort(tidx.numpy(), axis=1)
    np.testing.assert_array_equal(np.take_along_axis(idx, order, 1), np.take_along_axis(tidx.numpy(), torder, 1))
    np.testing.assert_allclose(np.take_along_axis(w, order, 1), np.take_along_axis(tw.numpy(), torder, 1),
                               rtol=1e-5, atol=1e-7)
    # experts chosen elsewhere (the reference's, held by bench/fidelity.py) get the weights route() would give them
    np.testing.assert_array_equal(weights_of(logits, idx, cfg), w)
    other = np.argsort(logits, axis=1)[:, :cfg.top_k]  # the k worst: different experts, different weights
    assert not np.allclose(weights_of(logits, other, cfg), w)


def test_expert_graph_inputs_and_counts():
    idx = np.array([[0, 2], [2, 3]])
    probs, weights = expert_graph_inputs(idx, np.array([[0.5, 0.25], [0.1, 0.2]], np.float32), 4)
    assert probs.tolist() == [[1, 0, 1, 0], [0, 0, 1, 1]]
    np.testing.assert_allclose(weights, [[0.5, 0, 0.25, 0], [0, 0, 0.1, 0.2]])
    counts = ExpertCounts(4)
    counts.add(1, idx)
    counts.add(1, idx[:1])
    assert counts.as_dict() == {"1": [2, 0, 3, 1]}

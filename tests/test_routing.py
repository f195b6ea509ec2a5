"""MoE routing against hand-computed cases (reference §7)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from vl2edge.model.config import VL2Config
from vl2edge.model.presets import preset_config
from vl2edge.model.routing import route


def lang(preset: str, **over):
    return dataclasses.replace(VL2Config.from_dict(preset_config(preset)).language, **over)


def logit(p):
    return math.log(p / (1 - p))


def as_dict(idx, w):
    return {int(i): float(x) for i, x in zip(idx[0], w[0])}


def test_softmax_greedy_keeps_raw_probabilities():
    cfg = lang("tiny", num_experts_per_tok=2, n_routed_experts=6)
    probs = [0.4, 0.3, 0.1, 0.1, 0.05, 0.05]
    idx, w = route(torch.tensor([[math.log(p) for p in probs]]), cfg)
    got = as_dict(idx, w)
    assert got.keys() == {0, 1}
    assert got[0] == pytest.approx(0.4, abs=1e-6) and got[1] == pytest.approx(0.3, abs=1e-6)
    assert sum(got.values()) == pytest.approx(0.7, abs=1e-6)  # NOT renormalized to 1


def test_sigmoid_noaux_tc_bias_selects_but_does_not_weight():
    cfg = lang("vl2", num_experts_per_tok=2, n_routed_experts=4, n_group=1, topk_group=1)
    scores = [0.9, 0.8, 0.7, 0.6]
    bias = torch.tensor([0.0, 0.0, 0.25, 0.0])  # choice = 0.9, 0.8, 0.95, 0.6 -> experts 2 and 0
    idx, w = route(torch.tensor([[logit(p) for p in scores]]), cfg, bias)
    got = as_dict(idx, w)
    assert got.keys() == {0, 2}
    # unbiased scores 0.9 and 0.7 renormalized (0.5625, 0.4375), times routed_scaling_factor 2.0
    assert got[0] == pytest.approx(1.125, abs=1e-5) and got[2] == pytest.approx(0.875, abs=1e-5)
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        route(torch.zeros(1, 4), cfg, None)


def test_noaux_tc_group_limit_excludes_the_best_single_expert():
    cfg = lang("vl2", num_experts_per_tok=2, n_routed_experts=8, n_group=4, topk_group=2)
    scores = [0.95, 0.1, 0.6, 0.6, 0.55, 0.55, 0.2, 0.2]
    # group score = sum of the top-2 choices per group: 1.05, 1.2, 1.1, 0.4 -> groups 1 and 2 are kept
    idx, w = route(torch.tensor([[logit(p) for p in scores]]), cfg, torch.zeros(8))
    got = as_dict(idx, w)
    assert got.keys() == {2, 3}
    assert got[2] == pytest.approx(1.0, abs=1e-5) and got[3] == pytest.approx(1.0, abs=1e-5)


def test_group_limited_greedy_uses_max_per_group():
    cfg = lang("tiny", topk_method="group_limited_greedy", num_experts_per_tok=2, n_routed_experts=6,
               n_group=3, topk_group=1)
    probs = [0.30, 0.01, 0.20, 0.19, 0.15, 0.15]  # group max: 0.30, 0.20, 0.15 -> only group 0 is kept
    idx, w = route(torch.tensor([[math.log(p) for p in probs]]), cfg)
    got = as_dict(idx, w)
    assert got.keys() == {0, 1}
    assert got[0] == pytest.approx(0.30, abs=1e-6) and got[1] == pytest.approx(0.01, abs=1e-6)


def test_norm_topk_prob_with_softmax_and_scaling():
    cfg = lang("tiny", num_experts_per_tok=2, n_routed_experts=4, norm_topk_prob=True, routed_scaling_factor=3.0)
    idx, w = route(torch.tensor([[math.log(p) for p in (0.5, 0.3, 0.1, 0.1)]]), cfg)
    got = as_dict(idx, w)
    assert got[0] == pytest.approx(3.0 * 0.5 / 0.8, abs=1e-5) and got[1] == pytest.approx(3.0 * 0.3 / 0.8, abs=1e-5)


def test_router_runs_in_fp32_for_bf16_inputs():
    cfg = lang("tiny", num_experts_per_tok=2, n_routed_experts=4)
    idx, w = route(torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.bfloat16), cfg)
    assert w.dtype == torch.float32 and set(idx[0].tolist()) == {2, 3}

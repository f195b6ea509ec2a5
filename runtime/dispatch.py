"""Top-k expert dispatch in numpy: from a layer's router logits to the experts the expert graph runs, and weights.

The exact selection and weights of each DeepSeek-VL2 variant (reference §7), in fp32:
  softmax + greedy (Tiny, Small)        top-k of softmax(logits); weights = those probabilities, not renormalized
  softmax + group_limited_greedy        keep the topk_group groups with the largest max probability, then top-k
  sigmoid + noaux_tc (VL2)              choice = sigmoid + e_score_correction_bias picks (group score = sum of the
                                        top-2 choices in the group); weights = the unbiased sigmoid scores of the
                                        chosen, renormalized (+1e-20) when norm_topk_prob
then x routed_scaling_factor. Experts of dropped groups get 0.0 before the final top-k, as the official code does.
Ties go to the lower expert index (a stable sort): deterministic on every platform.

The expert graph takes `router_probs` = a 0/1 mask of the chosen experts and `router_weights`
(contract/routing_feed.py), so it computes only the chosen experts and never re-derives the choice. `ExpertCounts` records which experts ran per
layer: the base for expert caching on small devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class RoutingConfig:
    num_experts: int
    top_k: int
    scoring: str = "softmax"  # softmax | sigmoid
    method: str = "greedy"  # greedy | group_limited_greedy | noaux_tc
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    @classmethod
    def from_language_config(cls, lc: dict) -> "RoutingConfig":
        """From a resolved language config (model.config.LanguageConfig or its dict form)."""
        get = (lambda k: getattr(lc, k)) if not isinstance(lc, dict) else lc.__getitem__
        return cls(num_experts=get("n_routed_experts"), top_k=get("num_experts_per_tok"),
                   scoring=get("scoring_func"), method=get("topk_method"), n_group=get("n_group") or 1,
                   topk_group=get("topk_group") or 1, norm_topk_prob=bool(get("norm_topk_prob")),
                   routed_scaling_factor=float(get("routed_scaling_factor")))


def _top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row; ties to the lower index."""
    return np.argsort(-values, axis=-1, kind="stable")[:, :k]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _within_groups(values: np.ndarray, group_scores: np.ndarray, cfg: RoutingConfig) -> np.ndarray:
    n = values.shape[0]
    keep = _top_k(group_scores, cfg.topk_group)
    mask = np.zeros_like(group_scores, dtype=bool)
    np.put_along_axis(mask, keep, True, axis=1)
    mask = np.repeat(mask, cfg.num_experts // cfg.n_group, axis=1).reshape(n, cfg.num_experts)
    return _top_k(np.where(mask, values, 0.0), cfg.top_k)


def route(logits: np.ndarray, cfg: RoutingConfig, correction_bias: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """logits [T, E] -> (expert ids [T, k] int64, weights [T, k] float32)."""
    logits = np.asarray(logits, dtype=np.float32)
    scores = _softmax(logits) if cfg.scoring == "softmax" else _sigmoid(logits)
    n = scores.shape[0]
    if cfg.method == "greedy":
        idx = _top_k(scores, cfg.top_k)
    elif cfg.method == "group_limited_greedy":
        idx = _within_groups(scores, scores.reshape(n, cfg.n_group, -1).max(axis=-1), cfg)
    elif cfg.method == "noaux_tc":
        if correction_bias is None:
            raise ValueError("noaux_tc routing needs e_score_correction_bias")
        choice = scores + np.asarray(correction_bias, dtype=np.float32)[None, :]
        top2 = -np.sort(-choice.reshape(n, cfg.n_group, -1), axis=-1)[..., :2]
        idx = _within_groups(choice, top2.sum(axis=-1), cfg)
    else:
        raise ValueError(f"unknown topk_method {cfg.method!r}")
    return idx.astype(np.int64), _weights(scores, idx, cfg)


def _weights(scores: np.ndarray, idx: np.ndarray, cfg: RoutingConfig) -> np.ndarray:
    # VL2's selection bias only picks; the weights are unbiased. Fancy indexing, not take_along_axis: the same
    # values, without its index construction (~10 us a call, 11-26 calls a decode step)
    weights = scores[np.arange(len(idx))[:, None], idx]
    if cfg.top_k > 1 and cfg.norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return (weights * cfg.routed_scaling_factor).astype(np.float32)


def weights_of(logits: np.ndarray, idx: np.ndarray, cfg: RoutingConfig) -> np.ndarray:
    """The weights route() gives experts `idx` [T, k], whichever chose them (bench/fidelity.py holds the
    reference's choices and weighs them with the artifact's own router logits)."""
    logits = np.asarray(logits, dtype=np.float32)
    return _weights(_softmax(logits) if cfg.scoring == "softmax" else _sigmoid(logits), idx, cfg)


@dataclass
class ExpertCounts:
    """How many tokens each expert of each MoE layer processed."""

    num_experts: int
    counts: dict[int, np.ndarray] = field(default_factory=dict)

    def add(self, layer: int, idx: np.ndarray) -> None:
        c = self.counts.setdefault(layer, np.zeros(self.num_experts, np.int64))
        c += np.bincount(idx.reshape(-1), minlength=self.num_experts)

    def as_dict(self) -> dict[str, list[int]]:
        return {str(layer): c.tolist() for layer, c in sorted(self.counts.items())}

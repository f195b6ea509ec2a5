"""MoE routing: which experts a token goes to, and with what weight (reference §7).

All in fp32 (the official gate casts x and W to float32).
  softmax + greedy (Tiny, Small): top-k of the softmax probabilities, weights = those probabilities, NOT
      renormalized (they do not sum to 1), x routed_scaling_factor (1.0).
  softmax + group_limited_greedy: keep the topk_group groups with the highest max score, then top-k inside them.
  sigmoid + noaux_tc (VL2): choice = sigmoid + e_score_correction_bias decides the selection only (group score =
      sum of the top-2 choices in the group); weights = the unbiased sigmoid scores of the chosen experts,
      renormalized to sum 1 (denominator + 1e-20) when norm_topk_prob, then x routed_scaling_factor (2.0).
Masked-out groups are filled with 0.0 before the final top-k, exactly as the official code does (some later
engines use -inf; the two differ only when every kept choice is negative, and never with VL2's single group).
"""

from __future__ import annotations

import torch

from .config import LanguageConfig


def route(logits: torch.Tensor, cfg: LanguageConfig, correction_bias: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [n, E] (fp32) -> (expert ids [n, k] int64, weights [n, k] fp32)."""
    logits = logits.float()
    n, num_experts = logits.shape
    k = cfg.num_experts_per_tok
    if cfg.scoring_func == "softmax":
        scores = logits.softmax(dim=-1)
    else:
        scores = logits.sigmoid()

    if cfg.topk_method == "greedy":
        weights, idx = torch.topk(scores, k, dim=-1, sorted=False)
    elif cfg.topk_method == "group_limited_greedy":
        g = cfg.n_group
        group_scores = scores.view(n, g, -1).max(dim=-1).values
        idx = _topk_in_groups(scores, group_scores, cfg)
        weights = scores.gather(1, idx)
    elif cfg.topk_method == "noaux_tc":
        if correction_bias is None:
            raise ValueError("noaux_tc routing needs e_score_correction_bias")
        choice = scores + correction_bias.float().unsqueeze(0)
        g = cfg.n_group
        group_scores = choice.view(n, g, -1).topk(2, dim=-1).values.sum(dim=-1)
        idx = _topk_in_groups(choice, group_scores, cfg)
        weights = scores.gather(1, idx)  # the bias only picks; the weights are unbiased
    else:
        raise ValueError(f"unknown topk_method {cfg.topk_method!r}")

    if k > 1 and cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, weights * cfg.routed_scaling_factor


def _topk_in_groups(values: torch.Tensor, group_scores: torch.Tensor, cfg: LanguageConfig) -> torch.Tensor:
    n, num_experts = values.shape
    g = cfg.n_group
    group_idx = torch.topk(group_scores, cfg.topk_group, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
    expert_mask = group_mask.unsqueeze(-1).expand(n, g, num_experts // g).reshape(n, num_experts)
    masked = values.masked_fill(expert_mask == 0, 0.0)
    return torch.topk(masked, cfg.num_experts_per_tok, dim=-1, sorted=False).indices

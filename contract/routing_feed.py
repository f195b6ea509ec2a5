"""How the runtime's routing reaches a MoE layer's expert graph (the format's contract).

The runtime routes (runtime/dispatch.py: each variant's exact selection and weights) and hands the graph only the
k chosen experts of each token and their weights, as two [T, n_routed_experts] tensors of the io dtype:
  router_probs    1 at the chosen experts, 0 elsewhere
  router_weights  the mixing weight of each chosen expert (0 elsewhere)
The same feed serves both forms the exporter writes (manifest quantization.routing.form):
  "weights"      (cpu target, int4/int8 experts, onnxruntime >= 1.25): QMoE reads the top-k of the mask and takes
                 router_weights (input 14) as the weights, normalize_routing_weights 0. Exact on the CPU kernel.
  "log_weights"  (cuda target, unquantized experts, or an onnxruntime without router_weights): the graph itself
                 turns the feed into router_probs = log(w) at the chosen experts and UNSELECTED elsewhere and
                 multiplies the layer's output by sum(w) per token, so a kernel that takes a softmax over all
                 router_probs (CUDA) or over the chosen k (CPU without input 14) still computes sum_i w_i e_i(x).
Ties in the mask never arise: it has exactly k ones per row. export/mlp.py writes the graphs; docs/artifact-format.md
says the same in prose.
"""

from __future__ import annotations

import numpy as np

ROUTING_FORMS = ("weights", "log_weights")
UNSELECTED = -1e4  # router_probs of the experts not chosen under "log_weights" (exp(-1e4) is 0 in fp16 and fp32)


def expert_graph_inputs(idx: np.ndarray, weights: np.ndarray, num_experts: int, dtype=np.float32):
    """(router_probs, router_weights) [T, E] for the expert graph: a 0/1 mask of the chosen experts and the weights
    scattered at them."""
    probs = np.zeros((idx.shape[0], num_experts), dtype=dtype)
    dense = np.zeros_like(probs)
    rows = np.arange(idx.shape[0])[:, None]  # fancy indexing: put_along_axis's index construction costs more
    probs[rows, idx] = 1.0
    dense[rows, idx] = weights.astype(dtype)
    return probs, dense

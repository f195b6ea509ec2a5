"""Routing traces: which experts every MoE layer chose for every token, in the order the engine ran them, so an
expert cache can be sized for real weights (bench/expert_replay.py replays a trace against a budget).

A trace is a list of records (layer, experts [T, k]): one per MoE layer per forward call (a prefill chunk, or a
prompt layer by layer with the expert cache, or one decode step). Saved as .npz:
  layers   int32 [R]       the layer of each record
  starts   int64 [R + 1]   record r's tokens are rows starts[r] .. starts[r + 1] - 1 of `experts`
  experts  int16 [N, k]    the chosen expert ids, in the router's order
  num_experts, num_layers  int scalars (the model's n_routed_experts and num_hidden_layers)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_trace(path: str | Path, records: list[tuple[int, np.ndarray]], num_experts: int, num_layers: int) -> Path:
    path = Path(path)
    k = records[0][1].shape[1] if records else 1
    sizes = np.array([len(idx) for _, idx in records], np.int64)
    np.savez_compressed(path, layers=np.array([layer for layer, _ in records], np.int32),
                        starts=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                        experts=(np.concatenate([idx for _, idx in records]) if records
                                 else np.zeros((0, k))).astype(np.int16),
                        num_experts=num_experts, num_layers=num_layers)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def load_trace(path: str | Path) -> tuple[list[tuple[int, np.ndarray]], int, int]:
    """-> (records, num_experts, num_layers)."""
    with np.load(path) as z:
        layers, starts, experts = z["layers"], z["starts"], z["experts"].astype(np.int64)
        records = [(int(layer), experts[starts[r]:starts[r + 1]]) for r, layer in enumerate(layers)]
        return records, int(z["num_experts"]), int(z["num_layers"])

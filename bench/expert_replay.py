"""How large an expert cache has to be: a routing trace replayed against the runtime's cache policy, hit rate
against the budget.

  python -m vl2edge.bench.expert_replay TRACE.npz [--fractions 0.1,0.2,...,1.0] [--prefetch-accuracy 0.9]
  python -m vl2edge.bench.expert_replay --synthetic uniform|skewed --layers 26 --experts 64 --k 6 --tokens 4000

A trace comes from `vl2edge run|chat ... --trace-routing TRACE.npz` (runtime/routing_trace.py). The replay does
what runtime/expert_cache.py does: each record (one MoE layer of one forward call) touches each distinct expert it
chose once, in ascending id; a resident expert is a hit and moves to the recent end; a miss evicts the least
recently used until the new one fits. The budget is a fraction of all routed experts (MoE layers x experts).

Prefetch: while layer L runs, the next MoE layer's experts are predicted (its router applied to the current hidden
state; published systems report ~90% on real models) and read in the background. The replay models a predictor
that names each expert the next record will touch with probability `accuracy`; a correctly predicted miss is read
off the critical path ("late misses" are what is left). Prefetching inserts before use, so it also evicts: the hit
rate is replayed with it.

Synthetic traces (for sizing before real weights exist): "uniform" draws each token's k experts uniformly without
replacement, the worst case for any cache and what synthesized checkpoints route like; "skewed" gives each layer a
Zipf popularity (weight 1 / rank^1.0 over a random permutation of its experts) and lets each token repeat the
previous token's choice at that layer with probability 0.5 (temporal locality), then fills the rest by popularity:
a stand-in for the strong reuse real MoE models show, not a measurement of DeepSeek-VL2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict

import numpy as np

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def synthetic_trace(kind: str, layers: int, experts: int, k: int, tokens: int, seed: int = 0,
                    prompt: int = 0) -> list[tuple[int, np.ndarray]]:
    """A prompt of `prompt` tokens (one record per layer, layer-major) then `tokens` decode steps."""
    rng = np.random.default_rng(seed)
    if kind not in ("uniform", "skewed"):
        raise ValueError(f"synthetic trace {kind!r}: uniform or skewed")
    popularity = []
    for _ in range(layers):
        w = 1.0 / np.arange(1, experts + 1)
        p = np.empty(experts)
        p[rng.permutation(experts)] = w / w.sum()
        popularity.append(p)

    def choose(layer: int, previous: np.ndarray | None) -> np.ndarray:
        if kind == "uniform":
            return rng.choice(experts, k, replace=False)
        p = popularity[layer]
        keep = [] if previous is None else [e for e in previous if rng.random() < 0.5]
        rest = p.copy()
        rest[keep] = 0
        more = rng.choice(experts, k - len(keep), replace=False, p=rest / rest.sum())
        return np.array(keep + more.tolist())

    last: list[np.ndarray | None] = [None] * layers
    records = []
    if prompt:
        for layer in range(layers):
            rows = []
            for _ in range(prompt):
                last[layer] = choose(layer, last[layer])
                rows.append(last[layer])
            records.append((layer, np.array(rows)))
    for _ in range(tokens):
        for layer in range(layers):
            last[layer] = choose(layer, last[layer])
            records.append((layer, last[layer][None]))
    return records


def replay(records: list[tuple[int, np.ndarray]], capacity: int, prefetch_accuracy: float = 0.0,
           seed: int = 0) -> dict:
    """LRU over (layer, expert) with `capacity` slots. Returns hits and misses (a miss is a read on the critical
    path) and, with prefetch, how many experts were read ahead and how many of those were used."""
    if capacity < 1:
        raise ValueError("capacity must be at least one expert")
    rng = np.random.default_rng(seed)
    lru: OrderedDict[tuple[int, int], bool] = OrderedDict()  # key -> read ahead and not used yet
    hits = misses = read_ahead = used_ahead = 0
    step_hits = step_misses = 0  # over the records of one token (decode steps)
    touched = [[(layer, int(e)) for e in np.unique(idx)] for layer, idx in records]
    one_token = [len(idx) == 1 for _, idx in records]

    def insert(key, ahead: bool):
        while len(lru) >= capacity:
            lru.popitem(last=False)
        lru[key] = ahead

    for r, keys in enumerate(touched):
        for key in keys:
            if key in lru:
                hits += 1
                step_hits += one_token[r]
                used_ahead += lru[key]
                lru[key] = False
                lru.move_to_end(key)
            else:
                misses += 1
                step_misses += one_token[r]
                insert(key, False)
        if prefetch_accuracy > 0 and r + 1 < len(touched):  # issued while record r runs, for record r + 1
            for key in touched[r + 1]:
                if key not in lru and rng.random() < prefetch_accuracy:
                    insert(key, True)
                    read_ahead += 1
    total = hits + misses
    step_total = step_hits + step_misses
    return {"capacity": capacity, "hits": hits, "misses": misses, "hit_rate": hits / total if total else None,
            "read_ahead": read_ahead, "read_ahead_used": used_ahead,
            "decode_hit_rate": step_hits / step_total if step_total else None, "decode_misses": step_misses}


def table(records, num_experts: int, moe_layers: int, fractions=FRACTIONS, prefetch_accuracy: float = 0.9) -> list:
    """Per budget: the decode steps' hit rate and misses per decoded token (all MoE layers), without and with
    prefetch, and the whole trace's hit rate (the prompt's first touches included)."""
    tokens = sum(len(idx) == 1 for _, idx in records) / max(moe_layers, 1)
    rows = []
    for f in fractions:
        cap = max(1, int(round(f * num_experts * moe_layers)))
        plain = replay(records, cap)
        pre = replay(records, cap, prefetch_accuracy)
        rows.append({"fraction": f, "capacity": cap, "hit_rate": plain["hit_rate"],
                     "decode_hit_rate": plain["decode_hit_rate"],
                     "misses_per_token": plain["decode_misses"] / tokens if tokens else None,
                     "decode_hit_rate_prefetch": pre["decode_hit_rate"],
                     "misses_per_token_prefetch": pre["decode_misses"] / tokens if tokens else None,
                     "read_ahead_used": pre["read_ahead_used"] / pre["read_ahead"] if pre["read_ahead"] else None})
    return rows


def render(rows: list, title: str) -> str:
    out = [title, "decode: the one-token records; misses = expert reads on the critical path per decoded token "
                  "(all MoE layers)",
           f"{'budget':>7} {'experts':>8} {'all hit rate':>13} {'decode hit rate':>16} {'misses/token':>13} | "
           f"{'prefetch: hit rate':>18} {'misses/token':>13} {'read ahead used':>16}"]
    for r in rows:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        out.append(f"{r['fraction']:>6.0%} {r['capacity']:>8} {fmt(r['hit_rate'], '.3f'):>13} "
                   f"{fmt(r['decode_hit_rate'], '.3f'):>16} {fmt(r['misses_per_token'], '.1f'):>13} | "
                   f"{fmt(r['decode_hit_rate_prefetch'], '.3f'):>18} {fmt(r['misses_per_token_prefetch'], '.1f'):>13} "
                   f"{fmt(r['read_ahead_used'], '.2f'):>16}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vl2edge.bench.expert_replay", description=__doc__.split("\n")[0])
    ap.add_argument("trace", nargs="?", help="a .npz from --trace-routing")
    ap.add_argument("--synthetic", choices=["uniform", "skewed"], action="append",
                    help="replay a synthetic trace instead (repeatable)")
    ap.add_argument("--layers", type=int, default=26, help="MoE layers (synthetic; Small: 26)")
    ap.add_argument("--experts", type=int, default=64, help="routed experts per layer (synthetic; Small: 64)")
    ap.add_argument("--k", type=int, default=6, help="experts per token (synthetic)")
    ap.add_argument("--tokens", type=int, default=256, help="decode steps (synthetic)")
    ap.add_argument("--prompt", type=int, default=0, help="prompt tokens before them, layer-major (synthetic)")
    ap.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    ap.add_argument("--prefetch-accuracy", type=float, default=0.9)
    ap.add_argument("--json", default=None, help="write the tables as JSON")
    a = ap.parse_args(argv)
    fractions = [float(x) for x in a.fractions.split(",")]
    if not 0 <= a.prefetch_accuracy <= 1:
        ap.error("--prefetch-accuracy must be within 0..1")
    doc = {}
    if a.trace:
        from ..runtime.routing_trace import load_trace

        records, experts, _ = load_trace(a.trace)
        moe_layers = len({layer for layer, _ in records})
        doc[a.trace] = table(records, experts, moe_layers, fractions, a.prefetch_accuracy)
        print(render(doc[a.trace], f"{a.trace}: {len(records)} records, {moe_layers} MoE layers x {experts} experts"))
    for kind in a.synthetic or []:
        records = synthetic_trace(kind, a.layers, a.experts, a.k, a.tokens, prompt=a.prompt)
        doc[kind] = table(records, a.experts, a.layers, fractions, a.prefetch_accuracy)
        print(render(doc[kind], f"synthetic {kind}: {a.tokens} tokens after a {a.prompt}-token prompt, {a.layers} "
                                f"layers x {a.experts} experts, k {a.k}; prefetch accuracy {a.prefetch_accuracy}"))
    if not doc:
        ap.error("give a trace or --synthetic")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

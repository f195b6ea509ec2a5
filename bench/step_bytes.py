"""Bytes one decode step reads, counted from the files that run it: the artifact's ONNX initializers, or a GGUF.

bench/roofline.py derives the same figure from the config and the quantization plan; this counts what is on disk,
so whatever the exporter added (scales, rope tables, MLA's W_UK/W_UV, the router) is in it and nothing is assumed.
At batch 1 a step reads each weight it uses once; which parts of a tensor it uses is read off the op that
consumes it:

  rows       a lookup table read one row per token: a Gather's / GatherBlockQuantized's data and scales (the
             embedding), GroupQueryAttention's and RotaryEmbedding's cos/sin caches (one position)
  experts    a tensor QMoE consumes whose first dimension is the routed-expert count: k of its E slices, k the
             experts a token is routed to. At one token the top-k are k distinct experts and every expert of a
             layer has the same size, so any routing reads the same bytes; `experts_per_layer` overrides k (a
             routing trace's distinct experts per layer, for several tokens)
  whole      everything else (projections, the shared experts, the head, norms)

The KV cache adds `cache_bytes_per_token` (manifest["attention"]) per token of context. A GGUF counts the same
way by tensor name: token_embd one row, `*_exps` k of E, the rest whole; its cache is llama.cpp's f16 default
(MLA: the latent, kv_lora_rank + rope dims; else K and V per head), an estimate from the file's metadata.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

ROW_INPUTS = {("Gather", 0), ("GatherBlockQuantized", 0), ("GatherBlockQuantized", 2),
              ("GroupQueryAttention", 7), ("GroupQueryAttention", 8),
              ("RotaryEmbedding", 2), ("RotaryEmbedding", 3)}


def _consumers(graph, out: dict) -> dict:
    """initializer name -> [(op_type, input index)], subgraphs (If branches) included."""
    import onnx

    for node in graph.node:
        for j, name in enumerate(node.input):
            out[name].append((node.op_type, j))
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _consumers(attr.g, out)
            for g in attr.graphs:
                _consumers(g, out)
    return out


def _stored_bytes(t) -> int:
    from onnx.external_data_helper import uses_external_data

    if uses_external_data(t):
        return int({e.key: e.value for e in t.external_data}.get("length", 0))
    if t.raw_data:
        return len(t.raw_data)
    import onnx.numpy_helper

    return onnx.numpy_helper.to_array(t).nbytes


def graph_step_bytes(path, n_experts: int | None = None, experts: int | None = None) -> dict[str, int]:
    """{"whole", "rows", "experts"} bytes one token reads from one graph file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    uses = _consumers(model.graph, defaultdict(list))
    out = {"whole": 0, "rows": 0, "experts": 0}
    for t in model.graph.initializer:
        size, by = _stored_bytes(t), uses.get(t.name, [])
        if by and all(u in ROW_INPUTS for u in by) and t.dims:
            out["rows"] += size // t.dims[0]
        elif by and all(op == "QMoE" for op, _ in by) and t.dims and n_experts and t.dims[0] == n_experts:
            out["experts"] += size * experts // n_experts
        else:
            out["whole"] += size
    return out


def at_context(weights: dict, cache_bytes_per_token: int, context: int) -> dict:
    """A step's parts at `context` tokens of cache: the weights' parts, kv_cache and total."""
    parts = {**weights, "kv_cache": cache_bytes_per_token * context}
    parts["total"] = sum(parts.values())
    return parts


def artifact_weight_bytes(artifact, experts_per_layer: list[int] | None = None) -> tuple[dict, int]:
    """The weights a decode step of the artifact's Engine reads, by part (embedding, attention with the router,
    dense_mlp, routed_experts, shared_experts, head), and its cache bytes per token of context."""
    from ..model.config import VL2Config

    artifact = Path(artifact)
    m = json.loads((artifact / "manifest.json").read_text())
    lang = VL2Config.from_dict(m["source"]["config"], str(artifact / "manifest.json")).language
    E, k = lang.n_routed_experts, lang.num_experts_per_tok
    g = m["graphs"]
    parts = defaultdict(int)
    parts["embedding"] = sum(graph_step_bytes(artifact / g["embedding"]["file"]).values())
    parts["head"] = sum(graph_step_bytes(artifact / g["head"]["file"]).values())
    moe_i = 0
    for entry in g["layers"]:
        parts["attention"] += sum(graph_step_bytes(artifact / entry["attention"]["file"]).values())
        if entry.get("moe"):
            used = experts_per_layer[moe_i] if experts_per_layer is not None else k
            moe_i += 1
            b = graph_step_bytes(artifact / entry["mlp"]["file"], n_experts=E, experts=used)
            parts["routed_experts"] += b["experts"]
            parts["shared_experts"] += b["whole"] + b["rows"]
        else:
            parts["dense_mlp"] += sum(graph_step_bytes(artifact / entry["mlp"]["file"]).values())
    return dict(parts), int(m["attention"]["cache_bytes_per_token"])


def artifact_step_bytes(artifact, context: int, experts_per_layer: list[int] | None = None) -> dict:
    """Bytes a decode step of the artifact's Engine reads at `context` tokens of cache, by part (module docstring):
    artifact_weight_bytes's parts, kv_cache and total."""
    return at_context(*artifact_weight_bytes(artifact, experts_per_layer), context)


def gguf_weight_bytes(path) -> tuple[dict, int]:
    """The same count for a llama.cpp GGUF (module docstring), by part (embedding, routed_experts, output,
    other_weights), and its cache bytes per token (estimated)."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    field = lambda key, default=None: r.fields[key].contents() if key in r.fields else default  # noqa: E731
    arch = field("general.architecture")
    E, k = field(f"{arch}.expert_count", 0), field(f"{arch}.expert_used_count", 0)
    layers = field(f"{arch}.block_count")
    parts = {"embedding": 0, "routed_experts": 0, "output": 0, "other_weights": 0}
    for t in r.tensors:
        n = int(t.n_bytes)
        if t.name == "token_embd.weight":
            parts["embedding"] += n // int(t.shape[-1])  # ggml's shape: [hidden, vocab], rows last
        elif "_exps." in t.name and E:
            parts["routed_experts"] += n * k // E
        elif t.name.startswith("output."):
            parts["output"] += n
        else:
            parts["other_weights"] += n
    lora = field(f"{arch}.attention.kv_lora_rank")
    if lora:  # MLA: llama.cpp caches the latent and the rope part, f16
        per_layer = (int(lora) + int(field(f"{arch}.rope.dimension_count", 0))) * 2
    else:
        heads = int(field(f"{arch}.attention.head_count_kv", field(f"{arch}.attention.head_count")))
        kl = int(field(f"{arch}.attention.key_length", 0) or field(f"{arch}.embedding_length") // heads)
        vl = int(field(f"{arch}.attention.value_length", 0) or kl)
        per_layer = heads * (kl + vl) * 2
    return parts, per_layer * int(layers)


def gguf_step_bytes(path, context: int) -> dict:
    """gguf_weight_bytes's parts at `context` tokens of cache, kv_cache and total."""
    return at_context(*gguf_weight_bytes(path), context)

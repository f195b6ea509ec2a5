"""Per-layer MLP graphs: the dense SwiGLU MLP of layer 0, and the routed + shared experts of MoE layers.

I/O contract (the runtime binds these names):
  inputs   hidden          io [1, T, H]   residual stream after attention (the attention graph's `hidden_out`)
           mlp_in          io [1, T, H]   post-attention RMSNorm of it (the attention graph's `mlp_in`)
           router_probs    io [T, E]      MoE only: 1 at the k experts the runtime chose, 0 elsewhere (only its top-k
                                          is read; a 0/1 mask makes that exact, with no ties to break)
           router_weights  io [T, E]      MoE only: the mixing weight of each expert, read at the chosen ones
  output   hidden_out      io [1, T, H]   hidden + MLP(mlp_in)

The runtime decides routing (softmax/greedy, sigmoid/noaux_tc, groups) and hands the graph only which experts and
their weights: the graph never re-derives them, and computes only the k chosen experts per token.

Routed experts, and how the runtime's choice reaches the kernel (`routing_form`):
  The three kernels read their routing inputs differently (onnxruntime.md §1.3):
    CPU QMoE with router_weights (input 14): top-k of router_probs; weights = router_weights there, renormalized
        only when normalize_routing_weights = 1;
    CPU QMoE / MoE without input 14: top-k of router_probs; weights = softmax over those k router_probs, ALWAYS
        (the attribute is ignored);
    CUDA QMoE / MoE (reportedly; input 14 ignored): softmax over ALL router_probs, then top-k; renormalized only
        when normalize_routing_weights = 1.
  "weights" (cpu target, int4/int8): router_probs = the 0/1 mask, input 14 = the weights, normalize 0. Exact on
      the CPU kernel and the cheapest; under the CUDA semantics it would give every chosen expert
      e / (k*e + E - k) instead of its weight.
  "log_weights" (cuda target; also every unquantized MoE): the graph turns the same inputs into router_probs =
      log(w) at the chosen experts and -1e4 elsewhere, no input 14. Softmax over all of them and softmax over the
      chosen k are then both w / sum(w) (exp(-1e4) is 0 in fp16 and fp32), so every semantics above selects the
      runtime's experts with weights w / sum(w), and the graph multiplies the output back by sum(w) per token.
  int4 / int8: com.microsoft QMoE with gate/up rows interleaved (swiglu_fusion 1, alpha 1, beta 0: silu(g) * u).
  fp32 / fp16: com.microsoft MoE (it has no router_weights input: always "log_weights").
Shared experts and the dense MLP: gated MLPs of Linear layers at the non-expert precision, gate and up fused.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..contract.routing_feed import ROUTING_FORMS, UNSELECTED
from ..model.config import VL2Config
from ..quant.blockwise import dequantize, quantize_blockwise
from ..quant.pack import interleave_gate_up, pack_qmoe
from ..quant.report import QualityReport
from .linear import Precision, emit_linear
from .onnx_builder import MS_DOMAIN, GraphBuilder

Getter = Callable[[str], np.ndarray]


def _gated_mlp(g: GraphBuilder, x: str, get: Getter, prefix: str, prec: Precision, io_dtype, report, kind: str) -> str:
    """down(silu(gate(x)) * up(x)), gate and up as ONE linear over their stacked rows [2I, H], then split: one weight
    stream and one kernel call instead of two. Block quantization is per row, so stacking changes no value."""
    gate_w, up_w = get(prefix + "gate_proj.weight"), get(prefix + "up_proj.weight")
    gate_up = emit_linear(g, x, np.concatenate([gate_w, up_w]), prec, io_dtype, prefix + "gate_up_proj",
                          report=report, report_kind=kind)
    gate, up = g.op("Split", [gate_up, g.const(prefix + "gate_up_split", np.array([len(gate_w), len(up_w)], np.int64))],
                    n_out=2, hint=prefix + "gate_up", axis=-1)
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate], hint=prefix + "sigmoid")], hint=prefix + "silu")
    h = g.op("Mul", [act, up], hint=prefix + "gated")
    return emit_linear(g, h, get(prefix + "down_proj.weight"), prec, io_dtype, prefix + "down_proj", report=report,
                       report_kind=kind)


def _stacked_experts(cfg: VL2Config, get: Getter, prefix: str, prec: Precision, scale_dtype, report):
    """fc1 [E, 2I, H] (interleaved gate/up) and fc2 [E, H, I], quantized one expert at a time (bounded memory)."""
    E = cfg.language.n_routed_experts
    fc1_parts, fc2_parts = [], []
    for e in range(E):
        p = f"{prefix}experts.{e}."
        fc1 = interleave_gate_up(get(p + "gate_proj.weight")[None], get(p + "up_proj.weight")[None])
        fc2 = get(p + "down_proj.weight")[None]
        if prec.bits is None:
            fc1_parts.append(fc1)
            fc2_parts.append(fc2)
            continue
        for w, parts, kind in ((fc1, fc1_parts, "experts.fc1"), (fc2, fc2_parts, "experts.fc2")):
            qt = quantize_blockwise(w, bits=prec.bits, block_size=prec.block_size, symmetric=True,
                                    scale_dtype=scale_dtype)
            if report is not None:
                report.add(kind, f"{p}{kind}", w, dequantize(qt))
            parts.append(pack_qmoe(qt))
    if prec.bits is None:
        return np.concatenate(fc1_parts), np.concatenate(fc2_parts)
    stack = lambda parts, i: np.concatenate([pp[i] for pp in parts])  # noqa: E731
    return (stack(fc1_parts, 0), stack(fc1_parts, 1)), (stack(fc2_parts, 0), stack(fc2_parts, 1))


def log_weight_logits(g: GraphBuilder, probs: str, weights: str, k: int, prefix: str, io_dtype) -> tuple[str, str]:
    """The "log_weights" routing form: (router_probs = log(w) at the k chosen experts and UNSELECTED elsewhere,
    sum(w) per token [T, 1]) from the runtime's mask and weights."""
    kk = g.const(prefix + "k", np.array([k], np.int64))
    _, idx = g.op("TopK", [probs, kk], n_out=2, hint=prefix + "topk", axis=-1, largest=1, sorted=0)
    w_sel = g.op("GatherElements", [weights, idx], hint=prefix + "w_sel", axis=1)
    floor = g.op("Add", [g.op("Mul", [probs, g.const(prefix + "zero", np.zeros((), io_dtype))]),
                         g.const(prefix + "minus", np.array(UNSELECTED, io_dtype))], hint=prefix + "floor")
    logits = g.op("ScatterElements", [floor, idx, g.op("Log", [w_sel], hint=prefix + "logw")], hint=prefix + "logits",
                  axis=1)
    total = g.op("ReduceSum", [w_sel, g.const(prefix + "axis1", np.array([1], np.int64))], hint=prefix + "w_sum",
                 keepdims=1)
    return logits, total


def _routed_experts(g: GraphBuilder, x2d: str, probs: str, weights: str, cfg: VL2Config, get: Getter, prefix: str,
                    prec: Precision, io_dtype, report, routing_form: str) -> str:
    L = cfg.language
    common = dict(k=L.num_experts_per_tok, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                  activation_beta=0.0, normalize_routing_weights=0)
    scale_dtype = np.float16 if np.dtype(io_dtype) == np.float16 else np.float32
    fc1, fc2 = _stacked_experts(cfg, get, prefix, prec, scale_dtype, report)
    if prec.bits is None or routing_form == "log_weights":
        router_probs, total = log_weight_logits(g, probs, weights, L.num_experts_per_tok, prefix, io_dtype)
        router_weights = ""  # input 14 absent: every kernel then weights by a softmax of router_probs
    else:
        router_probs, total, router_weights = probs, None, weights
    if prec.bits is not None:
        (w1, s1), (w2, s2) = fc1, fc2
        inputs = [x2d, router_probs, g.const(prefix + "fc1.qweight", w1),
                  g.const(prefix + "fc1.scales", s1.astype(io_dtype)), "", g.const(prefix + "fc2.qweight", w2),
                  g.const(prefix + "fc2.scales", s2.astype(io_dtype)),
                  "", "", "", "", "", "", "", router_weights]  # zero points absent (symmetric); 14 = router_weights
        # accuracy_level None: the attribute left out for an onnxruntime without it (contract/ort_compat.py)
        level = {} if prec.accuracy_level is None else {"accuracy_level": prec.accuracy_level}
        y = g.op("QMoE", inputs if router_weights else inputs[:7], domain=MS_DOMAIN,
                 hint=prefix + "qmoe", expert_weight_bits=prec.bits, block_size=prec.block_size, **level, **common)
    else:
        y = g.op("MoE", [x2d, router_probs, g.const(prefix + "fc1.weight", fc1.astype(io_dtype)), "",
                         g.const(prefix + "fc2.weight", fc2.astype(io_dtype))], domain=MS_DOMAIN, hint=prefix + "moe",
                 **common)
    return y if total is None else g.op("Mul", [y, total], hint=prefix + "rescaled")


def build_mlp_graph(cfg: VL2Config, layer: int, get: Getter, prec: Precision, expert_prec: Precision,
                    io_dtype=np.float32, report: QualityReport | None = None,
                    routing_form: str = "weights", routed: bool = True) -> GraphBuilder:
    """`get(name)` returns a checkpoint tensor as fp32 numpy. `prec` is for the dense MLP and shared experts,
    `expert_prec` for the routed experts; routing_form: how QMoE gets the routing (module docstring).
    routed=False: a MoE layer without its routed experts, hidden + shared_experts(mlp_in): the expert cache's
    "shared" graph (export/expert_cache.py), to which the runtime adds the routed experts it runs itself."""
    if routing_form not in ROUTING_FORMS:
        raise ValueError(f"routing_form {routing_form!r}: choose one of {ROUTING_FORMS}")
    L = cfg.language
    H = L.hidden_size
    prefix = f"language.model.layers.{layer}.mlp."
    moe = L.is_moe_layer(layer)
    g = GraphBuilder(f"layer{layer}_{'moe' if moe else 'mlp'}")
    hidden = g.input("hidden", io_dtype, [1, "T", H])
    x = g.input("mlp_in", io_dtype, [1, "T", H])
    if not moe:
        y = _gated_mlp(g, x, get, prefix, prec, io_dtype, report, "dense_mlp")
    elif not routed:  # every released VL2 model has shared experts; without them the graph passes hidden on
        y = _gated_mlp(g, x, get, prefix + "shared_experts.", prec, io_dtype, None, "shared_experts") \
            if L.n_shared_experts else g.op("Mul", [x, g.const("zero", np.zeros((), io_dtype))], hint="no_shared")
    else:
        probs = g.input("router_probs", io_dtype, ["T", L.n_routed_experts])
        weights = g.input("router_weights", io_dtype, ["T", L.n_routed_experts])
        x2d = g.op("Reshape", [x, g.const("shape_2d", np.array([-1, H], np.int64))], hint="tokens")
        routed = _routed_experts(g, x2d, probs, weights, cfg, get, prefix, expert_prec, io_dtype, report,
                                 routing_form)
        y = g.op("Reshape", [routed, g.const("shape_3d", np.array([1, -1, H], np.int64))], hint="routed")
        if L.n_shared_experts:
            y = g.op("Add", [y, _gated_mlp(g, x, get, prefix + "shared_experts.", prec, io_dtype, report,
                                           "shared_experts")], hint="with_shared")
    g.output(g.op("Add", [hidden, y], hint="residual"), "hidden_out", io_dtype, [1, "T", H])
    return g

"""One graph per decoder layer: the layer's attention graph, its routing and its MLP graph, run as one session.

A decode step ran 2 sessions per layer with the routing in numpy between them (runtime/dispatch.py): on real-dims
Tiny 26 session runs, ~1.8 ms of Python and bindings in an 18 ms step. Where the routing is DeepSeek-VL2 Tiny's and
Small's (softmax over all experts, greedy top-k, weights not renormalized) and QMoE takes it as it is ("weights"
form: router_weights, normalize_routing_weights 0), the graph can route itself:

    router_probs   = the router logits          (QMoE picks its top-k; softmax keeps the order)
    router_weights = softmax(logits) * routed_scaling_factor   (QMoE gathers its top-k's, not renormalized)
    expert_ids     = TopK(logits, k) indices    (an output: the runtime's expert counts and routing trace)

The fused graph is written from the two saved graphs (their protos, not their weights): its initializers point
into the attention's and the MLP's own data files, so it adds no weight bytes. Nodes and values of the MLP graph are
renamed under "mlp." (both graphs have small constants of the same names); the attention's `hidden_out` becomes the
internal `attention_out`. The weights differ from numpy's routing only by the softmax's rounding (onnxruntime's exp
against numpy's); with the 8-bit caches such a last-bit difference can move a cached code, as thread counts do.
Other routings (group-limited, noaux_tc, renormalized) and the "log_weights" form keep the two graphs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..model.config import LanguageConfig

MLP_PREFIX = "mlp."


def fusable(L: LanguageConfig, routing_form: str) -> bool:
    """Whether the layers of this model can route inside the graph (see the module docstring)."""
    if not L.n_routed_experts:
        return True
    return (L.scoring_func == "softmax" and L.topk_method == "greedy" and not L.norm_topk_prob
            and routing_form == "weights")


def _rename_all(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [mapping.get(x, x) for x in node.input]
        node.output[:] = [mapping.get(x, x) for x in node.output]


def fuse_layer(attention: onnx.ModelProto, mlp: onnx.ModelProto, L: LanguageConfig, moe: bool, name: str
               ) -> onnx.ModelProto:
    """The fused layer from the attention and MLP graphs as saved (load_external_data=False: external initializers
    keep their file, offset and length, so the new graph must be saved in the same directory). Both protos are
    consumed: their nodes and initializers are renamed and moved into the result."""
    a, m = attention.graph, mlp.graph
    nodes = list(a.node)
    inits = list(a.initializer)
    # the cache's outputs stay outputs (present_* or the latent rows); what fed the MLP graph becomes internal
    outputs = [o for o in a.output if o.name not in ("hidden_out", "mlp_in", "router_logits")]
    _rename_all(a, {"hidden_out": "attention_out"})
    into_mlp = {"hidden": "attention_out", "mlp_in": "mlp_in"}
    if moe:
        k = L.num_experts_per_tok
        weights = "router_softmax"
        nodes.append(helper.make_node("Softmax", ["router_logits"], [weights], axis=-1, name="route_softmax"))
        if L.routed_scaling_factor != 1.0:
            inits.append(numpy_helper.from_array(np.array(L.routed_scaling_factor, np.float32), "route_scale"))
            nodes.append(helper.make_node("Mul", [weights, "route_scale"], ["router_weights"], name="route_scaled"))
            weights = "router_weights"
        inits.append(numpy_helper.from_array(np.array([k], np.int64), "route_k"))
        nodes.append(helper.make_node("TopK", ["router_logits", "route_k"], ["route_top", "expert_ids"], axis=-1,
                                      name="route_topk"))
        outputs.append(helper.make_tensor_value_info("expert_ids", TensorProto.INT64, ["T", k]))
        into_mlp |= {"router_probs": "router_logits", "router_weights": weights}
    known = set(into_mlp) | {""}
    rename = {x: MLP_PREFIX + x for n in m.node for x in [*n.input, *n.output] if x not in known}
    rename |= {i.name: MLP_PREFIX + i.name for i in m.initializer}
    rename |= into_mlp
    rename["hidden_out"] = "hidden_out"
    for init in m.initializer:
        init.name = rename[init.name]
        inits.append(init)
    _rename_all(m, rename)
    for node in m.node:
        node.name = MLP_PREFIX + node.name if node.name else node.name
        nodes.append(node)
    (hidden_out,) = [o for o in m.output if o.name == "hidden_out"]
    graph = helper.make_graph(nodes, name, list(a.input), [hidden_out, *outputs], inits)
    opsets = {o.domain: o.version for o in [*attention.opset_import, *mlp.opset_import]}
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
                             ir_version=attention.ir_version)


def write_fused_layer(directory: Path, attention_file: str, mlp_file: str, L: LanguageConfig, moe: bool,
                      name: str) -> onnx.ModelProto:
    """Fuse two graphs saved in `directory` and save the result there as `name`.onnx; returns the model."""
    directory = Path(directory)
    model = fuse_layer(onnx.load(str(directory / attention_file), load_external_data=False),
                       onnx.load(str(directory / mlp_file), load_external_data=False), L, moe, name)
    onnx.save_model(model, str(directory / f"{name}.onnx"))
    return model

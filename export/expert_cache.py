"""What the runtime's expert cache needs from an artifact (runtime/expert_cache.py), written beside the MoE graphs
without adding a byte of weights:

  layerNN_shared.onnx   the MoE layer without its routed experts: hidden_out = hidden + shared_experts(mlp_in);
                        its initializers point into layerNN_moe.onnx.data (the shared experts' own bytes)
  expert.onnx           one routed expert as a QMoE over a single expert (k 1, the layer's bits, block size,
                        accuracy level and SwiGLU), inputs x [T, H], router_probs [T, 1] (ones), router_weights
                        [T, 1] (the routing weight); its four weights are external initializers the runtime hands
                        over per expert (SessionOptions.add_external_initializers), so ONNX Runtime prepacks them
  expert_routers.safetensors   every MoE layer's post-attention RMSNorm weight "N.norm" [H] and router "N.gate_t"
                        [H, E] (fp32, copies of the attention graphs' own): the runtime's prefetch predicts a
                        layer's experts with them (routers/(all weights) ~0.2% on Small)
  manifest graphs.routed_experts = {"template": expert.onnx's entry, "expert_bytes": one expert's bytes,
      "routers": "expert_routers.safetensors",
      "layers": {"N": {"shared": entry, "data": "layerNN_moe.onnx.data",
                       "tensors": {name: {"offset", "shape" [E, ...], "dtype"}}}}}
  Expert e of a tensor is the contiguous slice at offset + e * prod(shape[1:]) * itemsize: the QMoE layout is
  expert-major (quant/pack.pack_qmoe), so a miss is four reads.

Only CPU artifacts with quantized experts and the "weights" routing form get it (the CUDA path keeps its QMoE).
Additive: a runtime that ignores graphs.routed_experts runs the artifact as before; an index without "routers"
(written before the prefetch) serves the cache without prediction.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .linear import Precision
from .onnx_builder import IR_VERSION, MS_DOMAIN, NP_TO_ONNX, OPSET

# the QMoE inputs of the routed experts (export/mlp.py _routed_experts), by position
TENSORS = {"fc1.qweight": 2, "fc1.scales": 3, "fc2.qweight": 5, "fc2.scales": 6}
TEMPLATE = "expert.onnx"
ROUTERS = "expert_routers.safetensors"
USER = "user"  # the template's external-data location: never read, replaced by the runtime's buffers


def build_expert_template(hidden: int, prec: Precision, io_dtype, shapes: dict[str, tuple], dtypes: dict) -> onnx.ModelProto:
    """A QMoE over one expert whose weights are external initializers with per-expert shapes [1, ...]."""
    io = NP_TO_ONNX[np.dtype(io_dtype)]
    inputs = [helper.make_tensor_value_info("x", io, ["T", hidden]),
              helper.make_tensor_value_info("router_probs", io, ["T", 1]),
              helper.make_tensor_value_info("router_weights", io, ["T", 1])]
    inits = []
    for name, shape in shapes.items():
        t = TensorProto(name=name, data_type=NP_TO_ONNX[np.dtype(dtypes[name])], dims=[1, *shape[1:]],
                        data_location=TensorProto.EXTERNAL)
        for k, v in (("location", USER), ("offset", "0"), ("length", "0")):
            t.external_data.add(key=k, value=v)
        inits.append(t)
    level = {} if prec.accuracy_level is None else {"accuracy_level": prec.accuracy_level}
    node = helper.make_node(
        "QMoE", ["x", "router_probs", "fc1.qweight", "fc1.scales", "", "fc2.qweight", "fc2.scales",
                 "", "", "", "", "", "", "", "router_weights"], ["y"], domain=MS_DOMAIN, name="expert",
        k=1, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
        normalize_routing_weights=0, expert_weight_bits=prec.bits, block_size=prec.block_size, **level)
    graph = helper.make_graph([node], "routed_expert", inputs, [helper.make_tensor_value_info("y", io, ["T", hidden])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="vl2edge")
    model.ir_version = IR_VERSION
    return model


def routed_tensors(builder, data_file: str) -> dict[str, dict]:
    """Where the layer graph `builder` (saved, with offsets recorded) wrote its four routed-expert tensors."""
    found = {}
    for name, array in builder._arrays:
        for key in TENSORS:
            if name.endswith("." + key):
                location, offset = builder.offsets[name]
                if location != data_file:
                    raise ValueError(f"{name} was written to {location}, not {data_file}")
                found[key] = {"offset": offset, "shape": list(array.shape), "dtype": array.dtype.name}
    missing = sorted(set(TENSORS) - set(found))
    if missing:
        raise ValueError(f"the MoE graph has no {missing}")
    return found


def router_arrays(layer: int, norm: np.ndarray, gate: np.ndarray) -> dict[str, np.ndarray]:
    """The ROUTERS file's entries for one MoE layer: its RMSNorm weight and its router [E, H] transposed."""
    return {f"{layer}.norm": np.asarray(norm, np.float32), f"{layer}.gate_t": np.ascontiguousarray(
        np.asarray(gate, np.float32).T)}


def expert_bytes(tensors: dict[str, dict]) -> int:
    return sum(int(np.prod(t["shape"][1:])) * np.dtype(t["dtype"]).itemsize for t in tensors.values())

"""A small graph builder over onnx.helper: named inputs, initializers, nodes, outputs; saved with external data.

Every graph of the artifact is built with it, so the conventions live here once: ONNX IR version 10 (ORT 1.31
refuses the IR 14 that onnx 1.23 stamps by default), opset 21 for standard ops plus com.microsoft 1 for ORT's
contrib ops, weights in a `<graph>.onnx.data` side file (memory-mapped at load; no 2 GB protobuf limit).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10
OPSET = 21
MS_DOMAIN = "com.microsoft"
ALIGN = 4096  # external-data offsets on page boundaries (memory-mappable)

NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.bool_): TensorProto.BOOL,
}


class GraphBuilder:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self._arrays: list[tuple[str, np.ndarray]] = []  # initializers, kept as numpy until written
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()

    def _unique(self, hint: str) -> str:
        name, i = hint, 1
        while name in self._names:
            name, i = f"{hint}_{i}", i + 1
        self._names.add(name)
        return name

    def input(self, name: str, dtype, shape) -> str:
        self._names.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, NP_TO_ONNX[np.dtype(dtype)], shape))
        return name

    def output(self, value: str, name: str, dtype, shape) -> str:
        """Expose `value` as graph output `name` (an Identity when the names differ)."""
        if value != name:
            self.nodes.append(helper.make_node("Identity", [value], [name]))
            self._names.add(name)
        self.outputs.append(helper.make_tensor_value_info(name, NP_TO_ONNX[np.dtype(dtype)], shape))
        return name

    def const(self, hint: str, array) -> str:
        name = self._unique(hint)
        self._arrays.append((name, np.ascontiguousarray(array)))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", hint: str | None = None,
           out_names: list[str] | None = None, **attrs):
        """Add a node; returns its output name (or a list of names when n_out > 1). '' in inputs = omitted.
        `out_names` gives the outputs exact names (e.g. graph outputs that must not go through an Identity)."""
        base = hint or op_type.lower()
        if out_names is not None:
            if len(out_names) != n_out or any(n in self._names for n in out_names):
                raise ValueError(f"out_names {out_names} must be {n_out} names not used yet")
            self._names.update(out_names)
            outs = list(out_names)
        else:
            outs = [self._unique(f"{base}_out{i}" if n_out > 1 else base) for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self._unique(f"n_{base}"),
                                           domain=domain or None, **attrs))
        return outs if n_out > 1 else outs[0]

    def branch(self, name: str) -> "GraphBuilder":
        """A subgraph builder (an If branch) that shares this graph's names and initializers: its constants become
        initializers of this graph, visible to the branch as outer-scope values (and saved with this graph's
        external data); node and value names stay unique across both. `graph_proto()` gives the branch."""
        b = GraphBuilder(name)
        b._names, b._arrays = self._names, self._arrays
        return b

    def graph_proto(self) -> onnx.GraphProto:
        """This builder's nodes and outputs as a GraphProto with no inputs or initializers (an If branch)."""
        return helper.make_graph(self.nodes, self.name, [], self.outputs)

    # --- common blocks ------------------------------------------------------------------------------------------
    def rms_norm(self, x: str, weight: np.ndarray, eps: float, dtype, hint: str) -> str:
        """RMSNorm: x / sqrt(mean(x^2) + eps) * weight, statistics in fp32 (stash_type 1)."""
        w = self.const(f"{hint}.weight", weight.astype(dtype))
        return self.op("SimplifiedLayerNormalization", [x, w], hint=hint, axis=-1, epsilon=float(eps), stash_type=1)

    def model(self) -> onnx.ModelProto:
        """The whole model in memory, weights inline (for tests and small graphs; `save` streams instead)."""
        return self._model([numpy_helper.from_array(a, n) for n, a in self._arrays])

    def _model(self, initializers) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializers)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="vl2edge")
        m.ir_version = IR_VERSION
        return m

    def save(self, path: str | Path, inline_below: int = 1024, stored: dict | None = None,
             record: bool = False) -> Path:
        """Write `path`, with every initializer of `inline_below` bytes or more streamed into `path.name + '.data'`
        (ONNX external data). Each weight goes from its numpy array straight to the file: no protobuf copy of the
        weights is ever built (onnx's own save_as_external_data would hold them all in memory twice). Offsets are
        page-aligned so ONNX Runtime can memory-map them.
        stored: the `written` record of an earlier save into the same directory; an initializer with the same
        dtype, shape and bytes as one written there points at it instead of being written again (the vision parts
        share the vision graph's data file). record: keep that record of this save's own external initializers in
        `self.written` (both cost a hash of the bytes, so only the graphs that share pay it)."""
        path = Path(path)
        data_name = path.name + ".data"
        tensors, offset, self.written = [], 0, {}
        self.offsets: dict[str, tuple[str, int]] = {}  # initializer -> (data file, offset): where it lives
        with open(path.parent / data_name, "wb") as f:
            for name, a in self._arrays:
                if a.nbytes < inline_below:
                    tensors.append(numpy_helper.from_array(a, name))
                    continue
                key = (a.dtype.str, a.shape, hashlib.sha1(memoryview(a.reshape(-1)).cast("B")).hexdigest()) \
                    if stored is not None or record else None
                if stored and key in stored:
                    location, at = stored[key]
                else:
                    offset = -(-offset // ALIGN) * ALIGN
                    f.seek(offset)
                    f.write(memoryview(a.reshape(-1)).cast("B"))
                    location, at = data_name, offset
                    if record:
                        self.written[key] = (location, at)
                    offset += a.nbytes
                self.offsets[name] = (location, at)
                t = TensorProto(name=name, data_type=NP_TO_ONNX[a.dtype], dims=list(a.shape),
                                data_location=TensorProto.EXTERNAL)
                for k, v in (("location", location), ("offset", str(at)), ("length", str(a.nbytes))):
                    t.external_data.add(key=k, value=v)
                tensors.append(t)
        if offset == 0:
            (path.parent / data_name).unlink()
        onnx.save_model(self._model(tensors), str(path))
        return path

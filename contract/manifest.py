"""manifest.json of an exported artifact: what the runtime needs to open it, and how to trust it.

Written last by the exporter (so a directory without it is not an artifact) and read by the runtime, which checks
`format`, `format_version` and the sha256 of every file before creating any session. Kept free of onnx/torch
imports so the torch-free runtime can import the constants from here.

Top-level keys:
  format, format_version   "vl2edge-artifact", FORMAT_VERSION
  source                   {"checkpoint": path, "config": the checkpoint's config.json}
  target, io_dtype         "cpu" / "float32" or "cuda" / "float16"
  quantization             per weight group (experts, linear, vision, embedding, lm_head): kind, block_size, ...;
                           kv_cache: {kind: "int8" | "float", asked: the --kv-cache option}; mla_absorbed (MLA
                           fp32 artifacts with quantized attention): W_UK / W_UV int8 (export/mla_absorb.py)
  attention                kind ("mha_gqa" | "mla_latent_matmul" (fp32) | "mla_absorbed_gqa" (fp16)), max_len, cache
                           (per-layer buffers and, from format 5, each one's dtype (buffer_dtypes): the io dtype, or
                           int8 (MHA) / uint8 (MLA, with an fp32 token-scale buffer) codes with their calibration),
                           bytes/token
  graphs                   vision, embedding, head: {file, inputs, outputs}; layers: [{attention, mlp, moe}];
                           vision_parts (optional; a runtime that ignores it runs vision.onnx as before): the tower
                           as runs of blocks whose weights are vision.onnx.data's own (exporter.VISION_PART_BYTES);
                           layers[i].layer (optional, likewise): the layer's attention, routing and MLP as one graph
                           whose weights are the two graphs' data files (export/fused_layer.py)
  image_tokens             safetensors file with image_newline and view_seperator
  quality_report           per tensor kind: relative error and cosine of the quantized weights
  files                    {name: {sha256, bytes}} for every other file of the directory
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT = "vl2edge-artifact"
# 2: MLA attention kind mla_latent_matmul on fp32 artifacts; 3: the cache may be int8; 4: the MLA latent cache may be
# uint8 (export/latent_cache.py), which a version-3 runtime would misread as float; 5: the uint8 latent cache has a
# scale per token, an fp32 buffer beside the codes (attention.cache.buffer_dtypes), which a version-4 runtime lacks
FORMAT_VERSION = 5
READABLE_FORMAT_VERSIONS = (1, 2, 3, 4, 5)  # 1 differs from 2 only in that kind, which the runtime still runs
MANIFEST = "manifest.json"

# onnx.TensorProto element types -> numpy dtype names (no onnx import needed to read a manifest)
_ELEM_TYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 2: "uint8", 9: "bool", 16: "bfloat16"}


def _value_info(v) -> dict:
    t = v.type.tensor_type
    dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
    return {"name": v.name, "dtype": _ELEM_TYPES.get(t.elem_type, str(t.elem_type)), "shape": dims}


def graph_entry(builder, file: str) -> dict:
    """A graph's manifest entry from the GraphBuilder that wrote `file`."""
    return {"file": file, "inputs": [_value_info(v) for v in builder.inputs],
            "outputs": [_value_info(v) for v in builder.outputs]}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, manifest: dict) -> Path:
    path = Path(directory) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path

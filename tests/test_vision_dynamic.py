"""int8-dynamic vision matmuls: the DynamicQuantizeMatMul layout against ORT's kernel, the export-time per-layer
calibration (export/vision_calibration.py) against hand-made outliers, and the exported vision graph against the
fp32 PyTorch reference."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from vl2edge.export import vision_calibration
from vl2edge.export.exporter import ExportError, export
from vl2edge.export.linear import Precision, emit_linear
from vl2edge.export.onnx_builder import GraphBuilder
from vl2edge.model.checkpoint import Checkpoint
from vl2edge.model.config import VL2Config
from vl2edge.model.vl2 import DeepseekVL2
from vl2edge.quant.blockwise import quantize_blockwise
from vl2edge.quant.pack import pack_dynamic_quantize_matmul


def _uint8_round_trip(x: np.ndarray) -> np.ndarray:
    """DynamicQuantizeLinear's rule (ONNX spec), written out: range includes 0, scale (max - min) / 255."""
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    scale = np.float32((hi - lo) / 255)
    zp = np.clip(np.round(-lo / scale), 0, 255)
    return ((np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale).astype(np.float32)


def test_layout_matches_ort_kernel():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 64), dtype=np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    x = rng.standard_normal((2, 5, 64), dtype=np.float32)
    g = GraphBuilder("t")
    y = emit_linear(g, g.input("x", np.float32, [2, 5, 64]), w, Precision("int8-dynamic"), np.float32, "l", bias=b)
    g.output(y, "y", np.float32, [2, 5, 48])
    sess = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    qt = quantize_blockwise(w, bits=8, block_size=0, symmetric=True)
    packed = pack_dynamic_quantize_matmul(qt)
    assert packed.data.dtype == np.int8 and packed.data.shape == (64, 48) and packed.scales.shape == (48,)
    w_dq = packed.data.astype(np.float32).T * packed.scales[:, None]
    expected = _uint8_round_trip(x) @ w_dq.T + b
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert np.linalg.norm(got - (x @ w.T + b)) / np.linalg.norm(x @ w.T + b) < 0.02
    with pytest.raises(ValueError, match="row-wise"):
        pack_dynamic_quantize_matmul(quantize_blockwise(w, bits=8, block_size=32, symmetric=True))


def test_an_outlier_channel_makes_the_error_visible():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 128), dtype=np.float32) / np.sqrt(128)
    x = rng.standard_normal((300, 128), dtype=np.float32)
    clean = vision_calibration.dynamic_quant_error(x, w)
    x[:, 7] *= 60.0  # one channel, as ViT LayerNorm outputs can have
    assert clean < 0.02 < vision_calibration.MAX_ERROR < vision_calibration.dynamic_quant_error(x, w)


def test_calibration_falls_back_where_an_outlier_is(test_checkpoints):
    ckpt = Checkpoint.open(test_checkpoints["test-tiny"])
    cfg: VL2Config = ckpt.config

    def get(name):
        t = ckpt.tensor(name, torch.float32).numpy().copy()
        # fc1's input gets a channel 200x the others and fc1 compensates: the fp32 model is unchanged (this is how
        # outlier channels look in trained ViTs), only a per-tensor activation scale suffers
        if name in ("vision.blocks.1.norm2.weight", "vision.blocks.1.norm2.bias"):
            t[3] *= 200.0
        if name == "vision.blocks.1.mlp.fc1.weight":
            t[:, 3] /= 200.0
        return t

    tiles = vision_calibration.calibration_tiles(cfg)
    assert tiles.shape == (2, 3, cfg.vision.image_size, cfg.vision.image_size) and np.abs(tiles).max() <= 1
    errors = vision_calibration.measure(cfg, get, tiles)
    assert len(errors) == 4 * cfg.vision.layers
    chosen = vision_calibration.choose(errors)
    assert "vision.blocks.1.mlp.fc1" not in chosen and "vision.blocks.1.attn.qkv" in chosen
    assert len(chosen) == len(errors) - 1


def test_dynamic_vision_artifact_tracks_the_reference(test_checkpoints, tmp_path):
    src = test_checkpoints["test-tiny"]
    art = export(src, tmp_path / "dyn", experts="int4", block_size=32, vision="int8-dynamic", progress=False)
    manifest = json.loads((art / "manifest.json").read_text())
    cal = manifest["quantization"]["vision_dynamic"]
    assert cal["dynamic"] == cal["of"] == 4 * VL2Config.from_dict(manifest["source"]["config"]).vision.layers
    sess = ort.InferenceSession(str(art / "vision.onnx"), providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(art / "vision.onnx"), load_external_data=False).graph.node]
    assert ops.count("DynamicQuantizeMatMul") == cal["dynamic"] and ops.count("MatMulNBits") == 2  # projector

    model = DeepseekVL2.from_checkpoint(src)
    tiles = vision_calibration.calibration_tiles(model.cfg, n=3, seed=5)
    with torch.inference_mode():
        ref = model.encode_images(torch.from_numpy(tiles)).numpy()
    got = sess.run(None, {"pixel_values": tiles})[0]
    cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05 and cos > 0.998

    # auto (the default) is int8-dynamic for int4/int8 experts on cpu, and the plan's vision as it is otherwise
    for kwargs, dynamic in (({"experts": "int4"}, True), ({"experts": "int4", "vision": "int8"}, False),
                            ({"experts": "int8"}, True), ({"experts": "int8", "vision": "int8"}, False),
                            ({"experts": "fp32"}, False)):
        q = json.loads((export(src, tmp_path / "auto", block_size=32, progress=False, force=True, **kwargs)
                        / "manifest.json").read_text())["quantization"]
        assert ("vision_dynamic" in q) == dynamic and q["vision"]["asked"] == kwargs.get("vision", "auto")
    # auto under an fp32 vision override (the fidelity tool's exact-stage variant) leaves the tower fp32
    q = json.loads((export(src, tmp_path / "auto", block_size=32, progress=False, force=True,
                           stage_precision={"vision": Precision("fp32")}) / "manifest.json").read_text())["quantization"]
    assert "vision_dynamic" not in q and q["vision"]["kind"] == "fp32"
    with pytest.raises(ExportError, match="int8-dynamic is for --target cpu"):
        export(src, tmp_path / "c", experts="int4", block_size=32, target="cuda", vision="int8-dynamic",
               progress=False)
    with pytest.raises(ExportError, match="--vision 'int4'"):
        export(src, tmp_path / "d", block_size=32, vision="int4", progress=False)

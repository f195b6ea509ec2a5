"""export.vision: the vision + projector ONNX graph against the PyTorch reference `model.projector(model.vision(px))`.

Error measures (output [n, 196, D], flattened):
  rel max error  max |onnx - ref| / max |ref|      fp32 bound 1e-4 (measured 7e-7: summation-order noise)
  cosine         <onnx, ref> / (|onnx| |ref|)       quantized graphs (MatMulNBits, accuracy_level 4)
Measured on the seed-0 synthesized test checkpoints (random weights, 2 layers x width 64), 3 tiles in [-1, 1]:
  fp32  rel max error 7.0e-7 (mha and plain attention)
  int8  cosine 0.99991, worst token 0.9997   -> bound 0.999 (10x the measured 1 - cosine)
  int4  cosine 0.9876,  worst token 0.965    -> bound 0.98  (symmetric RTN 4-bit, block 32, on random weights whose
        blocks have no outlier structure, plus int8 activations; bound leaves ~1.5x the measured 1 - cosine)
  fp16  rel max error 5.5e-4                -> bound 5e-3 (fp16 storage of io, weights and activations)
test-vl2 has the same vision tower, projector width (64) and seed as test-tiny, so it reproduces test-tiny's numbers;
test_other_dims_from_a_mapping covers a projector width different from the vision width and another head count.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from vl2edge.export.linear import Precision
from vl2edge.export.vision import INPUT_NAME, OUTPUT_NAME, build_vision_graph
from vl2edge.model.checkpoint import Checkpoint
from vl2edge.model.vl2 import DeepseekVL2
from vl2edge.quant.report import QualityReport

N_TILES = 3


class Case:
    """One preset: its Checkpoint, reference outputs for N_TILES random tiles, and the fp32 weight getter."""

    def __init__(self, path):
        self.ckpt = Checkpoint.open(path)
        self.cfg = self.ckpt.config
        model = DeepseekVL2.from_checkpoint(self.ckpt)
        gen = torch.Generator().manual_seed(1234)
        self.pixels = torch.rand(N_TILES, 3, 384, 384, generator=gen) * 2 - 1
        with torch.inference_mode():
            self.ref = model.projector(model.vision(self.pixels)).numpy()
        del model

    def get(self, name: str) -> np.ndarray:
        return self.ckpt.tensor(name, torch.float32).numpy()


@pytest.fixture(scope="module")
def cases(test_checkpoints):
    made: dict[str, Case] = {}

    def case(preset: str) -> Case:
        if preset not in made:
            made[preset] = Case(test_checkpoints[preset])
        return made[preset]

    return case


def run(g, pixels: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {INPUT_NAME: pixels})[0]


def rel_max_err(out, ref) -> float:
    return float(np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max())


def cosine(out, ref) -> float:
    a, b = out.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("preset,attention", [("test-tiny", "mha"), ("test-tiny", "plain"), ("test-vl2", "mha")])
def test_fp32_matches_reference(cases, preset, attention):
    c = cases(preset)
    g = build_vision_graph(c.cfg, c.get, Precision("fp32"), attention=attention)
    out = run(g, c.pixels.numpy())
    assert out.dtype == np.float32
    assert out.shape == (N_TILES, 196, c.cfg.projector.n_embed)
    assert rel_max_err(out, c.ref) < 1e-4


def test_other_dims_from_a_mapping():
    """Projector width != vision width, other head count, weights passed as a Mapping (torch default init)."""
    from vl2edge.model.config import VL2Config
    from vl2edge.model.presets import preset_config
    from vl2edge.model.projector import Projector
    from vl2edge.model.vision import VisionTower

    base = VL2Config.from_dict(preset_config("test-tiny"))
    cfg = dataclasses.replace(base, vision=dataclasses.replace(base.vision, layers=1, heads=8),
                              projector=dataclasses.replace(base.projector, n_embed=96))
    torch.manual_seed(0)
    vision, proj = VisionTower(cfg.vision).eval(), Projector(cfg).eval()
    with torch.no_grad():
        vision.pos_embed.normal_(0, 0.02)
        for m in vision.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
    weights = {f"vision.{k}": v.numpy() for k, v in vision.state_dict().items()}
    weights.update({f"projector.{k}": v.numpy() for k, v in proj.state_dict().items()})
    px = torch.rand(2, 3, 384, 384) * 2 - 1
    with torch.inference_mode():
        ref = proj(vision(px)).numpy()
    out = run(build_vision_graph(cfg, weights, Precision("fp32")), px.numpy())
    assert out.shape == (2, 196, 96)
    assert rel_max_err(out, ref) < 1e-4


def test_graph_contract_and_weights_read(cases, tmp_path):
    """I/O names, dtypes and the symbolic tile dim; a valid model after save; attn_pool is never read."""
    c = cases("test-tiny")
    read: list[str] = []

    def get(name):
        read.append(name)
        return c.get(name)

    path = build_vision_graph(c.cfg, get, Precision("fp32")).save(tmp_path / "vision.onnx")
    assert (tmp_path / "vision.onnx.data").exists()
    expected = {k for k in c.ckpt.weight_map if k.startswith(("vision.", "projector."))
                and not k.startswith("vision.attn_pool.")}
    assert set(read) == expected and len(read) == len(expected)

    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    (inp,), (out,) = m.graph.input, m.graph.output
    dims = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    assert (inp.name, inp.type.tensor_type.elem_type, dims(inp)) == (INPUT_NAME, onnx.TensorProto.FLOAT,
                                                                     ["tiles", 3, 384, 384])
    assert (out.name, out.type.tensor_type.elem_type, dims(out)) == (OUTPUT_NAME, onnx.TensorProto.FLOAT,
                                                                     ["tiles", 196, c.cfg.projector.n_embed])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert rel_max_err(sess.run(None, {INPUT_NAME: c.pixels.numpy()})[0], c.ref) < 1e-4


def test_dynamic_tile_count(cases):
    c = cases("test-tiny")
    sess = ort.InferenceSession(build_vision_graph(c.cfg, c.get, Precision("fp32")).model().SerializeToString(),
                                providers=["CPUExecutionProvider"])
    px5 = np.concatenate([c.pixels.numpy(), -c.pixels.numpy()[:2]])
    out1 = sess.run(None, {INPUT_NAME: px5[:1]})[0]
    out5 = sess.run(None, {INPUT_NAME: px5})[0]
    assert out1.shape == (1, 196, c.cfg.projector.n_embed) and out5.shape == (5, 196, c.cfg.projector.n_embed)
    np.testing.assert_allclose(out5[:1], out1, rtol=0, atol=1e-5 * np.abs(out1).max())  # tiles are independent
    assert rel_max_err(out5[:N_TILES], c.ref) < 1e-4


@pytest.mark.parametrize("kind,min_cosine", [("int8", 0.999), ("int4", 0.98)])
def test_quantized_cosine_and_report(cases, kind, min_cosine):
    c = cases("test-tiny")
    report = QualityReport()
    g = build_vision_graph(c.cfg, c.get, Precision(kind), report=report)
    assert any(n.op_type == "MatMulNBits" for n in g.nodes)
    assert not any(n.op_type == "MatMul" and "weight" in "".join(n.input) for n in g.nodes)
    out = run(g, c.pixels.numpy())
    assert out.shape == c.ref.shape
    assert cosine(out, c.ref) > min_cosine

    s = report.summary()
    layers = c.cfg.vision.layers
    assert {k: s[k]["count"] for k in s} == {"vision.attn": 2 * layers, "vision.mlp": 2 * layers, "projector": 2}
    rel = {"int8": 0.01, "int4": 0.15}[kind]  # RTN weight error: ~0.4% (int8) / ~10% (int4) of a Gaussian block
    assert all(s[k]["rel_err"]["max"] < rel for k in s)


def test_fp16_io_runs_on_cpu(cases):
    """fp16 io: ORT CPU runs it (MultiHeadAttention and Gelu get fp32 fallbacks with inserted Casts)."""
    c = cases("test-tiny")
    for attention in ("mha", "plain"):
        g = build_vision_graph(c.cfg, c.get, Precision("fp16"), io_dtype=np.float16, attention=attention)
        onnx.checker.check_model(g.model())
        out = run(g, c.pixels.numpy().astype(np.float16))
        assert out.dtype == np.float16 and out.shape == c.ref.shape
        assert rel_max_err(out, c.ref) < 5e-3


def test_rejects_bad_arguments(cases):
    c = cases("test-tiny")
    with pytest.raises(ValueError, match="attention"):
        build_vision_graph(c.cfg, c.get, Precision("fp32"), attention="flash")
    with pytest.raises(ValueError, match="io_dtype"):
        build_vision_graph(c.cfg, c.get, Precision("fp32"), io_dtype=np.float64)

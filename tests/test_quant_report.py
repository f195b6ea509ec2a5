"""quant.report: per-tensor metrics on hand-computed cases, and the per-kind JSON summary."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from vl2edge.quant.blockwise import dequantize, quantize_blockwise
from vl2edge.quant.report import QualityReport, tensor_error


def test_tensor_error_hand_computed():
    m = tensor_error([3.0, 4.0], [3.0, 0.0])
    assert m["rel_err"] == pytest.approx(4 / 5)  # ||(0, 4)|| / ||(3, 4)||
    assert m["cosine"] == pytest.approx(9 / (5 * 3))
    assert m["max_abs_err"] == pytest.approx(4.0)
    m = tensor_error(np.array([[1.0, -2.0], [0.5, 0.0]]), np.array([[1.0, -2.0], [0.5, 0.0]]))
    assert m == {"rel_err": 0.0, "cosine": pytest.approx(1.0), "max_abs_err": 0.0}
    assert tensor_error([1.0, 1.0], [-1.0, -1.0])["cosine"] == pytest.approx(-1.0)


def test_tensor_error_zero_tensors_and_low_precision_inputs():
    assert tensor_error(np.zeros(4), np.zeros(4)) == {"rel_err": 0.0, "cosine": 1.0, "max_abs_err": 0.0}
    m = tensor_error(np.zeros(3), [0.0, 1.0, 0.0])
    assert math.isinf(m["rel_err"]) and m["cosine"] == 0.0 and m["max_abs_err"] == 1.0
    assert tensor_error([1.0, 0.0], np.zeros(2))["cosine"] == 0.0
    # fp16 inputs are measured in float64: in fp16, ||w||^2 = 1000 * 300^2 would overflow to inf
    w = np.full(1000, 300.0, np.float16)
    assert tensor_error(w, w * np.float16(0.5))["rel_err"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        tensor_error(np.zeros((2, 3)), np.zeros((3, 2)))


def test_report_summarizes_per_kind():
    report = QualityReport()
    report.add("expert.fc1", "layers.1.experts.fc1", [3.0, 4.0], [3.0, 0.0])  # rel 0.8
    report.add("expert.fc1", "layers.2.experts.fc1", [1.0, 0.0], [1.0, 0.5])  # rel 0.5
    report.add("embedding", "embed_tokens", np.ones((2, 2)), np.ones((2, 2)))
    s = report.summary()
    assert list(s) == ["embedding", "expert.fc1"]
    fc1 = s["expert.fc1"]
    assert fc1["count"] == 2 and fc1["numel"] == 4
    assert fc1["rel_err"] == {"mean": pytest.approx(0.65), "max": pytest.approx(0.8), "min": pytest.approx(0.5)}
    assert fc1["max_abs_err"]["max"] == pytest.approx(4.0)
    assert fc1["worst"] == {"name": "layers.1.experts.fc1", "rel_err": pytest.approx(0.8)}
    assert s["embedding"]["cosine"] == {"mean": 1.0, "max": 1.0, "min": 1.0}
    assert "tensors" not in fc1
    full = report.summary(include_tensors=True)
    assert full["expert.fc1"]["tensors"]["layers.2.experts.fc1"]["rel_err"] == pytest.approx(0.5)


def test_summary_is_strict_json():
    report = QualityReport()
    report.add("weird", "zero_vs_nonzero", np.zeros(2), np.ones(2))  # rel_err inf
    report.add("weird", "fine", np.ones(2), np.ones(2))
    text = json.dumps(report.summary(include_tensors=True), allow_nan=False)
    back = json.loads(text)
    assert back["weird"]["rel_err"]["max"] is None and back["weird"]["rel_err"]["min"] == 0.0
    assert back["weird"]["worst"]["name"] == "zero_vs_nonzero"
    assert QualityReport().summary() == {}


def test_report_on_quantized_weights():
    """The report of real quantized weights lands where the quantizer's own tests put it."""
    rng = np.random.default_rng(0)
    report = QualityReport()
    for layer in range(3):
        w = rng.standard_normal((64, 256)).astype(np.float32)
        for bits in (4, 8):
            report.add(f"int{bits}", f"layers.{layer}", w, dequantize(quantize_blockwise(w, bits=bits, block_size=64)))
    s = report.summary()
    assert 0.08 < s["int4"]["rel_err"]["mean"] < 0.12 and s["int4"]["cosine"]["min"] > 0.99
    assert s["int8"]["rel_err"]["max"] < 0.01 and s["int8"]["cosine"]["min"] > 0.9999

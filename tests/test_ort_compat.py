"""`vl2edge export --min-onnxruntime`: only what that release has in the graphs, the floor in the manifest, and
the runtime's one-line refusal of an artifact newer than its onnxruntime (contract/ort_compat.py). The releases
themselves run in tests/test_platforms.py (1.23.2 on Python 3.10) and `python -m vl2edge.bench.platforms.ort_versions`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from vl2edge.contract import ort_compat
from vl2edge.export.exporter import ExportError, export
from vl2edge.runtime.artifact import ArtifactError, required_onnxruntime
from vl2edge.runtime.engine import Engine


def _nodes(art, file, op):
    return [n for n in onnx.load(str(art / file), load_external_data=False).graph.node if n.op_type == op]


def _attrs(node):
    return {a.name for a in node.attribute}


@pytest.mark.parametrize("text, version", [("1.23.2", (1, 23, 2)), ("1.24", (1, 24, 0)),
                                           ("1.23.0+cu126", (1, 23, 0)), (" 1.31.1rc1", (1, 31, 1))])
def test_parse_version(text, version):
    assert ort_compat.parse_version(text) == version


def test_parse_version_refuses_what_is_not_one():
    with pytest.raises(ValueError, match="not an onnxruntime version"):
        ort_compat.parse_version("latest")


@pytest.fixture(scope="module")
def artifacts(test_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("ortcompat")
    tiny, small = test_checkpoints["test-tiny"], test_checkpoints["test-small"]
    return {
        "default": export(tiny, root / "default", progress=False),
        "int8-1.23.2": export(tiny, root / "int8-1.23.2", experts="int8", progress=False, min_onnxruntime="1.23.2"),
        "int4-1.25": export(tiny, root / "int4-1.25", progress=False, min_onnxruntime="1.25"),
        "int4-1.27": export(tiny, root / "int4-1.27", progress=False, min_onnxruntime="1.27.0"),
        "mla-int8-1.23.2": export(small, root / "mla", experts="int8", kv_cache="int8", progress=False,
                                  min_onnxruntime="1.23.2"),
        "same-options": export(tiny, root / "same", experts="int8", kv_cache="float", progress=False),
    }


def test_default_artifact_needs_qmoe_accuracy_level(artifacts):
    m = json.loads((artifacts["default"] / "manifest.json").read_text())
    assert m["onnxruntime"] == {"min": "1.31.0", "asked": None, "features": [
        "gather_block_quantized_bits", "swiglu_fusion", "qmoe_block_size", "cpu_qmoe_int4", "qmoe_router_weights",
        "gqa_quantized_cache", "qmoe_accuracy_level"]}


def test_oldest_artifact_uses_only_what_1_23_2_has(artifacts):
    art = artifacts["int8-1.23.2"]
    m = json.loads((art / "manifest.json").read_text())
    assert m["onnxruntime"]["min"] == "1.23.2" and m["onnxruntime"]["asked"] == "1.23.2"
    assert m["quantization"]["kv_cache"]["kind"] == "float"  # a CPU kernel for GQA's quantized cache: 1.27
    assert m["quantization"]["routing"]["form"] == "log_weights"  # QMoE's router_weights came in 1.25
    assert m["quantization"]["experts"]["accuracy_level"] is None
    (qmoe,) = _nodes(art, "layer01_moe.onnx", "QMoE")
    assert len(qmoe.input) == 7 and "accuracy_level" not in _attrs(qmoe) and "block_size" in _attrs(qmoe)
    (gqa,) = _nodes(art, "layer00_attention.onnx", "GroupQueryAttention")
    assert len(gqa.input) <= 12 and not {"k_quant_type", "kv_cache_bit_width"} & _attrs(gqa)


def test_1_25_has_router_weights_but_not_yet_the_8bit_gqa_cache(artifacts):
    art = artifacts["int4-1.25"]
    m = json.loads((art / "manifest.json").read_text())
    assert m["onnxruntime"]["min"] == "1.25.0"
    assert m["quantization"]["kv_cache"]["kind"] == "float" and m["quantization"]["routing"]["form"] == "weights"
    (qmoe,) = _nodes(art, "layer01_moe.onnx", "QMoE")
    assert len(qmoe.input) == 15 and "accuracy_level" not in _attrs(qmoe)


def test_1_27_keeps_the_8bit_gqa_cache(artifacts):
    m = json.loads((artifacts["int4-1.27"] / "manifest.json").read_text())
    assert m["onnxruntime"]["min"] == "1.27.0" and m["quantization"]["kv_cache"]["kind"] == "int8"


def test_mla_latent_cache_stays_8bit_on_1_23_2(artifacts):
    m = json.loads((artifacts["mla-int8-1.23.2"] / "manifest.json").read_text())
    assert m["attention"]["cache"]["dtype"] == "uint8" and m["onnxruntime"]["min"] == "1.23.2"


def test_oldest_artifact_gives_the_tokens_of_the_same_options(artifacts):
    """Under the pinned onnxruntime: log-weights routing is exact, and an 8-bit QMoE multiplies with int8
    activations with or without accuracy_level, so the compat artifact equals `--experts int8 --kv-cache float`."""
    from vl2edge.runtime.api import load

    a, b = load(artifacts["int8-1.23.2"]), load(artifacts["same-options"])
    for prompt in ("Describe the robot.", "List three primes."):
        ra, rb = a.generate(prompt, max_new_tokens=12), b.generate(prompt, max_new_tokens=12)
        assert ra.token_ids == rb.token_ids


@pytest.mark.parametrize("kwargs, match", [
    ({"experts": "int4", "min_onnxruntime": "1.23.2"}, r"4-bit experts right first shipped in onnxruntime 1\.24\.3"
                                                       r".*--experts int8"),
    ({"experts": "int8", "min_onnxruntime": "1.23.1"}, r"block_size attribute .* first shipped in "
                                                       r"onnxruntime 1\.23\.2"),
    ({"experts": "fp32", "min_onnxruntime": "1.23.0"}, r"CPU kernel for the fp32 MoE op first shipped"),
    ({"experts": "fp16", "target": "cuda", "min_onnxruntime": "1.22.1"}, r"swiglu_fusion attribute first shipped"),
    ({"experts": "int8", "kv_cache": "int8", "min_onnxruntime": "1.26.0"}, r"--kv-cache int8 .*first shipped in "
                                                                            r"onnxruntime 1\.27\.0"),
    ({"min_onnxruntime": "newest"}, r"--min-onnxruntime: 'newest' is not an onnxruntime version"),
])
def test_what_an_older_release_cannot_have_is_refused(test_checkpoints, tmp_path, kwargs, match):
    with pytest.raises(ExportError, match=match):
        export(test_checkpoints["test-tiny"], tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_runtime_refuses_an_artifact_newer_than_its_onnxruntime(artifacts, tmp_path):
    art = shutil.copytree(artifacts["int4-1.27"], tmp_path / "a")
    m = json.loads((art / "manifest.json").read_text())
    m["onnxruntime"]["min"] = "9.0.0"
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError) as e:
        Engine(art)
    msg = str(e.value)
    assert "\n" not in msg and "needs onnxruntime >= 9.0.0" in msg and f"this is onnxruntime {ort.__version__}" in msg
    assert f"--min-onnxruntime {ort.__version__}" in msg


def test_an_artifact_without_a_floor_needs_the_release_it_was_made_with(artifacts, tmp_path):
    art = shutil.copytree(artifacts["int4-1.25"], tmp_path / "a")
    m = json.loads((art / "manifest.json").read_text())
    del m["onnxruntime"]
    (art / "manifest.json").write_text(json.dumps(m))
    assert required_onnxruntime(m) == ort_compat.version_str(ort_compat.LEGACY_FLOOR)
    engine = Engine(art)  # the pinned onnxruntime is that release
    assert np.isfinite(engine.forward(engine.embed(np.array([[1, 2, 3]]))).all())

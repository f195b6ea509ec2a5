"""`vl2edge bench --provider cuda --check`: its CPU rehearsal end to end, and one clear line where a GPU is missing."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from vl2edge import cli
from vl2edge.bench import gpu_check
from vl2edge.bench.gpu_check import CheckUnavailable, check, preflight, table


def test_the_rehearsal_runs_every_step_of_the_check_and_writes_its_document(tmp_path):
    doc = check(provider="cpu", presets=("test-tiny", "test-vl2"), real=(), steps=4, conversations=2,
                out=tmp_path, progress=False, work_dir=tmp_path)
    assert json.loads((tmp_path / "gpu_check.json").read_text())["parity"].keys() == {"test-tiny", "test-vl2"}
    assert doc["ok"] and doc["machine"]["provider"] == "cpu"
    for preset, by in doc["parity"].items():
        assert set(by) == {"fp16", "int4"}
        assert by["fp16"]["provider"] == "cpu" and by["fp16"]["worst_cosine"] > 0.999, preset  # fp16 vs fp16 ref
        assert by["int4"]["worst_cosine"] > 0.97, preset
        for run in by["fp16"]["greedy"] + by["int4"]["greedy"]:
            assert run["tokens_equal"] or run["near_tie"]
    assert "OK" in table(doc) and "test-vl2" in table(doc)


def test_a_divergence_is_a_near_tie_only_inside_the_margin():
    class Engine:
        def reset(self):
            pass

        def embed(self, *args):
            return None

        def prefill(self, embeds):
            return self.logits[0]

        def decode(self, token):
            self.step += 1
            return self.logits[self.step]

    eng = Engine()
    eng.step = 0
    eng.logits = np.array([[0.0, 5.0, 1.0], [0.0, 1.0, 4.99]], np.float32)
    model = type("M", (), {"engine": eng})()
    inp = type("I", (), {"input_ids": None, "pixel_values": None, "images_seq_mask": None,
                         "images_spatial_crop": None})()
    ref_logits = np.array([[0.0, 5.0, 1.0], [0.0, 5.0, 4.99]], np.float32)  # the reference prefers token 1
    run = gpu_check.free_running(model, [1, 1], ref_logits, inp, 2)
    assert run["first_divergence"] == 1 and run["near_tie"] and run["reference_margin"] == pytest.approx(0.002, rel=1e-4)
    eng.step = 0
    far = gpu_check.free_running(model, [1, 1], np.array([[0, 5, 1], [0, 5, 1]], np.float32), inp, 2)
    assert not far["near_tie"]


def test_a_machine_without_onnxruntime_gpu_gets_one_line(monkeypatch, capsys):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(CheckUnavailable, match="no CUDA provider .* install onnxruntime-gpu"):
        preflight("cuda")
    assert cli.main(["bench", "--provider", "cuda", "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("vl2edge bench: error:") and "onnxruntime-gpu" in err


def test_cuda_libraries_that_do_not_load_are_named(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(gpu_check, "_runs_on_cuda", lambda: False)
    with pytest.raises(CheckUnavailable, match="could not start a session on CUDA"):
        preflight("cuda")

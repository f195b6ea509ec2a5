"""bench/fidelity.py: the teacher-forced comparison of an artifact with the PyTorch reference, per-stage error
attribution, and the precision policy it backs (docs/precision.md).

The reference here is model/ (itself checked against transformers and timm in test_parity_transformers.py); an
fp32 artifact must come out exact, which checks the tool's alignment of steps and expert selections."""

from __future__ import annotations

import json

import pytest

from vl2edge.bench import fidelity
from vl2edge.export.exporter import export
from vl2edge.model.vl2 import DeepseekVL2
from vl2edge.runtime.processor import Processor

PRESETS = ("test-tiny", "test-small", "test-vl2")
POLICY = fidelity.POLICY  # docs/precision.md; fidelity.policy_verdict applies it
FLIPS = "expert choices flipped / the bf16 reference's"


@pytest.fixture(scope="module")
def exported(test_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    cache = {}

    def get(preset, experts):
        if (preset, experts) not in cache:
            cache[preset, experts] = export(test_checkpoints[preset], root / f"{preset}-{experts}", experts=experts,
                                            progress=False)
        return cache[preset, experts]

    return get


@pytest.fixture(scope="module")
def references(test_checkpoints):
    return {p: DeepseekVL2.from_checkpoint(test_checkpoints[p]) for p in PRESETS}


@pytest.fixture(scope="module")
def yardstick(exported, references, test_checkpoints):
    """preset -> (the reference's runs over every conversation, the bf16 reference's summary against them): what
    each artifact of a preset is compared with, measured once."""
    cache = {}

    def get(preset):
        if preset not in cache:
            art = exported(preset, "fp32")  # for its processor files only
            inputs = fidelity.prepared_conversations(Processor.from_dir(art), len(fidelity.CONVERSATIONS))
            runs = [fidelity.reference_run(references[preset], inp, fidelity.STEPS) for inp in inputs]
            cache[preset] = runs, fidelity.bf16_yardstick(test_checkpoints[preset], art, runs)
        return cache[preset]

    return get


@pytest.fixture(scope="module")
def policy_of(exported, references, yardstick):
    """(preset, experts) -> (the policy's verdict, the summary it judged), measured once."""
    cache = {}

    def get(preset, experts):
        if (preset, experts) not in cache:
            runs, bf16 = yardstick(preset)
            s = fidelity.measure(exported(preset, experts), references[preset], references=runs,
                                 held_routing=True)["summary"]
            s["bf16_reference"] = bf16
            cache[preset, experts] = fidelity.policy_verdict(s, experts), s
        return cache[preset, experts]

    return get


@pytest.mark.parametrize("preset", PRESETS)
def test_the_fp32_artifact_is_exact_under_the_tool(exported, references, preset):
    doc = fidelity.measure(exported(preset, "fp32"), references[preset], conversations=3, steps=6)
    s = doc["summary"]
    assert s["worst_cosine"] > 0.99999 and s["top1_agreement"] == 1.0 and s["worst_rel_max_error"] < 1e-4
    assert s["expert_mismatch_mean"] == 0.0 and len(s["expert_mismatch_by_layer"]) == 2  # both MoE layers seen
    first = doc["conversations"][0]
    assert len(first["cosine"]) == 6 and first["selections"] == first["prompt_tokens"] + 5


def test_held_routing_splits_the_int8_error_of_test_vl2(policy_of):
    """Holding the reference's expert choices must change the run (every choice then agrees and the error shrinks),
    so the test fails if the held choices are not used; what is left, the arithmetic, meets the int8 floors."""
    verdict, s = policy_of("test-vl2", "int8")
    held = s["held_routing"]
    assert s["expert_mismatch_mean"] > 0 and held["expert_mismatch_mean"] == 0.0
    assert held["mean_error"] < s["mean_error"] and held["worst_cosine"] > s["worst_cosine"]
    assert held["worst_cosine"] >= POLICY["int8"]["worst_cosine"] and held["top1_agreement"] >= POLICY["int8"]["top1"]


@pytest.mark.parametrize("preset,experts", [("test-tiny", "int8"), ("test-tiny", "int4"), ("test-small", "int8"),
                                            ("test-small", "int4"), ("test-vl2", "int8")])
def test_quantized_artifacts_meet_the_precision_policy(policy_of, preset, experts):
    """The softmax-routed presets are tie-stable (their bf16 reference meets the int8 floor), so the free-running
    worst cosine is held to the floor there; test-vl2's bf16 reference misses it, so there the rate of flipped
    expert choices is held to a multiple of bf16's (measured 2.2x at int8) and the arithmetic to the floors."""
    verdict, s = policy_of(preset, experts)
    assert verdict["met"], verdict
    checked = {c["check"] for c in verdict["checks"]}
    if preset == "test-vl2":
        assert verdict["routing"].startswith("near-ties") and FLIPS in checked
    else:
        assert verdict["routing"] == "tie-stable" and "worst cosine" in checked


def test_int4_on_test_vl2_misses_the_policy_on_its_arithmetic(policy_of):
    """The measured state docs/precision.md and the exporter's note on sigmoid-routed int4 rest on: test-vl2's int4
    artifact misses even with the expert choices held (top-1 0.917), not by a near-tie. If a better int4 makes this
    fail, update docs/precision.md and the exporter's note."""
    verdict, s = policy_of("test-vl2", "int4")
    missed = {c["check"] for c in verdict["checks"] if not c["ok"]}
    assert not verdict["met"] and "top-1 agreement, expert choices held" in missed, verdict


def test_policy_verdict_switches_on_the_bf16_yardstick():
    """Hand-made summaries: which check applies follows the bf16 reference, a missing yardstick or a model without
    expert choices reads strictly, and unquantized experts have no policy."""
    s = {"worst_cosine": 0.995, "top1_agreement": 0.97, "expert_mismatch_mean": 0.05,
         "held_routing": {"worst_cosine": 0.9995, "top1_agreement": 0.97}}

    def bf16(worst, flips):
        return {"bf16_reference": {"worst_cosine": worst, "expert_mismatch_mean": flips}}

    stable = fidelity.policy_verdict(s | bf16(0.9999, 0.02), "int8")
    assert not stable["met"] and [c["check"] for c in stable["checks"] if not c["ok"]] == ["worst cosine"]
    ties = fidelity.policy_verdict(s | bf16(0.997, 0.02), "int8")
    assert ties["met"] and ties["checks"][-1] == {"check": FLIPS, "value": pytest.approx(2.5), "relation": "<=",
                                                   "bar": 3.0, "ok": True}
    assert not fidelity.policy_verdict(s | bf16(0.997, 0.0125), "int8")["met"]  # 4x bf16's flips
    assert fidelity.policy_verdict(s | bf16(0.997, 0.015), "int4")["met"]  # 3.3x: within int4's multiple
    assert fidelity.policy_verdict(s | bf16(0.997, 0.0), "int8")["checks"][-1]["check"] == "worst cosine"
    strict = fidelity.policy_verdict(s, "int8")
    assert not strict["met"] and strict["routing"].startswith("not judged")
    held_miss = s | bf16(0.997, 0.02) | {"held_routing": {"worst_cosine": 0.998, "top1_agreement": 0.97}}
    assert not fidelity.policy_verdict(held_miss, "int8")["met"]
    assert fidelity.policy_verdict(s, "fp32") is None


def test_stages_attribute_the_error_and_the_cli_writes_json(exported, test_checkpoints, tmp_path, capsys):
    art = exported("test-tiny", "int4")
    manifest = json.loads((art / "manifest.json").read_text())
    variants = fidelity.variant_overrides(manifest)
    assert set(variants) == {"vision", "embedding", "attention", "dense_mlp", "shared_experts", "experts", "lm_head",
                             "activations", "kv_cache"}
    assert variants["kv_cache"]["kv_cache"] == "float"
    mixed = json.loads(json.dumps(manifest))  # an `--dense int4 --head int8` artifact: variants keep both choices
    mixed["quantization"]["linear"]["kind"] = "int4"
    assert {(v["dense"], v["head"]) for v in fidelity.variant_overrides(mixed).values()} == {("int4", "int8")}
    out = tmp_path / "fid.json"
    assert fidelity.main([str(art), "--reference", str(test_checkpoints["test-tiny"]), "--stages",
                          "--conversations", "2", "--steps", "4", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["stages"]) == set(variants)
    assert doc["stages"]["experts"]["mean_error"] < doc["summary"]["mean_error"]  # int4 experts: the largest part
    assert "share of error" in capsys.readouterr().out
    with pytest.raises(ValueError, match="int4/int8 experts"):
        fidelity.variant_overrides(json.loads((exported("test-tiny", "fp32") / "manifest.json").read_text()))


def test_vl2_routing_error_is_attributed_to_the_routed_experts(exported, references, test_checkpoints):
    """Where the policy is missed (test-vl2 int4), the tool must say why: with only the routed experts exact, most
    of the error and of the expert-selection differences are gone."""
    art = exported("test-vl2", "int4")
    doc = fidelity.run(art, test_checkpoints["test-vl2"], stages=True, progress=False)
    stages, base = doc["stages"], doc["summary"]
    assert stages["experts"]["share_of_error"] > 0.5
    assert max(stages, key=lambda k: stages[k]["share_of_error"]) == "experts"
    assert stages["experts"]["expert_mismatch_mean"] < base["expert_mismatch_mean"]


def test_forced_reference_run_is_one_forward_over_the_whole_sequence(references, exported):
    """reference_run(forced=...) feeds the given tokens, not its own: its logits equal one forward pass of the
    model over prompt + those tokens (an independent path: no cache reuse, all positions at once)."""
    import numpy as np
    import torch

    model = references["test-tiny"]
    inp = fidelity.prepared_conversations(Processor.from_dir(exported("test-tiny", "fp32")), 1)[0]
    own, own_logits, _ = fidelity.reference_run(model, inp, 5)
    forced = [(t + 7) % model.cfg.language.vocab_size for t in own]  # not what the model would choose
    got, logits, sel = fidelity.reference_run(model, inp, 5, forced=forced)
    assert got == forced and not np.allclose(logits[1:], own_logits[1:])
    np.testing.assert_array_equal(logits[0], own_logits[0])  # the prompt's step does not depend on the answer
    ids = np.concatenate([np.asarray(inp.input_ids).reshape(-1), forced[:-1]])
    mask = np.concatenate([np.asarray(inp.images_seq_mask).reshape(-1), np.zeros(4, bool)])
    with torch.inference_mode():
        whole = model(ids, inp.pixel_values, mask, inp.images_spatial_crop)[0, -5:].numpy()
    np.testing.assert_allclose(logits, whole, rtol=1e-4, atol=1e-4)
    assert all(len(v) == inp.seq_len + 4 for v in sel.values())


def test_bf16_yardstick_is_measured_and_reported(exported, references, test_checkpoints, capsys):
    """The reference in bf16 is a distance of its own: not zero (its logits and expert choices move), far smaller
    than int4's on the same checkpoint, and printed beside the artifact's."""
    art = exported("test-vl2", "int4")
    doc = fidelity.run(art, test_checkpoints["test-vl2"], conversations=3, steps=8, progress=False)
    b, s = doc["summary"]["bf16_reference"], doc["summary"]
    assert 0.99 < b["worst_cosine"] < 1.0 and b["mean_error"] < s["mean_error"] / 5
    assert set(b["expert_mismatch_by_layer"]) == set(s["expert_mismatch_by_layer"])
    printed = fidelity.table(doc)
    assert "the reference itself in bf16" in printed
    assert f"is {s['mean_error'] / b['mean_error']:.1f}x the bf16 reference's" in printed
    assert doc["policy"]["experts"] == "int4" and "precision policy for int4 experts: " in printed
    assert "bf16_reference" not in fidelity.run(art, test_checkpoints["test-vl2"], conversations=1, steps=2,
                                                progress=False, bf16=False)["summary"]

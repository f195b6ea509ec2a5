"""The runtime on aarch64 against x86-64 (bench/platforms/aarch64.py, under qemu: marked `aarch64`, deselect locally with
`pytest -m "not aarch64"`; ~45 s with the arm64 environment cached, ~5 min more the first time on a machine), and
the comparison's bound (bench/platforms/crosscheck.py), which must fail a platform that disagrees beyond it."""

from __future__ import annotations

import numpy as np
import pytest

from vl2edge.bench.platforms import aarch64, crosscheck
from vl2edge.bench.platforms import probe as platform_probe


@pytest.fixture(scope="module")
def native(test_checkpoints, tmp_path_factory):
    """A native probe of int4 test-tiny (MHA) and int8 test-vl2 (group-limited sigmoid routing)."""
    from vl2edge.export.exporter import export

    root = tmp_path_factory.mktemp("crosscheck")
    arts = {"tiny": export(test_checkpoints["test-tiny"], root / "tiny", progress=False),
            "vl2": export(test_checkpoints["test-vl2"], root / "vl2", experts="int8", progress=False)}
    path = root / "native.npz"
    assert platform_probe.main([str(path), *map(str, arts.values()), "--steps", "6"]) == 0
    return path, arts


def _other(native_path, tmp_path, edit):
    """A copy of the native probe as another platform's, with held logits = its logits, then edited."""
    meta, arrays = crosscheck.load_probe(native_path)
    for k in [k for k in arrays if k.endswith("/logits") or "/router/" in k]:
        arrays[k.replace("/logits", "/held_logits").replace("/router/", "/held_router/")] = arrays[k].copy()
    edit(arrays)
    out = tmp_path / "other.npz"
    np.savez(out, **arrays)
    out.with_suffix(".json").write_text(native_path.with_suffix(".json").read_text())
    return out


def test_identical_platforms_agree(native, tmp_path):
    path, arts = native
    report = crosscheck.compare_probes(path, _other(path, tmp_path, lambda a: None), arts)
    assert report["ok"], crosscheck.table(report)
    case = report["artifacts"]["vl2"]["cases"][0]
    assert case["held"]["worst_cosine"] > 0.999999 and not case["router_near_ties"]


def test_logits_beyond_the_bound_fail(native, tmp_path):
    path, arts = native

    def skew(a):  # one step of one case moved by 10% of its largest logit
        k = "tiny/1/held_logits"
        a[k][2] += 0.1 * np.abs(a[k][2]).max() * np.sign(np.random.default_rng(0).standard_normal(a[k].shape[1]))

    report = crosscheck.compare_probes(path, _other(path, tmp_path, skew), arts)
    assert not report["ok"] and report["artifacts"]["vl2"]["ok"]
    assert any("held-routing logits beyond the bound" in f for c in report["artifacts"]["tiny"]["cases"]
               for f in c["failures"])


def test_router_beyond_the_bound_fails_and_a_flip_is_named(native, tmp_path):
    path, arts = native

    def flip(a):  # layer 1's first token chose another expert in the free run
        chosen, width = a["vl2/3/chosen/1"], a["vl2/3/router/1"].shape[1]
        chosen[0, 0] = next(e for e in range(width) if e not in chosen[0])

    report = crosscheck.compare_probes(path, _other(path, tmp_path, flip), arts)
    case = report["artifacts"]["vl2"]["cases"][0]
    named = case["router_near_ties"][0]
    assert (named["layer"], named["token"], named["flipped_tokens"]) == (1, 0, 1) and named["margin"] > 0
    assert case["ok"]  # a flip alone, with the routers within the bound, is a near-tie

    def drift(a):
        a["vl2/3/held_router/1"] = a["vl2/3/held_router/1"] * 1.2

    case = crosscheck.compare_probes(path, _other(path, tmp_path, drift), arts)["artifacts"]["vl2"]["cases"][0]
    assert not case["ok"] and any("router logits beyond the bound" in f for f in case["failures"])


def test_a_greedy_difference_without_a_near_tie_fails(native, tmp_path):
    path, arts = native

    def swap(a):  # the free run answers another token at a step where the reference's margin is wide
        logits = a["tiny/3/logits"]
        s = int(np.argmax([np.sort(x)[-1] - np.sort(x)[-2] for x in logits]))
        logits[s, np.argsort(logits[s])[-2]] = logits[s].max() + 1.0

    report = crosscheck.compare_probes(path, _other(path, tmp_path, swap), arts)
    case = report["artifacts"]["tiny"]["cases"][0]
    assert not case["ok"] and any("no near-tie" in f for f in case["failures"]), crosscheck.table(report)


@pytest.mark.aarch64
def test_aarch64_agrees_with_x86(test_checkpoints, tmp_path):
    report = aarch64.run(tmp_path, checkpoints=test_checkpoints, steps=8)
    print(crosscheck.table(report))
    assert report["other"]["machine"] == "aarch64" and report["reference"]["machine"] == "x86_64"
    assert set(report["artifacts"]) == set(aarch64.ARTIFACTS)
    assert report["ok"], crosscheck.table(report)

"""Two platforms' probes of the same artifacts compared (bench/platforms/probe.py): the same numbers within a bound
that says why, greedy tokens equal except at near-ties, each named with its margin.

The bound. The graphs are the same; what differs is the kernels' arithmetic: NEON and AVX-512 (or two
onnxruntime releases) sum fp32 products in another order, ~1e-7 relative per sum. Through the int8 activation
quantization that the quantized artifacts use (MatMulNBits / QMoE at accuracy_level 4, DynamicQuantizeMatMul), such
a last-bit difference can move an activation across a rounding boundary, changing one product by half a code
(1/254 of its block's absmax). Measured on the test presets: held-routing logits agree to cosine >= 0.99999 and a
relative max error of <= 2e-3 (x86-64 vs aarch64 under qemu). Hence, with the expert choices of the reference
platform held (so no near-tie of a router can amplify anything):
  logits   cosine >= HELD_COSINE and max |diff| <= HELD_REL_ERROR * max |logit|, every step;
  routers  max |diff| of the router logits <= HELD_REL_ERROR * the layer's max |router logit|, every MoE layer.
A platform beyond either bound FAILS. With each platform routing for itself ("free"), an expert choice may flip
where two experts' scores are closer than that difference (a router near-tie), and a flipped expert changes the
token's hidden state beyond the bound; a greedy token may differ where the top two logits are that close (a logit
near-tie). Each is named with its margin; a greedy difference that neither explains FAILS.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HELD_COSINE = 0.9995
HELD_REL_ERROR = 5e-2


def load_probe(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    path = Path(path)
    return json.loads(path.with_suffix(".json").read_text()), dict(np.load(path))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.float64) - b).max(-1) / np.abs(b.astype(np.float64)).max(-1)


def _choice_margin(router_logits: np.ndarray, chosen: np.ndarray, manifest: dict, layer: int, art: Path | None):
    """The reference platform's margin at a token, in the router's score units (softmax, or sigmoid + VL2's
    selection bias): the smallest gap that decided the choice, between the last kept and the first dropped group
    (group-limited routing) or between the smallest chosen and the largest unchosen expert of the kept groups."""
    from ...model.config import VL2Config
    from ...runtime.dispatch import RoutingConfig, _sigmoid, _softmax

    cfg = RoutingConfig.from_language_config(VL2Config.from_dict(manifest["source"]["config"], "manifest").language)
    v = _softmax(router_logits[None])[0] if cfg.scoring == "softmax" else _sigmoid(router_logits[None])[0]
    if cfg.method == "noaux_tc" and art is not None and manifest.get("router_bias"):
        from safetensors.numpy import load_file

        v = v + load_file(str(art / manifest["router_bias"]))[f"layer{layer}"]
    kept = np.ones(len(v), bool)
    margins = []
    if cfg.method != "greedy" and cfg.topk_group < cfg.n_group:
        groups = v.reshape(cfg.n_group, -1)
        g = groups.max(-1) if cfg.method == "group_limited_greedy" else -np.sort(-groups, -1)[:, :2].sum(-1)
        order = np.argsort(-g, kind="stable")
        margins.append(float(g[order[cfg.topk_group - 1]] - g[order[cfg.topk_group]]))
        kept = np.repeat(np.isin(np.arange(cfg.n_group), order[:cfg.topk_group]), len(v) // cfg.n_group)
    mask = np.zeros(len(v), bool)
    mask[chosen] = True
    margins.append(float(v[mask].min() - v[kept & ~mask].max()))
    return min(margins)


def compare_case(ref: dict, other: dict, key: str, manifest: dict, art: Path | None = None) -> dict:
    """One artifact and conversation: the held-routing bound, and the free run's token and routing differences."""
    out = {"case": key}
    held = other.get(f"{key}/held_logits")
    ref_logits = ref[f"{key}/logits"]
    layers = sorted(int(k.rsplit("/", 1)[1]) for k in ref if k.startswith(f"{key}/router/"))
    if held is None and layers:
        return out | {"ok": False, "failures": ["no held-routing run"]}
    held = ref_logits if held is None else held  # dense models: free is held
    failures = []
    cos, rel = _cosine(held, ref_logits), _rel(held, ref_logits)
    out["held"] = {"worst_cosine": float(cos.min()), "worst_rel_error": float(rel.max())}
    if cos.min() < HELD_COSINE or rel.max() > HELD_REL_ERROR:
        failures.append(f"held-routing logits beyond the bound: cosine {cos.min():.6f} (>= {HELD_COSINE}), "
                        f"max error {rel.max():.2e} of the largest logit (<= {HELD_REL_ERROR:g})")
    free_cos, free_rel = _cosine(other[f"{key}/logits"], ref_logits), _rel(other[f"{key}/logits"], ref_logits)
    out["free"] = {"worst_cosine": float(free_cos.min()), "worst_rel_error": float(free_rel.max())}
    flips, router_err = [], 0.0
    for i in layers:
        ref_router = ref[f"{key}/router/{i}"]
        held_router = other.get(f"{key}/held_router/{i}")
        if held_router is None:
            failures.append(f"layer {i}: no held-routing router logits")
            continue
        # against the layer's largest router logit: a token whose logits are all near 0 has no scale of its own
        router_err = max(router_err, float(np.abs(held_router - ref_router).max() / np.abs(ref_router).max()))
        a, b = other[f"{key}/chosen/{i}"], ref[f"{key}/chosen/{i}"]
        differ = [t for t in range(min(len(a), len(b))) if set(a[t].tolist()) != set(b[t].tolist())]
        if differ:  # the first flip of the free run, with the routers' arithmetic difference at that token
            t = differ[0]
            flips.append({"layer": i, "token": t, "flipped_tokens": len(differ),
                          "margin": _choice_margin(ref_router[t], b[t], manifest, i, art),
                          "difference": float(np.abs(held_router[t] - ref_router[t]).max())})
    out["router_rel_error"] = router_err
    if router_err > HELD_REL_ERROR:
        failures.append(f"held-routing router logits beyond the bound: {router_err:.2e} (<= {HELD_REL_ERROR:g})")
    out["router_near_ties"] = flips
    tokens_ref = ref[f"{key}/tokens"]
    top1 = other[f"{key}/logits"].argmax(-1)
    ties = []
    for s in np.flatnonzero(top1 != tokens_ref):
        lg = np.sort(ref_logits[s])[::-1]
        margin = float((lg[0] - lg[1]) / np.abs(lg).max())
        if flips:
            why = "after a router near-tie"
        elif margin <= 2 * float(rel[s]):  # the two platforms' own difference at that step covers the gap
            why = "logit near-tie"
        else:
            why = None
            failures.append(f"step {s}: greedy token differs at a margin of {margin:.2e} with no near-tie")
        ties.append({"step": int(s), "margin": margin, "why": why})
    out["token_differences"] = ties
    out["failures"] = failures
    out["ok"] = not failures
    return out


def compare_probes(ref_path: Path, other_path: Path, artifacts: dict[str, Path]) -> dict:
    """Every artifact and case of `ref_path`'s probe against `other_path`'s. artifacts: name -> directory."""
    ref_meta, ref = load_probe(ref_path)
    other_meta, other = load_probe(other_path)
    report = {"reference": {k: ref_meta[k] for k in ("machine", "python", "onnxruntime")},
              "other": {k: other_meta[k] for k in ("machine", "python", "onnxruntime")}, "artifacts": {}}
    for name, art in artifacts.items():
        manifest = json.loads((Path(art) / "manifest.json").read_text())
        entry = other_meta["artifacts"].get(name, {})
        bad = {f: s for f, s in entry.get("sessions", {}).items() if s != "ok"}
        errors = [entry[k] for k in ("engine_error", "run_error") if k in entry]
        if bad or errors or not entry:
            report["artifacts"][name] = {"ok": False, "failures": (errors or ([] if entry else ["not probed"]))
                                         + [f"{f}: {s}" for f, s in bad.items()]}
            continue
        if not any(k.startswith(f"{name}/") for k in ref):  # not run on the reference (a CUDA graph): sessions only
            report["artifacts"][name] = {"ok": True, "cases": []}
            continue
        cases = [compare_case(ref, other, f"{name}/{c}", manifest, Path(art)) for c in ref_meta["cases"]]
        report["artifacts"][name] = {"ok": all(c["ok"] for c in cases), "cases": cases}
    report["ok"] = all(a["ok"] for a in report["artifacts"].values())
    return report


def table(report: dict) -> str:
    """One line per artifact and case."""
    o, r = report["other"], report["reference"]
    lines = [f"{o['machine']} onnxruntime {o['onnxruntime']} (Python {o['python']}) against {r['machine']} "
             f"onnxruntime {r['onnxruntime']}",
             "| artifact | case | held cosine | held max err | router err | free cosine | near-ties | ok |",
             "|---|---|---|---|---|---|---|---|"]
    for name, a in report["artifacts"].items():
        if "cases" not in a:
            lines.append(f"| {name} | - | - | - | - | - | - | FAIL: {'; '.join(a['failures'])[:200]} |")
            continue
        for c in a["cases"]:
            ties = [f"router L{f['layer']} tok {f['token']} margin {f['margin']:.1e} (diff {f['difference']:.1e})"
                    for f in c["router_near_ties"]]
            ties += [f"step {t['step']} logit margin {t['margin']:.1e} ({t['why']})" for t in c["token_differences"]]
            lines.append(f"| {name} | {c['case'].rsplit('/', 1)[1]} | {c['held']['worst_cosine']:.6f} | "
                         f"{c['held']['worst_rel_error']:.1e} | {c['router_rel_error']:.1e} | "
                         f"{c['free']['worst_cosine']:.6f} | {'; '.join(ties) or '-'} | "
                         f"{'ok' if c['ok'] else 'FAIL: ' + '; '.join(c['failures'])} |")
    return "\n".join(lines)

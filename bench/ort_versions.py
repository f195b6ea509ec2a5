"""Which onnxruntime release loads each kind of artifact and gives the same logits: the compatibility matrix.

  python -m vl2edge.bench.ort_versions [--versions 1.20.1,1.22.1,...] [--work DIR] [--json out.json]

Exports every artifact kind of test-tiny (MHA) and test-small (MLA): cpu int4 / int8 / fp32 with each --kv-cache and
--vision choice, cuda fp16 / int4 / int8, and again with --min-onnxruntime (1.23.2, 1.24.3, 1.25.0).
The pinned onnxruntime (this interpreter's) probes them (bench/platform_probe.py); then each release, installed from
PyPI's CPU wheels into a throwaway venv (cached in --venvs) with the runtime's other dependencies, probes them again,
ignoring the manifest's floor, fed the pinned run's tokens and expert choices. Per artifact and release:
  verified      every session loads on CPU and the logits agree within bench/crosscheck.py's bound
  differs       they load but the logits do not agree
  schema ok     (cuda artifacts) onnxruntime accepts every graph; the CPU wheel has no kernel for some op, which a
                CUDA build has: the numbers are not checked
  refused       onnxruntime refuses a graph (an unknown attribute, an input count): the first reason is given
and whether that agrees with the manifest's onnxruntime.min (a release at or above it must load the artifact, one
below it must not). Exit 1 on a disagreement. A venv takes ~30 s to make the first time; the probes ~5 s each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from ..export.ort_compat import PINNED, parse_version, version_str
from .aarch64 import PROJECT
from .crosscheck import compare_probes

VERSIONS = ("1.20.1", "1.22.1", "1.23.0", "1.23.1", "1.23.2", "1.24.2", "1.24.3", "1.25.0", "1.30.0", "1.31.1",
            "1.32.0")
# name -> (preset, export options)
KINDS = {
    "cpu-int4": {"experts": "int4"},
    "cpu-int4-kvf": {"experts": "int4", "kv_cache": "float"},
    "cpu-int4-v8": {"experts": "int4", "vision": "int8"},
    "cpu-int8": {"experts": "int8"},
    "cpu-int8-kvf-v8": {"experts": "int8", "kv_cache": "float", "vision": "int8"},
    "cpu-fp32": {"experts": "fp32"},
    "cpu-int4-min1.25.0": {"experts": "int4", "min_onnxruntime": "1.25.0"},
    "cpu-int4-min1.24.3": {"experts": "int4", "min_onnxruntime": "1.24.3"},
    "cpu-int8-min1.23.2": {"experts": "int8", "min_onnxruntime": "1.23.2"},
    "cuda-fp16": {"experts": "fp16", "target": "cuda"},
    "cuda-int4": {"experts": "int4", "target": "cuda"},
    "cuda-int8": {"experts": "int8", "target": "cuda"},
    "cuda-int4-min1.23.2": {"experts": "int4", "target": "cuda", "min_onnxruntime": "1.23.2"},
}
PRESETS = ("test-tiny", "test-small")


def runtime_requirements() -> list[str]:
    """The base install's requirements other than onnxruntime (from the installed vl2edge's metadata)."""
    reqs = metadata.requires("vl2edge") or []
    return [r for r in reqs if "extra ==" not in r and not r.lower().startswith("onnxruntime")]


def make_venv(path: Path, packages: list[str], python: str = sys.executable) -> Path:
    """A venv at `path` with `packages` (kept when it exists with a marker of the same list); its python."""
    marker = path / "vl2edge-packages.json"
    py = path / "bin" / "python"
    if marker.is_file() and json.loads(marker.read_text()) == packages:
        return py
    subprocess.run([python, "-m", "venv", "--clear", str(path)], check=True, capture_output=True)
    p = subprocess.run([str(py), "-m", "pip", "install", "-q", "--only-binary=:all:", *packages],
                       capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"pip install {' '.join(packages)} into {path} failed: {p.stderr[-1500:]}")
    marker.write_text(json.dumps(packages))
    return py


def source_path(work: Path) -> Path:
    """A directory whose `vl2edge` is the source tree, for PYTHONPATH (no build, no install)."""
    d = work / "src"
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "vl2edge").exists():
        (d / "vl2edge").symlink_to(PROJECT, target_is_directory=True)
    return d


def run_probe(python: Path | str, out: Path, artifacts: list[Path], src: Path, native: Path | None = None,
              timeout: float = 900) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"PYTHONPATH": str(src)}
    cmd = [str(python), "-m", "vl2edge.bench.platform_probe", str(out), *map(str, artifacts), "--ignore-floor"]
    p = subprocess.run(cmd + (["--native", str(native)] if native else []), env=env, capture_output=True,
                       text=True, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"probe with {python} failed ({p.returncode}): {p.stderr[-2000:]}")


def export_kinds(work: Path, presets=PRESETS) -> dict[str, Path]:
    from ..export.exporter import export
    from ..model.synth import synthesize

    arts = {}
    for preset in presets:
        ckpt = work / "checkpoints" / preset
        if not (ckpt / "config.json").is_file():
            synthesize(ckpt, preset, seed=0, progress=False)
        for kind, opts in KINDS.items():
            out = work / "artifacts" / f"{preset}-{kind}"
            if not (out / "manifest.json").is_file():
                export(ckpt, out, progress=False, force=True, **opts)
            arts[out.name] = out
    return arts


def verdict(report: dict, meta: dict, name: str, target: str) -> tuple[str, str]:
    """(status, the first reason) of one artifact under one release."""
    sessions = meta["artifacts"][name]["sessions"]
    refused = [f"{f}: {s}" for f, s in sessions.items() if s.startswith("refused")]
    if refused:
        return "refused", refused[0]
    missing = [f"{f}: {s}" for f, s in sessions.items() if s.startswith("no kernel")]
    if target == "cuda":
        return "schema ok", missing[0] if missing else ""
    if missing:
        return "no kernel", missing[0]
    a = report["artifacts"][name]
    if a["ok"]:
        worst = min(c["held"]["worst_cosine"] for c in a["cases"])
        return "verified", f"held cosine >= {worst:.6f}"
    return "differs", "; ".join(a.get("failures") or [f for c in a["cases"] for f in c["failures"]])[:300]


def run(work: Path, versions=VERSIONS, venvs: Path | None = None, python: str = sys.executable) -> dict:
    import onnxruntime as ort

    if parse_version(ort.__version__) != PINNED:
        raise RuntimeError(f"the reference run needs the pinned onnxruntime {version_str(PINNED)}, this is "
                           f"{ort.__version__}")
    arts = export_kinds(work)
    src = source_path(work)
    native = work / f"ort-{ort.__version__}.npz"
    run_probe(sys.executable, native, list(arts.values()), src)
    venvs = venvs or work / "venvs"
    deps = runtime_requirements()
    matrix: dict[str, dict[str, dict]] = {name: {} for name in arts}
    disagreements = []
    for v in versions:
        py = make_venv(venvs / f"ort-{v}", [f"onnxruntime=={v}", *deps], python)
        out = work / f"ort-{v}.npz"
        run_probe(py, out, list(arts.values()), src, native)
        report = compare_probes(native, out, arts)
        meta = json.loads(out.with_suffix(".json").read_text())
        for name, art in arts.items():
            manifest = json.loads((art / "manifest.json").read_text())
            status, why = verdict(report, meta, name, manifest["target"])
            floor = manifest["onnxruntime"]["min"]
            works = status in ("verified", "schema ok")
            expected = parse_version(v) >= parse_version(floor)
            matrix[name][v] = {"status": status, "why": why, "floor": floor, "as_expected": works == expected}
            if works != expected:
                disagreements.append(f"{name} on {v}: {status} ({why}), manifest floor {floor}")
    return {"pinned": ort.__version__, "versions": list(versions), "matrix": matrix,
            "disagreements": disagreements, "ok": not disagreements}


SHORT = {"verified": "✓", "schema ok": "schema", "refused": "refused", "no kernel": "no kernel", "differs": "DIFFERS"}


def table(doc: dict) -> str:
    vs = doc["versions"]
    lines = ["| artifact | floor | " + " | ".join(vs) + " |", "|---|---|" + "---|" * len(vs)]
    for name, row in doc["matrix"].items():
        cells = [SHORT[row[v]["status"]] + ("" if row[v]["as_expected"] else " (!)") for v in vs]
        lines.append(f"| {name} | {row[vs[0]]['floor']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vl2edge.bench.ort_versions", description=__doc__.split("\n")[0])
    ap.add_argument("--versions", default=",".join(VERSIONS))
    ap.add_argument("--work", type=Path, default=None, help="checkpoints, artifacts, probes (default: temporary)")
    ap.add_argument("--venvs", type=Path, default=None, help="where the throwaway venvs are kept (default: in work)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        doc = run(args.work or Path(tmp), args.versions.split(","), args.venvs)
    print(table(doc))
    for d in doc["disagreements"]:
        print("disagrees with its manifest:", d)
    for name, row in doc["matrix"].items():
        for v, cell in row.items():
            if cell["why"] and cell["status"] != "verified":
                print(f"{name} @ {v}: {cell['status']}: {cell['why']}")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Which onnxruntime release loads each kind of artifact and gives the same logits: the compatibility matrix.

  python -m vl2edge.bench.platforms.ort_versions [--versions 1.20.1,1.22.1,...] [--work DIR] [--json out.json]
  python -m vl2edge.bench.platforms.ort_versions --speed ART[,ART...] --versions 1.23.2,1.31.1 [--rounds 3] [--context 512]

Exports every artifact kind of test-tiny (MHA) and test-small (MLA): cpu int4 / int8 / fp32 with each --kv-cache and
--vision choice, cuda fp16 / int4 / int8, and again with --min-onnxruntime (1.23.2, 1.24.3, 1.25.0, 1.27.0).
The pinned onnxruntime (this interpreter's) probes them (bench/platforms/probe.py); then each release, installed from
PyPI's CPU wheels into a throwaway venv (cached in --venvs) with the runtime's other dependencies, probes them again,
ignoring the manifest's floor, fed the pinned run's tokens and expert choices. Per artifact and release:
  verified      every session loads on CPU and the logits agree within bench/platforms/crosscheck.py's bound
  differs       they load but the logits do not agree
  schema ok     (cuda artifacts) onnxruntime accepts every graph; the CPU wheel has no kernel for some op, which a
                CUDA build has: the numbers are not checked
  refused       onnxruntime refuses a graph (an unknown attribute, an input count): the first reason is given
  no kernel     (cpu artifacts) accepted, but the CPU wheel has no kernel for an op
  run error     accepted and loaded, but a kernel fails when it runs (a feature in the schema before the kernel)
and whether that agrees with the manifest's onnxruntime.min (a release at or above it must load the artifact, one
below it must not). Exit 1 on a disagreement. A venv takes ~30 s to make the first time; the probes ~5 s each.

--speed: what an artifact for an older onnxruntime costs in prefill and decode time. Each artifact under each
release that its floor allows, in a fresh process each (the venvs above; this interpreter for the pinned release),
in rounds that alternate them (this machine's speed drifts between minutes): a prefill of `context` filler tokens
(tokens/s), then decode steps (the median ms/token); the report gives each pair's median over rounds and range.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from ...contract.ort_compat import PINNED, parse_version, version_str
from .crosscheck import compare_probes
from .probe import child_env, source_path

VERSIONS = ("1.20.1", "1.22.1", "1.23.0", "1.23.1", "1.23.2", "1.24.2", "1.24.3", "1.25.0", "1.26.0", "1.27.0",
            "1.28.0", "1.29.0", "1.30.0", "1.31.0", "1.31.1", "1.32.0")
# name -> (preset, export options)
KINDS = {
    "cpu-int4": {"experts": "int4"},
    "cpu-int4-kvf": {"experts": "int4", "kv_cache": "float"},
    "cpu-int4-v8": {"experts": "int4", "vision": "int8"},
    "cpu-int8": {"experts": "int8"},
    "cpu-int8-kvf-v8": {"experts": "int8", "kv_cache": "float", "vision": "int8"},
    "cpu-fp32": {"experts": "fp32"},
    "cpu-int4-min1.27.0": {"experts": "int4", "min_onnxruntime": "1.27.0"},
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


def run_probe(python: Path | str, out: Path, artifacts: list[Path], src: Path, native: Path | None = None,
              timeout: float = 900) -> None:
    env = child_env(str(src))
    cmd = [str(python), "-m", "vl2edge.bench.platforms.probe", str(out), *map(str, artifacts), "--ignore-floor"]
    p = subprocess.run(cmd + (["--native", str(native)] if native else []), env=env, capture_output=True,
                       text=True, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"probe with {python} failed ({p.returncode}): {p.stderr[-2000:]}")


def export_kinds(work: Path, presets=PRESETS) -> dict[str, Path]:
    from ...export.exporter import export
    from ...model.synth import synthesize

    arts = {}
    for preset in presets:
        ckpt = work / "checkpoints" / preset
        if not (ckpt / "config.json").is_file():
            synthesize(ckpt, preset, seed=0, progress=False)
        for kind, opts in KINDS.items():
            out = work / "artifacts" / f"{preset}-{kind}"
            export(ckpt, out, progress=False, force=True, **opts)  # always: the exporter may have changed
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
    if "run_error" in meta["artifacts"][name]:
        return "run error", meta["artifacts"][name]["run_error"]
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


def step_times(artifact: Path, context: int, steps: int = 16, warmup: int = 4, threads: int | None = None) -> dict:
    """Prefill tokens/s of `context` filler tokens, then the median ms of a decode step (torch-free: runs in any
    venv)."""
    import time

    import numpy as np

    from ...runtime import engine as engine_mod

    engine_mod.check_onnxruntime = lambda art, installed: None  # the caller chose the release
    eng = engine_mod.Engine(artifact, threads=threads, verify="size")
    ids = np.random.default_rng(0).integers(100, eng.config.language.vocab_size - 100, context + 1)
    t0 = time.perf_counter()
    eng.prefill(eng.embed(ids[:context][None]))
    prefill_s = time.perf_counter() - t0
    tok, times = int(ids[context]), []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        tok = int(np.argmax(eng.decode(tok)))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"prefill_tokens_per_s": context / prefill_s, "decode_ms": float(np.median(times) * 1e3)}


def speed(artifacts: list[Path], versions, work: Path, venvs: Path | None, rounds: int, context: int,
          threads: int | None) -> dict:
    import onnxruntime as ort

    from ...runtime.artifact import open_artifact, required_onnxruntime

    src, venvs, deps = source_path(work), venvs or work / "venvs", runtime_requirements()
    pythons = {v: (sys.executable if v == ort.__version__ else make_venv(venvs / f"ort-{v}",
                                                                          [f"onnxruntime=={v}", *deps]))
               for v in versions}
    pairs = [(v, a) for a in artifacts for v in versions
             if parse_version(v) >= parse_version(required_onnxruntime(open_artifact(a, verify="size").manifest))]
    env = child_env(str(src))
    ms: dict[tuple, list[float]] = {p: [] for p in pairs}
    for _ in range(rounds):
        for v, a in pairs:
            code = (f"import json; from vl2edge.bench.platforms.ort_versions import step_times; "
                    f"print(json.dumps(step_times({str(a)!r}, {context}, threads={threads})))")
            p = subprocess.run([str(pythons[v]), "-c", code], env=env, capture_output=True, text=True, timeout=1800)
            if p.returncode:
                raise RuntimeError(f"{a} on onnxruntime {v}: {p.stderr[-1500:]}")
            ms[(v, a)].append(json.loads(p.stdout.strip().splitlines()[-1]))
    import statistics

    def summary(values):
        return {"median": statistics.median(values), "range": [min(values), max(values)], "rounds": values}

    rows = [{"onnxruntime": v, "artifact": str(a), "context": context,
             "decode_ms": summary([r["decode_ms"] for r in t]),
             "prefill_tokens_per_s": summary([r["prefill_tokens_per_s"] for r in t])} for (v, a), t in ms.items()]
    return {"speed": rows, "context": context, "rounds": rounds, "threads": threads}


SHORT = {"verified": "✓", "schema ok": "schema", "refused": "refused", "no kernel": "no kernel", "differs": "DIFFERS",
         "run error": "run error"}


def table(doc: dict) -> str:
    vs = doc["versions"]
    lines = ["| artifact | floor | " + " | ".join(vs) + " |", "|---|---|" + "---|" * len(vs)]
    for name, row in doc["matrix"].items():
        cells = [SHORT[row[v]["status"]] + ("" if row[v]["as_expected"] else " (!)") for v in vs]
        lines.append(f"| {name} | {row[vs[0]]['floor']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vl2edge.bench.platforms.ort_versions", description=__doc__.split("\n")[0])
    ap.add_argument("--versions", default=",".join(VERSIONS))
    ap.add_argument("--work", type=Path, default=None, help="checkpoints, artifacts, probes (default: temporary)")
    ap.add_argument("--venvs", type=Path, default=None, help="where the throwaway venvs are kept (default: in work)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--speed", default=None, metavar="ART[,ART...]", help="decode time of these artifacts under "
                                                                        "--versions instead of the matrix")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.speed:
        with tempfile.TemporaryDirectory() as tmp:
            doc = speed([Path(a) for a in args.speed.split(",")], args.versions.split(","), args.work or Path(tmp),
                        args.venvs, args.rounds, args.context, args.threads)
        for r in doc["speed"]:
            d, pf = r["decode_ms"], r["prefill_tokens_per_s"]
            print(f"onnxruntime {r['onnxruntime']:8} {r['artifact']}: decode {d['median']:.1f} ms/token at "
                  f"{r['context']} ({d['range'][0]:.1f}-{d['range'][1]:.1f}), prefill {pf['median']:.0f} tokens/s "
                  f"({pf['range'][0]:.0f}-{pf['range'][1]:.0f}), {doc['rounds']} rounds")
        if args.json:
            args.json.write_text(json.dumps(doc, indent=1) + "\n")
        return 0
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

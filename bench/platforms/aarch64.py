"""The torch-free runtime on aarch64 (qemu user-mode emulation) against this x86-64 machine, same artifacts.

  python -m vl2edge.bench.platforms.aarch64 [--work DIR] [--json out.json] [--steps 8]

Exports int4 test-tiny (MHA, int8 KV cache), int4 test-small (MLA, uint8 latent cache) and int8 test-vl2 (MLA,
sigmoid group-limited routing) here, probes them natively (bench/platforms/probe.py), then again in an aarch64
Python 3.11 with the runtime's dependencies as manylinux aarch64 wheels (../shared/tools/arm64-env, which caches
under $TMPDIR/arm64env: ~5 min the first time), fed the native tokens and expert choices, and compares
(bench/platforms/crosscheck.py: the bound and why). Exit 1 when aarch64 disagrees beyond the bound.
The project reaches the emulated Python as itself: a `vl2edge` link to the source tree on its path.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .crosscheck import compare_probes, table
from .probe import PROJECT, child_env, source_path

ARM64_ENV = PROJECT.parent / "shared" / "tools" / "arm64-env"
ARTIFACTS = {"test-tiny-int4": ("test-tiny", "int4"), "test-small-int4": ("test-small", "int4"),
             "test-vl2-int8": ("test-vl2", "int8")}


def arm64_env(tool: Path = ARM64_ENV, tries: int = 3) -> tuple[str, str, str]:
    """(qemu, root, site) from the arm64-env tool. It builds its cache in stages and reads pyproject.toml from the
    working directory after a stage has changed it, so a first run can stop after a stage: run it again (each run
    keeps what earlier ones cached)."""
    if not tool.is_file():
        raise FileNotFoundError(f"{tool}: no arm64-env tool (it comes with the project's shared/ folder)")
    last = ""
    for _ in range(tries):
        p = subprocess.run(["bash", str(tool)], cwd=PROJECT, capture_output=True, text=True)
        words = p.stdout.split()
        if p.returncode == 0 and len(words) == 3 and Path(words[0]).is_file():
            return words[0], words[1], words[2]
        last = (p.stdout + p.stderr).strip()
    raise RuntimeError(f"arm64-env failed {tries} times: {last[-400:]}")


def export_artifacts(checkpoints: dict[str, Path], out: Path) -> dict[str, Path]:
    from ...export.exporter import export

    arts = {}
    for name, (preset, experts) in ARTIFACTS.items():
        arts[name] = export(checkpoints[preset], out / name, experts=experts, progress=False, force=True)
    return arts


def synthesize_checkpoints(out: Path, seed: int = 0) -> dict[str, Path]:
    from ...model.synth import synthesize

    presets = {p for p, _ in ARTIFACTS.values()}
    return {p: out / p if (out / p / "config.json").is_file() else synthesize(out / p, p, seed=seed, progress=False)
            for p in presets}


def run(work: Path, checkpoints: dict[str, Path] | None = None, steps: int = 8, timeout: float = 900) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    checkpoints = checkpoints or synthesize_checkpoints(work / "checkpoints")
    arts = export_artifacts(checkpoints, work / "artifacts")
    probe = [sys.executable, "-m", "vl2edge.bench.platforms.probe"]
    native = work / "x86_64.npz"
    subprocess.run(probe + [str(native), *map(str, arts.values()), "--steps", str(steps)], check=True,
                   capture_output=True, timeout=timeout)
    qemu, root, site = arm64_env()
    env = child_env(f"{site}:{source_path(work)}", QEMU_LD_PREFIX=root, PYTHONDONTWRITEBYTECODE="1")
    emulated = work / "aarch64.npz"
    t0 = time.perf_counter()
    p = subprocess.run([qemu, f"{root}/usr/bin/python3.11", "-m", "vl2edge.bench.platforms.probe", str(emulated),
                        *map(str, arts.values()), "--native", str(native), "--steps", str(steps)],
                       env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"the emulated probe failed ({p.returncode}): {p.stderr[-2000:]}")
    report = compare_probes(native, emulated, arts)
    report["emulated_seconds"] = round(time.perf_counter() - t0, 1)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vl2edge.bench.platforms.aarch64", description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="where checkpoints, artifacts and probes go "
                                                           "(default: a temporary directory)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = run(args.work or Path(tmp), steps=args.steps)
    print(table(report))
    print(f"emulated probe: {report['emulated_seconds']} s; {'ok' if report['ok'] else 'FAILED'}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

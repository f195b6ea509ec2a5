"""The base install on Python 3.10-3.13 (x86-64 and aarch64, as pip resolves it), and the runtime on Python 3.10
with the newest onnxruntime that has cp310 wheels (1.23.2, also the oldest the project supports), generating from
artifacts exported for it (`--min-onnxruntime 1.23.2`) with the same numbers as the pinned onnxruntime.

Marked `platforms` (they reach PyPI; deselect locally with -m "not platforms"). The 3.10 interpreter is pyenv's on
this kind of machine (/root/.pyenv/versions/3.10.*); its venv is made once per machine under $TMPDIR (~40 s)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from vl2edge.bench.platforms import crosscheck
from vl2edge.bench.platforms.ort_versions import make_venv, run_probe
from vl2edge.bench.platforms.probe import source_path
from vl2edge.contract.ort_compat import parse_version

ROOT = Path(__file__).resolve().parent.parent
BASE = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
# glibc tags a Jetson (JetPack 6: Ubuntu 22.04, glibc 2.35) and an older x86-64 distribution accept
TAGS = ["manylinux2014", "manylinux_2_17", "manylinux_2_27", "manylinux_2_28", "manylinux_2_34", "manylinux_2_35"]
OLDEST = "1.23.2"  # the base range's lower bound, and the newest onnxruntime with cp310 wheels


def test_base_range_starts_where_the_compat_matrix_does():
    ort = next(d for d in BASE if d.startswith("onnxruntime"))
    assert ort.startswith(f"onnxruntime>={OLDEST},"), ort


@pytest.mark.platforms
@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
@pytest.mark.parametrize("python", ["3.10", "3.11", "3.12", "3.13"])
def test_base_install_resolves(python, arch, tmp_path):
    """pip's own resolution of the base dependencies for that Python and machine, from the package index's
    metadata (--dry-run: nothing is installed)."""
    report = tmp_path / "report.json"
    platforms = [a for t in TAGS for a in ("--platform", f"{t}_{arch}")]
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), "--only-binary=:all:", "--python-version", python,
                        "--implementation", "cp", *platforms, "--target", str(tmp_path / "t"), *BASE],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert parse_version(got["onnxruntime"]) >= parse_version(OLDEST)
    if python == "3.10":
        assert got["onnxruntime"] == OLDEST  # what a Jetson's Python gets


def _python310() -> str | None:
    """A working Python 3.10 (pyenv's shim answers only where 3.10 is its selected version)."""
    for py in [*sorted(glob.glob("/root/.pyenv/versions/3.10.*/bin/python")), shutil.which("python3.10")]:
        if py and subprocess.run([py, "-c", "import sys; assert sys.version_info[:2] == (3, 10)"],
                                 capture_output=True).returncode == 0:
            return py
    return None


@pytest.fixture(scope="module")
def venv310():
    """A Python 3.10 venv with vl2edge installed as a user would (`pip install .`: pip resolves the base range on
    cp310), made once per machine and kept while the project's dependencies are unchanged."""
    py = _python310()
    if py is None:
        pytest.fail("no Python 3.10 interpreter (pyenv's 3.10.13 is on this kind of machine)")
    vpy = make_venv(Path(os.environ.get("TMPDIR", "/tmp")) / "vl2edge-py310", BASE, python=py)
    # the project itself, fresh each run (pip builds the wheel in an isolated env, setuptools from the index)
    p = subprocess.run([str(vpy), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(ROOT)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    return vpy


@pytest.fixture(scope="module")
def compat_artifacts(test_checkpoints, tmp_path_factory):
    from vl2edge.export.exporter import export

    root = tmp_path_factory.mktemp("compat")
    # int8 experts: 1.23.2's CPU QMoE computes 4-bit experts wrong (contract/ort_compat.py)
    return {"tiny": export(test_checkpoints["test-tiny"], root / "tiny", experts="int8", progress=False,
                           min_onnxruntime=OLDEST),
            "vl2": export(test_checkpoints["test-vl2"], root / "vl2", experts="int8", progress=False,
                          min_onnxruntime=OLDEST),
            "default": export(test_checkpoints["test-small"], root / "default", progress=False)}


def _run(vpy, *args, **kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}  # the venv's own vl2edge
    return subprocess.run([str(vpy), *args], capture_output=True, text=True, env=env, timeout=600, **kw)


@pytest.mark.platforms
def test_python310_runs_the_runtime_on_the_oldest_onnxruntime(venv310, compat_artifacts, tmp_path):
    p = _run(venv310, "-c", "import sys, onnxruntime, vl2edge.runtime.engine; print(sys.version_info[:2], "
                            "onnxruntime.__version__)")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["(3,", "10)", OLDEST]
    # a user's generation through the CLI
    vl2edge = Path(venv310).parent / "vl2edge"
    p = _run(vl2edge, "run", str(compat_artifacts["tiny"]), "--prompt", "Describe the robot.", "--max-new-tokens",
             "6")
    assert p.returncode == 0, p.stderr[-2000:]
    # the artifact made for the pinned onnxruntime: refused in one line that names both versions and the option
    p = _run(vl2edge, "run", str(compat_artifacts["default"]), "--prompt", "hi", "--max-new-tokens", "2")
    assert p.returncode != 0
    assert f"this is onnxruntime {OLDEST}" in p.stderr and f"--min-onnxruntime {OLDEST}" in p.stderr
    assert "Traceback" not in p.stderr
    # the same numbers as the pinned onnxruntime on Python 3.11 (bench/platforms/crosscheck.py's bound)
    arts = {k: v for k, v in compat_artifacts.items() if k != "default"}
    src = source_path(tmp_path)
    run_probe(sys.executable, tmp_path / "pinned.npz", list(arts.values()), src)
    run_probe(venv310, tmp_path / "py310.npz", list(arts.values()), src, native=tmp_path / "pinned.npz")
    report = crosscheck.compare_probes(tmp_path / "pinned.npz", tmp_path / "py310.npz", arts)
    print(crosscheck.table(report))
    assert report["other"]["python"].startswith("3.10") and report["other"]["onnxruntime"] == OLDEST
    assert report["ok"], crosscheck.table(report)


def test_readme_jetson_line_installs_the_base_dependencies_but_onnxruntime():
    """The `--no-deps` line that keeps a Jetson's onnxruntime-gpu names exactly the other base dependencies."""
    import re
    import shlex

    readme = (ROOT / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if ln.startswith("pip install --no-deps vl2edge && pip install "))
    listed = shlex.split(line.split("&& pip install ", 1)[1])
    norm = lambda r: re.sub(r"\s", "", r).lower().replace("_", "-")  # noqa: E731
    assert sorted(map(norm, listed)) == sorted(norm(d) for d in BASE if not d.startswith("onnxruntime"))

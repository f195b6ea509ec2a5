"""README.md as a newcomer reads it: short, every `vl2edge` command in it that runs on a synthesized test model runs
as written (in order, in one directory), every other one says it needs real dims and what, and no file of the
repository carries laboratory labels instead of versions, commits and dates."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 300
COMMAND = re.compile(r"^(vl2edge |python -m vl2edge\.|printf .*\| *vl2edge )")
REAL_DIMS = re.compile(r"#\s*real dims:\s*\S")
# notebook labels: "stop" and a number, "run" and a capital letter A-L, a list of such runs
LABELS = re.compile(r"stop [0-9]+|\brun [A-L]\b|runs? [A-L](, [A-L])+")


def fenced(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.S | re.M)


def readme_commands() -> list[str]:
    return [line.strip() for block in fenced("bash") for line in block.splitlines() if COMMAND.match(line.strip())]


def test_readme_is_short_and_has_the_two_fresh_machine_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_LINES
    fresh = [b.strip() for b in fenced("bash") if b.strip().startswith("python3 -m venv .venv")]
    assert [b.rsplit("&& ", 1)[1] for b in fresh] == ["vl2edge demo", "pytest -q"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().splitlines()[-1] == "pytest -q"  # CI runs the README's test command


def test_every_command_either_runs_here_or_says_what_it_needs():
    commands = readme_commands()
    real = [c for c in commands if "# real dims" in c]
    assert len(commands) >= 15 and len(real) >= 5
    vague = [c for c in real if not REAL_DIMS.search(c)]
    assert not vague, f"say what these need after '# real dims:': {vague}"
    for c in commands:
        if c not in real:  # a test-preset command names only what the quick path makes
            assert not re.search(r"\b(tiny|small|vl2)-(int|plan)", c), f"a real-dims artifact without a note: {c}"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _serve(command: str, cwd: Path, env: dict) -> None:
    """Start a `vl2edge serve` line, wait for its "serving ..." line (printed once the socket listens, so a request
    made then waits in the backlog), ask /health on the default port, stop it."""
    assert "--port" not in command and _port_free(8000), "port 8000 is taken: the README's serve line needs it"
    p = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        seen = []
        for line in p.stdout:  # ends at EOF if the server exits instead
            seen.append(line)
            if line.startswith("vl2edge serve: serving "):
                break
        else:
            raise AssertionError(f"{command!r} exited without serving:\n{''.join(seen)[-2000:]}")
        with urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=60) as r:
            assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    finally:
        os.killpg(p.pid, 15)
        p.wait(timeout=30)


def test_readme_commands_run_as_written(tmp_path):
    env = {**os.environ, "VL2EDGE_CACHE": str(tmp_path / "cache")}
    bin_dir = str(Path(sys.executable).parent)  # the `vl2edge` and `python` of this environment
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    ran = []
    for command in readme_commands():
        if "# real dims" in command:
            continue
        if command.startswith("vl2edge serve"):
            _serve(command, tmp_path, env)
        else:
            out = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=600)
            assert out.returncode == 0, f"{command!r} failed:\n{out.stderr[-3000:]}"
        ran.append(command.split()[1] if command.startswith("vl2edge") else command.split()[0])
    assert {"demo", "synth", "export", "run", "serve", "bench"} <= set(ran)
    assert (tmp_path / "boxes.png").is_file() and (tmp_path / "bench-test" / "bench.json").is_file()
    # the Python API block, on what the commands made
    (api,) = [b for b in fenced("python") if b.startswith("import vl2edge")]
    out = subprocess.run([sys.executable, "-c", api], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def _repository_text_files():
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")  # an installed copy has no repository to check
    for name in tracked.stdout.splitlines():
        path = ROOT / name
        if path.suffix in (".py", ".md", ".toml", ".txt", ".cfg", "") and path.is_file():
            yield name, path


def test_no_laboratory_labels_in_the_repository():
    hits = []
    for name, path in _repository_text_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        hits += [f"{name}:{i}: {line.strip()[:100]}" for i, line in enumerate(text.splitlines(), 1)
                 if LABELS.search(line)]
    assert not hits, "name these by version, commit or date:\n" + "\n".join(hits)


def test_the_label_check_would_see_a_label():
    stop, run = "stop", "run"  # spelled apart, so this file holds no label itself
    assert LABELS.search(f"measured in {stop} 23") and LABELS.search(f"({run} I)") and LABELS.search(f"{run}s I, J")
    assert not LABELS.search("run it; stop the server") and not LABELS.search("a run in 2026-12-01")


def _slug(header: str) -> str:
    """GitHub's anchor of a Markdown header: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", header.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    """Every header's anchor; a repeated header gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for header in re.findall(r"^#+ (.*)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M), re.M):
        slug = _slug(header)
        out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return out


def test_links_between_the_documents_resolve():
    pages = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
    assert len(pages) >= 6
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and anchor not in _anchors(dest):
                broken.append(f"{page.name}: {target} (no such header)")
    assert not broken, "\n".join(broken)

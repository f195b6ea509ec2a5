"""docs/artifact-format.md is a contract another program can implement: tests/artifact_format_loop.py, written
from that page alone, runs test-preset artifacts in a process where every vl2edge import fails, and its greedy
tokens equal the runtime's. The page's tables are checked against what the exporter writes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import vl2edge
from vl2edge.contract.manifest import FORMAT_VERSION, READABLE_FORMAT_VERSIONS
from vl2edge.export.exporter import export

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "artifact-format.md"
LOOP = Path(__file__).with_name("artifact_format_loop.py")
NEW_TOKENS = 12

# Runs the loop as __main__ with vl2edge unimportable (a meta-path finder placed first refuses it).
RUNNER = textwrap.dedent("""
    import runpy, sys

    class NoVl2edge:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "vl2edge":
                raise ImportError(f"{name}: the format loop must not use vl2edge")

    sys.meta_path.insert(0, NoVl2edge())
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")

# (preset, --experts): MHA with the int8 KV cache; MLA with the uint8 latent cache and its token scales (format 5);
# VL2's sigmoid + bias routing over groups, with router_bias.safetensors
CASES = [("test-tiny", "int4"), ("test-small", "int4"), ("test-vl2", "int8")]


@pytest.fixture(scope="module")
def artifacts(test_checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("format")
    return {p: export(test_checkpoints[p], root / p, experts=e, progress=False) for p, e in CASES}


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """640x480: a 2x2 grid on the test presets' candidates, so the local view has several tiles and rows."""
    im = Image.new("RGB", (640, 480), (200, 210, 190))
    d = ImageDraw.Draw(im)
    d.rectangle([60, 250, 300, 460], fill=(120, 80, 40))
    d.ellipse([380, 60, 560, 240], fill=(220, 30, 30))
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    im.save(path)
    return path


def loop_tokens(art: Path, prompt: str, image: Path | None) -> list[int]:
    args = [sys.executable, "-c", RUNNER, str(LOOP), str(art), prompt] + ([str(image)] if image else [])
    out = subprocess.run(args + ["--max-new-tokens", str(NEW_TOKENS)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)["tokens"]


@pytest.mark.parametrize("preset", [p for p, _ in CASES])
def test_a_loop_from_the_page_gets_the_runtimes_tokens(artifacts, scene, preset):
    prompt = "<image>\nDescribe the scene and the red ball."
    r = vl2edge.load(artifacts[preset]).generate(prompt, images=[scene], max_new_tokens=NEW_TOKENS)
    assert r.prompt_tokens > 512  # the prompt spans two prefill chunks, as the page's loop takes them
    assert loop_tokens(artifacts[preset], prompt, scene) == r.token_ids


def test_a_text_prompt_from_the_page(artifacts):
    prompt = "Name three colours of a traffic light."
    r = vl2edge.load(artifacts["test-small"]).generate(prompt, max_new_tokens=NEW_TOKENS)
    assert loop_tokens(artifacts["test-small"], prompt, None) == r.token_ids


def test_the_runner_really_blocks_vl2edge(tmp_path):
    script = tmp_path / "uses_vl2edge.py"
    script.write_text("import vl2edge.runtime\n")
    out = subprocess.run([sys.executable, "-c", RUNNER, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "must not use vl2edge" in out.stderr


def _page_section(title: str) -> str:
    text = PAGE.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_the_page_names_every_graph_input_and_output(artifacts):
    """Each name a test artifact's graphs use appears in the page's graph and cache tables (§3, §5)."""
    tables = _page_section("3. The graphs") + _page_section("5. The cache and how a step binds it")
    names = set()
    for art in artifacts.values():
        g = json.loads((art / "manifest.json").read_text())["graphs"]
        entries = [g["vision"], g["embedding"], g["head"]] + [x for layer in g["layers"] for x in layer.values()
                                                             if isinstance(x, dict)]
        names |= {v["name"] for e in entries for v in e["inputs"] + e["outputs"]}
    missing = sorted(n for n in names if f"`{n}`" not in tables)
    assert not missing, f"graph I/O names the page does not describe: {missing}"


def test_the_page_lists_every_format_version():
    table = _page_section("9. FORMAT_VERSION")
    versions = {int(v) for v in re.findall(r"^\| (\d+) \|", table, re.M)}
    assert versions == set(READABLE_FORMAT_VERSIONS) and max(versions) == FORMAT_VERSION
    assert f"format version {FORMAT_VERSION}" in PAGE.read_text()

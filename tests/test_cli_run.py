"""`vl2edge run --backend torch` (the PyTorch reference on a checkpoint) and `vl2edge demo` (synthesize, export,
run the runtime): the whole pipeline from the command line. The runtime's run/chat: test_cli_runtime.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from PIL import Image

CLI = [sys.executable, "-m", "vl2edge.cli"]


def run(args, **kw):
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=300, **kw)


def test_run_streams_the_same_text_it_reports_in_json(test_checkpoints, tmp_path):
    img = tmp_path / "scene.png"
    Image.new("RGB", (640, 480), (120, 30, 30)).save(img)
    common = [str(test_checkpoints["test-small"]), "--backend", "torch", "--image", str(img), "--prompt",
              "<image>\nDescribe.", "--max-new-tokens", "6", "--threads", "1"]
    js = run(["run"] + common + ["--json", "--draw-boxes", str(tmp_path / "boxes.png")])
    assert js.returncode == 0, js.stderr
    out = json.loads(js.stdout)
    assert out["prompt_tokens"] > 1023 and out["image_sizes"] == [[640, 480]]  # 2x2 grid: 1023 image slots
    assert len(out["token_ids"]) == 6 and out["stop_reason"] == "max_new_tokens"
    assert set(out["timings"]) >= {"vision_and_embed_s", "prefill_s", "decode_tokens_per_s"}
    assert (tmp_path / "boxes.png").is_file()
    streamed = run(["run"] + common)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == out["text"] + "\n"  # the deltas, then one newline


def test_run_reports_bad_inputs_with_exit_code_2(test_checkpoints, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    r = run(["run", str(test_checkpoints["test-tiny"]), "--backend", "torch", "--image", str(bad), "--prompt", "hi"])
    assert r.returncode == 2 and "broken.png" in r.stderr and "Traceback" not in r.stderr
    r = run(["run", str(tmp_path / "missing-model"), "--backend", "torch", "--prompt", "hi"])
    assert r.returncode == 2 and "missing-model" in r.stderr
    r = run(["run", str(test_checkpoints["test-tiny"]), "--backend", "torch", "--prompt", "word " * 5000])
    assert r.returncode == 2 and "4096" in r.stderr


def test_demo_synthesizes_and_exports_once_and_answers(tmp_path):
    env = {**os.environ, "VL2EDGE_CACHE": str(tmp_path)}
    demo = CLI + ["demo", "--max-new-tokens", "4", "--json", "--threads", "1"]
    r = subprocess.run(demo + ["--draw-boxes", str(tmp_path / "boxes.png")], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "synthesizing test-tiny" in r.stderr and "exporting" in r.stderr
    out = json.loads(r.stdout)
    assert out["image_sizes"] == [[640, 480]] and out["prompt_tokens"] > 1023 and (tmp_path / "boxes.png").is_file()
    assert (tmp_path / "artifacts" / "test-tiny-seed0-int4-b32" / "manifest.json").is_file()
    again = subprocess.run(demo, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "synthesizing" not in again.stderr and "exporting" not in again.stderr
    assert json.loads(again.stdout)["token_ids"] == out["token_ids"]  # greedy, same artifact
    ref = subprocess.run(demo + ["--backend", "torch"], capture_output=True, text=True, timeout=300, env=env)
    assert ref.returncode == 0, ref.stderr
    assert json.loads(ref.stdout)["prompt_tokens"] == out["prompt_tokens"]

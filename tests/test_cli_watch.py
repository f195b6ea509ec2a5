"""`vl2edge watch` and what a new user asked of `run` and `chat`: the --jsonl schemas, sources that cannot be opened
(one line, exit 2), Ctrl-C (stop reason "cancelled", exit 130, the loop's summary), --version, --system,
--prompt-file, and --draw-boxes checked before any model work."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from vl2edge import cli, watch_cli
from vl2edge.bench.scene_video import write_pngs, write_video

CLI = [sys.executable, "-m", "vl2edge.cli"]
PROMPT = "<image>\n<|ref|>the red mug<|/ref|>."
FRAME_KEYS = {"type", "index", "timestamp", "text", "boxes", "stop_reason", "tokens", "prompt_tokens", "cached_tokens",
              "image_size", "frame_to_first_token_s", "frame_to_answer_s", "dropped_since_last",
              "skipped_since_last", "stages"}
SUMMARY_KEYS = {"type", "source", "end_reason", "frames_read", "frames_answered", "frames_dropped", "frames_skipped",
                "skip_reasons", "wall_s", "answers_per_s", "frame_to_first_token_s", "frame_to_answer_s",
                "stage_mean_s", "idle_s", "tokens", "prefill_tokens", "cached_tokens"}


def run(args, **kw):
    kw.setdefault("timeout", 300)
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    return {"clip": write_video(d / "clip.mp4", 10, fps=10, width=96, height=64),
            "frames": write_pngs(d / "frames", 3, 96, 64)}


def test_watch_jsonl_on_a_video_and_a_directory(tiny_artifact, media, tmp_path):
    r = run(["watch", tiny_artifact, media["clip"], "--prompt", PROMPT, "--frames", "3", "--max-new-tokens", "4",
             "--jsonl", "--threads", "1"])
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["type"] for x in lines] == ["frame"] * 3 + ["summary"]
    assert all(set(x) == FRAME_KEYS for x in lines[:3]) and set(lines[-1]) == SUMMARY_KEYS
    assert lines[-1]["end_reason"] == "max_frames" and lines[-1]["frames_answered"] == 3
    assert all(x["image_size"] == [96, 64] and x["tokens"] == 4 for x in lines[:3])
    # a directory, every frame, with the overlay written as PNGs named by frame index
    r = run(["watch", tiny_artifact, media["frames"], "--all-frames", "--prompt", "Where is the mug?",
             "--max-new-tokens", "4", "--draw-boxes", tmp_path / "overlay", "--threads", "1"])
    assert r.returncode == 0, r.stderr
    assert [line.split(":")[0] for line in r.stdout.splitlines()] == [f"frame {k} @ " + line.split(" @ ")[1].split(
        ":")[0] for k, line in enumerate(r.stdout.splitlines())]
    assert sorted(p.name for p in (tmp_path / "overlay").iterdir()) == [f"frame_00000{k}.png" for k in range(3)]
    assert "[watch " in r.stderr and "end; 3 frames answered of 3 read" in r.stderr


def test_watch_draws_an_overlay_video(tiny_artifact, media, tmp_path):
    import av

    out = tmp_path / "overlay.mp4"
    r = run(["watch", tiny_artifact, media["clip"], "--all-frames", "--prompt", PROMPT, "--max-new-tokens", "2",
             "--draw-boxes", out, "--threads", "1"])
    assert r.returncode == 0, r.stderr
    with av.open(str(out)) as c:
        times = [f.time for f in c.decode(video=0)]
    assert len(times) == 10 and times == sorted(times) and times[-1] == pytest.approx(0.9, abs=0.01)


@pytest.mark.parametrize("source, says", [
    ("missing.mp4", "missing.mp4': no such file"),
    ("notes.mp4", "cannot open (Invalid data found when processing input)"),
    ("/dev/video77", "'/dev/video77': cannot open"),
    ("http://127.0.0.1:9/cam", "'http://127.0.0.1:9/cam': cannot open (Connection refused)"),
])
def test_a_source_that_cannot_be_opened_is_one_line_and_exit_2(tiny_artifact, tmp_path, source, says):
    (tmp_path / "notes.mp4").write_text("not a video")
    r = run(["watch", tiny_artifact, source, "--prompt", "hi"], cwd=tmp_path)
    assert r.returncode == 2 and says in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vl2edge watch: error: ")


def test_watch_refuses_bad_options_before_loading(tiny_artifact, media, tmp_path):
    for extra, says in ((["--every", "soon"], "--every 'soon': give a period"),
                        (["--frames", "0"], "--frames must be >= 1"),
                        (["--draw-boxes", tmp_path / "no" / "such" / "dir.mp4"], "does not exist")):
        r = run(["watch", tmp_path / "no-artifact", media["clip"], "--prompt", "hi", *extra])
        assert r.returncode == 2 and says in r.stderr, r.stderr


@pytest.mark.parametrize("text, seconds", [("2s", 2.0), ("500ms", 0.5), ("1.5", 1.5), ("1m", 60.0), ("0", 0.0)])
def test_periods(text, seconds):
    assert watch_cli.parse_period(text) == seconds


def _wait_for_line(p, prefix: str, timeout: float = 120):
    t0 = time.time()
    seen = []
    while time.time() - t0 < timeout:
        line = p.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith(prefix):
            return seen
    raise AssertionError(f"no line starting {prefix!r}: {seen[-5:]}")


def test_ctrl_c_ends_the_loop_with_its_summary_and_exit_130(tiny_artifact, tmp_path):
    """A long paced video (a camera would never end): the first answers come, Ctrl-C, the summary, exit 130."""
    clip = write_video(tmp_path / "long.mp4", 200, fps=10, width=64, height=48)
    p = subprocess.Popen(CLI + ["watch", str(tiny_artifact), str(clip), "--prompt", PROMPT, "--jsonl",
                                "--max-new-tokens", "3", "--threads", "1"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_line(p, '{"type": "frame"')
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    summary = json.loads(out.splitlines()[-1])
    assert p.returncode == 130, err
    assert summary["type"] == "summary" and summary["end_reason"] == "interrupted" and summary["frames_answered"] >= 1
    assert "Traceback" not in err


class _InterruptAt:
    """Engine.decode that raises KeyboardInterrupt (a Ctrl-C mid-answer) on its n-th call."""

    def __init__(self, monkeypatch, n: int):
        from vl2edge.runtime.engine import Engine

        self.calls, real = 0, Engine.decode

        def decode(engine, token):
            self.calls += 1
            if self.calls == n:
                raise KeyboardInterrupt
            return real(engine, token)

        monkeypatch.setattr(Engine, "decode", decode)


def test_ctrl_c_mid_answer_is_cancelled_in_the_api_run_and_chat(tiny_model, tiny_artifact, monkeypatch, capsys):
    _InterruptAt(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        tiny_model.generate("Count to twenty.", max_new_tokens=20)
    assert tiny_model.last_result.stop_reason == "cancelled" and len(tiny_model.last_result.token_ids) == 3

    _InterruptAt(monkeypatch, 3)
    assert cli.main(["run", str(tiny_artifact), "--prompt", "Count.", "--max-new-tokens", "20"]) == 130
    assert "stop: cancelled" in capsys.readouterr().err

    _InterruptAt(monkeypatch, 3)  # an interactive chat: the turn ends cancelled and the conversation goes on
    stdin = io.StringIO("Count to twenty.\nAnd again?\n/quit\n")
    stdin.isatty = lambda: True
    monkeypatch.setattr(sys, "stdin", stdin)
    assert cli.main(["chat", str(tiny_artifact), "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert "stop: cancelled" in err and "stop: max_new_tokens" in err and "stop: error" not in err


def test_run_jsonl_streams_tokens_boxes_and_the_result(tiny_artifact, media, monkeypatch, capsys):
    r = run(["run", tiny_artifact, "--image", media["frames"] / "frame_0000.png", "--prompt", PROMPT,
             "--max-new-tokens", "6", "--jsonl", "--threads", "1"])
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert events[-1]["type"] == "result" and {e["type"] for e in events[:-1]} <= {"token", "box"}
    assert "".join(e["text"] for e in events if e["type"] == "token") == events[-1]["text"]
    assert events[-1]["stop_reason"] == "max_new_tokens" and events[-1]["image_sizes"] == [[96, 64]]
    # a box event as soon as its "]" arrives, in the image's pixels (the random model writes none: fed directly)
    out = cli._JsonLines((96, 64))
    for piece in ("<|ref|>mug<|/ref|><|det|>[[0, 0, ", "999, 499]", "]<|/det|>"):
        out.on_text(piece)
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["type"] for e in printed] == ["token", "token", "box", "token"]
    assert printed[2] == {"type": "box", "label": "mug", "coords": [0, 0, 999, 499], "xyxy": [0.0, 0.0, 96.0, round(499 / 999 * 64, 2)]}


def test_run_system_and_prompt_file(tiny_artifact, tmp_path):
    base = ["run", tiny_artifact, "--max-new-tokens", "3", "--json", "--threads", "1"]
    plain = json.loads(run(base + ["--prompt", "What is on the table?"]).stdout)
    piped = run(base + ["--prompt-file", "-"], input="What is on the table?\n")
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["token_ids"] == plain["token_ids"]  # the file's last newline is not the prompt
    (tmp_path / "q.txt").write_text("What is on the table?\n")
    from_file = json.loads(run(base + ["--prompt-file", tmp_path / "q.txt"]).stdout)
    assert from_file["prompt_tokens"] == plain["prompt_tokens"]
    system = json.loads(run(base + ["--prompt", "What is on the table?", "--system", "You are terse."]).stdout)
    assert system["prompt_tokens"] > plain["prompt_tokens"]
    r = run(base + ["--prompt-file", tmp_path / "missing.txt"])
    assert r.returncode == 2 and "--prompt-file" in r.stderr and "missing.txt" in r.stderr
    r = run(base + ["--prompt", "a", "--prompt-file", "-"])
    assert r.returncode == 2 and "not allowed with argument" in r.stderr


def test_draw_boxes_is_checked_before_the_model_loads(tiny_artifact, media, tmp_path, monkeypatch, capsys):
    import vl2edge.runtime.api as api

    monkeypatch.setattr(api, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    image = str(media["frames"] / "frame_0000.png")
    cases = [(tmp_path / "missing" / "out.png", "does not exist"), (tmp_path, "is a directory")]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((ro / "out.png", "is not writable"))
    for target, says in cases:
        assert cli.main(["run", str(tiny_artifact), "--image", image, "--prompt", "hi", "--draw-boxes",
                         str(target)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"vl2edge run: error: --draw-boxes {target}: ") and says in err


def test_version():
    r = run(["--version"])
    assert r.returncode == 0 and r.stdout.startswith("vl2edge 0.1.0 (onnxruntime 1.31.1; Python ")

"""`vl2edge run` and `vl2edge chat` on exported artifacts (the onnx backend), and their errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import vl2edge
from vl2edge.cli import main
from vl2edge.export.exporter import export

CLI = [sys.executable, "-m", "vl2edge.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(args, **kw):
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=120, env=ENV, **kw)


@pytest.fixture(scope="module")
def artifact(test_checkpoints, tmp_path_factory):
    return export(test_checkpoints["test-vl2"], tmp_path_factory.mktemp("cli") / "vl2-fp32", experts="fp32",
                  block_size=32, progress=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-images")
    rng = np.random.default_rng(0)
    out = []
    for k, size in enumerate([(300, 200), (200, 300)]):
        p = d / f"img{k}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


def test_run_streams_what_it_reports_in_json(artifact, images, tmp_path):
    common = ["run", str(artifact), "--image", str(images[0]), "--prompt", "Describe.", "--max-new-tokens", "6",
              "--threads", "1"]
    js = cli(common + ["--json", "--draw-boxes", str(tmp_path / "boxes.png")])
    assert js.returncode == 0, js.stderr
    out = json.loads(js.stdout)
    assert set(out) >= {"text", "token_ids", "boxes", "timings", "stop_reason", "expert_counts", "grounding"}
    assert len(out["token_ids"]) == 6 and out["stop_reason"] == "max_new_tokens" and out["image_sizes"] == [[300, 200]]
    assert out["timings"]["vision_tiles"] == 2 and out["timings"]["prefill_tokens_per_s"] > 0
    assert len(out["timings"]["decode_s"]) == 5 and set(out["expert_counts"]) == {"1", "2"}
    assert (tmp_path / "boxes.png").is_file()
    streamed = cli(common)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == out["text"] + "\n"
    assert "6 tokens, stop: max_new_tokens" in streamed.stderr
    # the same answer as the API (greedy)
    api = vl2edge.load(artifact, threads=1).generate("Describe.", images=[images[0]], max_new_tokens=6)
    assert api.token_ids == out["token_ids"]


def test_chat_reads_turns_from_stdin_and_reuses_the_cache(artifact, images):
    script = "\n".join([f"/image {images[0]}", "What is this?", "", "And the colours?", "/reset",
                        f"/image {images[1]}", "/image " + str(images[0]), "Compare them.", "/quit",
                        "never sent"]) + "\n"
    r = cli(["chat", str(artifact), "--max-new-tokens", "5", "--threads", "1"], input=script)
    assert r.returncode == 0, r.stderr
    answers = r.stdout.split("\n")[:-1]
    assert len(answers) == 3 and "Traceback" not in r.stderr
    stats = [line for line in r.stderr.splitlines() if "stop:" in line]
    assert "(0 cached)" in stats[0] and "(0 cached)" not in stats[1]  # the second turn reused the first
    assert "[new conversation]" in r.stderr

    m = vl2edge.load(artifact, threads=1)
    t1 = [{"role": "user", "content": "<image>\nWhat is this?", "images": [images[0]]}]
    a1 = m.chat(t1, stream=False, max_new_tokens=5)
    a2 = m.chat(t1 + [{"role": "assistant", "content": a1.text},
                      {"role": "user", "content": "And the colours?"}], stream=False, max_new_tokens=5)
    a3 = m.chat([{"role": "user", "content": "<image>\n<image>\nCompare them.", "images": [images[1], images[0]]}],
                stream=False, max_new_tokens=5)
    assert answers == [a1.text, a2.text, a3.text]


def test_chat_reports_bad_commands_and_images_and_goes_on(artifact, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    r = cli(["chat", str(artifact), "--max-new-tokens", "2", "--threads", "1"],
            input=f"/image {broken}\n/frobnicate\nHi.\n")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "broken.png" in r.stderr and "unknown command '/frobnicate'" in r.stderr
    assert len(r.stdout.split("\n")[:-1]) == 1  # "Hi." was still answered


def test_errors_exit_2_without_traceback_in_a_real_process(artifact, test_checkpoints):
    r = cli(["run", str(test_checkpoints["test-tiny"]), "--prompt", "hi"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "checkpoint, not an exported artifact" in r.stderr and "--backend torch" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def run_main(capsys, args):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_bad_input_exit_codes(artifact, images, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    corrupt = shutil.copytree(artifact, tmp_path / "corrupt")
    with open(corrupt / "vision.onnx.data", "r+b") as f:
        f.seek(10)
        f.write(b"\x00\x00\xff\xff")
    cases = {
        "no such artifact directory": ["run", str(tmp_path / "missing"), "--prompt", "hi"],
        "sha256 does not match": ["run", str(corrupt), "--prompt", "hi"],
        "provider 'tpu'": ["run", str(artifact), "--prompt", "hi", "--provider", "tpu"],
        "broken.jpg": ["run", str(artifact), "--image", str(bad), "--prompt", "hi"],
        "4096": ["run", str(artifact), "--prompt", "word " * 5000],
        "1 <image> tag(s) but 2 image(s)": ["run", str(artifact), "--image", str(images[0]), "--image",
                                            str(images[1]), "--prompt", "<image> hi"],
        "top_p": ["run", str(artifact), "--prompt", "hi", "--top-p", "0"],
        "--draw-boxes needs an --image": ["run", str(artifact), "--prompt", "hi", "--draw-boxes", "x.png"],
    }
    for needle, args in cases.items():
        code, out, err = run_main(capsys, args)
        assert code == 2, (needle, err)
        assert needle in err and err.startswith("vl2edge run: error:") and len(err.strip().splitlines()) == 1
        assert out == ""


def test_stop_and_sampling_options(artifact, capsys):
    code, out, _ = run_main(capsys, ["run", str(artifact), "--prompt", "List.", "--max-new-tokens", "12",
                                     "--json", "--threads", "1"])
    full = json.loads(out)
    assert code == 0 and full["stop_reason"] in ("max_new_tokens", "eos")
    if len(full["text"]) > 4:
        stop = full["text"][2:4]  # random weights: some text, probably not a whole token
        code, out, _ = run_main(capsys, ["run", str(artifact), "--prompt", "List.", "--max-new-tokens", "12",
                                         "--json", "--stop", stop, "--threads", "1"])
        cut = json.loads(out)
        assert cut["stop_reason"] == "stop" and cut["text"] == full["text"][:full["text"].index(stop)]
    sampled = [json.loads(run_main(capsys, ["run", str(artifact), "--prompt", "List.", "--max-new-tokens", "6",
                                            "--temperature", "0.9", "--top-p", "0.9", "--top-k", "50",
                                            "--repetition-penalty", "1.1", "--seed", "3", "--json",
                                            "--threads", "1"])[1])["token_ids"] for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded


def test_official_pixels_drop_alpha_as_the_official_code_does(artifact, tmp_path):
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 255, (200, 300, 4), dtype=np.uint8)
    rgba[..., 3] = rng.integers(0, 2, (200, 300)) * 255  # half the pixels fully transparent
    src = tmp_path / "transparent.png"
    Image.fromarray(rgba, "RGBA").save(src)
    flat = tmp_path / "flat.png"
    Image.open(src).convert("RGB").save(flat)  # what the official pipeline's .convert("RGB") sees
    default = vl2edge.load(artifact, threads=1)
    official = vl2edge.load(artifact, threads=1, official_pixels=True)

    def pixels(m, path):
        return m.prepare("<image>\nDescribe.", images=[path]).pixel_values

    np.testing.assert_array_equal(pixels(official, src), pixels(default, flat))
    assert not np.array_equal(pixels(default, src), pixels(default, flat))  # default: composited over white
    r = cli(["run", str(artifact), "--image", str(src), "--prompt", "Describe.", "--max-new-tokens", "4",
             "--threads", "1", "--json", "--official-pixels"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == official.generate("Describe.", images=[src],
                                                                 max_new_tokens=4).token_ids

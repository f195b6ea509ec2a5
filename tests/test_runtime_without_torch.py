"""The runtime must import and run with torch absent: a fresh interpreter where importing torch fails."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from PIL import Image

from vl2edge.model.presets import preset_config, processor_config
from vl2edge.model.synth_tokenizer import write_tokenizer

# Runs in a subprocess. A meta-path finder placed first refuses torch (and libraries that would pull it in) and
# records every attempt, so even an import guarded by try/except is caught.
SCRIPT = textwrap.dedent("""
    import importlib, pkgutil, sys

    BLOCKED = ("torch", "torchvision", "transformers")
    attempts = []

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, NoTorch())

    import vl2edge.runtime
    modules = sorted(m.name for m in pkgutil.walk_packages(vl2edge.runtime.__path__, "vl2edge.runtime."))
    for name in modules:
        importlib.import_module(name)

    from vl2edge.runtime.grounding import draw_boxes, parse_grounding, referring_prompt
    from vl2edge.runtime.images import load_image
    from vl2edge.runtime.processor import Processor

    artifact, image_path = sys.argv[1], sys.argv[2]
    proc = Processor.from_dir(artifact)
    out = proc([{"role": "user", "content": referring_prompt("the mug")}], images=[image_path])
    assert out.pixel_values.shape == (5, 3, 384, 384), out.pixel_values.shape
    assert out.images_seq_mask.sum() == 1023 and out.images_spatial_crop.tolist() == [[2, 2]]
    result = parse_grounding("<|ref|>the mug<|/ref|><|det|>[[10, 20, 300, 400]]<|/det|>", out.image_sizes[0])
    assert result.boxes[0].xyxy is not None
    draw_boxes(load_image(image_path), result, artifact + "/boxes.png")

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not attempts and not loaded, (attempts, loaded)
    print("OK", len(modules), "modules")
""")


def test_runtime_runs_without_torch(tmp_path):
    write_tokenizer(tmp_path, vocab_size=2048)
    (tmp_path / "processor_config.json").write_text(json.dumps(processor_config()))
    (tmp_path / "config.json").write_text(json.dumps(preset_config("test-tiny")))
    image_path = tmp_path / "photo.jpg"
    Image.new("RGB", (640, 480), (200, 120, 40)).save(image_path)

    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(image_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OK")
    assert (tmp_path / "boxes.png").is_file()


def test_the_blocker_works(tmp_path):
    """The same finder does make `import torch` fail (so the test above would notice a torch import)."""
    script = SCRIPT.split("import vl2edge.runtime")[0] + "import torch\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr


# Runs in a subprocess too: the public API end to end (load an exported fp32 artifact, generate with an image,
# stream a chat turn on the cached conversation, ground), with torch, transformers and onnx unimportable.
API_SCRIPT = SCRIPT.split("import vl2edge.runtime")[0].replace(
    'BLOCKED = ("torch", "torchvision", "transformers")', 'BLOCKED = ("torch", "torchvision", "transformers", "onnx")'
) + textwrap.dedent("""
    import vl2edge

    artifact, image_path = sys.argv[1], sys.argv[2]
    m = vl2edge.load(artifact, threads=1)
    r = m.generate("<image>\\nWhat is this?", images=[image_path], max_new_tokens=4)
    assert len(r.token_ids) == 4 and r.stop_reason == "max_new_tokens", r
    turn = [{"role": "user", "content": "<image>\\nWhat is this?", "images": [image_path]},
            {"role": "assistant", "content": r.text}, {"role": "user", "content": "Sure?"}]
    stream = m.chat(turn, max_new_tokens=3)
    text = "".join(stream)
    assert stream.result.text == text and stream.result.cached_tokens > 0
    assert isinstance(m.ground(image_path, "the mug", max_new_tokens=3), list)

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not attempts and not loaded, (attempts, loaded)
    print("OK", r.token_ids)
""")


def test_the_api_generates_without_torch(test_checkpoints, tmp_path):
    from vl2edge.export.exporter import export

    artifact = export(test_checkpoints["test-tiny"], tmp_path / "tiny-fp32", experts="fp32", block_size=32,
                      progress=False)
    image_path = tmp_path / "photo.png"
    Image.new("RGB", (300, 200), (200, 120, 40)).save(image_path)
    proc = subprocess.run([sys.executable, "-c", API_SCRIPT, str(artifact), str(image_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OK")

"""The Python API (vl2edge.load -> Model): inputs in every accepted form, grounding, and clear errors."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

import vl2edge
from vl2edge.export.exporter import export
from vl2edge.runtime.artifact import ArtifactError
from vl2edge.runtime.chat_template import TemplateError
from vl2edge.runtime.grounding import Box, parse_grounding
from vl2edge.runtime.images import ImageError
from vl2edge.runtime.processor import PromptTooLongError


@pytest.fixture(scope="module")
def artifact(test_checkpoints, tmp_path_factory):
    return export(test_checkpoints["test-small"], tmp_path_factory.mktemp("api") / "small-fp32", experts="fp32",
                  block_size=32, progress=False)


@pytest.fixture(scope="module")
def model(artifact):
    return vl2edge.load(artifact, threads=1)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photos") / "scene.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(path)
    return path


def test_import_vl2edge_stays_light():
    code = ("import sys, vl2edge; assert callable(vl2edge.load); "
            "heavy = [m for m in ('onnxruntime', 'torch', 'vl2edge.runtime.api', 'numpy') if m in sys.modules]; "
            "assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_images_as_paths_bytes_pil_and_per_message_give_the_same_answer(model, photo):
    expected = model.generate("<image>\nWhat is it?", images=[str(photo)], max_new_tokens=5)
    assert expected.image_sizes == ((300, 200),) and expected.prompt_tokens > 421
    same = [
        model.generate("What is it?", images=photo.read_bytes(), max_new_tokens=5),  # tag added, image first
        model.generate("<image>\nWhat is it?", images=[Image.open(photo)], max_new_tokens=5),
        model.generate([{"role": "user", "content": "What is it?", "images": [io.BytesIO(photo.read_bytes())]}],
                       max_new_tokens=5),
        model.generate([{"role": "user", "content": "<image>\nWhat is it?"}], images=[photo], max_new_tokens=5,
                       reuse_cache=False),
    ]
    for r in same:
        assert r.token_ids == expected.token_ids
    with_system = model.generate([{"role": "system", "content": "You are terse."},
                                  {"role": "user", "content": "Hi."}], max_new_tokens=3)
    assert with_system.prompt_tokens > model.generate("Hi.", max_new_tokens=3).prompt_tokens


def test_chat_streams_by_default(model, photo):
    msgs = [{"role": "user", "content": "<image>\nDescribe.", "images": [photo]}]
    stream = model.chat(msgs, max_new_tokens=5)
    text = "".join(stream)
    assert stream.result.text == text and model.last_result is stream.result
    assert model.chat(msgs, stream=False, max_new_tokens=5).token_ids == stream.result.token_ids


def test_ground_returns_boxes_in_pixels(model, photo, monkeypatch):
    boxes = model.ground(photo, "the red mug", max_new_tokens=8)  # random weights: usually no box, but a list
    assert isinstance(boxes, list) and all(isinstance(b, Box) for b in boxes)
    seen = {}

    def fake_generate(messages, images=None, **options):
        seen.update(messages=messages, images=images, options=options)
        text = "<|ref|>the red mug<|/ref|><|det|>[[0, 0, 999, 499]]<|/det|>"
        return type("R", (), {"boxes": parse_grounding(text, (300, 200)).boxes})()

    monkeypatch.setattr(model, "generate", fake_generate)
    boxes = model.ground(photo, "the red mug")
    assert seen["messages"] == "<image>\n<|ref|>the red mug<|/ref|>." and seen["images"] == [photo]
    assert seen["options"]["temperature"] == 0.0
    assert boxes[0].label == "the red mug" and boxes[0].xyxy == pytest.approx((0, 0, 300, 100), abs=0.2)


def test_result_grounding_uses_the_last_image(model, photo):
    r = model.generate("<image>\n<image>\nWhere?", images=[Image.new("RGB", (640, 480)), photo], max_new_tokens=4)
    assert r.grounding == parse_grounding(r.text, (300, 200))
    d = r.as_dict()
    assert set(d) >= {"text", "token_ids", "boxes", "timings", "stop_reason", "expert_counts"}


def test_expert_counts_accumulate(model):
    model.reset()
    before = {k: sum(v) for k, v in model.expert_counts.as_dict().items()}
    r = model.generate("Count the experts.", max_new_tokens=4)
    after = {k: sum(v) for k, v in model.expert_counts.as_dict().items()}
    assert {k: after[k] - before.get(k, 0) for k in after} == {k: sum(v) for k, v in r.expert_counts.items()}
    assert set(r.expert_counts) == {"1", "2"}  # test-small: layer 0 dense, 1 and 2 MoE


def test_bad_inputs_raise_clear_errors(model, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(ImageError, match="broken.jpg"):
        model.generate("<image>\nWhat?", images=[broken])
    with pytest.raises(ImageError, match="no such file"):
        model.generate("<image>\nWhat?", images=[tmp_path / "missing.png"])
    with pytest.raises(PromptTooLongError, match="4096"):
        model.generate("word " * 5000)
    with pytest.raises(TemplateError, match="2 <image> tag"):
        model.generate("<image><image>\nWhat?", images=[Image.new("RGB", (64, 64))])
    with pytest.raises(TemplateError, match="unknown role"):
        model.generate([{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="top_p"):
        model.generate("hi", top_p=0)
    assert model.generate("hi", max_new_tokens=2).stop_reason in ("eos", "max_new_tokens")  # still fine


def test_bad_artifacts_and_options_are_refused(artifact, test_checkpoints, tmp_path):
    with pytest.raises(ArtifactError, match="no such artifact"):
        vl2edge.load(tmp_path / "nothing")
    with pytest.raises(ArtifactError, match="vl2edge export"):
        vl2edge.load(test_checkpoints["test-tiny"])
    bad = shutil.copytree(artifact, tmp_path / "bad")
    data = next(p for p in sorted(bad.iterdir()) if p.name.startswith("layer01") and p.suffix == ".data")
    with open(data, "r+b") as f:
        f.seek(64)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match="sha256"):
        vl2edge.load(bad)
    (bad / "head.onnx").unlink()
    with pytest.raises(ArtifactError, match="missing file 'head.onnx'"):
        vl2edge.load(bad, verify="size")
    with pytest.raises(ValueError, match="provider 'tpu'"):
        vl2edge.load(artifact, provider="tpu")
    with pytest.raises(ValueError, match="verify"):
        vl2edge.load(artifact, verify="md5")
    with pytest.raises(ValueError, match="max_tiles"):
        vl2edge.load(artifact, max_tiles=0)


def test_low_memory_chunk_bounds_the_attention_probabilities():
    """heads x chunk x max_len floats within 40 MiB, the largest power of two up to 256: the real presets' chunks."""
    from vl2edge.model.config import VL2Config
    from vl2edge.model.presets import preset_config
    from vl2edge.runtime.api import LOW_MEMORY_ATTENTION_BYTES, low_memory_chunk_size

    chunks = {p: low_memory_chunk_size(VL2Config.from_dict(preset_config(p)).language.num_attention_heads, 4096)
              for p in ("tiny", "small", "vl2")}
    assert chunks == {"tiny": 256, "small": 128, "vl2": 64}  # 10, 16 and 32 heads
    assert low_memory_chunk_size(4, 256) == 256 and low_memory_chunk_size(16, 8192) == 64
    for heads, max_len in ((10, 4096), (16, 4096), (16, 8192), (128, 1 << 20)):
        c = low_memory_chunk_size(heads, max_len)
        assert c == 16 or heads * c * max_len * 4 <= LOW_MEMORY_ATTENTION_BYTES < heads * 2 * c * max_len * 4 \
            or c == 256


def test_low_memory_gives_the_same_answer(artifact, model, photo):
    lean = vl2edge.load(artifact, threads=1, low_memory=True, verify="size")
    assert lean.chunk_size == 256 and lean.engine.transient_vision and lean.engine.vision_alone
    assert lean.engine.embedding is None
    r = lean.generate("<image>\nDescribe it.", images=[photo], max_new_tokens=8, reuse_cache=False)
    expected = model.generate("<image>\nDescribe it.", images=[photo], max_new_tokens=8, reuse_cache=False)
    assert r.token_ids == expected.token_ids and lean.engine.vision is None
    with pytest.raises(ValueError, match="chunk_size"):
        lean.generate("Hi", chunk_size=0)


def test_an_absent_provider_falls_back_to_cpu_with_a_warning(artifact):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = vl2edge.load(artifact, provider="cuda", verify="size", threads=1)
    assert m.provider == "cpu" and any("CUDAExecutionProvider" in str(w.message) for w in caught)
    assert len(m.generate("hi", max_new_tokens=2).token_ids) >= 1

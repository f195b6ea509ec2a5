"""Prompt assembly (runtime.chat_template + runtime.processor) against reference §4-§5, with a synthesized tokenizer.

Expected id sequences are built by hand from the tokenizer: bos, each text piece encoded on its own, runs of the
<image> id, eos after previous assistant turns.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image
from tokenizers import Tokenizer

from vl2edge.model import synth_tokenizer as synth
from vl2edge.model.presets import preset_config, processor_config
from vl2edge.runtime.chat_template import TemplateError, build_conversation, user_turn_text
from vl2edge.runtime.images import ImageError
from vl2edge.runtime.processor import PreparedInputs, Processor, PromptTooLongError


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    d = tmp_path_factory.mktemp("artifact")
    synth.write_tokenizer(d, vocab_size=2048)
    (d / "processor_config.json").write_text(json.dumps(processor_config()))
    (d / "config.json").write_text(json.dumps(preset_config("test-tiny")))
    return d


@pytest.fixture(scope="module")
def proc(artifact):
    return Processor.from_dir(artifact)


@pytest.fixture(scope="module")
def tok(artifact):
    return Tokenizer.from_file(str(artifact / "tokenizer.json"))


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def img(w, h, colour=(90, 140, 200)):
    return Image.new("RGB", (w, h), colour)


def check_consistent(out: PreparedInputs, image_id: int):
    """Invariants every PreparedInputs satisfies."""
    assert out.input_ids.dtype == np.int64 and out.images_seq_mask.dtype == bool
    assert out.pixel_values.dtype == np.float32 and out.images_spatial_crop.dtype == np.int64
    assert out.input_ids.shape == out.images_seq_mask.shape
    assert np.all(out.input_ids[out.images_seq_mask] == image_id)
    assert not np.any(out.input_ids[~out.images_seq_mask] == image_id)
    assert out.images_seq_mask.sum() == sum(out.num_image_tokens)
    tiles = sum(1 + tw * th for tw, th in out.images_spatial_crop)
    assert out.pixel_values.shape == (tiles, 3, 384, 384)
    for (tw, th), n in zip(out.images_spatial_crop, out.num_image_tokens):
        assert n == 211 + 14 * th * (14 * tw + 1)


def test_special_token_ids_come_from_the_tokenizer(proc, tok):
    assert proc.bos_id == tok.token_to_id(synth.BOS) == 0
    assert proc.eos_id == tok.token_to_id(synth.EOS) == 1
    assert proc.pad_id == tok.token_to_id(synth.PAD)
    assert proc.image_id == tok.token_to_id(synth.IMAGE)
    assert proc.max_length == 4096
    assert proc.image_processor.candidates == tuple(tuple(c) for c in processor_config()["candidate_resolutions"])


def test_user_turn_text():
    assert user_turn_text("  <image>\nHi \n") == "<|User|>: <image>\nHi\n\n<|Assistant|>:"


def test_single_turn_worked_example(proc, tok):
    """§5 worked example: the README grounding prompt with an image that selects the 2x2 grid."""
    content = "<image>\n<|ref|>The giraffe at the back.<|/ref|>."
    out = proc([{"role": "user", "content": content}], images=[img(640, 480)])
    expected = ([proc.bos_id] + enc(tok, "<|User|>: ") + [proc.image_id] * 1023
                + enc(tok, "\n<|ref|>The giraffe at the back.<|/ref|>.\n\n<|Assistant|>:"))
    assert out.input_ids.tolist() == expected
    lead = 1 + len(enc(tok, "<|User|>: "))
    assert out.images_seq_mask.tolist() == [False] * lead + [True] * 1023 + [False] * (len(expected) - lead - 1023)
    assert out.pixel_values.shape == (5, 3, 384, 384)
    assert out.images_spatial_crop.tolist() == [[2, 2]]
    assert out.image_sizes == ((640, 480),) and out.num_image_tokens == (1023,)
    assert out.prompt == synth.BOS + "<|User|>: " + content + "\n\n<|Assistant|>:"
    check_consistent(out, proc.image_id)


def test_plain_string_prompt_and_official_role_names(proc):
    a = proc("<image>\nDescribe.", images=[img(300, 300)])
    b = proc([{"role": "<|User|>", "content": "<image>\nDescribe."}, {"role": "<|Assistant|>", "content": ""}],
             images=[img(300, 300)])
    assert a.input_ids.tolist() == b.input_ids.tolist()
    assert a.images_spatial_crop.tolist() == [[1, 1]] and a.num_image_tokens == (421,)


def test_system_message(proc, tok):
    out = proc([{"role": "system", "content": " You are a careful robot. "},
                {"role": "user", "content": " Hello "}])
    assert out.input_ids.tolist() == ([proc.bos_id] + enc(tok, "You are a careful robot.")
                                      + enc(tok, "<|User|>: Hello\n\n<|Assistant|>:"))
    assert out.prompt == synth.BOS + "You are a careful robot.<|User|>: Hello\n\n<|Assistant|>:"
    assert out.pixel_values.shape == (0, 3, 384, 384) and out.images_spatial_crop.shape == (0, 2)
    assert not out.images_seq_mask.any()


def test_multi_turn_with_assistant_answer(proc, tok):
    msgs = [{"role": "user", "content": "<image>\nWhat is this?"},
            {"role": "assistant", "content": " A cat. "},
            {"role": "user", "content": "And its colour?"}]
    out = proc(msgs, images=[img(800, 800)])
    n = 2017  # 800x800 -> 1152x1152 -> 3x3
    expected = ([proc.bos_id] + enc(tok, "<|User|>: ") + [proc.image_id] * n
                + enc(tok, "\nWhat is this?\n\n<|Assistant|>:") + enc(tok, "A cat.") + [proc.eos_id]
                + enc(tok, "<|User|>: And its colour?\n\n<|Assistant|>:"))
    assert out.input_ids.tolist() == expected
    assert out.images_spatial_crop.tolist() == [[3, 3]] and out.pixel_values.shape[0] == 10
    # a final empty assistant turn changes nothing; a non-empty one is the answer's prefix, without eos
    same = proc(msgs + [{"role": "assistant", "content": ""}], images=[img(800, 800)])
    assert same.input_ids.tolist() == expected
    prefixed = proc(msgs + [{"role": "assistant", "content": "It is"}], images=[img(800, 800)])
    assert prefixed.input_ids.tolist() == expected + enc(tok, "It is")
    check_consistent(out, proc.image_id)


def test_two_images_in_one_turn_keep_tiling(proc, tok):
    out = proc("<image><image>\nCompare.", images=[img(1920, 1080), img(1000, 200)])
    expected = ([proc.bos_id] + enc(tok, "<|User|>: ") + [proc.image_id] * (1807 + 813)
                + enc(tok, "\nCompare.\n\n<|Assistant|>:"))
    assert out.input_ids.tolist() == expected  # "" between the tags encodes to nothing
    assert out.images_spatial_crop.tolist() == [[4, 2], [3, 1]]
    assert out.num_image_tokens == (1807, 813) and out.pixel_values.shape[0] == 9 + 4
    check_consistent(out, proc.image_id)


def test_images_in_a_later_turn_flat_and_per_message_agree(proc, tok):
    a, b = img(640, 480, (255, 0, 0)), img(384, 768, (0, 0, 255))
    base = [{"role": "user", "content": "<image>\nFirst?"}, {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "Now <image> this one?"}]
    flat = proc(base, images=[a, b])
    per = proc([{**base[0], "images": [a]}, base[1], {**base[2], "images": [b]}])
    assert flat.input_ids.tolist() == per.input_ids.tolist()
    np.testing.assert_array_equal(flat.pixel_values, per.pixel_values)
    expected = ([proc.bos_id] + enc(tok, "<|User|>: ") + [proc.image_id] * 1023 + enc(tok, "\nFirst?\n\n<|Assistant|>:")
                + enc(tok, "Red.") + [proc.eos_id] + enc(tok, "<|User|>: Now ") + [proc.image_id] * 631
                + enc(tok, " this one?\n\n<|Assistant|>:"))
    assert flat.input_ids.tolist() == expected
    assert flat.images_spatial_crop.tolist() == [[2, 2], [1, 2]]
    # the first image's tiles come first: its global tile is mostly red, the second's is blue
    assert flat.pixel_values[0, :, 192, 192].tolist() == [1.0, -1.0, -1.0]
    assert flat.pixel_values[5, :, 192, 192].tolist() == [-1.0, -1.0, 1.0]


def test_more_than_two_images_disable_tiling(proc):
    sizes = [(1920, 1080), (640, 480), (300, 300)]
    out = proc("<image>\n<image>\n<image>\nWhat changed?", images=[img(*s) for s in sizes])
    assert out.num_image_tokens == (421, 421, 421)
    assert out.images_spatial_crop.tolist() == [[1, 1]] * 3
    assert out.pixel_values.shape == (6, 3, 384, 384)
    for k in range(3):  # global and "local" tile are the same padded image
        np.testing.assert_array_equal(out.pixel_values[2 * k], out.pixel_values[2 * k + 1])
    assert out.images_seq_mask.sum() == 3 * 421
    check_consistent(out, proc.image_id)


def test_tag_image_count_mismatch(proc):
    with pytest.raises(TemplateError, match="2 <image> tag.*but 1 image"):
        proc("<image><image>\nTwo?", images=[img(10, 10)])
    with pytest.raises(TemplateError, match="0 <image> tag.*but 1 image"):
        proc("No tag.", images=[img(10, 10)])
    with pytest.raises(TemplateError, match="1 <image> tag.*but 0 image"):
        proc("<image>\nWhere is it?")
    with pytest.raises(TemplateError, match="message 2: 1 <image> tag.*but 2 image"):
        proc([{"role": "user", "content": "<image>", "images": [img(9, 9)]}, {"role": "assistant", "content": "x"},
              {"role": "user", "content": "<image>", "images": [img(9, 9), img(9, 9)]}])
    with pytest.raises(TemplateError, match="both per message and as a flat list"):
        proc([{"role": "user", "content": "<image>", "images": [img(9, 9)]}], images=[img(9, 9)])


def test_malformed_conversations():
    with pytest.raises(TemplateError, match="no messages"):
        build_conversation([])
    with pytest.raises(TemplateError, match="no user message"):
        build_conversation([{"role": "system", "content": "x"}])
    with pytest.raises(TemplateError, match="only allowed first"):
        build_conversation([{"role": "user", "content": "a"}, {"role": "system", "content": "x"}])
    with pytest.raises(TemplateError, match="unknown role"):
        build_conversation([{"role": "robot", "content": "a"}])
    with pytest.raises(TemplateError, match="only allowed in user messages"):
        build_conversation([{"role": "user", "content": "a"}, {"role": "assistant", "content": "<image>"}])
    with pytest.raises(TemplateError, match="content must be a string"):
        build_conversation([{"role": "user", "content": ["a"]}])


def test_overlong_prompt_fails_before_decoding_any_image(artifact, tok):
    proc = Processor.from_dir(artifact, max_length=3000)
    good = io.BytesIO()
    img(3456, 384).save(good, "PNG")
    data = good.getvalue()
    truncated = data[: len(data) // 3]  # the header is intact: size known, pixels undecodable
    text_len = 1 + len(enc(tok, "<|User|>: ")) + len(enc(tok, "\nTwo strips.\n\n<|Assistant|>:"))
    total = text_len + 1989 + 1989  # 3456x384 -> 9x1 each
    msg = rf"prompt is {total} tokens .* is 3000: {total - 3000} tokens too many; the 2 image\(s\) take 3978"
    with pytest.raises(PromptTooLongError, match=msg):
        proc("<image><image>\nTwo strips.", images=[truncated, truncated])
    # the same request under a tile budget fits, and only then is the broken image decoded
    small = Processor.from_dir(artifact, max_length=3000, max_tiles=2)
    with pytest.raises(ImageError, match="image 1 of 2 .*truncated or corrupt"):
        small("<image><image>\nTwo strips.", images=[truncated, truncated])
    assert len(small("<image><image>\nTwo strips.", images=[data, data]).input_ids) == text_len + 2 * 617


def test_context_limit_from_config(artifact, tmp_path):
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json"):
        (tmp_path / f).write_bytes((artifact / f).read_bytes())
    cfg = preset_config("test-tiny")
    cfg["language_config"]["max_position_embeddings"] = 500
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    proc = Processor.from_dir(tmp_path)
    assert proc.max_length == 500
    out = proc("<image>\nOk?", images=[img(100, 100)])  # 421 + a few text tokens fit
    with pytest.raises(PromptTooLongError, match="too many"):
        proc("<image>\nToo big?", images=[img(768, 768)])
    assert out.seq_len < 500
    assert Processor.from_dir(tmp_path, max_length=None)("<image>", images=[img(768, 768)]).seq_len > 1000


def test_bad_image_is_named(proc, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match=r"image 2 of 2 .*nope\.png.*no such file"):
        proc("<image><image>", images=[img(5, 5), missing])


def test_as_batch_matches_the_official_layout(proc):
    out = proc("<image>\nHi", images=[img(1080, 1920)])
    b = out.as_batch()
    assert b["input_ids"].shape == (1, out.seq_len) and b["attention_mask"].all()
    assert b["images"].shape == (1, 9, 3, 384, 384) and b["images_spatial_crop"].tolist() == [[[2, 4]]]
    none = proc("Hi").as_batch()
    assert none["images"].shape == (1, 1, 3, 384, 384) and not none["images"].any()
    assert none["images_spatial_crop"].tolist() == [[[0, 0]]]


def test_decode_keeps_grounding_tags(proc, tok):
    text = "<|ref|>cup<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>"
    ids = [proc.bos_id] + enc(tok, text) + [proc.eos_id]
    assert proc.decode(ids) == text
    assert proc.encode("") == []


@settings(max_examples=12, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 1600), st.integers(1, 1600)), min_size=0, max_size=3))
def test_random_sizes_invariants(proc, sizes):
    content = "".join("<image>" for _ in sizes) + "\nWhat is here?"
    out = proc(content, images=[img(*s) for s in sizes])
    check_consistent(out, proc.image_id)
    ip = proc.image_processor
    cropping = len(sizes) <= 2
    assert out.images_spatial_crop.tolist() == [list(ip.grid(s, cropping)) for s in sizes]
    assert out.num_image_tokens == tuple(ip.num_tokens(s, cropping) for s in sizes)
    assert out.seq_len == out.images_seq_mask.size


def test_a_single_image_may_be_given_without_a_list(proc, tmp_path):
    path = tmp_path / "one.png"
    img(640, 480).save(path)
    for single in (str(path), path, img(640, 480)):
        assert proc("<image>\nHi", images=single).num_image_tokens == (1023,)
    per = proc([{"role": "user", "content": "<image>\nHi", "images": str(path)}])
    assert per.images_spatial_crop.tolist() == [[2, 2]]

"""Grounding output parsing (one-shot and incremental), drawing and prompt helpers (reference §5)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from vl2edge.model.synth_tokenizer import train_tokenizer
from vl2edge.runtime.grounding import (
    BadBox, Box, Detection, GroundingParser, draw_boxes, grounded_caption_prompt, parse_grounding, referring_prompt,
)


def test_prompt_helpers():
    assert referring_prompt(" The giraffe at the back. ") == "<image>\n<|ref|>The giraffe at the back.<|/ref|>."
    assert grounded_caption_prompt("What is on the table?") == "<image>\n<|grounding|>What is on the table?"
    with pytest.raises(ValueError):
        referring_prompt("<|det|>")
    with pytest.raises(ValueError):
        referring_prompt("  ")


def test_single_box_readme_example():
    r = parse_grounding("<|ref|>The giraffe at the back.<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|>", (999, 1998))
    assert len(r.detections) == 1 and not r.issues and not r.bad_boxes
    d = r.detections[0]
    assert d.label == "The giraffe at the back." and d.closed and d.index == 0
    (box,) = d.boxes
    assert box.coords == (580, 270, 999, 900)
    assert box.xyxy == pytest.approx((580, 540, 999, 1800))
    assert r.text == "The giraffe at the back."


def test_pixels_are_relative_to_999():
    (box,) = parse_grounding("<|det|>[[0, 0, 999, 999]]<|/det|>", (640, 480)).boxes
    assert box.xyxy == (0.0, 0.0, 640.0, 480.0) and box.label is None
    (box,) = parse_grounding("<|det|>[[333, 111, 666, 222]]<|/det|>").boxes
    assert box.xyxy is None and box.to_pixels(999, 999) == pytest.approx((333, 111, 666, 222))


def test_multiple_boxes_and_pairs_with_caption_text():
    text = ("<|ref|>cups<|/ref|><|det|>[[10, 20, 30, 40], [50, 60, 70, 80]]<|/det|> stand next to "
            "<|ref|>a plate<|/ref|> <|det|>[[100,200,300,400]]<|/det|>.")
    r = parse_grounding(text, (1000, 1000))
    assert [d.label for d in r.detections] == ["cups", "a plate"]
    assert [b.coords for b in r.boxes] == [(10, 20, 30, 40), (50, 60, 70, 80), (100, 200, 300, 400)]
    assert [b.detection for b in r.boxes] == [0, 0, 1]
    assert not r.issues and not r.bad_boxes
    assert r.text == "cups stand next to a plate ."
    assert r.as_dict()["detections"][1]["boxes"][0]["coords"] == [100, 200, 300, 400]


@pytest.mark.parametrize("det, good, reasons", [
    ("[[1, 2, 3]]", [], ["expected 4 numbers, got 3"]),
    ("[[1, 2, 3, 4, 5]]", [], ["expected 4 numbers, got 5"]),
    ("[[1, 2, 3, 4], [5, 6, 7]]", [(1, 2, 3, 4)], ["expected 4 numbers, got 3"]),
    ("[[[1, 2, 3, 4]], [[5, 6, 7, 8]]]", [(1, 2, 3, 4), (5, 6, 7, 8)], []),  # nested: inner lists are boxes
    ("[1, 2, 3, 4]", [(1, 2, 3, 4)], []),  # flat
    ("[[12, 34, 99999999999999999999999999, 56]]", [], ["number too long"]),
    ("[[12, 34, 9999, 56]]", [], ["coordinate 9999 outside 0..999"]),
    ("[[-1, 2, 3, 4]]", [], ["outside"]),
    ("[[100, 20, 50, 40]]", [], ["x2 < x1"]),
    ("[[10, 200, 50, 40]]", [], ["y2 < y1"]),
    ("[[10, 20, 10, 40]]", [], ["empty box"]),
    ("[[10, 20, abc, 40]]", [], ["not a number: 'abc'"]),
    ("[[10, 20, , 40]]", [], ["empty coordinate"]),
    ("[[]]", [], ["empty list"]),
    ("[[1.5, 2, 30.25, 40]]", [(1.5, 2, 30.25, 40)], []),
    ("[[10, 20, 30, 40]] junk ]] [[5, 6, 7, 8]]", [(10, 20, 30, 40), (5, 6, 7, 8)], []),
    ("[7, [10, 20, 30, 40]]", [(10, 20, 30, 40)], ["numbers mixed with a nested list"]),
])
def test_malformed_boxes(det, good, reasons):
    r = parse_grounding(f"<|ref|>thing<|/ref|><|det|>{det}<|/det|>", (100, 100))
    assert [b.coords for b in r.boxes] == good
    assert len(r.bad_boxes) == len(reasons)
    for bad, reason in zip(r.bad_boxes, reasons):
        assert reason in bad.reason and bad.label == "thing"


def test_runs_of_nines_unterminated():
    r = parse_grounding("<|ref|>x<|/ref|><|det|>[[10, 10, 20, 20], [999999999999999999999999999999")
    assert [b.coords for b in r.boxes] == [(10, 10, 20, 20)]
    assert "unterminated" in r.bad_boxes[0].reason
    assert not r.detections[0].closed
    assert any("unclosed <|det|>" in i for i in r.issues)


def test_structural_problems():
    r = parse_grounding("<|ref|>cat<|det|>[[1, 2, 3, 4]]<|/det|>")  # ref never closed
    assert r.boxes[0].label == "cat" and "not closed before <|det|>" in r.issues[0]
    r = parse_grounding("<|ref|>cat<|/ref|> sits on <|ref|>mat<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>")
    assert [d.label for d in r.detections] == ["mat"]
    assert any("<|ref|>cat<|/ref|> has no <|det|>" in i for i in r.issues)
    r = parse_grounding("<|det|>[[1, 2, 3, 4]]<|det|>[[5, 6, 7, 8]]<|/det|>")
    assert [d.closed for d in r.detections] == [False, True] and len(r.boxes) == 2
    r = parse_grounding("<|det|>[[1, 2, 3, 4]]<|ref|>b<|/ref|><|det|>[[5, 6, 7, 8]]<|/det|>")
    assert [d.label for d in r.detections] == [None, "b"]
    r = parse_grounding("<|/det|> hello <|/ref|>")
    assert r.issues == ("stray <|/det|>", "stray <|/ref|>") and r.text == " hello "
    r = parse_grounding("<|ref|>dangling")
    assert "unclosed <|ref|>dangling" in r.issues[0] and not r.detections
    r = parse_grounding("<|ref|>a<|/ref|><|det|>nothing here<|/det|>")
    assert r.detections[0].boxes == () and "holds no coordinate list" in r.issues[0]
    r = parse_grounding("<|grounding|>a < b and c <| d <|de")
    assert r.text == "a < b and c <| d <|de" and not r.issues


GROUNDED = ("<|ref|>The red mug<|/ref|><|det|>[[120, 340, 260, 520]]<|/det|> sits left of "
            "<|ref|>two books<|/ref|><|det|>[[400, 300, 560, 610], [580, 290, 720, 640], [1,2,3]]<|/det|>"
            " and <|ref|>a lamp<|/ref|><|det|>[[800, 10, 990, 9999999")


def _events(chunks, size=(640, 480)):
    p = GroundingParser(size)
    events = [e for c in chunks for e in p.feed(c)]
    return events, p.close()


def test_incremental_char_by_char_equals_one_shot():
    one_events, one = _events([GROUNDED])
    events, result = _events(list(GROUNDED))
    assert result == one == parse_grounding(GROUNDED, (640, 480))
    assert events == one_events
    assert [type(e) for e in events] == [Box, Detection, Box, Box, BadBox, Detection]


def test_incremental_token_chunks_equal_one_shot():
    tok = train_tokenizer(2048)
    ids = tok.encode(GROUNDED, add_special_tokens=False).ids
    chunks = [tok.decode([i], skip_special_tokens=False) for i in ids]
    assert "".join(chunks) == GROUNDED and len(chunks) > 30
    assert _events(chunks) == _events([GROUNDED])


def test_first_box_is_reported_at_its_closing_bracket():
    p = GroundingParser((1000, 1000))
    cut = GROUNDED.index("]") + 1
    assert p.feed(GROUNDED[: cut - 1]) == []
    (box,) = p.feed(GROUNDED[cut - 1: cut])
    assert box.label == "The red mug" and box.coords == (120, 340, 260, 520)
    assert [type(e) for e in p.feed("]<|/det|>")] == [Detection]
    assert len(p.detections) == 1
    p.close()
    with pytest.raises(ValueError):
        p.feed("more")
    assert p.close() is p.close()


_PIECES = ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|", "<", "|>", "[", "]", "[[", "]]",
           ", ", "0", "999", "99999", "12", "7.5", "-3", "abc", " ", "\n", "cat", "x"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=60), st.lists(st.integers(0, 400), max_size=8))
def test_never_crashes_and_chunking_does_not_matter(pieces, cuts):
    text = "".join(pieces)
    one = parse_grounding(text, (320, 240))
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert _events(chunks, (320, 240))[1] == one
    for b in one.boxes:
        assert 0 <= b.coords[0] < b.coords[2] <= 999 and 0 <= b.coords[1] < b.coords[3] <= 999
        assert 0 <= b.xyxy[0] < b.xyxy[2] <= 320 and 0 <= b.xyxy[1] < b.xyxy[3] <= 240


def test_draw_boxes_writes_a_png(tmp_path):
    image = Image.new("RGB", (400, 300), (255, 255, 255))
    r = parse_grounding("<|ref|>box<|/ref|><|det|>[[250, 250, 750, 750]]<|/det|>", image.size)
    out_path = tmp_path / "boxes.png"
    drawn = draw_boxes(image, r, out_path)
    saved = Image.open(out_path)
    assert saved.format == "PNG" and saved.size == (400, 300)
    a = np.asarray(saved.convert("RGB")).astype(int)
    x1, y1 = round(250 / 999 * 400), round(250 / 999 * 300)
    x2, y2 = round(750 / 999 * 400), round(750 / 999 * 300)
    white = (a == 255).all(axis=2)
    assert not white[(y1 + y2) // 2, x1] and not white[(y1 + y2) // 2, x2]  # the vertical edges are drawn
    assert not white[y2, (x1 + x2) // 2]
    assert white[(y1 + y2) // 2, (x1 + x2) // 2]  # the inside stays untouched
    assert white[5, 5] and white[295, 395]  # far from the box
    assert not white[y1 - 6, x1 + 3]  # the label background sits above the box
    assert np.asarray(image).min() == 255  # the input image is not modified
    assert drawn.size == image.size
    src = tmp_path / "src.png"
    image.save(src)
    np.testing.assert_array_equal(np.asarray(draw_boxes(src, r)), np.asarray(drawn))

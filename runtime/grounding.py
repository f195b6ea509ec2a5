"""Grounding: parse <|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|> from generated text (reference §5).

Coordinates are integers 0..999 relative to the ORIGINAL image's width and height; in pixels x -> x/999*W,
y -> y/999*H (the official parse_ref_bbox mapping).

The model's output is not always well formed (odd-length or nested lists, runs of 9s, unclosed tags, x2 < x1;
upstream issue #96). The parser never raises on model output: every innermost [...] inside a <|det|> block is one
candidate box; four in-range numbers with x1 < x2 and y1 < y2 make a Box, anything else a BadBox with the reason.
Structural problems (unclosed or stray tags) are listed in `issues`.

It is incremental: GroundingParser.feed(text_delta) returns each Box as soon as its closing "]" arrives (a robot can
act on the first box while the model is still generating), and each Detection when its <|/det|> arrives. Feeding
the text in any chunks gives the same events and the same final result as parse_grounding(text) in one go.

Decode generated ids with skip_special_tokens=False (Processor.decode does): the tags are special tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Union

from PIL import Image, ImageDraw, ImageFont

from .images import ImageInput, load_image

REF_OPEN, REF_CLOSE = "<|ref|>", "<|/ref|>"
DET_OPEN, DET_CLOSE = "<|det|>", "<|/det|>"
GROUNDING = "<|grounding|>"
_TAGS = (REF_OPEN, REF_CLOSE, DET_OPEN, DET_CLOSE, GROUNDING)
COORD_MAX = 999
_MAX_NUMBER_CHARS = 16  # longer "numbers" are runs of 9s (or digits) that cannot be coordinates


# --- prompts ----------------------------------------------------------------------------------------------------
def referring_prompt(query: str) -> str:
    """User content asking where `query` is: "<image>\\n<|ref|>{query}<|/ref|>." (the README's form)."""
    query = query.strip()
    if not query or any(t in query for t in _TAGS):
        raise ValueError(f"referring query must be non-empty text without grounding tags, got {query!r}")
    return f"<image>\n{REF_OPEN}{query}{REF_CLOSE}."


def grounded_caption_prompt(question: str = "Describe this image.") -> str:
    """User content for grounded captioning: the answer names objects with <|ref|>/<|det|> boxes inline."""
    return f"<image>\n{GROUNDING}{question.strip()}"


# --- results ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Box:
    label: str | None
    coords: tuple[float, float, float, float]  # as generated, 0..999
    xyxy: tuple[float, float, float, float] | None  # pixels of the original image (None: no image size given)
    detection: int  # index of the Detection (the <|det|> block) it belongs to

    def to_pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        return to_pixels(self.coords, width, height)


@dataclass(frozen=True)
class BadBox:
    label: str | None
    raw: str  # the text between the brackets
    reason: str
    detection: int


@dataclass(frozen=True)
class Detection:
    label: str | None  # None when the <|det|> block had no <|ref|> before it
    boxes: tuple[Box, ...]
    bad_boxes: tuple[BadBox, ...]
    closed: bool  # False when the block never got its <|/det|>
    index: int


@dataclass(frozen=True)
class GroundingResult:
    detections: tuple[Detection, ...]
    issues: tuple[str, ...]
    text: str  # the output without tags and coordinate blocks (labels kept): readable caption text

    @property
    def boxes(self) -> list[Box]:
        return [b for d in self.detections for b in d.boxes]

    @property
    def bad_boxes(self) -> list[BadBox]:
        return [b for d in self.detections for b in d.bad_boxes]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "detections": [{
                "label": d.label, "closed": d.closed,
                "boxes": [{"coords": list(b.coords), "xyxy": None if b.xyxy is None else list(b.xyxy)}
                          for b in d.boxes],
                "bad_boxes": [{"raw": b.raw, "reason": b.reason} for b in d.bad_boxes],
            } for d in self.detections],
            "issues": list(self.issues),
            "text": self.text,
        }


Event = Union[Box, BadBox, Detection]


def to_pixels(coords: Iterable[float], width: int, height: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = coords
    return (x1 / COORD_MAX * width, y1 / COORD_MAX * height, x2 / COORD_MAX * width, y2 / COORD_MAX * height)


# --- parser -----------------------------------------------------------------------------------------------------
_TEXT, _REF, _DET = "text", "ref", "det"


@dataclass
class _OpenDetection:
    label: str | None
    index: int
    boxes: list[Box] = field(default_factory=list)
    bad: list[BadBox] = field(default_factory=list)
    saw_list: bool = False


class GroundingParser:
    """Incremental parser: feed(delta) -> new events; close() -> the GroundingResult of everything fed."""

    def __init__(self, image_size: tuple[int, int] | None = None):
        """image_size: (width, height) of the image the boxes refer to (PreparedInputs.image_sizes[i]); with it
        boxes carry pixel coordinates."""
        self.image_size = image_size
        self._state = _TEXT
        self._pending = ""  # a possible tag prefix ("<", "<|", "<|de", ...)
        self._label_chars: list[str] = []  # inside <|ref|>
        self._label: str | None = None  # a closed <|ref|> waiting for its <|det|>
        self._has_label = False
        self._det: _OpenDetection | None = None
        self._leaf: list[str] | None = None  # characters of the innermost open list
        self._text: list[str] = []
        self._detections: list[Detection] = []
        self._issues: list[str] = []
        self._result: GroundingResult | None = None

    # public API ---------------------------------------------------------------------------------------------------
    def feed(self, delta: str) -> list[Event]:
        if self._result is not None:
            raise ValueError("GroundingParser.feed after close()")
        events: list[Event] = []
        for ch in delta:
            self._char(ch, events)
        return events

    def close(self) -> GroundingResult:
        """End of output: settle whatever is still open and return the result (idempotent)."""
        if self._result is None:
            events: list[Event] = []
            pending, self._pending = self._pending, ""
            for ch in pending:  # an unfinished tag at the very end is plain text
                self._ordinary(ch, events)
            if self._state == _REF:
                self._issues.append(f"unclosed {REF_OPEN}{''.join(self._label_chars)} at the end of the output")
            elif self._state == _DET:
                self._end_detection(events, closed=False, why=f"unclosed {DET_OPEN} at the end of the output")
            self._drop_label()
            self._result = GroundingResult(tuple(self._detections), tuple(self._issues), "".join(self._text))
        return self._result

    @property
    def detections(self) -> list[Detection]:
        """Detections completed so far."""
        return list(self._detections)

    # characters and tags ------------------------------------------------------------------------------------------
    def _char(self, ch: str, events: list[Event]) -> None:
        if not self._pending and ch != "<":
            self._ordinary(ch, events)
            return
        self._pending += ch
        if self._pending in _TAGS:
            tag, self._pending = self._pending, ""
            self._tag(tag, events)
        elif not any(t.startswith(self._pending) for t in _TAGS):
            # not a tag after all: its first character is ordinary, the rest may start a new tag
            first, rest = self._pending[0], self._pending[1:]
            self._pending = ""
            self._ordinary(first, events)
            for c in rest:
                self._char(c, events)

    def _ordinary(self, ch: str, events: list[Event]) -> None:
        if self._state == _DET:
            self._det_char(ch, events)
            return
        if self._state == _REF:
            self._label_chars.append(ch)
        elif self._has_label and not ch.isspace():
            self._drop_label()  # text after <|/ref|>: that reference gets no boxes
        self._text.append(ch)

    def _tag(self, tag: str, events: list[Event]) -> None:
        if tag == GROUNDING:
            return  # a prompt-side switch; meaningless in output
        if tag == REF_OPEN:
            if self._state == _REF:
                self._issues.append(f"{REF_OPEN}{''.join(self._label_chars)} was not closed before another {REF_OPEN}")
            elif self._state == _DET:
                self._end_detection(events, closed=False, why=f"{DET_OPEN} was not closed before {REF_OPEN}")
            self._drop_label()
            self._state, self._label_chars = _REF, []
        elif tag == REF_CLOSE:
            if self._state == _REF:
                self._label, self._has_label = "".join(self._label_chars).strip(), True
                self._state = _TEXT
            else:
                self._issues.append(f"stray {REF_CLOSE}")
        elif tag == DET_OPEN:
            if self._state == _REF:
                self._issues.append(f"{REF_OPEN}{''.join(self._label_chars)} was not closed before {DET_OPEN}")
                self._label, self._has_label = "".join(self._label_chars).strip(), True
            elif self._state == _DET:
                self._end_detection(events, closed=False, why=f"{DET_OPEN} was not closed before another {DET_OPEN}")
            label = self._label if self._has_label else None
            self._label, self._has_label = None, False
            self._det = _OpenDetection(label, len(self._detections))
            self._state, self._leaf = _DET, None
        elif tag == DET_CLOSE:
            if self._state == _DET:
                self._end_detection(events, closed=True)
            else:
                self._issues.append(f"stray {DET_CLOSE}")

    def _drop_label(self) -> None:
        if self._has_label:
            self._issues.append(f"{REF_OPEN}{self._label}{REF_CLOSE} has no {DET_OPEN} after it")
        self._label, self._has_label = None, False

    # inside <|det|> ----------------------------------------------------------------------------------------------
    def _det_char(self, ch: str, events: list[Event]) -> None:
        det = self._det
        if ch == "[":
            det.saw_list = True
            if self._leaf is not None and "".join(self._leaf).strip(" ,\n\t"):
                self._bad(events, "".join(self._leaf), "numbers mixed with a nested list")
            self._leaf = []  # every "[" opens a new innermost list; only innermost lists are boxes
        elif ch == "]":
            if self._leaf is not None:  # closes an innermost list; a "]" closing an outer list carries nothing
                self._leaf_done(events, "".join(self._leaf))
                self._leaf = None
        elif self._leaf is not None:
            self._leaf.append(ch)
        # anything else between lists (commas, spaces, junk) carries no box

    def _leaf_done(self, events: list[Event], raw: str) -> None:
        det = self._det
        pieces = [p.strip() for p in raw.split(",")]
        if pieces == [""]:
            self._bad(events, raw, "empty list")
            return
        if len(pieces) != 4:
            self._bad(events, raw, f"expected 4 numbers, got {len(pieces)}")
            return
        coords = []
        for p in pieces:
            v, problem = _coordinate(p)
            if problem:
                self._bad(events, raw, problem)
                return
            coords.append(v)
        x1, y1, x2, y2 = coords
        if x2 < x1 or y2 < y1:
            self._bad(events, raw, "x2 < x1" if x2 < x1 else "y2 < y1")
            return
        if x2 == x1 or y2 == y1:
            self._bad(events, raw, "empty box (zero width or height)")
            return
        xyxy = to_pixels(coords, *self.image_size) if self.image_size else None
        box = Box(det.label, (x1, y1, x2, y2), xyxy, det.index)
        det.boxes.append(box)
        events.append(box)

    def _bad(self, events: list[Event], raw: str, reason: str) -> None:
        bad = BadBox(self._det.label, raw.strip(), reason, self._det.index)
        self._det.bad.append(bad)
        events.append(bad)

    def _end_detection(self, events: list[Event], *, closed: bool, why: str | None = None) -> None:
        det = self._det
        if self._leaf is not None:
            self._bad(events, "".join(self._leaf), "unterminated list (no closing ']')")
        if why:
            self._issues.append(why)
        if not det.saw_list:
            self._issues.append(f"{DET_OPEN} block{'' if det.label is None else ' for ' + repr(det.label)} "
                                f"holds no coordinate list")
        done = Detection(det.label, tuple(det.boxes), tuple(det.bad), closed, det.index)
        self._detections.append(done)
        events.append(done)
        self._det, self._leaf, self._state = None, None, _TEXT


def _coordinate(p: str) -> tuple[float, str | None]:
    """(value, None) for a valid 0..999 coordinate, else (0, the reason it is not one)."""
    if not p:
        return 0, "empty coordinate"
    if len(p) > _MAX_NUMBER_CHARS:
        return 0, f"number too long ({len(p)} characters: {p[:8]}...)"
    try:
        v: float = int(p)
    except ValueError:
        try:
            v = float(p)
        except ValueError:
            return 0, f"not a number: {p!r}"
    if not math.isfinite(v) or not 0 <= v <= COORD_MAX:
        return 0, f"coordinate {p} outside 0..{COORD_MAX}"
    return v, None


def parse_grounding(text: str, image_size: tuple[int, int] | None = None) -> GroundingResult:
    """One-shot parse of a whole generated answer."""
    parser = GroundingParser(image_size)
    parser.feed(text)
    return parser.close()


# --- drawing ----------------------------------------------------------------------------------------------------
_PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40))


def draw_boxes(image: ImageInput, boxes: GroundingResult | Iterable[Box], out_path: str | Path | None = None,
               ) -> Image.Image:
    """Draw each box (outline + label) on a copy of the image and save it as PNG if out_path is given.

    image: a PIL image or anything runtime.images opens (loaded upright, as the Processor's default sees it; pass
    load_image(src, exif_transpose=False) for a Processor that does not transpose). Pixel positions come from the
    boxes' 0..999 coordinates and this image's size.
    """
    if isinstance(boxes, GroundingResult):
        boxes = boxes.boxes
    if not isinstance(image, Image.Image):
        image = load_image(image)
    out = image.convert("RGB")  # always a copy for RGB input too
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    w, h = out.size
    line = max(2, round(min(w, h) / 200))
    colours: dict[str | None, tuple[int, int, int]] = {}
    for box in boxes:
        colour = colours.setdefault(box.label, _PALETTE[len(colours) % len(_PALETTE)])
        x1, y1, x2, y2 = (round(v) for v in box.to_pixels(w, h))
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        if box.label:
            left, top, right, bottom = draw.textbbox((0, 0), box.label, font=font)
            tw, th = right - left, bottom - top
            ty = y1 - th - 4 if y1 - th - 4 >= 0 else y1 + line  # above the box, or inside when at the top edge
            draw.rectangle((x1, ty, x1 + tw + 4, ty + th + 4), fill=colour)
            draw.text((x1 + 2 - left, ty + 2 - top), box.label, fill=(255, 255, 255), font=font)
    if out_path is not None:
        out.save(out_path, format="PNG")
    return out

"""A perception loop: frames in, one answer per frame out, always about the newest frame.

    for a in m.watch("/dev/video0", "<image>\\n<|ref|>the red mug<|/ref|>.", every=1.0):
        print(a.index, a.boxes, a.frame_to_answer_s)

`Model.watch(source, prompt, ...)` returns a Watch: an iterator of FrameAnswer, one per answered frame, as soon as
the answer is complete. A reader thread (runtime.frame_reader) decodes the source (runtime.frame_sources) while the
model answers and keeps only the newest frame, so the loop never falls behind the source and holds one frame
whatever its rate; `all_frames=True` answers every frame instead (offline labelling).

Latency is counted from the moment a frame was decoded (`read_at`): frame -> first token and frame -> answer include
the time the frame waited for the model to finish the previous one. Every request reuses the prompt's tokens
before the image from the KV cache (runtime.generation's prefix reuse): the system prompt, and the question when it
is placed before "<image>", are prefilled once for the whole loop, not once per frame.

The loop ends when the source ends, stalls (no frame within `stall_timeout`), disconnects (after `reconnect`
attempts), after `max_frames` answers, or on close(); `summary()` says why and where each frame's time went.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .frame_reader import LatestFrameReader
from .frame_sources import DEFAULT_TIMEOUT_S, open_source
from .frames import Frame

STAGES = ("read_s", "wait_s", "preprocess_s", "vision_s", "prefill_s", "decode_s")
_KEEP_LATENCIES = 10_000  # per-frame figures kept for the summary's percentiles (bounded: a loop may run for days)


@dataclass
class FrameAnswer:
    """One answered frame. Times in seconds; boxes in the frame's pixels.

    index                   the frame's position in its source (decoded frames, skipped ones counted)
    timestamp               its presentation time in the source (a video's pts; else seconds since it opened)
    frame_to_first_token_s  from the frame's decode to the first generated token
    frame_to_answer_s       from the frame's decode to the end of its answer
    dropped_since_last      frames read but never answered since the previous answer (latest frame wins)
    skipped_since_last      frames that failed to decode since the previous answer
    stages                  where the time went: read_s (decoding the frame), wait_s (in the slot, and the
                            request's start), preprocess_s, vision_s, prefill_s, decode_s
    """

    index: int
    timestamp: float | None
    text: str
    boxes: list[dict]
    stop_reason: str
    tokens: int
    prompt_tokens: int
    cached_tokens: int
    image_size: tuple[int, int]
    frame_to_first_token_s: float | None
    frame_to_answer_s: float
    dropped_since_last: int
    skipped_since_last: int
    stages: dict[str, float]
    result: Any = field(repr=False, default=None)  # the Result (token ids, grounding, engine timings)
    frame: Frame | None = field(repr=False, default=None)  # the pixels answered (for drawing the boxes)

    def as_dict(self) -> dict[str, Any]:
        """The JSON line of `vl2edge watch --jsonl`."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("result", "frame")}
        d["image_size"] = list(self.image_size)
        d["stages"] = {k: round(v, 6) for k, v in self.stages.items()}
        return {"type": "frame", **d}


def _box(b) -> dict:
    return {"label": b.label, "xyxy": None if b.xyxy is None else [round(v, 2) for v in b.xyxy],
            "coords": list(b.coords)}


def _percentiles(values) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "max": None}
    a = np.asarray(values, float)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "max": float(a.max())}


class Watch:
    """Iterator of FrameAnswer over a frame source (see the module docstring). Also a context manager;
    close() stops the reader and ends the loop; summary() is ready at any time."""

    def __init__(self, model, source: Any, prompt: str, *, system: str | None = None, every: float | None = None,
                 max_frames: int | None = None, all_frames: bool = False, channels: str = "rgb",
                 max_tiles: int | None = None, fps: float | None = None, stall_timeout: float = DEFAULT_TIMEOUT_S,
                 reconnect: int = 0, on_text: Callable[[Frame, str], None] | None = None, **options):
        if every is not None and not every >= 0:
            raise ValueError(f"every must be >= 0 seconds, got {every!r}")
        if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 1):
            raise ValueError(f"max_frames must be a positive integer, got {max_frames!r}")
        if not stall_timeout > 0:
            raise ValueError(f"stall_timeout must be > 0 seconds, got {stall_timeout!r}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty")
        self.model = model
        self.prompt = prompt
        self.system = system
        self.every = every or None
        self.max_frames = max_frames
        self.stall_timeout = stall_timeout
        self.on_text = on_text
        self.options = options
        self._proc = model.processor
        self._saved_ip = None
        if max_tiles is not None:  # this loop's tiling, restored by close()
            self._saved_ip = self._proc.image_processor
            self._proc.image_processor = dataclasses.replace(self._saved_ip, max_tiles=max_tiles)
        # the prompt is checked once, here, on a stand-in frame: a template error is not a per-frame failure
        try:
            model.prepare(self._messages(), [np.zeros((32, 32, 3), np.uint8)])
        except BaseException:
            self._restore()
            raise
        try:
            src = open_source(source, paced=not all_frames, fps=fps, channels=channels, timeout_s=stall_timeout,
                              reconnect=reconnect, image_options=self._proc.image_options)
        except BaseException:
            self._restore()
            raise
        self.source = src
        self.reader = LatestFrameReader(src, all_frames=all_frames).start()
        self.answered = 0
        self.end_reason: str | None = None
        self._t_start = time.perf_counter()
        self._t_end: float | None = None
        self._idle_s = 0.0
        self._last_start: float | None = None
        self._dropped_seen = 0
        self._skipped_seen = 0
        self._ttft: collections.deque = collections.deque(maxlen=_KEEP_LATENCIES)
        self._answer: collections.deque = collections.deque(maxlen=_KEEP_LATENCIES)
        self._stage_sums = dict.fromkeys(STAGES, 0.0)
        self._tokens = 0
        self._prefill_tokens = 0
        self._cached_tokens = 0
        self._stream = None

    def _messages(self) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": self.prompt}]

    # iterator ----------------------------------------------------------------------------------------------------
    def __iter__(self) -> "Watch":
        return self

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close("interrupted" if exc_type is KeyboardInterrupt else None)

    def __next__(self) -> FrameAnswer:
        if self.end_reason is not None:
            raise StopIteration
        if self.max_frames is not None and self.answered >= self.max_frames:
            self.close("max_frames")
            raise StopIteration
        t_idle = time.perf_counter()
        if self.every and self._last_start is not None:
            pause = self._last_start + self.every - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        frame = self.reader.take(timeout=self.stall_timeout)
        self._idle_s += time.perf_counter() - t_idle
        if frame is None:
            self.close(self.reader.end_reason or "end")
            raise StopIteration
        try:
            return self._answer_frame(frame)
        except KeyboardInterrupt:
            self.close("interrupted")
            raise
        except BaseException as e:
            self.close(f"error: {type(e).__name__}: {e}")
            raise

    def _answer_frame(self, frame: Frame) -> FrameAnswer:
        t_req = time.perf_counter()
        self._last_start = t_req
        stream = self._stream = self.model.stream(self._messages(), [frame], **self.options)
        for delta in stream:
            if self.on_text is not None:
                self.on_text(frame, delta)
        self._stream = None
        r = stream.result
        t_end = time.perf_counter()
        read_at = frame.read_at if frame.read_at is not None else t_req
        t = r.timings
        stages = {"read_s": float(frame.meta.get("read_s", 0.0)), "wait_s": t_req - read_at,
                  "preprocess_s": t["preprocess_s"], "vision_s": t["vision_s"], "prefill_s": t["prefill_s"],
                  "decode_s": float(sum(t["decode_s"]))}
        ttft = None if t["ttft_s"] is None else t_req - read_at + t["ttft_s"]
        dropped, skipped = frame.meta["dropped_before"], frame.meta["skipped_before"]
        answer = FrameAnswer(
            index=frame.index, timestamp=frame.timestamp, text=r.text, boxes=[_box(b) for b in r.boxes],
            stop_reason=r.stop_reason, tokens=len(r.token_ids), prompt_tokens=r.prompt_tokens,
            cached_tokens=r.cached_tokens, image_size=r.image_sizes[-1], frame_to_first_token_s=ttft,
            frame_to_answer_s=t_end - read_at, dropped_since_last=dropped - self._dropped_seen,
            skipped_since_last=skipped - self._skipped_seen, stages=stages, result=r, frame=frame)
        self._dropped_seen, self._skipped_seen = dropped, skipped
        self.answered += 1
        if ttft is not None:
            self._ttft.append(ttft)
        self._answer.append(answer.frame_to_answer_s)
        for k, v in stages.items():
            self._stage_sums[k] += v
        self._tokens += answer.tokens
        self._prefill_tokens += t["prefill_tokens"]
        self._cached_tokens += r.cached_tokens
        return answer

    # ending --------------------------------------------------------------------------------------------------------
    def close(self, reason: str | None = None) -> None:
        """End the loop (idempotent): stop the request in flight and the reader, restore the tiling."""
        if self.end_reason is None:
            self.end_reason = reason or "closed"
            self._t_end = time.perf_counter()
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        # a stalled reader is blocked in its source's read (until its timeout or its next frame): no use waiting
        self.reader.close(join_timeout=0.0 if self.end_reason == "stalled" else 2.0)
        self._restore()

    def _restore(self) -> None:
        if self._saved_ip is not None:
            self._proc.image_processor = self._saved_ip
            self._saved_ip = None

    def summary(self) -> dict[str, Any]:
        """The loop so far: why it ended, frames read / answered / dropped / skipped, latency percentiles (seconds),
        and the mean seconds per answered frame of each stage (plus idle: waiting for a frame or the period)."""
        n = max(self.answered, 1)
        wall = (self._t_end or time.perf_counter()) - self._t_start
        return {
            "type": "summary",
            "source": self.source.name,
            "end_reason": self.end_reason,
            "frames_read": self.reader.read,
            "frames_answered": self.answered,
            "frames_dropped": self.reader.dropped,
            "frames_skipped": self.reader.skipped,
            "skip_reasons": list(self.source.skip_messages),
            "wall_s": wall,
            "answers_per_s": self.answered / wall if wall > 0 else None,
            "frame_to_first_token_s": _percentiles(self._ttft),
            "frame_to_answer_s": _percentiles(self._answer),
            "stage_mean_s": {k: v / n for k, v in self._stage_sums.items()},
            "idle_s": self._idle_s,
            "tokens": self._tokens,
            "prefill_tokens": self._prefill_tokens,
            "cached_tokens": self._cached_tokens,
        }

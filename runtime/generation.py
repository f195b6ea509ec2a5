"""Generation over an Engine: prefill, decode, sampling, streamed text, stop conditions and KV-cache reuse.

`Runner(engine, processor).start(inputs, params, ...)` returns a `Stream`: an iterator of text deltas whose
`result` (a `Result`) is set once it ends. Per request:

  1. cache reuse: the longest prefix of the new prompt's ids that is already in the cache (same ids, and every
     image in it the same pixels at the same place) is kept; the cache is rewound to it (the engine's KV buffers
     are addressed by position, so rewinding is `engine.truncate(n)`) and only the rest is prefilled. Always at
     least the prompt's last token is prefilled (its logits start the answer). Images that lie wholly in the
     reused prefix skip the vision graph. For a chat turn with the `deepseek` template the whole previous
     conversation is a prefix of the next one (up to the answer as the template re-tokenizes it), so only the new
     turn is prefilled. When it is not a prefix (edited history; a third image in the conversation, which turns
     the earlier images' tiling off and so changes their slot counts), the reused part shrinks to the common
     prefix, down to nothing.
  2. prefill in chunks (`chunk_size`, default 512), then one decode step per token.
  3. stop, in this order after each sampled token: eos ("eos"; the eos id is in token_ids, not in the text); a
     stop string ("stop"); max_new_tokens ("max_new_tokens"); a full cache ("context": the sampled token is
     kept but there is no room to feed it back). `Stream.cancel()` (any thread; also between prefill chunks, where
     it ends the request with no token and the chunks done stay in the cache) or `Stream.close()` (also what
     leaving a `for` loop and garbage collection do) end it with "cancelled"; an exception with "error".

Text: ids -> IncrementalDetokenizer (never a broken character) -> stop-string gate: text that could still be the
start of a stop string is held back; a matched stop string and everything after it is never emitted; no cut ever
falls inside a special token's text (the cut moves to its start). `result.text` is always exactly the
concatenation of the deltas the stream yielded (after close(), the held-back tail is dropped; after cancel(), it
is yielded before the stream ends).

Nothing is allocated per request beyond the token's own arrays: the engine's buffers are reused, a stream that ends
in any way leaves the engine consistent (`engine.length` counts exactly the positions written), and starting a new
request closes a still-open previous stream first.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from .detokenizer import IncrementalDetokenizer, special_token_ids
from .grounding import GroundingParser, GroundingResult
from .processor import PreparedInputs
from .sampling import Sampler, SamplingParams

STOP_REASONS = ("eos", "stop", "max_new_tokens", "context", "cancelled", "error")


# --- text gate: stop strings ------------------------------------------------------------------------------------
class StopGate:
    """Detokenized text in, user-visible text out: holds back possible stop-string prefixes, cuts at a match."""

    def __init__(self, detok: IncrementalDetokenizer, stop: Iterable[str] = ()):
        self.detok = detok
        self.stops = tuple(s for s in stop if s)
        self.emitted = 0  # characters of detok.text given out
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.detok.add(token_id)
        return self._advance(final=False)

    def finish(self) -> str:
        """End of generation: flush the detokenizer and give out everything that is not a stop string."""
        if self.stopped:
            return ""
        self.detok.flush()
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        text = self.detok.text
        cut = len(text)
        if self.stops:
            hits = [i for i in (text.find(s, self.emitted) for s in self.stops) if i >= 0]
            if hits:
                cut, self.stopped = min(hits), True
            elif not final:
                cut = len(text) - self._holdback(text)
        cut = self._snap(cut)
        if cut <= self.emitted:
            return ""
        delta, self.emitted = text[self.emitted:cut], cut
        return delta

    def _holdback(self, text: str) -> int:
        """Length of the longest suffix of the not-yet-emitted text that is a proper prefix of a stop string."""
        pending = len(text) - self.emitted
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, pending), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        return hold

    def _snap(self, cut: int) -> int:
        """Never cut inside a special token's text: move the cut back to its start."""
        for start, end in reversed(self.detok.special_spans):
            if end <= self.emitted:
                break
            if start < cut < end:
                cut = start
        return cut


# --- results ----------------------------------------------------------------------------------------------------
@dataclass
class Result:
    """One answer.

    text           the answer as streamed (special tokens such as the grounding tags kept; eos and stop strings not)
    token_ids      every sampled id, the final eos included (what the reference's GenerationResult.tokens holds)
    stop_reason    eos | stop | max_new_tokens | context | cancelled | error
    prompt_tokens  length of the prompt (whole conversation); cached_tokens of them were reused from the cache
    image_sizes    (width, height) of each image of the conversation, as the model saw it (upright)
    grounding      parse of `text`, boxes in pixels of the conversation's last image
    timings        seconds: preprocess_s, vision_s, vision_tiles, embed_s, prefill_s, prefill_tokens,
                   prefill_tokens_per_s, ttft_s (request start -> first token), decode_s (list, one per decode
                   step), decode_tokens_per_s, total_s, engine (per-stage seconds of this request)
    expert_counts  {layer: tokens per routed expert} for this request (prefill + decode)
    """

    text: str
    token_ids: list[int]
    stop_reason: str
    prompt_tokens: int
    cached_tokens: int
    image_sizes: tuple[tuple[int, int], ...]
    grounding: GroundingResult
    timings: dict[str, Any] = field(default_factory=dict)
    expert_counts: dict[str, list[int]] = field(default_factory=dict)

    @property
    def boxes(self):
        """Grounding boxes (Box: label, coords 0..999, xyxy in pixels of the last image)."""
        return self.grounding.boxes

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "stop_reason": self.stop_reason,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "image_sizes": [list(s) for s in self.image_sizes],
            "boxes": [{"label": b.label, "xyxy": None if b.xyxy is None else [round(v, 2) for v in b.xyxy],
                       "coords": list(b.coords)} for b in self.grounding.boxes],
            "grounding": self.grounding.as_dict(),
            "timings": self.timings,
            "expert_counts": self.expert_counts,
        }


# --- the cache ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageSpan:
    start: int  # first slot in the sequence
    end: int  # one past the last slot
    key: bytes  # digest of the image's tiles and grid: same key = same embeddings
    tiles: slice  # its rows of pixel_values
    index: int  # its row of images_spatial_crop


def image_spans(inputs: PreparedInputs) -> list[ImageSpan]:
    """Where each image's slots are, and a digest of its tiles (what its embeddings depend on)."""
    slots = np.flatnonzero(inputs.images_seq_mask)
    spans, s0, t0 = [], 0, 0
    for k, (n, (tw, th)) in enumerate(zip(inputs.num_image_tokens, inputs.images_spatial_crop.tolist())):
        tiles = slice(t0, t0 + 1 + tw * th)
        h = hashlib.blake2b(digest_size=16)
        h.update(np.asarray([tw, th, n], np.int64).tobytes())
        h.update(np.ascontiguousarray(inputs.pixel_values[tiles]).data)
        start = int(slots[s0])
        spans.append(ImageSpan(start, start + int(n), h.digest(), tiles, k))
        s0, t0 = s0 + int(n), tiles.stop
    return spans


@dataclass
class CacheState:
    """What the engine's cache holds: ids[:engine.length] (ids may run one token ahead while a step is in flight)
    and the images whose embeddings are in it, by start position."""

    ids: list[int] = field(default_factory=list)
    images: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # start -> (end, key)


def reusable_prefix(valid_ids: list[int], cached_images: dict[int, tuple[int, bytes]], ids: list[int],
                    spans: list[ImageSpan]) -> int:
    """How many leading positions of `ids` the cache already holds (at most len(ids) - 1)."""
    n = min(len(valid_ids), len(ids) - 1)
    a = np.asarray(valid_ids[:n], np.int64)
    b = np.asarray(ids[:n], np.int64)
    diff = np.flatnonzero(a != b)
    keep = int(diff[0]) if diff.size else n
    for sp in spans:
        if sp.start >= keep:
            break
        if sp.end > keep or cached_images.get(sp.start) != (sp.end, sp.key):
            return sp.start  # an image only partly in the prefix, or another image at this place
    # Every image slot below `keep` is checked: equal ids there mean the new prompt has image slots wherever the
    # cache has them, and each new image below `keep` matched a cached one by (start, end, digest).
    return keep


class Runner:
    """Runs requests on one Engine and remembers what its KV cache holds. Not thread-safe (one request at a
    time; `Stream.cancel()` may be called from another thread)."""

    def __init__(self, engine, processor):
        self.engine = engine
        self.processor = processor
        self.cache = CacheState()
        self.special_ids = special_token_ids(processor.tokenizer)
        self._active: Stream | None = None

    def reset(self) -> None:
        self.close_active()
        self.engine.reset()
        self.cache = CacheState()

    def close_active(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None

    def start(self, inputs: PreparedInputs, params: SamplingParams, *, stop: Iterable[str] | str | None = None,
              chunk_size: int = 512, reuse_cache: bool = True, t_start: float | None = None,
              preprocess_s: float = 0.0, on_finish: Callable[["Result"], None] | None = None) -> "Stream":
        self.close_active()
        if isinstance(stop, str):
            stop = [stop]
        stream = Stream(self, inputs, params, tuple(stop or ()), chunk_size, reuse_cache,
                        t_start if t_start is not None else time.perf_counter(), preprocess_s, on_finish)
        self._active = stream
        return stream


class Stream:
    """Iterator of text deltas for one request. `result` is None until it ends; `finish()` runs it to the end and
    returns the Result; `cancel()` stops at the next token; `close()` stops now. Also a context manager."""

    def __init__(self, runner: Runner, inputs: PreparedInputs, params: SamplingParams, stop: tuple[str, ...],
                 chunk_size: int, reuse_cache: bool, t_start: float, preprocess_s: float,
                 on_finish: Callable[[Result], None] | None):
        self.runner = runner
        self.inputs = inputs
        self.params = params
        self.stop = stop
        self.chunk_size = chunk_size
        self.reuse_cache = reuse_cache
        self.result: Result | None = None
        self.token_ids: list[int] = []
        self.text = ""
        self._cancel = False
        self._on_finish = on_finish
        proc = runner.processor
        self._detok = IncrementalDetokenizer.for_processor(proc, runner.special_ids)
        self._gate = StopGate(self._detok, stop)
        self.grounding = GroundingParser(inputs.image_sizes[-1] if inputs.image_sizes else None)
        self._t = {"t_start": t_start, "preprocess_s": preprocess_s, "vision_s": 0.0, "vision_tiles": 0,
                   "embed_s": 0.0, "prefill_s": 0.0, "prefill_tokens": 0, "ttft_s": None, "decode_s": []}
        self._cached = 0
        eng = runner.engine
        self._engine_t0 = eng.timings.as_dict()
        self._counts0 = {layer: c.copy() for layer, c in eng.expert_counts.counts.items()}
        self._it = self._run()

    # iterator protocol ---------------------------------------------------------------------------------------
    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        return next(self._it)

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def cancel(self) -> None:
        """Stop after the current step or prefill chunk (thread-safe: only sets a flag); the held-back text is still
        yielded."""
        self._cancel = True

    def close(self) -> None:
        """Stop now; result.stop_reason is "cancelled" unless the stream had already ended."""
        self._it.close()
        self._finish("cancelled")

    def finish(self) -> Result:
        """Consume the rest of the stream and return the Result."""
        for _ in self._it:
            pass
        assert self.result is not None
        return self.result

    @property
    def done(self) -> bool:
        return self.result is not None

    # the work ------------------------------------------------------------------------------------------------
    def _emit(self, delta: str) -> str:
        self.text += delta
        self.grounding.feed(delta)
        return delta

    def _prefill(self) -> np.ndarray:
        eng, runner, inp = self.runner.engine, self.runner, self.inputs
        ids = inp.input_ids.tolist()
        spans = image_spans(inp)
        state = runner.cache
        valid = state.ids[:min(eng.length, len(state.ids))]
        keep = reusable_prefix(valid, state.images, ids, spans) if self.reuse_cache else 0
        # rewind: positions >= keep are rewritten; nothing past engine.length is ever read
        eng.truncate(keep)
        runner.cache = CacheState(list(ids), {sp.start: (sp.end, sp.key) for sp in spans})
        self._cached = keep
        new = [sp for sp in spans if sp.start >= keep]
        if new:
            pixel_values = np.concatenate([inp.pixel_values[sp.tiles] for sp in new])
            crop = inp.images_spatial_crop[[sp.index for sp in new]]
        else:
            pixel_values, crop = None, None
        v0 = eng.timings.vision
        t0 = time.perf_counter()
        embeds = eng.embed(inp.input_ids[keep:], pixel_values, inp.images_seq_mask[keep:], crop)
        t1 = time.perf_counter()
        logits = eng.prefill(embeds, self.chunk_size, stop=lambda: self._cancel)
        t2 = time.perf_counter()
        vision = eng.timings.vision - v0
        self._t.update(vision_s=vision, vision_tiles=0 if pixel_values is None else len(pixel_values),
                       embed_s=t1 - t0 - vision, prefill_s=t2 - t1, prefill_tokens=len(ids) - keep)
        return logits

    def _run(self):
        eng, proc, p = self.runner.engine, self.runner.processor, self.params
        reason = None
        try:
            logits = self._prefill()
            if logits is None:  # cancelled between prefill chunks: no token
                reason = "cancelled"
                return
            sampler = Sampler(p)
            seen: set[int] = set(self.inputs.input_ids.tolist()) if p.repetition_penalty != 1.0 else set()
            cache_ids = self.runner.cache.ids
            while True:
                if self._cancel:
                    reason = "cancelled"
                    break
                tok = sampler(logits, np.fromiter(seen, np.int64, len(seen)) if seen else ())
                self.token_ids.append(tok)
                if self._t["ttft_s"] is None:
                    self._t["ttft_s"] = time.perf_counter() - self._t["t_start"]
                if tok == proc.eos_id:
                    reason = "eos"
                    break
                delta = self._gate.push(tok)
                if delta:
                    yield self._emit(delta)
                if self._gate.stopped:
                    reason = "stop"
                    break
                if len(self.token_ids) >= p.max_new_tokens:
                    reason = "max_new_tokens"
                    break
                if eng.length >= eng.max_len:
                    reason = "context"
                    break
                if self._cancel:
                    reason = "cancelled"
                    break
                if p.repetition_penalty != 1.0:
                    seen.add(tok)
                cache_ids.append(tok)
                t0 = time.perf_counter()
                logits = eng.decode(tok)
                self._t["decode_s"].append(time.perf_counter() - t0)
            tail = self._gate.finish()
            if self._gate.stopped:
                reason = "stop"
            if tail:
                yield self._emit(tail)
        except (GeneratorExit, KeyboardInterrupt):  # closed, or Ctrl-C in the middle of a step: cancelled, not an error
            reason = reason or "cancelled"
            raise
        except BaseException:
            reason = reason or "error"
            raise
        finally:
            self._finish(reason or "cancelled")

    def _finish(self, reason: str) -> None:
        if self.result is not None:
            return
        eng = self.runner.engine
        t = self._t
        decode = t["decode_s"]
        engine_now = eng.timings.as_dict()
        counts = {}
        for layer, c in eng.expert_counts.counts.items():
            d = c - self._counts0.get(layer, 0)
            if d.any():
                counts[str(layer)] = d.tolist()
        timings = {
            "preprocess_s": t["preprocess_s"],
            "vision_s": t["vision_s"],
            "vision_tiles": t["vision_tiles"],
            "embed_s": t["embed_s"],
            "prefill_s": t["prefill_s"],
            "prefill_tokens": t["prefill_tokens"],
            "prefill_tokens_per_s": t["prefill_tokens"] / t["prefill_s"] if t["prefill_s"] > 0 else None,
            "ttft_s": t["ttft_s"],
            "decode_s": decode,
            "decode_tokens_per_s": len(decode) / sum(decode) if decode and sum(decode) > 0 else None,
            "total_s": time.perf_counter() - t["t_start"],
            "engine": {k: engine_now[k] - self._engine_t0.get(k, 0.0) for k in engine_now},
        }
        self.result = Result(
            text=self.text, token_ids=list(self.token_ids), stop_reason=reason, prompt_tokens=self.inputs.seq_len,
            cached_tokens=self._cached, image_sizes=self.inputs.image_sizes, grounding=self.grounding.close(),
            timings=timings, expert_counts=counts)
        if self.runner._active is self:
            self.runner._active = None
        if self._on_finish is not None:
            self._on_finish(self.result)

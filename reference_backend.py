"""The PyTorch reference behind the runtime's front door: processor -> model/ -> streamed text -> grounding.

`vl2edge run/chat --backend torch` and `vl2edge demo --backend torch` use this to run a Hugging Face checkpoint
directory end to end. It is the comparison path (only it needs torch; torch is imported when a model is loaded);
the lean runtime never imports this module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

from .runtime.grounding import GroundingResult, parse_grounding
from .runtime.images import OFFICIAL_PIXELS
from .runtime.processor import Processor


@dataclass
class ReferenceAnswer:
    text: str
    token_ids: list[int]
    stop_reason: str
    prompt_tokens: int
    image_sizes: tuple
    grounding: GroundingResult
    timings: dict = field(default_factory=dict)  # seconds
    cached_tokens: int = 0  # the reference re-runs the whole conversation every turn
    expert_counts: dict | None = None  # not recorded by the reference

    @property
    def boxes(self):
        return self.grounding.boxes

    def as_dict(self) -> dict:
        return {
            "text": self.text, "token_ids": list(self.token_ids), "stop_reason": self.stop_reason,
            "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
            "image_sizes": [list(s) for s in self.image_sizes],
            "boxes": [{"label": b.label, "xyxy": None if b.xyxy is None else [round(v, 2) for v in b.xyxy],
                       "coords": list(b.coords)} for b in self.grounding.boxes],
            "grounding": self.grounding.as_dict(), "timings": self.timings, "expert_counts": self.expert_counts,
        }


class ReferenceModel:
    """A checkpoint loaded once into the PyTorch reference; `generate` answers a prompt or conversation with the
    same processor, streaming, stop strings and grounding as the runtime (no cache reuse between calls)."""

    def __init__(self, checkpoint: str | Path, *, dtype: str = "float32", max_tiles: int | None = None,
                 threads: int | None = None, official_pixels: bool = False):
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype {dtype!r}: choose float32 or bfloat16")
        from .model.checkpoint import Checkpoint

        t0 = time.perf_counter()
        ckpt = Checkpoint.open(checkpoint)  # a directory or a hub repo id; a bad one fails before torch loads
        self.processor = Processor.from_dir(ckpt.dir, max_tiles=max_tiles,
                                            **(OFFICIAL_PIXELS if official_pixels else {}))

        import torch

        from .model.vl2 import DeepseekVL2

        if threads:
            torch.set_num_threads(threads)
        self.model = DeepseekVL2.from_checkpoint(ckpt, dtype={"float32": torch.float32,
                                                              "bfloat16": torch.bfloat16}[dtype])
        self.load_s = time.perf_counter() - t0

    def reset(self) -> None:
        """Nothing is cached between calls."""

    def generate(self, messages, images=None, *, sampling=None, stop=None,
                 on_text: Callable[[str], None] | None = None, interruptible: bool = False) -> ReferenceAnswer:
        """sampling: model.generate.SamplingConfig (default greedy, 512 tokens); stop: strings that end the answer
        (not included). interruptible: KeyboardInterrupt ends the answer ("cancelled") instead of propagating."""
        from .model.generate import SamplingConfig, generate
        from .runtime.detokenizer import IncrementalDetokenizer
        from .runtime.generation import StopGate

        processor = self.processor
        t0 = time.perf_counter()
        inputs = processor(messages, images=images)
        t1 = time.perf_counter()
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        gate = StopGate(IncrementalDetokenizer.for_processor(processor), stops)
        emitted: list[str] = []

        def emit(delta: str) -> None:
            if delta:
                emitted.append(delta)
                if on_text:
                    on_text(delta)

        def stream(tok: int):
            if tok == processor.eos_id:
                return None
            emit(gate.push(tok))
            return False if gate.stopped else None

        try:
            result = generate(self.model, inputs.input_ids, inputs.pixel_values, inputs.images_seq_mask,
                              inputs.images_spatial_crop, sampling or SamplingConfig(), eos_token_id=processor.eos_id,
                              on_token=stream)
            tokens, reason, timings = result.tokens, result.stop_reason, result.timings
        except KeyboardInterrupt:
            if not interruptible:
                raise
            tokens, reason, timings = [], "cancelled", {"embed": 0.0, "prefill": 0.0, "decode": []}
        if reason != "cancelled" or gate.stopped:
            emit(gate.finish())
        if gate.stopped:
            reason = "stop"
        text = "".join(emitted)
        image_size = inputs.image_sizes[-1] if inputs.image_sizes else None  # boxes refer to the last image
        decode = timings["decode"]
        return ReferenceAnswer(
            text=text, token_ids=tokens, stop_reason=reason, prompt_tokens=inputs.seq_len,
            image_sizes=inputs.image_sizes, grounding=parse_grounding(text, image_size),
            timings={"preprocess_s": t1 - t0, "load_s": self.load_s, "vision_and_embed_s": timings["embed"],
                     "prefill_s": timings["prefill"],
                     "decode_tokens_per_s": len(decode) / sum(decode) if decode and sum(decode) > 0 else None},
        )


def answer(checkpoint: str | Path, messages, images=None, *, dtype: str = "float32", max_tiles: int | None = None,
           sampling=None, on_text: Callable[[str], None] | None = None, threads: int | None = None,
           stop=None) -> ReferenceAnswer:
    """One-shot: load the checkpoint into the reference and answer."""
    return ReferenceModel(checkpoint, dtype=dtype, max_tiles=max_tiles, threads=threads).generate(
        messages, images, sampling=sampling, stop=stop, on_text=on_text)


def demo_image(width: int = 640, height: int = 480) -> Image.Image:
    """A small synthetic scene (table, red mug, blue book, window) for the demo: no image file ships with us."""
    im = Image.new("RGB", (width, height), (200, 215, 230))
    d = ImageDraw.Draw(im)
    d.rectangle([0, int(height * 0.62), width, height], fill=(140, 100, 60))  # table
    d.rectangle([int(width * 0.62), int(height * 0.08), int(width * 0.92), int(height * 0.42)],
                fill=(235, 245, 255), outline=(90, 90, 90), width=4)  # window
    d.rectangle([int(width * 0.18), int(height * 0.40), int(width * 0.32), int(height * 0.64)], fill=(200, 30, 30))
    d.ellipse([int(width * 0.30), int(height * 0.45), int(width * 0.37), int(height * 0.56)], outline=(200, 30, 30),
              width=6)  # mug handle
    d.rectangle([int(width * 0.48), int(height * 0.55), int(width * 0.70), int(height * 0.63)], fill=(40, 70, 180))
    return im

"""The PyTorch reference behind the runtime's front door: processor -> model/ -> streamed text -> grounding.

`vl2edge run --backend torch` and `vl2edge demo` use this to run a Hugging Face checkpoint directory end to end. It
is the comparison path (only it needs torch); the lean runtime never imports this module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

from .runtime.grounding import GroundingResult, parse_grounding
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


def _new_text(processor: Processor, tokens: list[int], emitted: str) -> str:
    """The text the tokens add beyond what was already emitted; held back while it ends in a partial UTF-8
    character (byte-level BPE can split one across tokens)."""
    text = processor.decode(tokens)
    if text.endswith("\ufffd") or not text.startswith(emitted):
        return ""
    return text[len(emitted):]


def answer(checkpoint: str | Path, messages, images=None, *, dtype: str = "float32", max_tiles: int | None = None,
           sampling=None, on_text: Callable[[str], None] | None = None, threads: int | None = None) -> ReferenceAnswer:
    import torch

    from .model.generate import SamplingConfig, generate
    from .model.vl2 import DeepseekVL2

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    processor = Processor.from_dir(checkpoint, max_tiles=max_tiles)
    inputs = processor(messages, images=images)
    t1 = time.perf_counter()
    model = DeepseekVL2.from_checkpoint(checkpoint, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
    t2 = time.perf_counter()

    tokens: list[int] = []
    emitted = [""]

    def stream(tok: int):
        if tok == processor.eos_id:
            return
        tokens.append(tok)
        delta = _new_text(processor, tokens, emitted[0])
        if delta:
            emitted[0] += delta
            if on_text:
                on_text(delta)

    result = generate(model, inputs.input_ids, inputs.pixel_values, inputs.images_seq_mask,
                      inputs.images_spatial_crop, sampling or SamplingConfig(), eos_token_id=processor.eos_id,
                      on_token=stream)
    text = processor.decode(tokens)
    if on_text and text[len(emitted[0]):]:
        on_text(text[len(emitted[0]):])
    image_size = inputs.image_sizes[-1] if inputs.image_sizes else None  # boxes refer to the last image
    decode = result.timings["decode"]
    return ReferenceAnswer(
        text=text, token_ids=result.tokens, stop_reason=result.stop_reason, prompt_tokens=inputs.seq_len,
        image_sizes=inputs.image_sizes, grounding=parse_grounding(text, image_size),
        timings={"preprocess_s": t1 - t0, "load_s": t2 - t1, "vision_and_embed_s": result.timings["embed"],
                 "prefill_s": result.timings["prefill"],
                 "decode_tokens_per_s": len(decode) / sum(decode) if decode else None},
    )


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

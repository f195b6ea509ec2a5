"""The workload: what is measured and how often, identical for the runtime and the PyTorch reference.

  images      one synthetic scene per size, each its own tile grid (global view + local tiles):
              384x384 -> 1x1 (2 tiles), 640x480 -> 2x2 (5), 1920x1080 -> 4x2 (9), 1000x200 -> 3x1 (4)
  prefill     a text prompt of `prefill_tokens` filler tokens into an empty cache, in chunks of `chunk_size`
  ttft        one 640x480 image + a short question, request start -> first token (greedy), cache not reused
  decode      at each context length C: the cache holds C tokens (filler), then `decode_warmup` untimed and
              `decode_steps` timed single-token steps, greedy; `decode_repeats` rounds, each over every C from the
              longest down (the cache is rewound between contexts and filled again between rounds), so a drift of
              the machine's speed falls on all contexts alike (the runtime; the reference repeats each C in a row).
              Where C + warmup + steps would overrun the cache, C is lowered so that the last step fills it (the 4k
              point of a 4096-token model starts at 4096 - warmup - steps).

Every figure is the median over repeats with its spread (bench/stats.py); one untimed warm-up precedes each kind
of measurement. `full()` is the headline run, `quick()` a run of a few minutes (used with a truncated model),
`tiny()` what the unit tests use.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

IMAGE_SIZES = ((384, 384), (640, 480), (1920, 1080), (1000, 200))
TTFT_IMAGE = (640, 480)
QUESTION = "What is on the table?"
FILLER = ("The quick brown fox jumps over the lazy dog while the five boxing wizards jump quickly. "
          "Pack my box with five dozen liquor jugs. ")


@dataclass(frozen=True)
class Workload:
    image_sizes: tuple[tuple[int, int], ...] = IMAGE_SIZES
    vision_repeats: int = 3
    ttft_image: tuple[int, int] = TTFT_IMAGE
    question: str = QUESTION
    ttft_repeats: int = 3
    prefill_tokens: int = 1024
    prefill_repeats: int = 3
    chunk_size: int = 512
    contexts: tuple[int, ...] = (512, 1024, 2048, 4096)
    decode_warmup: int = 4
    decode_steps: int = 32
    decode_repeats: int = 3
    # the reference is 4-5x slower per step: fewer steps, same contexts
    reference_decode_steps: int = 16
    reference_decode_repeats: int = 3
    reference_vision_repeats: int = 2
    reference_ttft_repeats: int = 2
    reference_fill: str = "random"  # the reference cache is filled with random values up to C (not a prefill)
    extra: dict = field(default_factory=dict)

    @classmethod
    def full(cls) -> "Workload":
        return cls()

    @classmethod
    def quick(cls) -> "Workload":
        return cls(image_sizes=((384, 384), TTFT_IMAGE), vision_repeats=1, ttft_repeats=1, prefill_repeats=2,
                   contexts=(512, 4096), decode_warmup=2, decode_steps=12, decode_repeats=2,
                   reference_decode_steps=8, reference_decode_repeats=1, reference_vision_repeats=1,
                   reference_ttft_repeats=1)

    @classmethod
    def tiny(cls) -> "Workload":
        """For the unit tests on test presets: everything runs, nothing is long."""
        return cls(image_sizes=((384, 384), TTFT_IMAGE), vision_repeats=1, ttft_repeats=1, prefill_tokens=64,
                   prefill_repeats=1, chunk_size=32, contexts=(32, 96), decode_warmup=1, decode_steps=3,
                   decode_repeats=1, reference_decode_steps=2, reference_decode_repeats=1,
                   reference_vision_repeats=1, reference_ttft_repeats=1)

    def with_(self, **changes) -> "Workload":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict:
        d = asdict(self)
        d["image_sizes"] = [list(s) for s in self.image_sizes]
        d["ttft_image"] = list(self.ttft_image)
        d["contexts"] = list(self.contexts)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Workload":
        d = dict(d)
        d["image_sizes"] = tuple(tuple(s) for s in d["image_sizes"])
        d["ttft_image"] = tuple(d["ttft_image"])
        d["contexts"] = tuple(d["contexts"])
        return cls(**d)


def decode_start(context: int, max_len: int, warmup: int, steps: int) -> int:
    """Where the cache is filled to before a decode measurement at `context` (see the module docstring)."""
    return max(0, min(context, max_len - warmup - steps))


def synthetic_image(width: int, height: int):
    """A deterministic scene (the demo's table, mug, book, window) at this size. Its content does not change the
    cost: only the size (the tile grid) does."""
    from ..reference_backend import demo_image

    return demo_image(width, height)


def filler_ids(encode, n: int) -> np.ndarray:
    """n token ids of ordinary text (the FILLER sentence repeated), from the model's own tokenizer."""
    base = np.asarray(encode(FILLER), np.int64)
    if len(base) == 0:
        raise ValueError("the tokenizer encodes the filler text to nothing")
    return np.resize(base, n)

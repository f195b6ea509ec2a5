"""Next-token selection in numpy, with the semantics of the PyTorch reference (model/generate.py `next_token`).

Hugging Face's processor order: repetition penalty over every id seen so far (prompt + generated; a positive logit
is divided by the penalty, a negative one multiplied), then temperature, top-k (keeps every token tied with the
k-th), top-p (nucleus: drops the least likely tokens whose cumulative probability is <= 1 - top_p, always keeping
the most likely one), then one draw from the softmax. Temperature 0 is greedy (argmax after the penalty; ties to
the lowest id, as torch.argmax).

The draw uses a numpy Generator seeded per request (`seed`), so a seeded request is reproducible on every platform;
it cannot reproduce torch's random stream, only its distribution. Official defaults: inference.py T 0.4, top_p 0.9,
repetition penalty 1.1; the README is greedy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def as_dict(self) -> dict:
        return asdict(self)


def apply_repetition_penalty(logits: np.ndarray, seen: Iterable[int] | np.ndarray, penalty: float) -> np.ndarray:
    """A penalized copy of logits [V] (every distinct seen id once, as torch's indexed assignment does)."""
    logits = np.array(logits, dtype=np.float32, copy=True)
    seen = np.unique(np.fromiter(seen, np.int64) if not isinstance(seen, np.ndarray) else seen.astype(np.int64))
    if penalty != 1.0 and seen.size:
        prev = logits[seen]
        logits[seen] = np.where(prev > 0, prev / np.float32(penalty), prev * np.float32(penalty))
    return logits


def filter_logits(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature, top-k, top-p on (already penalized) logits [V]: a copy with dropped tokens at -inf."""
    x = np.asarray(logits, dtype=np.float32) / np.float32(params.temperature)
    if params.top_k > 0:
        k = min(params.top_k, x.size)
        kth = np.partition(x, x.size - k)[x.size - k]
        x = np.where(x < kth, -np.inf, x).astype(np.float32)
    if params.top_p < 1.0:
        order = np.argsort(x, kind="stable")  # ascending, as torch.sort(descending=False)
        cum = np.cumsum(_softmax(x[order]))
        drop = cum <= 1 - params.top_p
        drop[-1] = False  # always keep the most likely token
        x = x.copy()
        x[order[drop]] = -np.inf
    return x


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


class Sampler:
    """`sampler(logits, seen) -> token id`; one per request (it owns the request's random stream)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def probabilities(self, logits: np.ndarray, seen) -> np.ndarray:
        """The distribution the next token is drawn from (a one-hot for greedy)."""
        x = apply_repetition_penalty(logits, seen, self.params.repetition_penalty)
        if self.params.greedy:
            p = np.zeros(x.size, np.float64)
            p[int(np.argmax(x))] = 1.0
            return p
        return _softmax(filter_logits(x, self.params).astype(np.float64))

    def __call__(self, logits: np.ndarray, seen) -> int:
        x = apply_repetition_penalty(logits, seen, self.params.repetition_penalty)
        if self.params.greedy:
            return int(np.argmax(x))
        p = _softmax(filter_logits(x, self.params).astype(np.float64))
        cum = np.cumsum(p)
        # inverse CDF: the first index whose cumulative probability exceeds u * total (never a zero-probability id)
        i = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
        return i if i < p.size else int(np.flatnonzero(p)[-1])

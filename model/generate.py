"""Generation with the PyTorch reference: chunked prefill, then one token per step over the preallocated cache.

This is the baseline the benchmarks compare against, so it is an honest eager implementation: static KV cache
written in place, SDPA attention, experts run once per step on the tokens routed to them, logits of the last
position only. Sampling follows Hugging Face's processor order (repetition penalty over prompt + generated ids,
then temperature, top-k, top-p); temperature 0 is greedy. The official inference.py uses T 0.4, top_p 0.9,
repetition penalty 1.1; the README uses greedy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .vl2 import DeepseekVL2


@dataclass
class SamplingConfig:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None


@dataclass
class GenerationResult:
    tokens: list[int]
    stop_reason: str  # "eos", "max_new_tokens", "context" or "cancelled"
    timings: dict = field(default_factory=dict)  # seconds: embed (incl. vision), prefill, decode (list per token)


def next_token(logits: torch.Tensor, seen: torch.Tensor, s: SamplingConfig, gen: torch.Generator | None) -> int:
    """logits [V] fp32 -> token id."""
    logits = logits.clone()
    if s.repetition_penalty != 1.0 and len(seen):
        prev = logits[seen]
        logits[seen] = torch.where(prev > 0, prev / s.repetition_penalty, prev * s.repetition_penalty)
    if s.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - s.top_p
        drop[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=gen))


@torch.inference_mode()
def generate(model: DeepseekVL2, input_ids, pixel_values=None, images_seq_mask=None, images_spatial_crop=None,
             sampling: SamplingConfig | None = None, eos_token_id: int | None = None,
             chunk_size: int = 512, on_token: Callable[[int], bool | None] | None = None) -> GenerationResult:
    """`on_token(id)` is called for every generated token; returning False stops generation ("cancelled")."""
    s = sampling or SamplingConfig()
    cfg = model.cfg.language
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    gen = torch.Generator().manual_seed(s.seed) if s.seed is not None else None

    t0 = time.perf_counter()
    x = model.embed(input_ids, pixel_values, images_seq_mask, images_spatial_crop)
    t1 = time.perf_counter()
    prompt_len = x.shape[1]
    room = cfg.max_position_embeddings - prompt_len
    if room <= 0:
        raise ValueError(f"prompt of {prompt_len} tokens leaves no room in the context of "
                         f"{cfg.max_position_embeddings} (over by {1 - room})")
    cache = model.new_cache(prompt_len + min(s.max_new_tokens, room))
    step = chunk_size if chunk_size > 0 else prompt_len
    for c in range(0, prompt_len, step):  # incremental prefill: bounded activation memory per chunk
        logits = model.language(x[:, c:c + step], cache)
    t2 = time.perf_counter()

    seen = torch.as_tensor(list(input_ids), dtype=torch.long).reshape(-1)
    tokens, decode_times, reason = [], [], "max_new_tokens"
    embed = model.language.model.embed_tokens
    while True:
        tok = next_token(logits[0, -1], seen, s, gen)
        tokens.append(tok)
        if on_token is not None and on_token(tok) is False:
            reason = "cancelled"
            break
        if tok == eos:
            reason = "eos"
            break
        if len(tokens) >= s.max_new_tokens:
            break
        if cache.length >= cache.max_len:
            reason = "context"
            break
        seen = torch.cat([seen, torch.tensor([tok])])
        ts = time.perf_counter()
        logits = model.language(embed(torch.tensor([[tok]])), cache)
        decode_times.append(time.perf_counter() - ts)
    return GenerationResult(tokens, reason, {"embed": t1 - t0, "prefill": t2 - t1, "decode": decode_times})

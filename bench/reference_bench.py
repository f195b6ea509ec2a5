"""The PyTorch reference (model/, eager) on the checkpoint: the same workload as the runtime, in THIS process.

fp32 or bf16 weights (DeepseekVL2.from_checkpoint), torch.set_num_threads(threads), torch.inference_mode, CPU.
Every weight is materialized in memory after loading: a tensor already in the checkpoint's dtype (bf16 from a bf16
checkpoint) would otherwise stay a view of the memory-mapped safetensors file, and the timed steps would include
the page faults that read it from disk whenever the page cache has been evicted (observed: the bf16 decode went
from 213 to 350 ms/token after the fp32 reference's 17 GB load ran just before it).
Same processor, images, filler text and contexts as bench/runtime_bench.py:
  vision    model.encode_images(tiles) (all of an image's tiles in one batch, as the reference runs them).
  prefill   model.language over filler embeddings into an empty cache, in chunks of chunk_size (as generate()).
  ttft      processor + model/generate.generate(max_new_tokens=1): request start -> first token.
  decode    one model.language step per token over a cache of C tokens (the loop of generate(): embed the token,
            forward, argmax outside the timed call). To keep it affordable the cache is NOT prefilled to C: its
            first C positions are filled with random values (N(0, 1)) and its length set to C. The cost of a step
            does not depend on the cached values (dense attention over C positions; routing depends on the
            token, not on the cache), so the step time is what a real C-token context would give, without a 4k
            prefill at reference speed.
  memory    RSS after load and after each phase, the peak of the whole run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from . import memory
from .machine import load_average
from .runtime_bench import _log
from .stats import summarize
from .workload import Workload, decode_start, filler_ids, synthetic_image


def bench_reference(checkpoint: str | Path, dtype: str, threads: int | None, workload: Workload,
                    max_len: int | None = None, progress: bool = True) -> dict:
    """The whole workload on the reference. max_len: the cache size the contexts are clamped to (the runtime
    artifact's, so that both decode at the same positions; default the model's context)."""
    import torch

    from ..model.generate import SamplingConfig, generate
    from ..model.vl2 import DeepseekVL2
    from ..runtime.processor import Processor

    w = workload
    label = f"reference {dtype}"
    t_start = time.perf_counter()
    loads = {"start": load_average()}
    if threads:
        torch.set_num_threads(threads)
    phases = {"start": memory.rss()}
    t0 = time.perf_counter()
    model = DeepseekVL2.from_checkpoint(checkpoint, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
    for p in model.parameters():  # in memory, not served from the checkpoint's file mapping (see the docstring)
        p.data = p.data.clone()
    load_s = time.perf_counter() - t0
    phases["loaded"] = memory.rss()
    proc = Processor.from_dir(checkpoint)
    cfg = model.cfg.language
    max_len = max_len or cfg.max_position_embeddings
    _log(progress, f"{label}: loaded in {load_s:.1f} s, RSS {phases['loaded']['rss'] / 2**30:.2f} GiB")
    out = {"dtype": dtype, "checkpoint": str(checkpoint), "device": "cpu", "threads": torch.get_num_threads(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_s": load_s, "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}

    with torch.inference_mode():
        # vision ------------------------------------------------------------------------------------------------
        rows, warm = [], False
        for size in w.image_sizes:
            image = synthetic_image(*size)
            pre, vis, inp = [], [], None
            for _ in range(w.reference_vision_repeats + (0 if warm else 1)):
                t0 = time.perf_counter()
                inp = proc("<image>\n" + w.question, images=[image])
                t1 = time.perf_counter()
                model.encode_images(torch.from_numpy(inp.pixel_values))
                t2 = time.perf_counter()
                if not warm:
                    warm = True
                    continue
                pre.append(t1 - t0)
                vis.append(t2 - t1)
            tiles = int(len(inp.pixel_values))
            s = summarize(vis)
            rows.append({"size": list(size), "grid": [int(x) for x in inp.images_spatial_crop[0]], "tiles": tiles,
                         "image_tokens": int(inp.num_image_tokens[0]), "image_s": s,
                         "preprocess_s": summarize(pre), "ms_per_image": s["median"] * 1e3,
                         "ms_per_tile": s["median"] * 1e3 / tiles})
            _log(progress, f"{label}: vision {size[0]}x{size[1]} ({tiles} tiles): "
                           f"{s['median'] * 1e3 / tiles:.0f} ms/tile")
        out["vision"] = rows
        phases["after_vision"], loads["after_vision"] = memory.rss(), load_average()

        # prefill -----------------------------------------------------------------------------------------------
        embed = model.language.model.embed_tokens
        ids = torch.from_numpy(filler_ids(proc.encode, w.prefill_tokens)).reshape(1, -1)
        times = []
        for r in range(w.prefill_repeats + 1):
            x = embed(ids)
            cache = model.new_cache(w.prefill_tokens)
            t0 = time.perf_counter()
            for c in range(0, w.prefill_tokens, w.chunk_size):
                model.language(x[:, c:c + w.chunk_size], cache)
            if r:
                times.append(time.perf_counter() - t0)
            del cache
        s = summarize(times)
        out["prefill"] = {"tokens": w.prefill_tokens, "chunk_size": w.chunk_size, "s": s,
                          "tokens_per_s": w.prefill_tokens / s["median"]}
        _log(progress, f"{label}: prefill {w.prefill_tokens} tokens: {w.prefill_tokens / s['median']:.1f} tokens/s")
        phases["after_prefill"], loads["after_prefill"] = memory.rss(), load_average()

        # time to first token -----------------------------------------------------------------------------------
        image = synthetic_image(*w.ttft_image)
        ttft, breakdown = [], []
        prompt_tokens = tiles = None
        for _ in range(w.reference_ttft_repeats):
            t0 = time.perf_counter()
            inp = proc("<image>\n" + w.question, images=[image])
            t1 = time.perf_counter()
            res = generate(model, inp.input_ids, inp.pixel_values, inp.images_seq_mask, inp.images_spatial_crop,
                           SamplingConfig(max_new_tokens=1), eos_token_id=proc.eos_id, chunk_size=w.chunk_size)
            ttft.append(time.perf_counter() - t0)
            breakdown.append({"preprocess_s": t1 - t0, "vision_and_embed_s": res.timings["embed"],
                              "prefill_s": res.timings["prefill"]})
            prompt_tokens, tiles = inp.seq_len, len(inp.pixel_values)
        s = summarize(ttft)
        out["ttft"] = {"image": list(w.ttft_image), "question": w.question, "prompt_tokens": prompt_tokens,
                       "vision_tiles": tiles, "s": s, "ttft_s": s["median"],
                       "breakdown_s": {k: summarize(b[k] for b in breakdown)["median"] for k in breakdown[0]}}
        _log(progress, f"{label}: TTFT ({prompt_tokens} tokens): {s['median']:.2f} s")
        phases["after_ttft"], loads["after_ttft"] = memory.rss(), load_average()

        # decode at each context (cache filled with random values) ----------------------------------------------
        steps_n, warmup = w.reference_decode_steps, w.decode_warmup
        starts = {c: decode_start(c, max_len, warmup, steps_n) for c in sorted(set(w.contexts))}
        cache = model.new_cache(max(starts.values()) + warmup + steps_n)
        gen = torch.Generator().manual_seed(0)
        for buf in (getattr(cache, "latent", None) or (cache.k + cache.v)):
            buf.copy_(torch.randn(buf.shape, generator=gen).to(buf.dtype))
        fill = filler_ids(proc.encode, max_len)
        rows = []
        for ctx, start in starts.items():
            steps = []
            for _ in range(w.reference_decode_repeats):
                cache.length = start
                tok = int(fill[start])
                for i in range(warmup + steps_n):
                    t0 = time.perf_counter()
                    logits = model.language(embed(torch.tensor([[tok]])), cache)
                    dt = time.perf_counter() - t0
                    if i >= warmup:
                        steps.append(dt)
                    tok = int(torch.argmax(logits[0, -1]))
            s = summarize(steps)
            rows.append({"context": ctx, "start": start, "end": start + warmup + steps_n, "steps": steps_n,
                         "warmup": warmup, "repeats": w.reference_decode_repeats, "step_s": s,
                         "ms_per_token": s["median"] * 1e3, "tokens_per_s": 1.0 / s["median"],
                         "cache_fill": "random"})
            _log(progress, f"{label}: decode @{ctx}: {s['median'] * 1e3:.1f} ms/token "
                           f"({1 / s['median']:.2f} tokens/s)")
        out["decode"] = rows
        kv = cache.nbytes()
        del cache
        phases["after_decode"] = memory.rss()

    out["memory"] = {"peak_rss_bytes": phases["after_decode"]["peak"], "rss_after_load_bytes": phases["loaded"]["rss"],
                     "kv_cache_bytes": kv, "phases": phases}
    out["load_average"] = {**loads, "end": load_average()}
    out["wall_s"] = time.perf_counter() - t_start
    return out

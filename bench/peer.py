"""llama.cpp beside the runtime, in the same run: decode at several depths and prefill, alternated rounds, each
side's median and range and the ratio with its range.

  python -m vl2edge.bench.peer ARTIFACT --llama-bench BIN --gguf FILE [--threads 2] [--depths 0,2048]
                               [--decode-tokens 64] [--prefill 512] [--rounds 3] [--json OUT]

llama.cpp cannot run DeepSeek-VL2, but it runs its language model's shapes (../shared/peer-llamacpp/ builds
llama-bench and random Q4_0 GGUFs of Tiny's and Small's LM). On this class of machine only a ratio measured side by
side means anything (the same llama-bench gave 18.9-24.9 tok/s one day and 33.8 another), so every round measures
both, the side that goes first alternating from round to round, at the same threads and contexts:
  ours    the artifact's Engine in this process, loaded afresh every round as llama-bench loads its model (where a
          load's buffers land moves its decode: five loads in one process gave 37-59 tok/s on real-dims Tiny at
          depth 0, 2026-12-03), with a warm-up run first (the first runs of every session allocate and pack):
          prefill = `prefill` filler tokens into an empty cache (tokens/s);
          decode at depth d = `decode_tokens` greedy steps after a prefill of max(d, 1) filler tokens and
          WARMUP_STEPS untimed steps, timed step by step (tokens/s = steps / their summed time); a warm-up prefill
          before the timed one (llama-bench too warms up before each test);
  theirs  `llama-bench -m GGUF -t T -p P -n N -d D1,D2.. -r 1 -o json` (pp P at depth 0, tg N at each depth).
The ratio of a round is ours / theirs in tokens/s; the report gives its median and range over rounds.

Bytes per token and the roofline (bench/step_bytes.py): each decode row carries the bytes a step reads on each side
at the timed steps' mean context (ours from the artifact's initializers, theirs from the GGUF's tensors), the
effective rate bytes x tokens/s, and that rate against two ceilings measured in every round at the same threads:
a streaming read of 1 GiB (bench/machine.measure_bandwidth) and onnxruntime's 8-bit MatMulNBits GEMV over 256 MiB
(bench/machine.measure_gemv_bandwidth).
The bytes also bound the ratio: `ratio_at_stream` is, round by round, the ratio ours would have if a step read its
bytes at 100% of that round's streaming read, against llama.cpp as measured (stream / our bytes / their tokens/s).
Kernels can move the ratio up to it; past it only fewer bytes can (docs/benchmarks.md uses it for issue 30's targets).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def llama_bench(binary: Path, gguf: Path, threads: int, prefill: int, decode_tokens: int, depths: list[int],
                timeout: float = 3600) -> dict[str, float]:
    """One llama-bench call -> {"prefill": tok/s at depth 0, "decode@D": tok/s} (its JSON output's avg_ts)."""
    binary = Path(binary)
    if not binary.is_file():
        raise FileNotFoundError(f"{binary}: no llama-bench binary (../shared/peer-llamacpp/build.sh makes one)")
    if not Path(gguf).is_file():
        raise FileNotFoundError(f"{gguf}: no GGUF model")
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-p", str(prefill), "-n", str(decode_tokens),
           "-d", ",".join(map(str, depths)), "-r", "1", "-o", "json"]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = str(binary.parent) + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"llama-bench failed ({p.returncode}): {p.stderr.strip()[-800:]}")
    try:
        records = json.loads(p.stdout)
    except json.JSONDecodeError as e:
        raise RuntimeError(f"llama-bench printed no JSON ({e}): {p.stdout[:200]!r}") from None
    out = {}
    for r in records:
        depth = int(r.get("n_depth", 0))
        if r.get("n_prompt", 0) and not r.get("n_gen", 0) and depth == 0:
            out["prefill"] = float(r["avg_ts"])
        elif r.get("n_gen", 0) and not r.get("n_prompt", 0):
            out[f"decode@{depth}"] = float(r["avg_ts"])
    missing = {"prefill", *(f"decode@{d}" for d in depths)} - set(out)
    if missing:
        raise RuntimeError(f"llama-bench's output lacks {sorted(missing)}")
    return out


WARMUP_STEPS = 4  # untimed decode steps before each timed run, as llama-bench warms up before each test


def ours(engine, prefill: int, decode_tokens: int, depths: list[int]) -> dict[str, float]:
    """The same measurements on the runtime's Engine (module docstring)."""
    vocab = engine.config.language.vocab_size
    ids = np.random.default_rng(0).integers(100, vocab - 100, max([prefill, *depths]) + 1)
    engine.reset()
    engine.prefill(engine.embed(ids[:min(prefill, 64)][None]))  # warm-up (llama-bench runs one too)
    engine.reset()
    t0 = time.perf_counter()
    engine.prefill(engine.embed(ids[:prefill][None]))
    out = {"prefill": prefill / (time.perf_counter() - t0)}
    for d in depths:
        engine.reset()
        engine.prefill(engine.embed(ids[:max(d, 1)][None]))
        tok, spent = int(ids[max(d, 1)]), 0.0
        for _ in range(WARMUP_STEPS):
            tok = int(np.argmax(engine.decode(tok)))
        for _ in range(decode_tokens):
            t0 = time.perf_counter()
            tok = int(np.argmax(engine.decode(tok)))
            spent += time.perf_counter() - t0
        out[f"decode@{d}"] = decode_tokens / spent
    engine.reset()
    return out


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "range": [min(values), max(values)], "rounds": values}


def ceilings(threads: int, stream_mb: int = 1024, gemv_mb: int = 256) -> dict[str, float]:
    """The machine's read ceilings now, bytes/s (module docstring)."""
    from .machine import measure_bandwidth, measure_gemv_bandwidth

    stream = measure_bandwidth(threads, size_mb=stream_mb, repeats=3, single_thread=False)
    return {"stream": stream[f"threads_{threads}_bytes_per_s"],
            "gemv_int8": measure_gemv_bandwidth(threads, bits=8, size_mb=gemv_mb)["bytes_per_s"]}


def mean_context(depth: int, decode_tokens: int) -> dict[str, float]:
    """The timed steps' mean context on each side: ours prefill max(depth, 1) and run WARMUP_STEPS first;
    llama-bench fills `depth` and times all of its `decode_tokens`."""
    return {"ours": max(depth, 1) + WARMUP_STEPS + (decode_tokens - 1) / 2, "theirs": depth + (decode_tokens - 1) / 2}


def run(artifact, binary, gguf, threads: int = 2, depths=(0, 2048), decode_tokens: int = 64, prefill: int = 512,
        rounds: int = 3, progress: bool = True, ceiling_mb: tuple[int, int] = (1024, 256)) -> dict:
    from ..runtime.engine import Engine
    from ..runtime.thread_pool import wanted
    from .step_bytes import artifact_weight_bytes, at_context, gguf_weight_bytes

    depths = list(depths)

    def loaded() -> Engine:
        engine = Engine(artifact, threads=threads, verify="size", shared_threads=wanted(False))
        if max(depths) + WARMUP_STEPS + decode_tokens + 1 > engine.max_len or prefill > engine.max_len:
            raise ValueError(f"depths {depths} + {decode_tokens} tokens do not fit the artifact's {engine.max_len}")
        ours(engine, min(prefill, 64), 4, [0])  # warm-up: the first runs of every session allocate and pack
        return engine

    thread_pool = loaded().thread_pool  # the artifact fits the depths (checked before any llama.cpp round)
    weights = {"ours": artifact_weight_bytes(artifact), "theirs": gguf_weight_bytes(gguf)}  # read once: the files
    step_bytes = {}
    for d in depths:
        ctx = mean_context(d, decode_tokens)
        step_bytes[f"decode@{d}"] = {side: at_context(*weights[side], round(ctx[side])) for side in weights}
    order, got, ceiling = [], {"ours": [], "theirs": []}, []
    for r in range(rounds):
        ceiling.append(ceilings(threads, *ceiling_mb))
        for side in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
            order.append(side)
            if side == "ours":
                engine = loaded()
                got[side].append(ours(engine, prefill, decode_tokens, depths))
                del engine  # its buffers go before the next load
            else:
                got[side].append(llama_bench(binary, gguf, threads, prefill, decode_tokens, depths))
            if progress:
                print(f"round {r + 1} {side}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in got[side][-1].items()),
                      file=sys.stderr)
    keys = list(got["ours"][0])
    rows = [{"measure": k, "ours": _summary([g[k] for g in got["ours"]]),
             "theirs": _summary([g[k] for g in got["theirs"]]),
             "ratio": _summary([a[k] / b[k] for a, b in zip(got["ours"], got["theirs"])])} for k in keys]
    for row in rows:
        if row["measure"] not in step_bytes:
            continue
        sb = step_bytes[row["measure"]]
        row["bytes_per_token"] = sb
        for side in ("ours", "theirs"):  # bytes x tokens/s, round by round; and against that round's ceilings
            rate = [sb[side]["total"] * t for t in row[side]["rounds"]]
            row[f"{side}_bytes_per_s"] = _summary(rate)
            row[f"{side}_of_stream"] = _summary([x / c["stream"] for x, c in zip(rate, ceiling)])
            row[f"{side}_of_gemv"] = _summary([x / c["gemv_int8"] for x, c in zip(rate, ceiling)])
        row["ratio_at_stream"] = _summary([c["stream"] / sb["ours"]["total"] / t
                                           for c, t in zip(ceiling, row["theirs"]["rounds"])])
    return {"artifact": str(artifact), "gguf": str(gguf), "llama_bench": str(binary), "threads": threads,
            "thread_pool": thread_pool,
            "prefill_tokens": prefill, "decode_tokens": decode_tokens, "depths": depths, "rounds": rounds,
            "order": order, "rows": rows,
            "ceilings": {k: _summary([c[k] for c in ceiling]) for k in ceiling[0]},
            "date_utc": time.strftime("%Y-%m-%d", time.gmtime())}


def table(doc: dict) -> str:
    lines = [f"{doc['rounds']} alternated rounds, {doc['threads']} threads, {doc['date_utc']}; tokens/s median "
             f"(range), ratio = ours / llama.cpp per round",
             "| measure | vl2edge | llama.cpp | ratio |", "|---|---|---|---|"]
    for r in doc["rows"]:
        f = lambda s, p=1: f"{s['median']:.{p}f} ({s['range'][0]:.{p}f}-{s['range'][1]:.{p}f})"  # noqa: E731
        name = f"prefill {doc['prefill_tokens']}" if r["measure"] == "prefill" else \
            f"decode {doc['decode_tokens']} at depth {r['measure'].split('@')[1]}"
        lines.append(f"| {name} | {f(r['ours'])} | {f(r['theirs'])} | {f(r['ratio'], 2)}× |")
    c = doc.get("ceilings")
    if c:
        gb = lambda s: f"{s['median'] / 1e9:.1f} ({s['range'][0] / 1e9:.1f}-{s['range'][1] / 1e9:.1f})"  # noqa: E731
        pct = lambda s: f"{100 * s['median']:.0f}% ({100 * s['range'][0]:.0f}-{100 * s['range'][1]:.0f})"  # noqa: E731
        times = lambda s: f"{s['median']:.2f} ({s['range'][0]:.2f}-{s['range'][1]:.2f})×"  # noqa: E731
        lines += ["", f"Ceilings, GB/s median (range) over the rounds: streaming read {gb(c['stream'])}, 8-bit "
                      f"MatMulNBits GEMV {gb(c['gemv_int8'])}", "",
                  "| decode | MB/token vl2edge | MB/token llama.cpp | GB/s vl2edge | GB/s llama.cpp "
                  "| vl2edge of stream | llama.cpp of stream | ratio at 100% of stream |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in doc["rows"]:
            if "bytes_per_token" not in r:
                continue
            mb = r["bytes_per_token"]
            lines.append(f"| depth {r['measure'].split('@')[1]} | {mb['ours']['total'] / 1e6:.0f} | "
                         f"{mb['theirs']['total'] / 1e6:.0f} | {gb(r['ours_bytes_per_s'])} | "
                         f"{gb(r['theirs_bytes_per_s'])} | {pct(r['ours_of_stream'])} | {pct(r['theirs_of_stream'])} | "
                         f"{times(r['ratio_at_stream'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vl2edge.bench.peer", description=__doc__.split("\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--llama-bench", type=Path, required=True)
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depths", default="0,2048")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from ..runtime.thread_pool import ENV

    os.environ.setdefault(ENV, "1")  # this process is the bench's: the runtime as `vl2edge run` runs it
    doc = run(args.artifact, args.llama_bench, args.gguf, args.threads, [int(d) for d in args.depths.split(",")],
              args.decode_tokens, args.prefill, args.rounds)
    print(table(doc))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

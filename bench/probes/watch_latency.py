"""Frame -> first token and frame -> answer of the perception loop on a synthetic camera, per tiling, and what the
kept prompt prefix saves (docs/benchmarks.md, "Perception loop").

    python -m vl2edge.bench.probes.watch_latency ART --threads 2 --out watch.json   # real dims: a Tiny export

A 10 fps camera of 640x480 frames (bench.scene_video) through Model.watch, latest frame wins, as `vl2edge watch`
runs it: latencies count from each frame's decode, so they include the wait of the frame behind the previous answer.
The first answer of each loop is reported apart (it prefills the prompt's prefix and warms onnxruntime).

  tilings   the default tiling and --max-tiles 1, a grounding prompt, `--answers` answers each
  prefix    a system prompt and the question before "<image>", kept in the cache (the default) against prefilled
            with every frame (reuse_cache=False); alternated loop by loop, `--rounds` rounds
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ..watch_soak import camera

GROUNDING = "<image>\n<|ref|>the red mug<|/ref|>."
SYSTEM = ("You are the perception module of a mobile kitchen robot. You see the robot's head camera. Answer with "
          "the object's name and its box in <|det|> form, nothing else. If the object is not visible, say so in "
          "three words. Boxes use the image's 0-999 coordinates. The robot acts on your first box at once.")
QUESTION_FIRST = "Where is the red mug on the table? Give its box.\n<image>"


def loop(model, prompt: str, answers: int, *, fps: float, size, max_new_tokens: int, **options) -> dict:
    rows = []
    with model.watch(camera(fps, *size), prompt, max_frames=answers + 1, max_new_tokens=max_new_tokens,
                     **options) as w:
        for a in w:
            rows.append({"index": a.index, "first_token_s": a.frame_to_first_token_s, "answer_s": a.frame_to_answer_s,
                         "tokens": a.tokens, "prompt_tokens": a.prompt_tokens, "cached_tokens": a.cached_tokens,
                         "vision_tiles": a.result.timings["vision_tiles"],
                         "prefill_tokens": a.result.timings["prefill_tokens"], **a.stages})
    steady = rows[1:]

    def pct(key):
        v = np.asarray([r[key] for r in steady], float)
        return {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)), "min": float(v.min()),
                "max": float(v.max())}

    return {"first_answer": rows[0], "answers": steady, "frame_to_first_token_s": pct("first_token_s"),
            "frame_to_answer_s": pct("answer_s"),
            "stage_median_s": {k: float(np.median([r[k] for r in steady])) for k in
                               ("read_s", "wait_s", "preprocess_s", "vision_s", "prefill_s", "decode_s")},
            "vision_tiles": steady[0]["vision_tiles"], "prompt_tokens": steady[0]["prompt_tokens"],
            "prefill_tokens": steady[0]["prefill_tokens"], "cached_tokens": steady[0]["cached_tokens"]}


def measure(model, answers: int = 8, rounds: int = 3, fps: float = 10.0, size=(640, 480),
            max_new_tokens: int = 20, progress: bool = True) -> dict:
    doc = {"fps": fps, "frame_size": list(size), "max_new_tokens": max_new_tokens, "tilings": {}, "prefix": {}}
    for name, tiles in (("default", None), ("max_tiles_1", 1)):
        doc["tilings"][name] = loop(model, GROUNDING, answers, fps=fps, size=size, max_new_tokens=max_new_tokens,
                                    max_tiles=tiles)
        if progress:
            t = doc["tilings"][name]
            print(f"{name}: {t['vision_tiles']} tiles, {t['prompt_tokens']} tokens; first token p50 "
                  f"{t['frame_to_first_token_s']['p50']:.2f} s, answer p50 {t['frame_to_answer_s']['p50']:.2f} s",
                  file=sys.stderr)
    # the kept prefix, at the tiling where prefill is the larger share of a frame
    kept, fresh = [], []
    for r in range(rounds):
        for reuse, bucket in ((True, kept), (False, fresh)) if r % 2 == 0 else ((False, fresh), (True, kept)):
            bucket.append(loop(model, QUESTION_FIRST, 3, fps=fps, size=size, max_new_tokens=max_new_tokens,
                               max_tiles=1, system=SYSTEM, reuse_cache=reuse))
        if progress:
            print(f"prefix round {r + 1}: kept {kept[-1]['frame_to_first_token_s']['p50']:.2f} s, prefilled "
                  f"{fresh[-1]['frame_to_first_token_s']['p50']:.2f} s to the first token", file=sys.stderr)
    ttft_k = [a["first_token_s"] for x in kept for a in x["answers"]]
    ttft_f = [a["first_token_s"] for x in fresh for a in x["answers"]]
    pre_k = [a["prefill_s"] for x in kept for a in x["answers"]]
    pre_f = [a["prefill_s"] for x in fresh for a in x["answers"]]
    doc["prefix"] = {
        "rounds": rounds, "prompt_tokens": kept[0]["prompt_tokens"], "cached_tokens": kept[0]["cached_tokens"],
        "prefill_tokens_kept": kept[0]["prefill_tokens"], "prefill_tokens_fresh": fresh[0]["prefill_tokens"],
        "frame_to_first_token_p50_s": {"kept": float(np.median(ttft_k)), "fresh": float(np.median(ttft_f))},
        "prefill_p50_s": {"kept": float(np.median(pre_k)), "fresh": float(np.median(pre_f))},
        "saved_p50_s": float(np.median(ttft_f) - np.median(ttft_k)),
        "per_round_first_token_p50_s": [[k["frame_to_first_token_s"]["p50"], f["frame_to_first_token_s"]["p50"]]
                                        for k, f in zip(kept, fresh)],
    }
    return doc


def table(doc: dict) -> str:
    lines = [f"perception loop: a {doc['fps']:g} fps camera of {doc['frame_size'][0]}x{doc['frame_size'][1]} frames, "
             f"latest frame wins, {doc['max_new_tokens']} new tokens at most",
             f"{'tiling':<14}{'tiles':>6}{'tokens':>8}{'first token p50 / p90 (s)':>28}{'answer p50 / p90 (s)':>24}"
             f"{'vision':>8}{'prefill':>9}{'decode':>8}{'wait':>7}"]
    for name, t in doc["tilings"].items():
        f, a, st = t["frame_to_first_token_s"], t["frame_to_answer_s"], t["stage_median_s"]
        lines.append(f"{name:<14}{t['vision_tiles']:>6}{t['prompt_tokens']:>8}"
                     f"{f['p50']:>18.2f} / {f['p90']:<7.2f}{a['p50']:>14.2f} / {a['p90']:<7.2f}"
                     f"{st['vision_s']:>8.2f}{st['prefill_s']:>9.2f}{st['decode_s']:>8.2f}{st['wait_s']:>7.2f}")
    p = doc["prefix"]
    lines.append(f"kept prefix (system prompt + question before the image, --max-tiles 1): {p['cached_tokens']} of "
                 f"{p['prompt_tokens']} prompt tokens reused; first token p50 {p['frame_to_first_token_p50_s']['kept']:.2f}"
                 f" s against {p['frame_to_first_token_p50_s']['fresh']:.2f} s prefilled every frame (saves "
                 f"{p['saved_p50_s']:.2f} s; prefill {p['prefill_p50_s']['kept']:.2f} vs "
                 f"{p['prefill_p50_s']['fresh']:.2f} s), {p['rounds']} alternated rounds")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vl2edge.bench.probes.watch_latency",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--answers", type=int, default=8, help="answers per tiling after the first (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds of the prefix A/B (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from ...runtime.api import load
    from ...runtime.thread_pool import wanted

    model = load(args.artifact, threads=args.threads, shared_threads=wanted(True))
    doc = measure(model, answers=args.answers, rounds=args.rounds, max_new_tokens=args.max_new_tokens)
    doc.update(artifact=str(Path(args.artifact).resolve()), threads=args.threads)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())

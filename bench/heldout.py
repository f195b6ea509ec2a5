"""Precision defaults judged on data they never saw: the 8-bit KV caches against `--kv-cache float` on held-out
checkpoints and held-out conversations.

  python -m vl2edge.bench.heldout [--work DIR] [--seeds 1,2,3] [--precisions int8,int4] [--steps 16] [--json OUT]

Why: the caches' export-time calibration (export/kv_calibration.py) and the precision policy's verdicts were made
on the test presets at seed 0 and bench/fidelity.py's conversations. Here every checkpoint is new: test-tiny,
test-small and test-vl2 synthesized at other seeds (default 1, 2, 3), and heldout-mha / heldout-mla (other dims,
model/presets.py) at seed 7 with other weight statistics too (`--init heavy`: heavy tails, outlier channels); the
sharp family (`--init sharp`: attention scores of std ~3, norm gains over 0.6-1.4) of test-small and test-tiny at
the same seeds and heldout-mla at seed 7; and every conversation is unlike both the calibration sequence (one calibration tile,
a chat text of receipts, code and grounding) and the fidelity tool's (drawn rectangles on a ramp, short questions):
long prose, a repetitive text, digits and symbols, a noise image, a near-black one, an extreme-aspect striped one
(many tiles), and two images in one turn (HELDOUT).

For each checkpoint and routed-expert precision the default artifact (8-bit cache: MHA int8 read by
GroupQueryAttention, MLA uint8 latent cache) and the same export with `--kv-cache float` are fed the fp32 PyTorch
reference's greedy tokens (teacher forcing, `steps` per conversation) twice: with their own routing, and with the
reference's expert choices held, which removes routing near-ties (a flipped expert choice moves a step's logits by
more than any cache error; test-vl2's group-limited routing has many). The cache's cost is judged on the held runs:
  generalizes   held worst cosine within WORST_COSINE_GAP of the float cache's, held top-1 within TOP1_GAP;
free-running figures are reported beside them, with the steps where the two artifacts' top-1 differ and whether the
expert choices flipped there (a routing near-tie) or not.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

WORST_COSINE_GAP = 0.002
TOP1_GAP = 0.02
STEPS = 16
CHECKPOINTS = ("test-tiny", "test-small", "test-vl2")
# other dims and other statistics: heavy-tailed weights, outlier norm channels, large-norm embeddings (model/synth.py)
OTHER_DIMS = {"heldout-mha": 7, "heldout-mla": 7}
# sharp attention (model/synth.py, init="sharp": scores of std ~3, spread norm gains): where small probabilities carry
# real mass and an 8-bit path that drops them shows it; both attention kinds, at every seed, and other dims
SHARP = ("test-small", "test-tiny")
SHARP_OTHER_DIMS = {"heldout-mla": 7}

PROSE = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the one hundred and twelve "
         "steps aloud, because his father had done so and his grandfather before him. Storms came from the west in "
         "autumn; the fishing boats would shelter in the cove below, their lanterns swinging. ")


def _noise(w, h, seed):
    from PIL import Image
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _dark(w, h, seed):
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 12).astype(np.uint8))


def _stripes(w, h, seed):
    from PIL import Image
    x = (np.arange(w)[None, :, None] // 7 % 2) * np.array([255, 255, 0])[None, None, :]
    return Image.fromarray(np.broadcast_to(x, (h, w, 3)).astype(np.uint8))


# (prompt, [(image maker, width, height)]): none like the calibration sequence or bench/fidelity.CONVERSATIONS
HELDOUT = (
    ("Continue the story in the same style.\n" + PROSE * 3, []),
    ("Repeat after me: " + "go left, go left, stop. " * 24, []),
    ("Compute 7^13 mod 1009 and show 3.14159 26535 89793 * 2 = ? [{}] <> ~~ ## 0xDEADBEEF", []),
    ("<image>\nWhat is in this picture?", [(_noise, 512, 512)]),
    ("<image>\nIs anything visible here?", [(_dark, 800, 600)]),
    ("<image>\nCount the stripes.", [(_stripes, 1600, 200)]),
    ("<image>\n<image>\nWhich of the two is brighter?", [(_dark, 300, 300), (_noise, 200, 400)]),
)


def heldout_inputs(processor) -> list:
    out = []
    for i, (prompt, images) in enumerate(HELDOUT):
        pics = [make(w, h, 100 + 10 * i + j) for j, (make, w, h) in enumerate(images)]
        out.append(processor(prompt, images=pics or None))
    return out


def _summaries(engine, inputs, refs) -> dict:
    from .fidelity import artifact_run, compare, summarize

    free, held, top1, chosen = [], [], [], []
    for inp, (tokens, ref_logits, ref_sel) in zip(inputs, refs, strict=True):
        logits, sel = artifact_run(engine, inp, tokens)
        free.append(compare(ref_logits, logits, ref_sel, sel))
        top1.append(logits.argmax(-1))
        chosen.append({layer: np.sort(idx, -1) for layer, idx in sel.items()})
        if ref_sel:
            logits, sel = artifact_run(engine, inp, tokens, held=ref_sel)
            held.append(compare(ref_logits, logits, ref_sel, sel))
    return {"free": summarize(free), "held": summarize(held or free), "top1": top1, "chosen": chosen}


def evaluate(checkpoint: Path, work: Path, precisions=("int8", "int4"), steps: int = STEPS) -> list[dict]:
    """One checkpoint: per precision, the default (8-bit cache) and --kv-cache float artifacts on HELDOUT."""
    from ..export.exporter import export
    from ..model.vl2 import DeepseekVL2
    from ..runtime.engine import Engine
    from ..runtime.processor import Processor
    from .fidelity import reference_run

    model = DeepseekVL2.from_checkpoint(checkpoint)
    inputs = heldout_inputs(Processor.from_dir(checkpoint))
    refs = [reference_run(model, inp, steps) for inp in inputs]
    del model
    rows = []
    for prec in precisions:
        got = {}
        for kv in ("auto", "float"):
            art = export(checkpoint, work / f"{checkpoint.name}-{prec}-{kv}", experts=prec, kv_cache=kv, force=True,
                         progress=False)
            got[kv] = _summaries(Engine(art), inputs, refs)
        q, f = got["auto"], got["float"]
        differ = []  # steps where the two artifacts' greedy tokens differ, and whether their expert choices did
        for c, (a, b, sa, sb) in enumerate(zip(q["top1"], f["top1"], q["chosen"], f["chosen"])):
            prompt = inputs[c].seq_len
            for s in np.flatnonzero(a != b):
                upto = prompt + int(s)  # the tokens whose routing reached this step's logits
                flipped = any((sa[k][:upto] != sb[k][:upto]).any() for k in sa)
                differ.append({"conversation": c, "step": int(s), "routing_differs": bool(flipped)})
        row = {"checkpoint": checkpoint.name, "experts": prec,
               "held": {"kv8_worst_cosine": q["held"]["worst_cosine"], "float_worst_cosine": f["held"]["worst_cosine"],
                        "kv8_top1": q["held"]["top1_agreement"], "float_top1": f["held"]["top1_agreement"]},
               "free": {"kv8_worst_cosine": q["free"]["worst_cosine"], "float_worst_cosine": f["free"]["worst_cosine"],
                        "kv8_top1": q["free"]["top1_agreement"], "float_top1": f["free"]["top1_agreement"],
                        "kv8_expert_mismatch": q["free"]["expert_mismatch_mean"],
                        "float_expert_mismatch": f["free"]["expert_mismatch_mean"]},
               "top1_differs_at": differ}
        h = row["held"]
        row["worst_cosine_gap"] = h["float_worst_cosine"] - h["kv8_worst_cosine"]
        row["top1_gap"] = h["float_top1"] - h["kv8_top1"]
        row["generalizes"] = row["worst_cosine_gap"] <= WORST_COSINE_GAP and row["top1_gap"] <= TOP1_GAP
        rows.append(row)
    return rows


def checkpoints(work: Path, seeds=(1, 2, 3)) -> list[Path]:
    from ..model.synth import synthesize

    out = []
    for preset, seed, init in [(p, s, "default") for p in CHECKPOINTS for s in seeds] + [
            (p, s, "heavy") for p, s in OTHER_DIMS.items()] + [(p, s, "sharp") for p in SHARP for s in seeds] + [
            (p, s, "sharp") for p, s in SHARP_OTHER_DIMS.items()]:
        d = work / "checkpoints" / (f"{preset}-s{seed}" + ("" if init == "default" else f"-{init}"))
        out.append(d if (d / "config.json").is_file() else synthesize(d, preset, seed=seed, progress=False,
                                                                        init=init))
    return out


def run(work: Path, seeds=(1, 2, 3), precisions=("int8", "int4"), steps: int = STEPS, progress: bool = True) -> dict:
    rows = []
    for ckpt in checkpoints(work, seeds):
        for row in evaluate(ckpt, work / "artifacts", precisions, steps):
            rows.append(row)
            if progress:
                print(line(row), file=sys.stderr)
    return {"steps": steps, "conversations": len(HELDOUT), "rows": rows,
            "generalizes": all(r["generalizes"] for r in rows)}


def line(r: dict) -> str:
    h, f = r["held"], r["free"]
    ties = sum(d["routing_differs"] for d in r["top1_differs_at"])
    return (f"| {r['checkpoint']} | {r['experts']} | {h['kv8_worst_cosine']:.5f} / {h['float_worst_cosine']:.5f} | "
            f"{h['kv8_top1']:.3f} / {h['float_top1']:.3f} | {f['kv8_worst_cosine']:.5f} / {f['float_worst_cosine']:.5f}"
            f" | {f['kv8_top1']:.3f} / {f['float_top1']:.3f} | {len(r['top1_differs_at'])} ({ties} after expert "
            f"choices differed) | {'ok' if r['generalizes'] else 'MISS'} |")


HEADER = ("| checkpoint | experts | held worst cos 8-bit / float | held top-1 8-bit / float | free worst cos | "
          "free top-1 | greedy tokens differ | generalizes |\n|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vl2edge.bench.heldout", description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--precisions", default="int8,int4")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        doc = run(args.work or Path(tmp), tuple(int(s) for s in args.seeds.split(",")),
                  tuple(args.precisions.split(",")), args.steps)
    print(HEADER)
    print("\n".join(line(r) for r in doc["rows"]))
    print("every default generalizes" if doc["generalizes"] else "a default MISSES on held-out data")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if doc["generalizes"] else 1


if __name__ == "__main__":
    sys.exit(main())

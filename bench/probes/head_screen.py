"""Could an lm_head screen read fewer bytes and still prove the greedy token? Measured on a checkpoint's own head.

    python -m vl2edge.bench.probes.head_screen CHECKPOINT [--conversations 6] [--steps 16] [--text-only]
                                                           [--json OUT]

The screen is the exact int8 head cut in two (issue 30, item 3): the int8 head's code u = q + 128 (q in -127..127,
export/linear.py's 8-bit grid, block 32) is 16 * hi + lo with hi, lo in 0..15, so

    exact_r = sum_b s_rb * sum_j (u_j - 128) x_j = screen_r + resid_r
    screen_r = sum_b s_rb * sum_j 16 (hi_j - 8) x_j        (4-bit codes: half the head's bytes)
    resid_r  = sum_b s_rb * sum_j lo_j x_j,  lo_j in 0..15  (the other half, read only for candidate rows)

where x is the activation as the 8-bit MatMulNBits kernel sees it at accuracy level 4 (int8 per block of 32, scale
absmax / 127). In onnxruntime both halves are 4-bit MatMulNBits (hi: zero point 8, scale 16 s; lo: zero point 0,
scale s) and their sum equals the int8 head to fp32 rounding, so a screen loses nothing if the rows it leaves out
are proven below the best row it recomputes. Proof needs a bound on resid_r for the rows not read:

    worst case   resid_r <= 15 * sum_b s_rb * sum_j max(x_j, 0)                          (certain)
    8 sigma      resid_r <= mean_r + 8 sd_r, lo_j iid uniform on 0..15: mean_r = 7.5 sum_b s_rb sum_j x_j,
                 sd_r^2 = 21.25 sum_b s_rb^2 sum_j x_j^2                                  (a model of the codes)

Both per row, the tightest either can be. A step is settled by a screen when every row whose screen + bound reaches
the exact maximum is among the rows recomputed; the figure that decides whether a screen pays is that set's size
(`rows_needed`), against the head's 2 x rows-worth of codes: the screen reads half the head, each needed row the
other half of itself. Also per candidate count K: how often the exact argmax is among the screen's top K (what an
unproven top-K heuristic would get right).

The hidden states are the PyTorch reference's (model/, fp32), teacher-forced on its own greedy answer for the
fidelity bench's conversations (bench/fidelity.py), taken at lm_head's input: the probe needs no artifact. Every
conversation costs a reference prefill, so real dims want --text-only and a few minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ...quant.blockwise import quantize_blockwise
from ..fidelity import CONVERSATIONS

BLOCK = 32  # export/linear.py's MatMulNBits block and the accuracy-level-4 activation block
CANDIDATES = (64, 256, 1024)
Z = 8.0


def activations_as_kernel_sees(x: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """x [K] -> x with each block of `block` rounded to int8 with scale absmax / 127 (MLAS's accuracy level 4)."""
    xb = np.asarray(x, np.float32).reshape(-1, block)
    amax = np.abs(xb).max(axis=1, keepdims=True)
    scale = amax / np.float32(127)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    return (np.round(xb * inv) * scale).reshape(-1)


class SplitHead:
    """An int8 lm_head [V, K] quantized as the exporter quantizes it, held as its high and low nibbles."""

    def __init__(self, weight: np.ndarray, block: int = BLOCK):
        qt = quantize_blockwise(np.asarray(weight, np.float32), bits=8, block_size=block, symmetric=True)
        v, k = qt.q.shape
        self.block, self.scales = block, qt.scales  # [V, K / block]
        u = qt.q.reshape(v, k // block, block)
        self.hi = (16 * (u.astype(np.float32) // 16 - 8))  # 16 (hi - 8)
        self.lo = (u % 16).astype(np.float32)  # u - 128 = 16 (hi - 8) + lo: the int8 head is their sum

    def parts(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(exact, screen, resid) logits [V] for the kernel's activations x [K]; exact = screen + resid (the
        tests check it against onnxruntime's 8-bit kernel)."""
        xb = x.reshape(1, -1, self.block)
        screen = np.einsum("vbj,vb,xbj->v", self.hi, self.scales, xb, optimize=True)
        resid = np.einsum("vbj,vb,xbj->v", self.lo, self.scales, xb, optimize=True)
        return screen + resid, screen, resid

    def bounds(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Per-row upper bounds on resid [V]: worst case, and mean + Z sd for iid uniform low nibbles."""
        xb = x.reshape(-1, self.block)
        worst = 15 * self.scales @ np.maximum(xb, 0).sum(axis=1)
        mean = 7.5 * self.scales @ xb.sum(axis=1)
        sd = np.sqrt(21.25 * (self.scales ** 2) @ (xb ** 2).sum(axis=1))
        return {"worst_case": worst, f"{Z:g}_sigma": mean + Z * sd}


def settle(head: SplitHead, x: np.ndarray) -> dict:
    """One step's figures for the kernel's activations x."""
    exact, screen, resid = head.parts(x)
    best = exact.max()
    order = np.argsort(-screen, kind="stable")
    step = {"top1_in_screen_top": {str(k): bool(int(exact.argmax()) in set(order[:k].tolist())) for k in CANDIDATES},
            "logit_sd": float(exact.std()), "gap12": float(best - np.partition(exact, -2)[-2])}
    for name, bound in head.bounds(x).items():
        if name == "worst_case" and np.any(resid > bound + 1e-4 * np.abs(exact).max()):
            raise AssertionError("the worst-case bound failed")  # it cannot: a check of the algebra
        step[f"rows_needed_{name}"] = int(np.count_nonzero(screen + bound >= best))
        step[f"margin_{name}"] = float(np.median(bound))
    return step


def hidden_states(model, inp, steps: int) -> list[np.ndarray]:
    """lm_head's input (after the final norm) at every answer step of the reference's greedy run."""
    from ..fidelity import reference_run

    seen: list[np.ndarray] = []
    hook = model.language.lm_head.register_forward_hook(
        lambda mod, args, out: seen.append(args[0][0, -1].float().cpu().numpy()))
    try:
        reference_run(model, inp, steps)
    finally:
        hook.remove()
    return seen


def summarize(steps: list[dict], vocab: int) -> dict:
    out = {"steps": len(steps), "vocab": vocab,
           "top1_in_screen_top": {str(k): float(np.mean([s["top1_in_screen_top"][str(k)] for s in steps]))
                                  for k in CANDIDATES}}
    for name in ("worst_case", f"{Z:g}_sigma"):
        rows = np.array([s[f"rows_needed_{name}"] for s in steps])
        # code bytes a step reads, as a share of the int8 head's: half (the screen) + each needed row's other half
        # (the fp32 block scales, a ninth of the head's bytes, are read by the screen and again for those rows)
        share = 0.5 + 0.5 * rows / vocab
        out[name] = {"rows_needed_median": float(np.median(rows)), "rows_needed_max": int(rows.max()),
                     "rows_needed_share_median": float(np.median(rows) / vocab),
                     "head_bytes_share_median": float(np.median(share)),
                     "steps_saving_a_quarter": float(np.mean(share <= 0.75)),
                     "bound_median": float(np.median([s[f"margin_{name}"] for s in steps]))}
    out["logit_sd_median"] = float(np.median([s["logit_sd"] for s in steps]))
    out["gap12_median"] = float(np.median([s["gap12"] for s in steps]))
    return out


def run(checkpoint, conversations: int = len(CONVERSATIONS), steps: int = 16, text_only: bool = False) -> dict:
    import torch

    from ...model.vl2 import DeepseekVL2
    from ...runtime.processor import Processor
    from ..fidelity import prepared_conversations

    torch.manual_seed(0)
    model = DeepseekVL2.from_checkpoint(checkpoint)
    head = SplitHead(model.language.lm_head.weight.detach().float().numpy())
    from ...model.checkpoint import resolve_checkpoint

    processor = Processor.from_dir(resolve_checkpoint(checkpoint))
    per_step = []
    chats = prepared_conversations(processor, len(CONVERSATIONS))
    chats = [c for c, (_, image) in zip(chats, CONVERSATIONS) if not (text_only and image)][:conversations]
    for inp in chats:
        for h in hidden_states(model, inp, steps):
            per_step.append(settle(head, activations_as_kernel_sees(h)))
    return {"checkpoint": str(checkpoint), "conversations": len(chats), "text_only": text_only, "steps": steps, "z": Z,
            "summary": summarize(per_step, head.scales.shape[0]), "per_step": per_step}


def table(doc: dict) -> str:
    s = doc["summary"]
    lines = [f"{s['steps']} steps, vocabulary {s['vocab']}; logit sd {s['logit_sd_median']:.3f}, "
             f"top-1 gap {s['gap12_median']:.4f} (medians)",
             "exact argmax within the screen's top K: " + ", ".join(
                 f"K={k}: {v:.3f}" for k, v in s["top1_in_screen_top"].items()),
             "| bound | median bound | rows needed (median / max) | head code bytes read (median) "
             "| steps saving >= 25% |",
             "|---|---|---|---|---|"]
    for name in ("worst_case", f"{Z:g}_sigma"):
        b = s[name]
        lines.append(f"| {name} | {b['bound_median']:.3f} | {b['rows_needed_median']:.0f} / {b['rows_needed_max']} "
                     f"| {b['head_bytes_share_median']:.1%} | {b['steps_saving_a_quarter']:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vl2edge.bench.probes.head_screen", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="HF checkpoint directory or hub id")
    p.add_argument("--conversations", type=int, default=len(CONVERSATIONS), choices=range(1, len(CONVERSATIONS) + 1),
                   metavar=f"1..{len(CONVERSATIONS)}")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--text-only", action="store_true", help="only the conversations without an image")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    doc = run(args.checkpoint, args.conversations, args.steps, args.text_only)
    print(table(doc))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

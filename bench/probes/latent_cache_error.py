"""Where the 8-bit MLA latent cache loses: each quantization of the decode products (export/latent_cache.py) applied
alone to the reference's own decode-step attention, per layer, on a checkpoint and a conversation.

    python -m vl2edge.bench.probes.latent_cache_error CKPT [--steps 16] [--context 0] [--json OUT]

The fp32 PyTorch reference runs each conversation (bench.heldout's, then `--steps` greedy decode steps); at every
decode step of every MLA layer it records the absorbed query [nh, r + rope], the latent cache [P, r + rope] and the
softmax scale. For each step the exact attended latents ctx = softmax(scale * q . cache^T) . c_kv are compared with
the same product where one thing is quantized as the graph does it, the rest exact:
  cache rows   c_kv | k_pe as uint8 codes with one scale per token over the channel equalizer (chan: each channel's
               range over this conversation, as the exporter's calibration measures it on its own text)
  k_pe apart   the same, with k_pe's channels given a token scale of their own
  queries      the absorbed query as int8 with one scale per head
  probs        p = exp(s - max) as uint8 with one scale per head (what is below max/510 becomes 0; the softmax's
               denominator stays the fp32 sum of p)
  probs, block p as uint8 with one scale per head and block of BLOCK tokens (the candidate fix)
  all          everything the graph of format 5 does
Reported: the relative error ||ctx_q - ctx|| / ||ctx|| (mean and max over heads and steps) per layer and variant,
and the probability mass below each head's max/510 (what uint8 probabilities drop). `--context N` pads the prompt
with N tokens of prose first (the tail grows with the context).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ...export.kv_calibration import latent_scales
from ...export.latent_cache import QMAX, TINY, quantize_latent

BLOCK = 64
VARIANTS = ("cache rows", "k_pe apart", "queries", "probs", "probs, block", "all")


def _q8_per_head(q: np.ndarray) -> np.ndarray:
    s = np.maximum(np.abs(q).max(-1, keepdims=True) / QMAX, TINY)
    return np.clip(np.rint(q / s), -QMAX, QMAX) * s


def _p8(p: np.ndarray, block: int | None = None) -> np.ndarray:
    """p [nh, P] >= 0 -> uint8 codes times their scale, one scale per head (or per head and block of tokens)."""
    if block is None:
        s = np.maximum(p.max(-1, keepdims=True) / 255.0, TINY)
        return np.clip(np.rint(p / s), 0, 255) * s
    nh, n = p.shape
    pad = (-n) % block
    pb = np.pad(p, ((0, 0), (0, pad))).reshape(nh, -1, block)
    s = np.maximum(pb.max(-1, keepdims=True) / 255.0, TINY)
    return (np.clip(np.rint(pb / s), 0, 255) * s).reshape(nh, -1)[:, :n]


def _rows(cache: np.ndarray, chan: np.ndarray, r: int | None) -> np.ndarray:
    """The cache as the 8-bit path reads it back: one token scale over the row, or (r given) k_pe's apart."""
    if r is None:
        codes, tok = quantize_latent(cache, chan)
        return (codes.astype(np.float32) - 128) * chan * tok
    a, b = _rows(cache[:, :r], chan[:r], None), _rows(cache[:, r:], chan[r:], None)
    return np.concatenate([a, b], -1)


def attend(q: np.ndarray, cache: np.ndarray, scale: float, r: int, *, rows=None, q_fn=None, p_fn=None) -> np.ndarray:
    """ctx [nh, r] = softmax(scale * q . cache^T) . c_kv with the given pieces replaced."""
    kv = cache if rows is None else rows
    qq = q if q_fn is None else q_fn(q * scale) / scale
    s = scale * qq @ kv.T
    p = np.exp(s - s.max(-1, keepdims=True))
    denom = p.sum(-1, keepdims=True)
    pn = p if p_fn is None else p_fn(p)
    return pn @ kv[:, :r] / denom


def step_errors(q: np.ndarray, cache: np.ndarray, scale: float, r: int, chan: np.ndarray) -> dict[str, np.ndarray]:
    """Relative error per head of each variant at one decode step."""
    exact = attend(q, cache, scale, r)
    rows = _rows(cache, chan, None)
    out = {
        "cache rows": attend(q, cache, scale, r, rows=rows),
        "k_pe apart": attend(q, cache, scale, r, rows=_rows(cache, chan, r)),
        "queries": attend(q, cache, scale, r, q_fn=_q8_per_head),
        "probs": attend(q, cache, scale, r, p_fn=_p8),
        "probs, block": attend(q, cache, scale, r, p_fn=lambda p: _p8(p, BLOCK)),
        "all": attend(q, cache, scale, r, rows=rows, q_fn=_q8_per_head, p_fn=_p8),
    }
    norm = np.linalg.norm(exact, axis=-1)
    return {k: np.linalg.norm(v - exact, axis=-1) / np.maximum(norm, 1e-30) for k, v in out.items()}


def capture(model, inp, steps: int) -> dict[int, list]:
    """Run the reference; {layer: [(q [nh, w], cache [P, w], scale), ...]} at each decode step (T = 1)."""
    import torch.nn.functional as F

    from ...model import language
    from ..fidelity import reference_run

    calls: list = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, scale=None, **kw):
        if q.shape[-2] == 1 and k.shape[1] == 1:  # an MLA decode step: one latent "head" shared by all
            calls.append((q[0, :, 0].float().numpy().copy(), k[0, 0].float().numpy().copy(), float(scale)))
        return real(q, k, v, attn_mask=attn_mask, scale=scale, **kw)

    language.F.scaled_dot_product_attention = spy
    try:
        reference_run(model, inp, steps)
    finally:
        language.F.scaled_dot_product_attention = real
    layers = len(model.language.model.layers)
    return {i: calls[i::layers] for i in range(layers)}


def measure(checkpoint, steps: int = 16, context: int = 0, conversations: int | None = None) -> dict:
    from ...model.vl2 import DeepseekVL2
    from ...runtime.processor import Processor
    from ..heldout import HELDOUT, PROSE, heldout_inputs

    model = DeepseekVL2.from_checkpoint(checkpoint)
    r = model.cfg.language.kv_lora_rank
    if not r:
        raise ValueError(f"{checkpoint}: not an MLA model (no kv_lora_rank)")
    proc = Processor.from_dir(checkpoint)
    inputs = heldout_inputs(proc)[:conversations or len(HELDOUT)]
    if context:
        words = (PROSE * (1 + context // 40)).split()
        pad = " ".join(words)
        ids = proc.encode(pad)[:context]
        inputs = [proc(proc.decode(ids) + "\n" + HELDOUT[0][0])] + inputs[1:]
    errs: dict[int, dict[str, list]] = {}
    tail: dict[int, list] = {}
    for inp in inputs:
        for layer, calls in capture(model, inp, steps).items():
            chan = latent_scales(calls[-1][1], r)  # the conversation's own ranges (calibration's best case)
            for q, cache, scale in calls:
                e = step_errors(q, cache, scale, r, chan)
                for k, v in e.items():
                    errs.setdefault(layer, {}).setdefault(k, []).append(v)
                s = scale * q @ cache.T
                p = np.exp(s - s.max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
                tail.setdefault(layer, []).append((p * (p < p.max(-1, keepdims=True) / 510)).sum(-1))
    doc = {"checkpoint": str(checkpoint), "steps": steps, "context_pad": context, "conversations": len(inputs),
           "block": BLOCK, "layers": {}}
    for layer, per in errs.items():
        t = np.concatenate(tail[layer])
        doc["layers"][layer] = {"tail_mass_mean": float(t.mean()), "tail_mass_max": float(t.max()),
                                **{k: {"mean": float(np.concatenate(v).mean()), "max": float(np.concatenate(v).max())}
                                   for k, v in per.items()}}
    return doc


def table(doc: dict) -> str:
    lines = [f"{doc['checkpoint']}: relative error of the attended latents per variant (mean / max over heads and "
             f"decode steps), {doc['conversations']} conversations x {doc['steps']} steps"
             + (f", prompt padded by {doc['context_pad']} tokens" if doc["context_pad"] else ""),
             f"{'layer':<6}{'tail mass':>18}" + "".join(f"{v:>20}" for v in VARIANTS)]
    for layer, d in doc["layers"].items():
        lines.append(f"{layer:<6}{d['tail_mass_mean']:>9.4f} / {d['tail_mass_max']:<6.3f}"
                     + "".join(f"{d[v]['mean']:>11.5f} / {d[v]['max']:<6.4f}" for v in VARIANTS))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vl2edge.bench.probes.latent_cache_error",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--context", type=int, default=0, help="pad the first conversation's prompt with N tokens")
    ap.add_argument("--conversations", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    doc = measure(args.checkpoint, args.steps, args.context, args.conversations)
    print(table(doc))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `vl2edge` command. Each subcommand imports only what it needs, so runtime commands never load torch."""

from __future__ import annotations

import argparse
import sys


def _synth(args) -> int:
    from .model.synth import synthesize

    out = synthesize(args.out, args.preset, seed=args.seed, layers=args.layers, force=args.force,
                     progress=not args.quiet)
    print(out)
    return 0


def _export(args) -> int:
    from .export.exporter import export

    out = export(args.src, args.out, experts=args.experts, block_size=args.block_size, target=args.target,
                 force=args.force, max_len=args.max_len, progress=not args.quiet)
    print(out)
    return 0


def _sampling(args):
    from .model.generate import SamplingConfig

    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)


def _print_answer(args, ans, image) -> None:
    import json

    if not args.json:
        print()
    if args.draw_boxes and image is not None:
        from .runtime.grounding import draw_boxes

        draw_boxes(image, ans.grounding, args.draw_boxes)
    summary = {
        "text": ans.text, "token_ids": ans.token_ids, "stop_reason": ans.stop_reason,
        "prompt_tokens": ans.prompt_tokens, "image_sizes": [list(s) for s in ans.image_sizes],
        "grounding": ans.grounding.as_dict(), "timings": ans.timings,
    }
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        t = ans.timings
        rate = f"{t['decode_tokens_per_s']:.1f} tok/s" if t["decode_tokens_per_s"] else "n/a"
        print(f"[{len(ans.token_ids)} tokens, stop: {ans.stop_reason}; prompt {ans.prompt_tokens} tokens; "
              f"vision+embed {t['vision_and_embed_s']:.2f} s, prefill {t['prefill_s']:.2f} s, decode {rate}; "
              f"{len(ans.grounding.boxes)} boxes]", file=sys.stderr)


def _run(args) -> int:
    from . import reference_backend
    from .runtime.images import load_image

    if args.backend != "torch":
        raise ValueError("only --backend torch (the PyTorch reference on a checkpoint directory) exists so far")
    images = [load_image(p) for p in args.image]
    prompt = args.prompt
    if images and "<image>" not in prompt:
        prompt = "<image>\n" * len(images) + prompt  # the official convention: images first
    ans = reference_backend.answer(
        args.model, prompt, images, dtype=args.dtype, max_tiles=args.max_tiles, sampling=_sampling(args),
        on_text=None if args.json else (lambda d: print(d, end="", flush=True)), threads=args.threads)
    _print_answer(args, ans, images[-1] if images else None)
    return 0


def _demo(args) -> int:
    import os
    from pathlib import Path

    from . import reference_backend
    from .model.synth import synthesize
    from .runtime.grounding import referring_prompt

    cache = Path(os.environ.get("VL2EDGE_CACHE", Path.home() / ".cache" / "vl2edge"))
    ckpt = cache / "checkpoints" / f"{args.preset}-seed0"
    if not (ckpt / "config.json").is_file():
        print(f"synthesizing {args.preset} into {ckpt} (random weights: the answer will be noise)", file=sys.stderr)
        synthesize(ckpt, args.preset, seed=0, force=True, progress=False)
    image = reference_backend.demo_image()
    prompt = referring_prompt("the red mug")
    print(f"prompt: {prompt!r} + a 640x480 synthetic scene", file=sys.stderr)
    ans = reference_backend.answer(ckpt, prompt, [image], sampling=_sampling(args),
                                   on_text=None if args.json else (lambda d: print(d, end="", flush=True)))
    _print_answer(args, ans, image)
    return 0


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (defaults: greedy, as the official README)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; official inference.py uses 0.4")
    g.add_argument("--top-p", type=float, default=1.0, help="official inference.py: 0.9")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="official inference.py: 1.1")
    g.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    p.add_argument("--draw-boxes", metavar="OUT.png", help="draw parsed grounding boxes on the (last) image")


def build_parser() -> argparse.ArgumentParser:
    from .model.presets import PRESETS

    p = argparse.ArgumentParser(prog="vl2edge", description="DeepSeek-VL2 on small machines")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthesized DeepSeek-VL2 checkpoint in the Hugging Face layout")
    s.add_argument("out", help="output directory")
    s.add_argument("--preset", required=True, choices=sorted(PRESETS),
                   help="tiny / small / vl2 at real dims; test-* at small dims")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--layers", type=int, default=None, help="truncate the language model to N layers")
    s.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_synth)

    e = sub.add_parser("export", help="checkpoint -> quantized split-ONNX runtime artifact")
    e.add_argument("src", help="checkpoint directory or hub repo id")
    e.add_argument("out", help="artifact directory to create")
    e.add_argument("--experts", default="int4", choices=["int4", "int8", "fp16", "fp32"],
                   help="routed-expert weights (fp32 = the all-fp32 parity artifact on cpu)")
    e.add_argument("--block-size", type=int, default=64, choices=[32, 64, 128])
    e.add_argument("--target", default="cpu", choices=["cpu", "cuda"], help="cpu: fp32 I/O; cuda: fp16 I/O")
    e.add_argument("--max-len", type=int, default=None, help="KV-cache length (default: the model's context)")
    e.add_argument("--force", action="store_true", help="replace an existing OUT (only once the new one is done)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_export)

    r = sub.add_parser("run", help="answer one prompt about images")
    r.add_argument("model", help="checkpoint directory or hub repo id (with --backend torch)")
    r.add_argument("--backend", default="torch", choices=["torch"], help="torch: the PyTorch reference")
    r.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    r.add_argument("--prompt", required=True)
    r.add_argument("--max-tiles", type=int, default=None, help="at most N local tiles per image (latency budget)")
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    r.add_argument("--threads", type=int, default=None)
    _add_generation_options(r)
    r.set_defaults(func=_run)

    d = sub.add_parser("demo", help="synthesize a small model (once, cached) and ground 'the red mug' in a "
                                    "synthetic scene through the whole pipeline")
    d.add_argument("--preset", default="test-tiny", choices=sorted(PRESETS))
    _add_generation_options(d)
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # our errors say what is wrong: no traceback
        print(f"vl2edge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

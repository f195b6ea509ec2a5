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

"""The `vl2edge` command. Each subcommand imports only what it needs, so runtime commands never load torch."""

from __future__ import annotations

import argparse
import sys


def _synth(args) -> int:
    from .model.synth import synthesize

    out = synthesize(args.out, args.preset, seed=args.seed, layers=args.layers, force=args.force,
                     progress=not args.quiet, init=args.init)
    print(out)
    return 0


def _export(args) -> int:
    from .export.exporter import export

    out = export(args.src, args.out, experts=args.experts, block_size=args.block_size, target=args.target,
                 force=args.force, max_len=args.max_len, progress=not args.quiet, dense=args.dense,
                 head=args.head, vision=args.vision, kv_cache=args.kv_cache,
                 min_onnxruntime=args.min_onnxruntime)
    print(out)
    return 0


# --- backends ------------------------------------------------------------------------------------------------
def _resolve_backend(args) -> str:
    """--backend onnx|torch, or by what the directory holds: a manifest.json = an exported artifact (onnx); a
    checkpoint needs --backend torch (or an export first)."""
    from pathlib import Path

    if args.backend:
        return args.backend
    path = Path(args.model).expanduser()
    if path.is_dir() and not (path / "manifest.json").is_file() and (path / "config.json").is_file():
        raise ValueError(f"{path} is a checkpoint, not an exported artifact: export it with "
                         f"`vl2edge export {path} OUT` and run OUT, or pass --backend torch to run the PyTorch "
                         f"reference on it")
    return "onnx"


def _options(args) -> dict:
    from .runtime.sampling import SamplingParams

    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    return {**sampling.as_dict(), "stop": args.stop or None}  # checked here (ValueError) for both backends


class _OnnxBackend:
    def __init__(self, args):
        from .runtime.api import load
        from .runtime.thread_pool import wanted

        self.model = load(args.model, provider=args.provider, threads=args.threads, max_tiles=args.max_tiles,
                          verify=args.verify, transient_vision=args.transient_vision,
                          official_pixels=args.official_pixels, low_memory=args.low_memory,
                          expert_cache=args.expert_cache, expert_prefetch=not args.no_prefetch,
                          shared_threads=wanted(True))
        self.chunk_size = args.chunk_size
        self.trace_path = args.trace_routing
        if self.trace_path:
            self.model.engine.routing_trace = []

    def answer(self, messages, images, options: dict, on_text, interruptible: bool = False):
        stream = self.model.chat(messages, images, stream=True, chunk_size=self.chunk_size, **options)
        try:
            for delta in stream:
                on_text(delta)
        except KeyboardInterrupt:
            stream.close()
            if not interruptible:
                raise
        return stream.result

    def reset(self) -> None:
        self.model.reset()

    def close(self) -> None:
        """Write the routing trace (--trace-routing) and say what the expert cache did."""
        eng = self.model.engine
        if self.trace_path:
            from .runtime.routing_trace import save_trace

            L = eng.config.language
            path = save_trace(self.trace_path, eng.routing_trace, L.n_routed_experts or 0, L.num_hidden_layers)
            print(f"[routing trace: {len(eng.routing_trace)} records -> {path}]", file=sys.stderr, flush=True)
        if eng.expert_cache is not None:
            c = eng.expert_cache
            st = c.stats.as_dict()
            rate = f"{st['hit_rate']:.1%}" if st["hit_rate"] is not None else "n/a"
            if not eng.expert_prefetch:
                pred = "no prefetch"
            elif st["prediction_rate"] is None:
                pred = "prefetch: none predicted yet"
            else:
                pred = f"prefetch: {st['prefetched']} loads, predictions {st['prediction_rate']:.1%} right"
            print(f"[expert cache: {c.budget / 2**20:.0f} MiB, {c.capacity} experts; hit rate {rate} "
                  f"({st['hits']} hits, {st['prefetch_hits']} prefetched, {st['misses']} misses; {pred}), "
                  f"{st['bytes_read'] / 2**20:.0f} MiB read ({c.read_mode}), {st['load_s']:.1f} s loading, "
                  f"{st['wait_s']:.1f} s waited]", file=sys.stderr, flush=True)


class _TorchBackend:
    def close(self) -> None:
        pass

    def __init__(self, args):
        from .reference_backend import ReferenceModel

        self.model = ReferenceModel(args.model, dtype=args.dtype, max_tiles=args.max_tiles, threads=args.threads,
                                    official_pixels=args.official_pixels)

    def answer(self, messages, images, options: dict, on_text, interruptible: bool = False):
        from .model.generate import SamplingConfig

        options = dict(options)
        stop = options.pop("stop")
        return self.model.generate(messages, images, sampling=SamplingConfig(**options), stop=stop, on_text=on_text,
                                   interruptible=interruptible)

    def reset(self) -> None:
        self.model.reset()


def _open_backend(args):
    if args.provider is not None and _resolve_backend(args) == "torch":
        raise ValueError("--provider applies to the onnx backend only")
    return (_TorchBackend if _resolve_backend(args) == "torch" else _OnnxBackend)(args)


def _summary(ans) -> str:
    t = ans.timings
    rate = f"{t['decode_tokens_per_s']:.1f} tok/s" if t.get("decode_tokens_per_s") else "n/a"
    parts = [f"{len(ans.token_ids)} tokens, stop: {ans.stop_reason}"]
    if "vision_s" in t:  # the runtime
        parts.append(f"prompt {ans.prompt_tokens} tokens ({ans.cached_tokens} cached)")
        parts.append(f"vision {t['vision_s']:.2f} s ({t['vision_tiles']} tiles), prefill {t['prefill_s']:.2f} s"
                     + (f" ({t['prefill_tokens_per_s']:.0f} tok/s)" if t.get("prefill_tokens_per_s") else "")
                     + (f", first token {t['ttft_s']:.2f} s" if t.get("ttft_s") is not None else "")
                     + f", decode {rate}")
    else:
        parts.append(f"prompt {ans.prompt_tokens} tokens")
        parts.append(f"vision+embed {t['vision_and_embed_s']:.2f} s, prefill {t['prefill_s']:.2f} s, decode {rate}")
    parts.append(f"{len(ans.grounding.boxes)} boxes")
    return "[" + "; ".join(parts) + "]"


def _print_answer(args, ans, image) -> None:
    import json

    if not args.json:
        print(flush=True)
    if args.draw_boxes and image is not None:
        from .runtime.grounding import draw_boxes

        draw_boxes(image, ans.grounding, args.draw_boxes)
    if args.json:
        print(json.dumps(ans.as_dict(), ensure_ascii=False), flush=True)
    else:
        print(_summary(ans), file=sys.stderr, flush=True)


def _stdout(delta: str) -> None:
    sys.stdout.write(delta)
    sys.stdout.flush()


def _prompt_text(args) -> str:
    """--prompt, or --prompt-file (`-`: standard input), read before any model is loaded."""
    if args.prompt_file is None:
        return args.prompt
    if args.prompt_file == "-":
        text = sys.stdin.read()
    else:
        from pathlib import Path

        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--prompt-file {args.prompt_file}: cannot read it ({e})") from None
    if text.endswith("\n"):
        text = text[:-1]  # the file's last newline is not part of the question
    if not text.strip():
        raise ValueError(f"--prompt-file {args.prompt_file}: the prompt is empty")
    return text


def _messages(args, prompt: str, n_images: int):
    user = _with_tags(prompt, n_images)
    if not args.system:
        return user
    return [{"role": "system", "content": args.system}, {"role": "user", "content": user}]


class _JsonLines:
    """`run --jsonl`: one event per line as it happens: {"type": "token", "text"}, {"type": "box", ...} as each
    grounding box closes (pixels of the last image), then {"type": "result", ...} (the --json object)."""

    def __init__(self, image_size):
        from .runtime.grounding import GroundingParser

        self.parser = GroundingParser(image_size)

    @staticmethod
    def emit(obj: dict) -> None:
        import json

        sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def on_text(self, delta: str) -> None:
        from .runtime.grounding import Box

        self.emit({"type": "token", "text": delta})
        for ev in self.parser.feed(delta):
            if isinstance(ev, Box):
                self.emit({"type": "box", "label": ev.label, "coords": list(ev.coords),
                           "xyxy": None if ev.xyxy is None else [round(v, 2) for v in ev.xyxy]})


def _run(args) -> int:
    from .runtime.images import OFFICIAL_PIXELS, load_image, open_image
    from .runtime.overlay_writer import check_output_path

    images = list(args.image)
    if args.draw_boxes and not images:
        raise ValueError("--draw-boxes needs an --image")
    if args.draw_boxes:
        check_output_path(args.draw_boxes)  # before the model: a run must not fail at its end
    prompt = _prompt_text(args)
    pixels = OFFICIAL_PIXELS if args.official_pixels else {}
    sizes = []
    for path in images:  # headers only: a missing or unreadable image fails before any model is loaded
        with open_image(path, **pixels) as im:
            sizes.append(im.size)
    backend = _open_backend(args)
    last = load_image(images[-1]) if args.draw_boxes else None
    events = _JsonLines(sizes[-1] if sizes else None) if args.jsonl else None
    on_text = events.on_text if events else (lambda d: None) if args.json else _stdout
    ans = backend.answer(_messages(args, prompt, len(images)), images or None, _options(args), on_text,
                         interruptible=True)
    if events:
        if args.draw_boxes and last is not None:
            from .runtime.grounding import draw_boxes

            draw_boxes(last, ans.grounding, args.draw_boxes)
        events.emit({"type": "result", **ans.as_dict()})
    else:
        _print_answer(args, ans, last)
    backend.close()
    return 130 if ans.stop_reason == "cancelled" else 0  # only Ctrl-C cancels a run


def _with_tags(prompt: str, n: int) -> str:
    from .runtime.chat_template import IMAGE_TAG

    if n and IMAGE_TAG not in prompt:  # the official convention: images first
        return (IMAGE_TAG + "\n") * n + prompt
    return prompt


CHAT_HELP = """commands: /image PATH  attach an image to the next message (repeatable)
          /reset       start a new conversation
          /quit        end (as does end of input)
anything else is your next message"""


def _chat(args) -> int:
    from .runtime.images import ImageError, open_image

    backend = _open_backend(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"vl2edge chat ({args.model}); /image PATH, /reset, /quit", file=sys.stderr)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    start = list(history)
    pending: list[str] = []
    failed = False
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit"):
                break
            if cmd == "/reset":
                history, pending = list(start), []
                backend.reset()
                print("[new conversation]", file=sys.stderr, flush=True)
            elif cmd == "/image":
                if not arg:
                    print("vl2edge chat: error: /image needs a path", file=sys.stderr, flush=True)
                    failed = True
                    continue
                try:
                    open_image(arg).close()  # header only: a bad file is reported now, not at the next message
                except ImageError as e:
                    print(f"vl2edge chat: error: {e}", file=sys.stderr, flush=True)
                    failed = True
                    continue
                pending.append(arg)
                print(f"[image attached: {arg}]", file=sys.stderr, flush=True)
            elif cmd == "/help":
                print(CHAT_HELP, file=sys.stderr, flush=True)
            else:
                print(f"vl2edge chat: error: unknown command {cmd!r} (/image PATH, /reset, /quit, /help)",
                      file=sys.stderr, flush=True)
                failed = True
            continue
        message = {"role": "user", "content": _with_tags(text, len(pending)), "images": list(pending)}
        pending = []
        try:
            ans = backend.answer(history + [message], None, _options(args), _stdout, interruptible=interactive)
        except (ValueError, OSError) as e:  # this turn failed; the conversation goes on without it
            print(f"\nvl2edge chat: error: {e}", file=sys.stderr, flush=True)
            failed = True
            continue
        print(flush=True)
        print(_summary(ans), file=sys.stderr, flush=True)
        history += [message, {"role": "assistant", "content": ans.text}]
    backend.close()
    return 2 if failed else 0


def _demo(args) -> int:
    import os
    from pathlib import Path

    from . import reference_backend
    from .runtime.grounding import referring_prompt

    if args.draw_boxes:
        from .runtime.overlay_writer import check_output_path

        check_output_path(args.draw_boxes)  # before synthesizing and exporting
    cache = Path(os.environ.get("VL2EDGE_CACHE", Path.home() / ".cache" / "vl2edge"))
    ckpt = cache / "checkpoints" / f"{args.preset}-seed0"
    art = cache / "artifacts" / f"{args.preset}-seed0-int4-b32"
    fresh = False
    if not (ckpt / "config.json").is_file():
        from .model.synth import synthesize

        print(f"synthesizing {args.preset} into {ckpt} (random weights: the answer will be noise)", file=sys.stderr)
        synthesize(ckpt, args.preset, seed=0, force=True, progress=False)
        fresh = True
    if args.backend == "onnx" and (fresh or not (art / "manifest.json").is_file()):
        try:
            from .export.exporter import export
        except ImportError as e:
            raise ValueError(f"building the demo artifact needs the [export] extra (torch, onnx): {e}") from None
        print(f"exporting it (int4 experts, block 32) into {art}", file=sys.stderr)
        export(ckpt, art, experts="int4", block_size=32, force=True, progress=False)
    image = reference_backend.demo_image()
    prompt = referring_prompt("the red mug")
    print(f"prompt: {prompt!r} + a 640x480 synthetic scene ({args.backend} backend)", file=sys.stderr)
    args.model = str(art if args.backend == "onnx" else ckpt)
    backend = _open_backend(args)
    ans = backend.answer(prompt, [image], _options(args), (lambda d: None) if args.json else _stdout)
    _print_answer(args, ans, image)
    return 0


def _serve(args) -> int:
    import logging
    import os
    from pathlib import Path

    try:
        from .serve.server import ServerOptions, serve
    except ImportError as e:
        raise ValueError(f"`vl2edge serve` needs the [server] extra: pip install \"vl2edge[server]\" ({e})") from None
    from .runtime.api import load
    from .runtime.thread_pool import wanted
    from .serve.media_files import allowed_dirs
    from .serve.server import check_exposure

    for name, v in (("--max-queue", args.max_queue), ("--max-images", args.max_images),
                    ("--max-body-mb", args.max_body_mb), ("--max-image-pixels", args.max_image_pixels),
                    ("--default-max-tokens", args.default_max_tokens), ("--port", args.port)):
        if v < (0 if name in ("--max-queue", "--port") else 1):
            raise ValueError(f"{name} must be {'>= 0' if name in ('--max-queue', '--port') else '>= 1'}, got {v}")
    api_key = args.api_key or os.environ.get("VL2EDGE_API_KEY") or None
    media = allowed_dirs(args.allowed_media_dir)
    check_exposure(args.host, ServerOptions(model_id="-", api_key=api_key, no_auth=args.no_auth))  # before loading
    model = load(args.model, provider=args.provider, threads=args.threads, max_tiles=args.max_tiles,
                 verify=args.verify, transient_vision=args.transient_vision, official_pixels=args.official_pixels,
                 low_memory=args.low_memory, expert_cache=args.expert_cache,
                 expert_prefetch=not args.no_prefetch, shared_threads=wanted(True))
    model.processor.image_options["max_pixels"] = args.max_image_pixels
    options = ServerOptions(model_id=args.model_name or Path(args.model).resolve().name, api_key=api_key,
                            max_queue=args.max_queue, max_body_bytes=int(args.max_body_mb * 2 ** 20),
                            max_images=args.max_images, allowed_media_dirs=media, no_auth=args.no_auth,
                            default_max_tokens=args.default_max_tokens, chunk_size=args.chunk_size)
    logging.basicConfig(level=args.log_level.upper(), format="vl2edge serve: %(message)s")
    serve(model, options, host=args.host, port=args.port, log_level=args.log_level,
          announce=lambda line: print(f"vl2edge serve: {line}", file=sys.stderr, flush=True))
    return 0


def _bench(args) -> int:
    from .bench.runner import main as bench_main

    return bench_main(args)


def _add_generation_options(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    g = p.add_argument_group("generation (defaults: greedy, as the official README)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; official inference.py uses 0.4")
    g.add_argument("--top-p", type=float, default=1.0, help="official inference.py: 0.9")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="official inference.py: 1.1")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the answer at this text, not included (repeatable)")


def _add_prompt_options(p: argparse.ArgumentParser) -> None:
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--prompt", help="the question; without <image> tags the images come first")
    q.add_argument("--prompt-file", metavar="FILE", help="read the question from FILE (`-`: standard input)")
    p.add_argument("--system", default=None, help="a system prompt (raw text before the first turn)")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    p.add_argument("--draw-boxes", metavar="OUT.png", help="draw parsed grounding boxes on the (last) image")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="ARTIFACT", help="exported artifact directory (`vl2edge export`); with "
                                                     "--backend torch a checkpoint directory")
    p.add_argument("--backend", default=None, choices=["onnx", "torch"],
                   help="onnx: the runtime on an artifact (default when the directory has a manifest.json); "
                        "torch: the PyTorch reference on a checkpoint")
    p.add_argument("--max-tiles", type=int, default=None, help="at most N local tiles per image (latency budget)")
    _add_runtime_options(p)
    _add_dtype_option(p)


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", default=None, metavar="cpu|cuda",
                   help="execution provider (default: CUDA if available, else CPU)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads")
    p.add_argument("--verify", default="sha256", choices=["sha256", "size"],
                   help="check the artifact's files by sha256 (default) or size only (fast start)")
    p.add_argument("--chunk-size", type=int, default=None, help="prefill chunk in tokens (default 512; with "
                                                                "--low-memory 256 on Tiny, 128 on Small)")
    p.add_argument("--transient-vision", action="store_true",
                   help="load the vision graph per image and release it after: less memory, slower images")
    p.add_argument("--low-memory", action="store_true",
                   help="the lowest peak RSS: --transient-vision with the language model loaded after the first "
                        "images and released while later images are encoded, and 256-token prefill chunks (slower "
                        "prefill, a vision load per image, a language-model load after each later image)")
    p.add_argument("--expert-cache", metavar="SIZE", default=None,
                   help="keep the routed experts in the artifact's files and at most SIZE (e.g. 3G, 512M, or auto: "
                        "the memory this process may use less the rest of the model) of them in memory, the "
                        "recently used ones (CPU; the tokens are the same)")
    p.add_argument("--no-prefetch", action="store_true",
                   help="with --expert-cache: do not load the experts the next layer's router predicts while a "
                        "decode step runs (the A/B of the prefetch)")
    p.add_argument("--trace-routing", metavar="FILE", default=None,
                   help="record every MoE layer's expert choices into FILE (.npz) for "
                        "`python -m vl2edge.bench.expert_replay FILE` (hit rate against a cache size)")
    p.add_argument("--official-pixels", action="store_true",
                   help="open images as the official code does: no EXIF rotation, transparency dropped instead of "
                        "composited over white (to compare answers with it)")


def _add_dtype_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="--backend torch only")


def build_parser() -> argparse.ArgumentParser:
    from .model.presets import PRESETS

    p = argparse.ArgumentParser(prog="vl2edge", description="DeepSeek-VL2 on small machines")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthesized DeepSeek-VL2 checkpoint in the Hugging Face layout")
    s.add_argument("out", help="output directory")
    s.add_argument("--preset", required=True, choices=sorted(PRESETS),
                   help="tiny / small / vl2 at real dims; test-* at small dims")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--layers", type=int, default=None, help="truncate the language model to N layers")
    s.add_argument("--init", default="default", choices=["default", "heavy", "sharp"],
                   help="heavy: heavy-tailed weights, outlier norm channels and large-norm token embeddings (the "
                        "statistics of trained models); sharp: sharp attention (queries x3, scores of std ~3), "
                        "RMSNorm gains over 0.6-1.4, sharper router and head; both for checkpoints no default was "
                        "tuned on")
    s.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_synth)

    e = sub.add_parser("export", help="checkpoint -> quantized split-ONNX runtime artifact")
    e.add_argument("src", help="checkpoint directory or hub repo id")
    e.add_argument("out", help="artifact directory to create")
    e.add_argument("--experts", default="int4", choices=["int4", "int8", "fp16", "fp32"],
                   help="routed-expert weights (fp32 = the all-fp32 parity artifact on cpu)")
    e.add_argument("--dense", default=None, choices=["int4", "int8"],
                   help="cpu: attention, dense/shared MLP and lm_head weights (default int8; the embedding and "
                        "the vision tower are int8 either way)")
    e.add_argument("--head", default=None, choices=["int4", "int8"],
                   help="cpu: lm_head weights (default: --dense's). `--dense int4 --head int8` keeps the output "
                        "layer at int8, where int4 costs most of the accuracy (docs/precision.md)")
    e.add_argument("--vision", default="auto", choices=["auto", "int8", "int8-dynamic"],
                   help="cpu: int8-dynamic runs the vision matmuls on int8 activations (~5x faster per matmul "
                        "on AMX/VNNI) in the layers where export-time calibration shows it is accurate, int8 "
                        "keeps fp32 activations; auto: int8-dynamic for int4/int8 experts on cpu")
    e.add_argument("--block-size", type=int, default=None, choices=[32, 64, 128],
                   help="quantization block (default 64, or the largest smaller one dividing the model's dims)")
    e.add_argument("--kv-cache", default="auto", choices=["auto", "int8", "float"],
                   help="KV-cache elements: int8 (cpu: 8-bit codes with static per-channel scales calibrated at "
                        "export, a quarter of the bytes a decode step reads; the MLA latent cache as uint8) or "
                        "float (the I/O dtype); auto: int8 for int4/int8 experts on cpu")
    e.add_argument("--target", default="cpu", choices=["cpu", "cuda"], help="cpu: fp32 I/O; cuda: fp16 I/O")
    e.add_argument("--min-onnxruntime", default=None, metavar="VERSION",
                   help="write only ops, inputs and attributes onnxruntime VERSION has (e.g. 1.23.2, the newest "
                        "with Python 3.10 wheels and Jetson's): an older release gets a float MHA cache, routing "
                        "as log-weights, QMoE without accuracy_level (docs/benchmarks.md, onnxruntime releases); default: the pinned one")
    e.add_argument("--max-len", type=int, default=None, help="KV-cache length (default: the model's context)")
    e.add_argument("--force", action="store_true", help="replace an existing OUT (only once the new one is done)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_export)

    r = sub.add_parser("run", help="answer one prompt about images, streaming the answer")
    _add_model_options(r)
    r.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    _add_prompt_options(r)
    _add_generation_options(r)
    _add_output_options(r)
    r.add_argument("--jsonl", action="store_true", help="stream JSON lines: a token event per piece of text, a box "
                                                        "event as each box closes, then the result object")
    r.set_defaults(func=_run)

    from .watch_cli import add_watch_parser

    add_watch_parser(sub)

    c = sub.add_parser("chat", help="interactive multi-turn session on stdin (/image PATH, /reset, /quit)")
    _add_model_options(c)
    c.add_argument("--system", default=None, help="a system prompt (raw text before the first turn)")
    _add_generation_options(c)
    c.set_defaults(func=_chat)

    d = sub.add_parser("demo", help="synthesize a small model and export it (once, cached), then ground 'the red "
                                    "mug' in a synthetic scene through the whole runtime")
    d.add_argument("--preset", default="test-tiny", choices=sorted(PRESETS))
    d.add_argument("--backend", default="onnx", choices=["onnx", "torch"],
                   help="onnx: export (int4, block 32) and run the runtime; torch: the PyTorch reference")
    d.add_argument("--max-tiles", type=int, default=None)
    _add_runtime_options(d)
    _add_dtype_option(d)
    _add_generation_options(d, max_new_tokens=48)
    _add_output_options(d)
    d.set_defaults(func=_demo)

    v = sub.add_parser("serve", help="an OpenAI-compatible HTTP API on the artifact (needs the [server] extra)")
    v.add_argument("model", metavar="ARTIFACT", help="exported artifact directory (`vl2edge export`)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only; an address "
                                                       "outside loopback needs --api-key or --no-auth)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (also $VL2EDGE_API_KEY)")
    v.add_argument("--model-name", default=None, help="the model id clients send and /v1/models lists (default: "
                                                      "the artifact directory's name)")
    v.add_argument("--max-tiles", type=int, default=None, help="at most N local tiles per image (latency budget)")
    v.add_argument("--max-queue", type=int, default=8, help="requests that may wait behind the running one; "
                                                            "more get 429 (default 8)")
    v.add_argument("--max-images", type=int, default=8, help="images per request (default 8)")
    v.add_argument("--max-image-pixels", type=int, default=40_000_000, help="pixels per image (default 40M)")
    v.add_argument("--max-body-mb", type=float, default=32.0, help="request body size limit (default 32 MiB)")
    v.add_argument("--allowed-media-dir", action="append", default=[], metavar="DIR",
                   help="a directory file:// image URLs may name files in (repeatable); without it file:// URLs "
                        "are refused and only data: URLs are taken")
    v.add_argument("--no-auth", action="store_true", help="serve without an API key on an address outside "
                                                          "loopback (otherwise refused: use --api-key)")
    v.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    v.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _add_runtime_options(v)
    v.set_defaults(func=_serve)

    b = sub.add_parser("bench", help="latency and memory benchmarks of the runtime against the PyTorch reference "
                                     "(JSON + table + plots)")
    b.add_argument("--model", default="tiny", help="preset name (synthesized and exported on first use, cached) or "
                                                   "a checkpoint directory (default: real-dims tiny)")
    b.add_argument("--precisions", default=None, help="artifacts to export and measure, comma-separated: int4, "
                                                      "int8, fp32 (routed experts; other weights int8), "
                                                      "+ -dense4 (`export --dense int4`), -head8 (after -dense4: "
                                                      "`--head int8`), -vdyn / -v8 (`--vision int8-dynamic` / "
                                                      "`int8`), -kv8 / -kvf (`--kv-cache`), e.g. int4-v8; default "
                                                      "int4,int8; --quick int4")
    b.add_argument("--threads", type=int, default=None, help="intra-op threads, runtime and reference (default: "
                                                             "the usable cores)")
    b.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--out", default=None, metavar="DIR", help="bench.json, bench.txt and the PNGs (default "
                                                              "./bench-out)")
    b.add_argument("--quick", action="store_true", help="a few minutes: the model truncated to 2 layers, fewer "
                                                        "contexts and repeats, fp32 reference only")
    b.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference")
    b.add_argument("--reference-dtypes", default=None, help="fp32,bf16 (default: both; --quick: fp32)")
    b.add_argument("--layers", type=int, default=None, help="truncate a preset to N layers (--quick: 2)")
    b.add_argument("--block-size", type=int, default=None, choices=[32, 64, 128],
                   help="quantization block (default: the exporter's: 64, or the largest smaller size that divides "
                        "the model's quantized dims)")
    b.add_argument("--artifact", action="append", default=[], metavar="PRECISION=DIR",
                   help="use this exported artifact for a precision instead of the cached export (repeatable)")
    b.add_argument("--force-export", action="store_true", help="export the cached artifacts again (after an "
                                                                 "exporter change)")
    b.add_argument("--contexts", default=None, help="decode context lengths, comma-separated (default "
                                                    "512,1024,2048,4096; --quick 512,4096)")
    b.add_argument("--repeats", type=int, default=None, help="repeats of every runtime measurement")
    b.add_argument("--decode-steps", type=int, default=None, help="timed decode steps per repeat")
    b.add_argument("--transient-vision", action="store_true",
                   help="the runtime loads the vision graph per image and releases it after (less memory)")
    b.add_argument("--low-memory", action="store_true",
                   help="the runtime in its low-memory mode (vl2edge.load(low_memory=True); 256-token chunks "
                        "on Tiny, 128 on Small)")
    b.add_argument("--expert-cache", metavar="SIZE", default=None,
                   help="the runtime with `--expert-cache SIZE` (or auto): routed experts read from the artifact "
                        "into a pool of that size; hit, prefetch and wait figures in bench.json")
    b.add_argument("--bandwidth-mb", type=int, default=1024, help="array size of the bandwidth probe (0: skip)")
    b.add_argument("--cache-dir", default=None, help="where presets and exports are cached (default "
                                                     "$VL2EDGE_CACHE/bench or ~/.cache/vl2edge/bench)")
    b.add_argument("--quiet", action="store_true", help="no progress lines")
    b.add_argument("--check", action="store_true",
                   help="with --provider cuda: check a GPU in one command (test presets exported --target cuda "
                        "against the fp16 reference on the GPU, then real-dims tiny's speed and device memory; "
                        "--out DIR/gpu_check.json); --provider cpu rehearses it")
    b.add_argument("--check-small", action="store_true", help="--check also measures real-dims small")
    b.set_defaults(func=_bench)
    return p


def _version() -> str:
    """vl2edge's version and the onnxruntime it would run on (from the installed metadata: nothing imported)."""
    from importlib import metadata

    from . import __version__

    ort = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            ort.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return f"vl2edge {__version__} ({', '.join(ort) or 'onnxruntime not installed'}; Python {sys.version.split()[0]})"


def _one_line_warnings() -> None:
    import warnings

    warnings.formatwarning = lambda message, category, *a, **k: f"vl2edge: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _one_line_warnings()
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as e:  # our errors say what is wrong (bad artifact/image/prompt/option): no traceback
        print(f"vl2edge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nvl2edge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

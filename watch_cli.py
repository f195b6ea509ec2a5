"""`vl2edge watch`: the perception loop from the command line (runtime/watch.py is the loop itself). Its parser and
its output: a line per answered frame on stderr with the answer streamed to stdout, or --jsonl, and the summary."""

from __future__ import annotations

import sys


def parse_period(text: str | None) -> float | None:
    """--every: "2s", "500ms", "1.5" (seconds), "1m" -> seconds."""
    if text is None:
        return None
    t = text.strip().lower()
    scale = 1.0
    for suffix, f in (("ms", 1e-3), ("s", 1.0), ("m", 60.0)):
        if t.endswith(suffix):
            t, scale = t[:-len(suffix)], f
            break
    try:
        value = float(t) * scale
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"--every {text!r}: give a period such as 2s, 500ms or 1.5")
    return value


def _frame_line(a) -> str:
    first = "n/a" if a.frame_to_first_token_s is None else f"{a.frame_to_first_token_s:.2f} s"
    return (f"[frame {a.index}: {a.tokens} tokens, stop: {a.stop_reason}; from the frame: first token {first}, "
            f"answer {a.frame_to_answer_s:.2f} s; {a.cached_tokens} of {a.prompt_tokens} prompt tokens cached; "
            f"{len(a.boxes)} boxes; {a.dropped_since_last} dropped]")


def _summary_lines(s: dict) -> list[str]:
    def pct(d):
        return "n/a" if d["p50"] is None else f"p50 {d['p50']:.2f} s, p90 {d['p90']:.2f} s"

    st = s["stage_mean_s"]
    lines = [f"[watch {s['source']}: {s['end_reason']}; {s['frames_answered']} frames answered of {s['frames_read']} "
             f"read ({s['frames_dropped']} dropped, {s['frames_skipped']} failed to decode) in {s['wall_s']:.1f} s]",
             f"[from the frame: first token {pct(s['frame_to_first_token_s'])}; answer {pct(s['frame_to_answer_s'])}]",
             "[per answered frame: " + ", ".join(f"{k[:-2]} {v:.3f} s" for k, v in st.items())
             + f"; idle {s['idle_s']:.1f} s in all; {s['cached_tokens']} prompt tokens reused from the cache]"]
    lines += [f"[skipped: {m}]" for m in s["skip_reasons"]]
    return lines


def run_watch(args) -> int:
    import json

    from .cli import _options, _prompt_text, _stdout, _with_tags
    from .runtime.api import load
    from .runtime.frame_sources import open_source
    from .runtime.images import load_image
    from .runtime.overlay_writer import OverlayWriter, check_output_path
    from .runtime.thread_pool import wanted

    every = parse_period(args.every)
    if args.frames is not None and args.frames < 1:
        raise ValueError(f"--frames must be >= 1, got {args.frames}")
    if args.draw_boxes:
        check_output_path(args.draw_boxes, directory_ok=True)
    prompt = _prompt_text(args)
    # the source is opened before the model loads: a missing file, a busy camera or a refused URL costs nothing
    source = open_source(args.source, paced=not args.all_frames, fps=args.fps, timeout_s=args.stall_timeout,
                         reconnect=args.reconnect)
    model = load(args.model, provider=args.provider, threads=args.threads, verify=args.verify,
                 transient_vision=args.transient_vision, official_pixels=args.official_pixels,
                 low_memory=args.low_memory, expert_cache=args.expert_cache, expert_prefetch=not args.no_prefetch,
                 shared_threads=wanted(True))
    options = _options(args)
    if args.chunk_size is not None:
        options["chunk_size"] = args.chunk_size
    writer = OverlayWriter(args.draw_boxes) if args.draw_boxes else None
    started: set[int] = set()

    def on_text(frame, delta):
        if frame.index not in started:
            started.add(frame.index)
            stamp = "" if frame.timestamp is None else f" @ {frame.timestamp:.2f} s"
            _stdout(f"frame {frame.index}{stamp}: ")
        _stdout(delta)

    watch = model.watch(source, _with_tags(prompt, 1), system=args.system, every=every, max_frames=args.frames,
                        all_frames=args.all_frames, max_tiles=args.max_tiles, stall_timeout=args.stall_timeout,
                        on_text=None if args.jsonl else on_text, **options)
    interrupted = False
    try:
        for a in watch:
            if args.jsonl:
                print(json.dumps(a.as_dict(), ensure_ascii=False), flush=True)
            else:
                print(flush=True)
                print(_frame_line(a), file=sys.stderr, flush=True)
            if writer is not None:
                writer.write(load_image(a.frame), a.result.grounding, a.index, a.timestamp)
    except KeyboardInterrupt:
        interrupted = True
        watch.close("interrupted")
    finally:
        watch.close()
        if writer is not None:
            writer.close()
    summary = watch.summary()
    if args.jsonl:
        print(json.dumps(summary, ensure_ascii=False), flush=True)
    else:
        if interrupted:
            print(flush=True)
        for line in _summary_lines(summary):
            print(line, file=sys.stderr, flush=True)
    if interrupted:
        return 130
    return 0 if summary["end_reason"] in ("end", "max_frames") else 1


def add_watch_parser(sub) -> None:
    """The `watch` subcommand on the `vl2edge` parser's subparsers."""
    from .cli import _add_generation_options, _add_prompt_options, _add_runtime_options

    w = sub.add_parser("watch", help="answer a prompt about frame after frame of a video, stream, camera or image "
                                     "directory, always the newest frame (needs the [video] extra for video)")
    w.add_argument("model", metavar="ARTIFACT", help="exported artifact directory (`vl2edge export`)")
    w.add_argument("source", metavar="SOURCE", help="a video file, http(s):// or rtsp:// URL, /dev/videoN, or a "
                                                    "directory or glob of images")
    _add_prompt_options(w)
    w.add_argument("--every", default=None, metavar="PERIOD", help="at most one answer per PERIOD (2s, 500ms, 1.5); "
                                                                   "frames between are dropped")
    w.add_argument("--frames", type=int, default=None, metavar="N", help="stop after N answered frames")
    w.add_argument("--all-frames", action="store_true", help="answer every frame, as fast as the model can (offline "
                                                             "labelling): no dropping, a file not paced")
    w.add_argument("--fps", type=float, default=None, help="the rate of a directory or glob of images (default: as "
                                                           "fast as they are taken)")
    w.add_argument("--stall-timeout", type=float, default=10.0, metavar="S",
                   help="end the loop when no frame arrives for S seconds (default 10)")
    w.add_argument("--reconnect", type=int, default=0, metavar="N", help="reopen a live stream that disconnects or "
                                                                         "stalls, up to N failed tries in a row")
    w.add_argument("--max-tiles", type=int, default=None, help="at most N local tiles per frame (latency budget)")
    w.add_argument("--jsonl", action="store_true", help="one JSON object per answered frame, then the summary")
    w.add_argument("--draw-boxes", metavar="OUT", help="write the answered frames with their boxes: a video (.mp4, "
                                                       ".mkv, .avi, .mov) or a directory of PNGs")
    _add_runtime_options(w)
    _add_generation_options(w, max_new_tokens=64)
    w.set_defaults(func=run_watch)

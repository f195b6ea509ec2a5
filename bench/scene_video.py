"""A synthetic camera: the demo's table scene with the red mug and the blue book sliding across it, as frames, an
encoded video (PyAV) or a directory of PNGs. What `vl2edge watch` is tried and tested on where no camera exists.

    python -m vl2edge.bench.scene_video clip.mp4 --frames 20 --fps 10     # H.264 (or MPEG-4 Part 2) in MP4
    python -m vl2edge.bench.scene_video frames/ --frames 5                # frame_0000.png, ...

Frame k is a pure function of (k, size): a test can rebuild the pixels of any frame it was given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw


def scene_frame(k: int, width: int = 640, height: int = 480, period: int = 40) -> np.ndarray:
    """Frame k, uint8 RGB H x W x 3: the mug moves right and back with a period of `period` frames, the book left."""
    phase = (k % period) / period
    x = 2 * phase if phase < 0.5 else 2 * (1 - phase)  # 0 -> 1 -> 0
    im = Image.new("RGB", (width, height), (200, 215, 230))
    d = ImageDraw.Draw(im)
    d.rectangle([0, int(height * 0.62), width, height], fill=(140, 100, 60))  # table
    d.rectangle([int(width * 0.62), int(height * 0.08), int(width * 0.92), int(height * 0.42)],
                fill=(235, 245, 255), outline=(90, 90, 90), width=max(1, width // 160))  # window
    mx = int(width * (0.05 + 0.55 * x))
    d.rectangle([mx, int(height * 0.40), mx + int(width * 0.14), int(height * 0.64)], fill=(200, 30, 30))  # mug
    bx = int(width * (0.70 - 0.55 * x))
    d.rectangle([bx, int(height * 0.55), bx + int(width * 0.22), int(height * 0.63)], fill=(40, 70, 180))  # book
    d.ellipse([int(width * 0.05), int(height * 0.05), int(width * 0.12), int(height * 0.14)],
              fill=(250, 200, 40))  # a sun that never moves: a fixed reference
    return np.asarray(im)


def scene_frames(n: int, width: int = 640, height: int = 480) -> Iterator[np.ndarray]:
    for k in range(n):
        yield scene_frame(k, width, height)


def write_video(path: str | Path, n: int, fps: int = 10, width: int = 640, height: int = 480,
                codec: str | None = None) -> Path:
    """Encode n frames at `fps` into `path` with PyAV (codec: libx264 when FFmpeg has it, else mpeg4)."""
    import av

    path = Path(path)
    with av.open(str(path), "w") as out:
        names = [codec] if codec else ["libx264", "h264", "mpeg4"]
        for name in names:
            try:
                stream = out.add_stream(name, rate=fps)
                break
            except (ValueError, av.error.FFmpegError):
                continue
        else:
            raise ValueError(f"FFmpeg has none of the encoders {names}")
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for a in scene_frames(n, width, height):
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_pngs(directory: str | Path, n: int, width: int = 640, height: int = 480) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for k, a in enumerate(scene_frames(n, width, height)):
        Image.fromarray(a).save(directory / f"frame_{k:04d}.png")
    return directory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vl2edge.bench.scene_video", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="a video file (.mp4, .mkv, .avi) or a directory (ending in /) for PNGs")
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--fps", type=int, default=10)
    p.add_argument("--size", default="640x480", help="WIDTHxHEIGHT (even numbers for video)")
    args = p.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    if args.out.endswith(("/", "\\")) or Path(args.out).is_dir():
        print(write_pngs(args.out, args.frames, w, h))
    else:
        print(write_video(args.out, args.frames, args.fps, w, h))
    return 0


if __name__ == "__main__":
    sys.exit(main())

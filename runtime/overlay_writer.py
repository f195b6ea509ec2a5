"""The overlay a person looks at: answered frames with their boxes drawn (runtime.grounding.draw_boxes), written as
a video (PyAV: .mp4, .mkv, .avi, .mov) or as a directory of PNGs (frame_000123.png, the source's frame index).

A video is written with the frames' own timestamps (variable frame rate, in milliseconds), so it plays back at the
pace the answers came at, the dropped frames' time included. Paths are checked before any model work
(`check_output_path`): a run must not fail at its end because of where it writes.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov")


def check_output_path(path: str | os.PathLike, *, directory_ok: bool = False) -> Path:
    """Refuse (ValueError naming it) an output path that cannot be written: a missing or read-only parent, a
    directory where a file is meant, a file that may not be overwritten. With directory_ok, a path without a video
    suffix is a directory of PNGs (created if missing)."""
    p = Path(path).expanduser()
    is_dir_target = directory_ok and p.suffix.lower() not in VIDEO_SUFFIXES and p.suffix.lower() != ".png"
    target = p if is_dir_target and p.exists() else p.parent
    if is_dir_target and p.exists() and not p.is_dir():
        raise ValueError(f"--draw-boxes {path}: exists and is not a directory")
    if not is_dir_target and p.is_dir():
        raise ValueError(f"--draw-boxes {path}: is a directory (give a file name)")
    if not target.exists():
        raise ValueError(f"--draw-boxes {path}: the directory {target} does not exist")
    if not target.is_dir():
        raise ValueError(f"--draw-boxes {path}: {target} is not a directory")
    if not os.access(target, os.W_OK | os.X_OK):
        raise ValueError(f"--draw-boxes {path}: the directory {target} is not writable")
    if not is_dir_target and p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"--draw-boxes {path}: the file exists and is not writable")
    return p


class OverlayWriter:
    """write(image, boxes, index, timestamp) for each answered frame; close() finishes the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = check_output_path(path, directory_ok=True)
        self.video = self.path.suffix.lower() in VIDEO_SUFFIXES
        self.written = 0
        self._container = self._stream = None
        self._t0: float | None = None
        self._last_pts = -1
        if not self.video:
            self.path.mkdir(exist_ok=True)

    def write(self, image, boxes, index: int, timestamp: float | None) -> None:
        """image: the frame as the model saw it (an RGB PIL image or uint8 RGB array); boxes: a GroundingResult or
        Boxes; index: the frame's index in its source (the PNG's name); timestamp: its time (the video's pts)."""
        from PIL import Image

        from .grounding import draw_boxes

        drawn = draw_boxes(image if isinstance(image, Image.Image) else Image.fromarray(image), boxes)
        if not self.video:
            drawn.save(self.path / f"frame_{index:06d}.png", format="PNG")
        else:
            self._encode(np.asarray(drawn), timestamp)
        self.written += 1

    def _encode(self, a: np.ndarray, timestamp: float | None) -> None:
        import av

        if self._container is None:
            self._container = av.open(str(self.path), "w")
            for name in ("libx264", "h264", "mpeg4"):
                try:
                    self._stream = self._container.add_stream(name, rate=1000)
                    break
                except (ValueError, av.error.FFmpegError):
                    continue
            else:
                raise ValueError(f"--draw-boxes {self.path}: FFmpeg has no H.264 or MPEG-4 encoder")
            # yuv420p needs even sizes: the overlay drops an odd last row / column
            self._stream.width, self._stream.height = a.shape[1] // 2 * 2, a.shape[0] // 2 * 2
            self._stream.pix_fmt = "yuv420p"
            self._stream.time_base = Fraction(1, 1000)
            self._t0 = timestamp or 0.0
        a = a[:self._stream.height, :self._stream.width]
        if a.shape[0] != self._stream.height or a.shape[1] != self._stream.width:  # a source that changed size
            from PIL import Image

            a = np.asarray(Image.fromarray(a).resize((self._stream.width, self._stream.height)))
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")
        pts = round(((timestamp or 0.0) - self._t0) * 1000) if timestamp is not None else self._last_pts + 1
        frame.pts = max(pts, self._last_pts + 1)  # strictly increasing, whatever the source's clock did
        frame.time_base = Fraction(1, 1000)
        self._last_pts = frame.pts
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        if self._container is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._container = None

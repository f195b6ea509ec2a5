"""Where frames come from: a video file, an HTTP / RTSP stream, a V4L2 camera, a directory or glob of images, or any
Python iterable of frames. `open_source(spec)` -> a FrameSource, whose `frames()` yields Frames (runtime.frames)
with their index, timestamp and read time.

Video, streams and cameras are read with PyAV (FFmpeg's bindings; the `[video]` extra), never a decoder of ours.
OpenCV would read the same sources, but it is a 60-90 MB wheel with a GUI stack, reports a stalled or disconnected
stream as an endless run of empty reads, and cannot say which packet failed; PyAV raises per packet and per
read, so a corrupt frame is skipped and counted, a stall is a timeout and a disconnection an error.

Timing, as a camera would deliver it: a file (a video file, or a video over HTTP with a known duration) is paced at
its own frame rate, the reader sleeping until each frame's presentation time, unless `paced=False` (every frame,
as fast as the consumer takes them: offline labelling). Live sources (a camera, RTSP, a live HTTP stream) deliver
at their own rate and are never paced. A directory or glob of images has no rate: it is read as fast as frames
are taken, or at `fps` when given.

Errors: a source that cannot be opened (missing, not a video, a busy or absent camera, a refused connection, the
extra not installed) raises SourceError, a ValueError whose message names the source, when it is opened, before any
model work. A frame that fails to decode is skipped and counted (`skipped`), never raised. A read that times out
ends the source with `end_reason` "stalled"; a broken connection with "disconnected" (after `reconnect` attempts to
open it again); a file or iterable that runs out with "end".
"""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .frames import CHANNEL_ORDERS, Frame, check_array
from .images import ImageError, describe, load_image

LIVE_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "udp://", "tcp://", "srt://", "rtp://")
URL_SCHEMES = LIVE_SCHEMES + ("http://", "https://")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
DEFAULT_TIMEOUT_S = 10.0


class SourceError(ValueError):
    """A frame source that cannot be opened; the message names it and says why."""


class FrameSource:
    """Frames from somewhere. `frames()` is a generator run by one reader thread; `skipped` counts frames that failed
    to decode, `end_reason` says why `frames()` ended ("end", "stalled", "disconnected", "closed", "error: ...")."""

    name = "?"
    live = False  # delivers at its own rate (a camera, a live stream): never paced

    def __init__(self) -> None:
        self.skipped = 0
        self.skip_messages: list[str] = []  # the first few reasons, for the summary
        self.end_reason: str | None = None
        self._closed = False

    def frames(self) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        self._closed = True

    def _skip(self, why: str) -> None:
        self.skipped += 1
        if len(self.skip_messages) < 5:
            self.skip_messages.append(why)


class _Pacer:
    """Sleep until a frame's presentation time, counted from the first frame (a camera's delivery)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0: float | None = None
        self.ts0 = 0.0

    def wait(self, timestamp: float | None, closed: Callable[[], bool]) -> None:
        if not self.enabled or timestamp is None:
            return
        if self.t0 is None:
            self.t0, self.ts0 = time.perf_counter(), timestamp
            return
        delay = self.t0 + (timestamp - self.ts0) - time.perf_counter()
        while delay > 0 and not closed():  # in slices, so that close() is not held up by a long gap
            time.sleep(min(delay, 0.1))
            delay = self.t0 + (timestamp - self.ts0) - time.perf_counter()


# --- video, streams, cameras: PyAV --------------------------------------------------------------------------------
def _import_av():
    try:
        import av
    except ImportError as e:
        raise SourceError(f"reading video, streams and cameras needs PyAV: pip install \"vl2edge[video]\" ({e})") \
            from None
    return av


class VideoSource(FrameSource):
    """A video file, an HTTP / RTSP / UDP stream or a V4L2 camera, decoded by PyAV. Opened in the constructor."""

    def __init__(self, spec: str, *, paced: bool = True, timeout_s: float = DEFAULT_TIMEOUT_S, reconnect: int = 0,
                 options: dict[str, str] | None = None):
        super().__init__()
        self.av = _import_av()
        self.spec = spec
        self.name = spec
        self.device = spec.startswith("/dev/video")
        self.format = "v4l2" if self.device else None
        self.timeout_s = timeout_s
        self.reconnect = reconnect
        self.options = dict(options or {})
        if spec.startswith(("rtsp://", "rtsps://")):
            self.options.setdefault("rtsp_transport", "tcp")  # UDP loses packets (grey smears) on Wi-Fi
        if not self.device and "://" not in spec and not Path(spec).exists():
            raise SourceError(f"{spec!r}: no such file")
        self.container = self._open()
        duration = self.container.duration
        self.live = self.device or spec.startswith(LIVE_SCHEMES) or (spec.startswith(("http://", "https://"))
                                                                     and not duration)
        self.paced = paced and not self.live
        st = self.container.streams.video[0]
        self.rate = float(st.average_rate) if st.average_rate else None

    def _open(self):
        av = self.av
        try:
            container = av.open(self.spec, format=self.format, options=self.options,
                                timeout=(self.timeout_s, self.timeout_s))
        except av.error.FFmpegError as e:
            raise SourceError(f"{self.spec!r}: cannot open ({_av_reason(e)})") from None
        except OSError as e:
            raise SourceError(f"{self.spec!r}: cannot open ({e})") from None
        if not container.streams.video:
            container.close()
            raise SourceError(f"{self.spec!r}: has no video stream")
        container.streams.video[0].thread_type = "AUTO"  # frame threads: decoding keeps up with the source
        return container

    def frames(self) -> Iterator[Frame]:
        pacer = _Pacer(self.paced)
        state = {"index": 0, "t_open": time.perf_counter(), "attempts": 0}
        while True:
            try:
                reason = yield from self._decode(self.container, pacer, state)
            finally:
                self.container.close()
            if self._closed:
                reason = "closed"
            if reason in ("end", "closed") or state["attempts"] >= self.reconnect or not self.live:
                self.end_reason = reason
                return
            state["attempts"] += 1
            time.sleep(min(2.0 ** state["attempts"] / 4, 5.0))
            try:
                self.container = self._open()
            except SourceError as e:
                self.end_reason = f"{reason}; reconnect {state['attempts']} of {self.reconnect} failed: {e}"
                return

    def _decode(self, container, pacer: _Pacer, state: dict):
        """Yield the container's frames; return why it ended: "end", "closed", "stalled", "disconnected (...)"."""
        av = self.av
        stream = container.streams.video[0]
        try:
            for packet in container.demux(stream):
                if self._closed:
                    return "closed"
                t0 = time.perf_counter()
                try:
                    decoded = packet.decode()
                except (av.error.InvalidDataError, ValueError) as e:
                    self._skip(f"packet at {_seconds(packet.pts, stream.time_base)} s: {_av_reason(e)}")
                    state["index"] += 1
                    continue
                decode_s = time.perf_counter() - t0
                for vf in decoded:
                    ts = vf.time if vf.time is not None else time.perf_counter() - state["t_open"]
                    pacer.wait(ts, lambda: self._closed)
                    t1 = time.perf_counter()
                    try:
                        array = vf.to_ndarray(format="rgb24")
                    except Exception as e:  # a frame the converter refuses: skipped like a corrupt one
                        self._skip(f"frame at {ts:.3f} s: {e}")
                        state["index"] += 1
                        continue
                    now = time.perf_counter()
                    # read_s: decoding and conversion, not the pacing sleep
                    yield Frame(array, "rgb", index=state["index"], timestamp=float(ts), read_at=now,
                                meta={"read_s": decode_s + now - t1})
                    state["index"] += 1
                    state["attempts"] = 0
                    decode_s = 0.0  # a packet's decode is counted once, on its first frame
        except av.error.FFmpegError as e:
            if isinstance(e, (TimeoutError, av.error.ExitError)) or "timed out" in str(e).lower():
                return "stalled"
            return f"disconnected ({_av_reason(e)})"
        except OSError as e:
            return f"disconnected ({e})"
        return "disconnected (the stream ended)" if self.live else "end"  # a live stream has no end of its own



def _seconds(pts, time_base) -> str:
    return "?" if pts is None or time_base is None else f"{float(pts * time_base):.3f}"


def _av_reason(e: Exception) -> str:
    # FFmpeg's message without the filename PyAV appends (the caller names the source)
    s = getattr(e, "strerror", None) or str(e)
    return str(s)


# --- images on disk -------------------------------------------------------------------------------------------------
class ImageFilesSource(FrameSource):
    """A directory (its image files in name order) or a glob pattern. Files are decoded with runtime.images, so
    they are turned upright and composited like any image input; an unreadable one is skipped and counted."""

    live = False

    def __init__(self, spec: str, *, fps: float | None = None, image_options: dict | None = None):
        super().__init__()
        self.name = spec
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not files:
                raise SourceError(f"{spec!r}: a directory with no image files ({', '.join(IMAGE_SUFFIXES)})")
        else:
            files = [Path(p) for p in sorted(glob.glob(spec)) if Path(p).is_file()]
            if not files:
                raise SourceError(f"{spec!r}: no file matches" if glob.has_magic(spec) else f"{spec!r}: no such file "
                                  f"or directory")
        self.files = files
        self.fps = fps
        self.image_options = {k: v for k, v in (image_options or {}).items() if k != "max_pixels"}

    def frames(self) -> Iterator[Frame]:
        t_open = time.perf_counter()
        pacer = _Pacer(self.fps is not None)
        for index, path in enumerate(self.files):
            if self._closed:
                self.end_reason = "closed"
                return
            ts = index / self.fps if self.fps else time.perf_counter() - t_open
            pacer.wait(ts, lambda: self._closed)
            t0 = time.perf_counter()
            try:
                array = np.asarray(load_image(path, **self.image_options))
            except ImageError as e:
                self._skip(str(e))
                continue
            now = time.perf_counter()
            yield Frame(array, "rgb", index=index, timestamp=ts, read_at=now, meta={"read_s": now - t0,
                                                                                      "path": str(path)})
        self.end_reason = "end"


# --- Python iterables -----------------------------------------------------------------------------------------------
class IterableSource(FrameSource):
    """Any iterable of frames: numpy arrays (in `channels` order), Frames (their own order), PIL images or paths.
    Arrays are copied as they are read (the producer may reuse its buffer); other inputs are decoded here, in the
    reader thread. An item that is not an image is skipped and counted."""

    live = True  # it delivers at its own rate

    def __init__(self, iterable: Iterable[Any], *, channels: str = "rgb", image_options: dict | None = None):
        super().__init__()
        if channels not in CHANNEL_ORDERS:
            raise ValueError(f"channels must be one of {CHANNEL_ORDERS}, got {channels!r}")
        self.iterable = iterable
        self.channels = channels
        self.name = f"<{type(iterable).__name__}>"
        self.image_options = {k: v for k, v in (image_options or {}).items() if k != "max_pixels"}

    def frames(self) -> Iterator[Frame]:
        t_open = time.perf_counter()
        for index, item in enumerate(self.iterable):
            if self._closed:
                self.end_reason = "closed"
                return
            t0 = time.perf_counter()
            ts = time.perf_counter() - t_open
            name = f"frame {index} ({describe(item)})"
            try:
                if isinstance(item, Frame):
                    frame = Frame(np.array(check_array(item.array, name), copy=True), item.channels, index=index,
                                  timestamp=item.timestamp if item.timestamp is not None else ts, meta=dict(item.meta))
                elif isinstance(item, np.ndarray):
                    frame = Frame(np.array(check_array(item, name), copy=True), self.channels, index=index,
                                  timestamp=ts)
                else:
                    frame = Frame(np.asarray(load_image(item, name=name, **self.image_options)), "rgb",
                                  index=index, timestamp=ts)
            except ImageError as e:  # not an image, or a corrupt one: skipped and counted, the loop goes on
                self._skip(str(e))
                continue
            now = time.perf_counter()
            yield Frame(frame.array, frame.channels, index=index, timestamp=frame.timestamp, read_at=now,
                        meta={**frame.meta, "read_s": now - t0})
        self.end_reason = "end"


# --- choosing one -------------------------------------------------------------------------------------------------
def open_source(spec: Any, *, paced: bool = True, fps: float | None = None, channels: str = "rgb",
                timeout_s: float = DEFAULT_TIMEOUT_S, reconnect: int = 0,
                image_options: dict | None = None) -> FrameSource:
    """A FrameSource for `spec`: a FrameSource (as is); a path or URL string (a directory or glob of images, a
    video file, /dev/videoN, http(s)://, rtsp://, ...); or any other iterable of frames.

    paced: read a video file at its frame rate (False: every frame, as fast as taken); fps: the rate of a directory
    or glob (None: as fast as taken); channels: the order of bare arrays from an iterable; timeout_s: a read that
    waits longer ends the source ("stalled"); reconnect: tries to reopen a live stream that disconnects or stalls, counted in a row
    (a frame read resets the count: a camera that comes back is followed for as long as it does)."""
    if isinstance(spec, FrameSource):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec)
        if not s:
            raise SourceError("the source is an empty string")
        if s.startswith(URL_SCHEMES) or s.startswith("/dev/video"):
            return VideoSource(s, paced=paced, timeout_s=timeout_s, reconnect=reconnect)
        path = Path(s)
        if path.is_dir() or glob.has_magic(s) or path.suffix.lower() in IMAGE_SUFFIXES:
            return ImageFilesSource(s, fps=fps, image_options=image_options)
        return VideoSource(s, paced=paced, timeout_s=timeout_s, reconnect=reconnect)
    if isinstance(spec, (bytes, np.ndarray, Frame)) or not hasattr(spec, "__iter__"):
        raise SourceError(f"{type(spec).__name__}: not a frame source (expected a path, a URL, /dev/videoN, a "
                          f"directory or glob of images, or an iterable of frames; one image goes to generate())")
    return IterableSource(spec, channels=channels, image_options=image_options)

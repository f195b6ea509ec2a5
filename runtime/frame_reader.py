"""Latest frame wins: a reader thread decodes a FrameSource while the model answers and keeps only the newest frame.

A perception loop that queued frames would answer ever older frames while memory grew; here the reader holds one
frame slot. A frame nobody took before the next one arrived is dropped and counted (`dropped`), so the consumer
always gets the newest frame, at most one frame is held whatever the source's rate, and the reader never waits for
the model (a camera's driver buffer never fills, so its frames stay fresh).

`all_frames=True` is the other contract, for offline labelling: the slot then blocks the reader until its frame is
taken, so every frame is answered and none is dropped (the source is read only as fast as the model answers).

The consumer's `take(timeout)` returns the next frame not yet taken, or None once the source has ended (why:
`end_reason`) or nothing arrived within the timeout (a stalled source: end_reason "stalled"). A FrameSource's own
read timeout (PyAV's) ends a blocked read; a Python iterable that blocks forever leaves its (daemon) reader thread
behind, ended as soon as the iterable yields again.
"""

from __future__ import annotations

import threading
import time

from .frame_sources import FrameSource
from .frames import Frame


class LatestFrameReader:
    def __init__(self, source: FrameSource, *, all_frames: bool = False):
        self.source = source
        self.all_frames = all_frames
        self.read = 0  # frames decoded
        self.dropped = 0  # frames replaced before anyone took them
        self.taken = 0
        self.end_reason: str | None = None
        self._slot: Frame | None = None
        self._done = False
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"vl2edge-frames {source.name}", daemon=True)

    @property
    def skipped(self) -> int:
        """Frames the source could not decode."""
        return self.source.skipped

    def start(self) -> "LatestFrameReader":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            for frame in self.source.frames():
                with self._cond:
                    if self._stop:
                        break
                    if self.all_frames:
                        while self._slot is not None and not self._stop:
                            self._cond.wait()
                        if self._stop:
                            break
                    elif self._slot is not None:
                        self.dropped += 1
                    # the counts as this frame arrives: what was lost between two answered frames is the difference
                    frame.meta["dropped_before"] = self.dropped
                    frame.meta["skipped_before"] = self.source.skipped
                    self._slot = frame
                    self.read += 1
                    self._cond.notify_all()
            reason = self.source.end_reason or ("closed" if self._stop else "end")
        except Exception as e:  # a source's own failure ends the loop with its message, never a hung consumer
            reason = f"error: {type(e).__name__}: {e}"
        with self._cond:
            self._done = True
            if self.end_reason is None:
                self.end_reason = reason
            self._cond.notify_all()

    def take(self, timeout: float | None = None) -> Frame | None:
        """The newest frame not yet taken (waits for one); None when the source has ended or nothing came within
        `timeout` seconds (then end_reason is "stalled")."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        with self._cond:
            while self._slot is None:
                if self._done:
                    return None
                left = None if deadline is None else deadline - time.perf_counter()
                if left is not None and left <= 0:
                    self.end_reason = self.end_reason or "stalled"
                    return None
                self._cond.wait(left)
            frame, self._slot = self._slot, None
            self.taken += 1
            self._cond.notify_all()
            return frame

    def close(self, join_timeout: float = 2.0) -> None:
        """Stop reading and release the source (waits up to join_timeout for the reader to notice)."""
        with self._cond:
            self._stop = True
            if self.end_reason is None:
                self.end_reason = "closed"
            self._slot = None
            self._cond.notify_all()
        self.source.close()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(join_timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

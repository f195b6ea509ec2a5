"""Frames as robotics code holds them: NumPy arrays (OpenCV, PyAV, cv_bridge) -> the PIL image the processor opens.

Accepted: `uint8` arrays of shape H x W (grayscale), H x W x 1, H x W x 3 or H x W x 4, contiguous or not (a crop,
a strided view, a negative stride). Four channels are composited over white as a PNG with alpha is (or dropped with
`official_pixels`, as for a PNG), so an array and the same pixels saved losslessly give the model the same tiles.

Channel order is never guessed from the pixels: an array is RGB unless it is wrapped as `Frame(array, "bgr")` (or
`bgr(array)`). The order is a property of where an array came from (OpenCV's `VideoCapture` and `imread` and
cv_bridge's "bgr8" give BGR, PyAV and Pillow give RGB), so it travels with the array: a conversation may mix a
PIL image, a PyAV frame and an OpenCV frame, a frame source yields frames of either order, and no per-call flag can
be set for the wrong image of a list. A Frame also carries the capture timestamp a source read it at.

Refused, each with one ImageError naming what was given and what is accepted: other dtypes (float arrays are
ambiguous between 0..1 and 0..255, uint16 between 10-, 12- and 16-bit sensors: convert to uint8 first), other
ranks or channel counts, an empty array, more pixels than the decompression-bomb limit.

The array is copied when it is opened: a camera driver or `cap.read(frame)` may reuse its buffer for the next
frame while the model still holds this one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

CHANNEL_ORDERS = ("rgb", "bgr")
ACCEPTED = ("uint8 arrays H x W (grayscale), H x W x 1, H x W x 3 (RGB, or BGR as Frame(a, 'bgr')) or H x W x 4 "
            "(RGBA / BGRA)")


@dataclass(frozen=True, eq=False)
class Frame:
    """An array with its channel order (and, from a frame source, when and where it was read).

    array      uint8 H x W, H x W x 1, H x W x 3 or H x W x 4
    channels   "rgb" or "bgr" (OpenCV's order; BGRA for four channels)
    index      position in its source (frames read so far, counting skipped and dropped ones), -1 if none
    timestamp  seconds: the frame's presentation time in its source (a video's pts), else since the source opened
    read_at    time.perf_counter() when the frame was decoded: latencies of an answer are counted from it
    """

    array: np.ndarray
    channels: str = "rgb"
    index: int = -1
    timestamp: float | None = None
    read_at: float | None = None
    meta: dict = field(default_factory=dict)  # source-specific facts (e.g. the file a frame came from)

    def __post_init__(self) -> None:
        if self.channels not in CHANNEL_ORDERS:
            raise ValueError(f"Frame channels must be one of {CHANNEL_ORDERS}, got {self.channels!r}")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return int(self.array.shape[1]), int(self.array.shape[0])


def bgr(array: np.ndarray, **frame_fields) -> Frame:
    """An OpenCV-ordered array (BGR, or BGRA) as a Frame the model reads correctly."""
    return Frame(array, "bgr", **frame_fields)


def is_array_input(src: object) -> bool:
    return isinstance(src, (np.ndarray, Frame))


def describe_array(src: np.ndarray | Frame) -> str:
    if isinstance(src, Frame):
        a = src.array
        what = f"{src.channels.upper()} frame" + (f" #{src.index}" if src.index >= 0 else "")
    else:
        a, what = src, "ndarray"
    if not isinstance(a, np.ndarray):
        return f"<{what} holding {type(a).__name__}>"
    return f"<{what} {a.dtype} {'x'.join(str(n) for n in a.shape) or 'scalar'}>"


def array_to_image(src: np.ndarray | Frame, name: str, max_pixels: int | None = None) -> Image.Image:
    """A copy of the frame's pixels as an RGB, RGBA or L PIL image (images.to_rgb then handles alpha as for files).

    max_pixels: refuse larger frames (None = Pillow's Image.MAX_IMAGE_PIXELS at call time)."""
    channels = src.channels if isinstance(src, Frame) else "rgb"
    a = check_array(src.array if isinstance(src, Frame) else src, name, max_pixels)
    # a fresh C-ordered copy either way (see the module docstring: never hold the caller's buffer)
    if channels == "bgr" and a.ndim == 3:
        a = np.ascontiguousarray(a[:, :, [2, 1, 0, 3][:a.shape[2]]])  # fancy indexing copies
    else:
        a = np.array(a, order="C", copy=True)
    return Image.fromarray(a)  # 2-D -> L, 3 channels -> RGB, 4 -> RGBA


def check_array(a: object, name: str, max_pixels: int | None = None) -> np.ndarray:
    """`a` as an accepted image array (H x W x 1 squeezed to H x W; not copied), or ImageError naming the problem."""
    from .images import ImageError

    if not isinstance(a, np.ndarray):
        raise ImageError(f"{name}: a Frame must hold a numpy array; accepted: {ACCEPTED}")
    if a.dtype != np.uint8:
        hint = (" (float pixels may mean 0..1 or 0..255: scale and convert with .astype(np.uint8))"
                if a.dtype.kind == "f" else " (convert to 8 bits first)")
        raise ImageError(f"{name}: dtype {a.dtype} is not accepted{hint}; accepted: {ACCEPTED}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(f"{name}: shape {tuple(a.shape)} is not an image layout; accepted: {ACCEPTED}")
    h, w = int(a.shape[0]), int(a.shape[1])
    if h == 0 or w == 0:
        raise ImageError(f"{name}: the array has no pixels ({w}x{h})")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if limit is not None and w * h > limit:
        raise ImageError(f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {limit} "
                         f"(raise max_pixels if the frame is trusted)")
    return a

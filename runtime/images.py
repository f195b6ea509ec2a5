"""Opening images robustly: any Pillow-readable input -> an 8-bit RGB PIL image, or a clear ImageError.

The official pipeline does `Image.open(path).convert("RGB")` and nothing else. That is exact for ordinary 8-bit
RGB/L files, but it
  * ignores EXIF orientation, so a portrait phone photo reaches the model lying on its side (and boxes come back in
    a frame the user never sees);
  * drops the alpha channel, so transparent pixels show whatever colour happens to be stored under them (often
    black: black text on a transparent logo becomes black on black);
  * clips 16-bit images to 255, which turns almost every 16-bit picture white.

Defaults here, and how to get the official behaviour back:
  * `exif_transpose=True`: the image is turned upright the way every viewer shows it. `exif_transpose=False`
    reproduces the official pixels (no rotation). Camera frames and most datasets carry no orientation tag, so
    for them both settings are identical.
  * `alpha_background=(255, 255, 255)`: transparency is composited over white (what a page or a viewer shows).
    `alpha_background=None` drops alpha like `.convert("RGB")` does.
  * 16-bit and 32-bit integer images are scaled to 8 bits (v / 257 for 16-bit), float images are mapped from
    [0, 1] (or their own range); there is no switch back to clipping, which nobody wants.
  * animated images: the first frame; CMYK/YCbCr/1/LA/PA/...: Pillow's own conversion to RGB.

Errors: every failure (missing or empty file, unknown format, truncated or corrupt data, 0-pixel image,
decompression bomb) raises ImageError, a ValueError whose message starts with the image's name (its path or a
short description) and says what is wrong.

Opening is lazy on purpose: `open_image` reads only the header, so the processor can count tokens and reject an
overlong prompt before any pixel is decoded; `OpenedImage.load()` decodes.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import IO, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .frames import Frame, array_to_image, describe_array, is_array_input

WHITE = (255, 255, 255)
# The official pipeline's pixels (PIL .convert("RGB"), no EXIF rotation): Processor options that reproduce them, for
# comparing answers with the official code on transparent or rotated images (`--official-pixels`).
OFFICIAL_PIXELS = {"exif_transpose": False, "alpha_background": None}

# numpy arrays and Frames (runtime.frames) are images too: what robotics code holds
ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes], Image.Image, np.ndarray, Frame]

_ORIENTATION_TAG = 0x0112
# EXIF orientation value -> the transpose that shows the image upright.
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = (5, 6, 7, 8)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageError(ValueError):
    """An image that cannot be used; the message names the image and the problem."""


def describe(src: object) -> str:
    """A short human-readable name for an image input, used in error messages."""
    if isinstance(src, OpenedImage):
        return src.name
    if is_array_input(src):
        return describe_array(src)
    if isinstance(src, (str, os.PathLike)):
        return repr(os.fspath(src))
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    if isinstance(src, Image.Image):
        return f"<PIL image {src.mode} {src.width}x{src.height}>"
    name = getattr(src, "name", None)
    if isinstance(name, (str, bytes)) and name:
        return repr(os.fsdecode(name))
    return f"<{type(src).__name__}>"


class OpenedImage:
    """An image whose header has been read: its upright size is known, its pixels are not decoded yet."""

    def __init__(self, im: Image.Image, name: str, *, owned: bool, exif_transpose: bool,
                 alpha_background: tuple[int, int, int] | None):
        self._im = im
        self._owned = owned  # close only what we opened, never a PIL image the caller handed us
        self._rgb: Image.Image | None = None
        self.name = name
        self.alpha_background = alpha_background
        self.orientation = _orientation(im) if exif_transpose else 1
        w, h = im.size
        self.size: tuple[int, int] = (h, w) if self.orientation in _SWAPS_AXES else (w, h)

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    def load(self) -> Image.Image:
        """Decode and return the upright 8-bit RGB image (ImageError if the data is truncated or corrupt).

        The result is kept, so calling load() again is free; the source file is released once decoded.
        """
        if self._rgb is not None:
            return self._rgb
        try:
            self._im.load()
            rgb = to_rgb(self._im, self.alpha_background)
            if self.orientation in _ORIENTATION_TRANSPOSE:
                rgb = rgb.transpose(_ORIENTATION_TRANSPOSE[self.orientation])
            if rgb is self._im and self._owned:
                # Detach from the source so that closing it cannot destroy the result. Only animated files
                # (kept open for seeking) need it; other files were closed by Pillow after decoding.
                rgb = rgb.copy() if getattr(self._im, "n_frames", 1) > 1 else rgb
        except ImageError:
            self.close()
            raise
        except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
            self.close()
            raise ImageError(f"{self.name}: truncated or corrupt image data ({type(e).__name__}: {e})") from e
        if rgb is not self._im:
            self.close()
        if rgb.size != self.size:  # cannot happen unless a plugin lies about its size; never feed a wrong count
            raise ImageError(f"{self.name}: decoded size {rgb.size} differs from the header's {self.size}")
        self._rgb = rgb
        return rgb

    def close(self) -> None:
        """Release the source file if we opened it and it is not the decoded result itself."""
        if self._owned and self._im is not self._rgb:
            self._im.close()

    def __enter__(self) -> "OpenedImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OpenedImage({self.name}, size={self.size}, mode={self._im.mode})"


def open_image(src: ImageInput | OpenedImage, *, exif_transpose: bool = True,
               alpha_background: tuple[int, int, int] | None = WHITE, max_pixels: int | None = None,
               name: str | None = None) -> OpenedImage:
    """Read an image's header (path, bytes, binary file object or PIL image) without decoding its pixels; a numpy
    array or Frame (runtime.frames) is checked and copied here.

    max_pixels: refuse images with more pixels (decompression-bomb guard); None = Pillow's Image.MAX_IMAGE_PIXELS
    at call time (no limit if that is None).
    """
    if isinstance(src, OpenedImage):
        return src
    name = name or describe(src)
    owned = True
    if isinstance(src, Image.Image):
        im, owned = src, False
    elif is_array_input(src):
        im = array_to_image(src, name, max_pixels)
    else:
        im = _open_pil(src, name)
    try:
        _check_size(im, name, max_pixels)
        return OpenedImage(im, name, owned=owned, exif_transpose=exif_transpose, alpha_background=alpha_background)
    except BaseException:
        if owned:
            im.close()
        raise


def load_image(src: ImageInput | OpenedImage, **kwargs) -> Image.Image:
    """open_image(...).load(): the decoded upright RGB image."""
    return open_image(src, **kwargs).load()


def _open_pil(src: object, name: str) -> Image.Image:
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.exists():
            raise ImageError(f"{name}: no such file")
        if path.is_file() and path.stat().st_size == 0:
            raise ImageError(f"{name}: the file is empty (0 bytes)")
        fp: object = path
    elif isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageError(f"{name}: no data (0 bytes)")
        fp = io.BytesIO(bytes(src))
    elif hasattr(src, "read"):
        fp = src
    else:
        raise ImageError(f"{name}: not an image input (expected a path, bytes, a binary file object, a PIL image or "
                         f"a uint8 numpy array)")
    try:
        with warnings.catch_warnings():
            # Pillow warns between 1x and 2x its limit and raises above 2x; _check_size decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: refused as a possible decompression bomb ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{name}: not a readable image (unknown format or corrupt header)") from e
    except Exception as e:
        raise ImageError(f"{name}: cannot open ({type(e).__name__}: {e})") from e


def _check_size(im: Image.Image, name: str, max_pixels: int | None) -> None:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: the image has no pixels ({w}x{h})")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if limit is not None and w * h > limit:
        raise ImageError(f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {limit} "
                         f"(decompression-bomb guard; raise max_pixels if the image is trusted)")


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block is no reason to refuse the pixels
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def to_rgb(im: Image.Image, alpha_background: tuple[int, int, int] | None = WHITE) -> Image.Image:
    """Convert a decoded image of any mode to 8-bit RGB (see the module docstring for the rules)."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        return Image.fromarray(_to_uint8(np.asarray(im), im.mode)).convert("RGB")
    if alpha_background is not None and _has_alpha(im):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*alpha_background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if im.mode == "RGB":
        return im
    return im.convert("RGB")


def _has_alpha(im: Image.Image) -> bool:
    # "transparency" covers palette images with a transparent index and L/RGB images with a colour key.
    return im.mode in _ALPHA_MODES or (im.mode in ("P", "L", "RGB") and "transparency" in im.info)


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Scale a single-channel high-depth array to uint8 without clipping away its range.

    I;16 declares its depth: always v / 257. "I" (32-bit) and "F" do not, so their range decides: floats in [0, 1]
    are x 255, values within 0..255 are kept, "I" within 0..65535 is taken as 16-bit, anything else is stretched.
    """
    if mode.startswith("I;16"):
        # full 16-bit range: 65535 -> 255; (v + 128) // 257 == round(v / 257) for integers (no ties exist)
        return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    a = a.astype(np.float64)
    a = np.where(np.isfinite(a), a, 0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = a * 255.0  # the usual float convention
    elif lo >= 0.0 and hi <= 255.0:
        scaled = a  # 8-bit data stored in a wide container
    elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
        scaled = a / 257.0  # 16-bit data (older Pillow opens 16-bit PNGs as "I")
    else:
        scaled = (a - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)  # unknown range: stretch it
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)

"""DeepSeek-VL2 dynamic tiling (reference: ../shared/reference/deepseek-vl2.md §4), numpy + Pillow only.

For one RGB image of size (W, H):
  1. best resolution: the candidate (w, h) from processor_config.json's `candidate_resolutions` that keeps the most
     of the original pixels, then wastes the fewest canvas pixels; the earlier candidate wins ties (§4a). With more
     than two images in the conversation there is no tiling and the "best" is one tile, (384, 384).
  2. global view: the image padded to 384x384; local view: padded to (w, h) and cut into 384x384 crops row by row.
     Padding is PIL.ImageOps.pad (aspect-preserving bicubic resize, centred on a canvas of colour int(mean*255)).
  3. each tile: x/255, then (x - mean)/std, channels first, float32 -> tiles [1 + tw*th, 3, 384, 384].
  4. image tokens: s*(s+1) global (s rows ended by a newline slot) + 1 separator + (th*s)*(tw*s + 1) local, with
     s = ceil((384 // patch) / downsample) = 14, i.e. 211 + 14*th*(14*tw + 1).

`max_tiles` is this runtime's own knob (not in the official code): it restricts the candidates to grids of at most N
local tiles, trading detail for latency. None keeps the model's behaviour.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps


def select_best_resolution(size: tuple[int, int], candidates: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """§4a: the candidate (w, h) that maximises the effective pixels, then minimises the wasted ones; first wins."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {size} has no pixels")
    best = None
    max_effective, min_wasted = 0, math.inf
    for cw, ch in candidates:
        scale = min(cw / width, ch / height)
        # int() truncation as in the official code; upscaling earns nothing beyond the original pixel count
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cw * ch - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            best, max_effective, min_wasted = (cw, ch), effective, wasted
    if best is None:
        raise ValueError("no candidate resolutions")
    return best


def tokens_per_side(image_size: int, patch_size: int, downsample_ratio: int) -> int:
    """Tokens along one side of a tile: the ViT grid (384 // 14 = 27) pooled by the projector, rounded up (14)."""
    return -(-(image_size // patch_size) // downsample_ratio)


def image_token_count(grid: tuple[int, int], per_side: int) -> int:
    """Image-token slots of one image tiled into grid = (width tiles, height tiles) (§4c)."""
    tw, th = grid
    global_view = per_side * (per_side + 1)  # s rows of s tokens, each row ended by a newline slot
    separator = 1
    local_view = (th * per_side) * (tw * per_side + 1)
    return global_view + separator + local_view


def pad_to(image: Image.Image, size: tuple[int, int], color: tuple[int, int, int]) -> Image.Image:
    """PIL.ImageOps.pad(image, size, BICUBIC, color), also for images so thin that they shrink to 0 pixels.

    Pillow >= 10.x returns the bare canvas when the resized image would be 0 pixels wide (a 1x4000 strip in a
    384 box); older versions raise instead. Reproduce the former everywhere so extreme aspect ratios work.
    """
    w, h = image.size
    if w * size[1] != h * size[0]:  # aspect differs: ImageOps.contain rounds the short side
        if w * size[1] > h * size[0]:
            short = round(h / w * size[0])
        else:
            short = round(w / h * size[1])
        if short == 0:
            return Image.new("RGB", size, color)
    return ImageOps.pad(image, size, method=Image.Resampling.BICUBIC, color=color)


@dataclass(frozen=True)
class TiledImage:
    """One image after tiling: tiles [1 + tw*th, 3, S, S] float32 (global first) and its grid (tw, th)."""

    tiles: np.ndarray
    grid: tuple[int, int]
    num_tokens: int


@dataclass(frozen=True)
class ImageProcessor:
    """The image half of DeepseekVLV2Processor, configured from processor_config.json."""

    candidate_resolutions: tuple[tuple[int, int], ...]
    patch_size: int
    downsample_ratio: int
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    normalize: bool = True
    max_tiles: int | None = None

    def __post_init__(self) -> None:
        cands = tuple((int(w), int(h)) for w, h in self.candidate_resolutions)
        object.__setattr__(self, "candidate_resolutions", cands)
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))
        if not cands:
            raise ValueError("candidate_resolutions is empty")
        s = cands[0][0]  # the official image_size: the first candidate's width
        bad = [c for c in cands if c[0] <= 0 or c[1] <= 0 or c[0] % s or c[1] % s]
        if bad:
            raise ValueError(f"candidate_resolutions {bad} are not whole multiples of the tile size {s}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0.0 in self.image_std:
            raise ValueError(f"image_mean {self.image_mean} / image_std {self.image_std} must be 3 values, std != 0")
        if self.max_tiles is not None:
            if not isinstance(self.max_tiles, int) or self.max_tiles < 1:
                raise ValueError(f"max_tiles must be a positive integer or None, got {self.max_tiles!r}")
            if not self.candidates:
                raise ValueError(f"max_tiles={self.max_tiles}: no candidate resolution has that few tiles")

    # --- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: dict, max_tiles: int | None = None) -> "ImageProcessor":
        """From a processor_config.json dict (patch_size and downsample_ratio are required, as officially)."""
        missing = [k for k in ("candidate_resolutions", "patch_size", "downsample_ratio") if k not in cfg]
        if missing:
            raise ValueError(f"processor_config.json lacks {missing}")
        return cls(
            candidate_resolutions=tuple(tuple(c) for c in cfg["candidate_resolutions"]),
            patch_size=int(cfg["patch_size"]),
            downsample_ratio=int(cfg["downsample_ratio"]),
            image_mean=tuple(cfg.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(cfg.get("image_std", (0.5, 0.5, 0.5))),
            normalize=bool(cfg.get("normalize", True)),
            max_tiles=max_tiles,
        )

    @classmethod
    def from_dir(cls, path: str | Path, max_tiles: int | None = None) -> "ImageProcessor":
        return cls.from_config(json.loads((Path(path) / "processor_config.json").read_text()), max_tiles)

    # --- geometry and token counts (no pixels) -----------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.candidate_resolutions[0][0]

    @property
    def tokens_per_side(self) -> int:
        return tokens_per_side(self.image_size, self.patch_size, self.downsample_ratio)

    @property
    def pad_color(self) -> tuple[int, int, int]:
        return tuple(int(m * 255) for m in self.image_mean)  # 0.5 -> 127, as officially

    @property
    def candidates(self) -> tuple[tuple[int, int], ...]:
        """The candidates in use: all of them, or those with at most max_tiles local tiles (order kept)."""
        if self.max_tiles is None:
            return self.candidate_resolutions
        s = self.image_size
        return tuple(c for c in self.candidate_resolutions if (c[0] // s) * (c[1] // s) <= self.max_tiles)

    def best_resolution(self, size: tuple[int, int], cropping: bool = True) -> tuple[int, int]:
        """The canvas (w, h) of the local view; one tile when cropping is off (> 2 images in the conversation)."""
        if not cropping:
            return (self.image_size, self.image_size)
        return select_best_resolution(size, self.candidates)

    def grid(self, size: tuple[int, int], cropping: bool = True) -> tuple[int, int]:
        """(width tiles, height tiles): the row of images_spatial_crop."""
        w, h = self.best_resolution(size, cropping)
        return (w // self.image_size, h // self.image_size)

    def num_tokens(self, size: tuple[int, int], cropping: bool = True) -> int:
        """Image-token slots for an image of this (upright) size."""
        return image_token_count(self.grid(size, cropping), self.tokens_per_side)

    def num_tiles(self, size: tuple[int, int], cropping: bool = True) -> int:
        tw, th = self.grid(size, cropping)
        return 1 + tw * th

    # --- pixels ---------------------------------------------------------------------------------------------
    def process(self, image: Image.Image, cropping: bool = True) -> TiledImage:
        """Tile one RGB image: [global, local row 0 left..right, local row 1, ...] as normalised float32."""
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode} (use runtime.images.load_image)")
        s = self.image_size
        best = self.best_resolution(image.size, cropping)
        tw, th = best[0] // s, best[1] // s
        global_view = self.to_array(pad_to(image, (s, s), self.pad_color))  # [S, S, 3]
        if best == (s, s):
            local = global_view[None]  # the single local tile is the same padded image; skip a second resize
        else:
            big = self.to_array(pad_to(image, best, self.pad_color))  # [th*S, tw*S, 3]
            local = big.reshape(th, s, tw, s, 3).transpose(0, 2, 1, 3, 4).reshape(th * tw, s, s, 3)
        tiles = np.concatenate([global_view[None], local], axis=0).transpose(0, 3, 1, 2)
        return TiledImage(np.ascontiguousarray(tiles), (tw, th), image_token_count((tw, th), self.tokens_per_side))

    def to_array(self, image: Image.Image) -> np.ndarray:
        """HWC float32: x/255, then (x - mean)/std, in float32 like torchvision's ToTensor + Normalize."""
        x = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255)
        if self.normalize:
            x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return x

"""Projector and image-token layout (reference §1a, §4d).

Projector: the 27x27 grid is zero-padded to 28x28 (bottom row, right column) and unfolded in non-overlapping 2x2
windows. F.unfold orders the 4*C features channel-major (feature = c*4 + dy*2 + dx), not "four neighbours
concatenated"; the checkpoint's first Linear was trained on that order. Then Linear -> exact GELU -> Linear.

Layout of one image in the sequence (global view first, "head"):
  global tile 14x14, an image_newline after every row        -> 14 * 15 = 210 vectors
  view_seperator                                             -> 1
  local tiles arranged as one (th*14) x (tw*14) grid, a newline after every row -> th*14 * (tw*14 + 1)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VL2Config


class Projector(nn.Module):
    def __init__(self, cfg: VL2Config):
        super().__init__()
        p = cfg.projector
        self.ratio = p.downsample_ratio
        self.layers = nn.Sequential(
            nn.Linear(p.input_dim * self.ratio**2, p.n_embed), nn.GELU(), nn.Linear(p.n_embed, p.n_embed)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[n, 729, C] -> [n, 196, D]"""
        n, t, c = x.shape
        side = int(round(t**0.5))
        grid = x.transpose(1, 2).reshape(n, c, side, side)
        pad = -side % self.ratio
        grid = F.pad(grid, (0, pad, 0, pad))  # zeros on the right and at the bottom
        patches = F.unfold(grid, kernel_size=self.ratio, stride=self.ratio)  # [n, c*r*r, 196], channel-major
        return self.layers(patches.transpose(1, 2))


def layout_image(tiles: torch.Tensor, width_tiles: int, height_tiles: int, newline: torch.Tensor,
                 separator: torch.Tensor, global_first: bool = True) -> torch.Tensor:
    """Projected tiles of one image [1 + tw*th, side*side, D] -> its embedding run [211 + 14*th*(14*tw+1), D]."""
    n, t, d = tiles.shape
    side = int(round(t**0.5))
    tw, th = width_tiles, height_tiles
    if n != 1 + tw * th:
        raise ValueError(f"image with a {tw}x{th} grid needs {1 + tw * th} tiles, got {n}")
    g = tiles[0].view(side, side, d)
    g = torch.cat([g, newline.view(1, 1, d).expand(side, 1, d)], dim=1).reshape(-1, d)
    loc = tiles[1:].view(th, tw, side, side, d).permute(0, 2, 1, 3, 4).reshape(th * side, tw * side, d)
    loc = torch.cat([loc, newline.view(1, 1, d).expand(th * side, 1, d)], dim=1).reshape(-1, d)
    sep = separator.view(1, d)
    parts = [g, sep, loc] if global_first else [loc, sep, g]
    return torch.cat(parts, dim=0)


def image_token_count(width_tiles: int, height_tiles: int, side: int = 14) -> int:
    return side * (side + 1) + 1 + height_tiles * side * (width_tiles * side + 1)

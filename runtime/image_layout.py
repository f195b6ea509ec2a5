"""Image embeddings into their sequence layout, in numpy (reference §4d; the reference model's projector.py does the
same in torch, and tests hold the two equal).

One image with a tw x th grid, tiles [1 + tw*th, side*side, D] (global view first):
  global tile as side rows of side, an image_newline after each row        side * (side + 1)
  view_seperator                                                            1
  local tiles as one (th*side) x (tw*side) grid, a newline after each row   th*side * (tw*side + 1)
(global_view_pos "tail" puts local, separator, global.)
"""

from __future__ import annotations

import numpy as np


def layout_image(tiles: np.ndarray, width_tiles: int, height_tiles: int, newline: np.ndarray,
                 separator: np.ndarray, global_first: bool = True) -> np.ndarray:
    n, t, d = tiles.shape
    side = int(round(t**0.5))
    tw, th = width_tiles, height_tiles
    if n != 1 + tw * th:
        raise ValueError(f"an image with a {tw}x{th} grid needs {1 + tw * th} tiles, got {n}")
    nl = newline.reshape(1, 1, d).astype(tiles.dtype)
    g = np.concatenate([tiles[0].reshape(side, side, d), np.broadcast_to(nl, (side, 1, d))], axis=1).reshape(-1, d)
    loc = tiles[1:].reshape(th, tw, side, side, d).transpose(0, 2, 1, 3, 4).reshape(th * side, tw * side, d)
    loc = np.concatenate([loc, np.broadcast_to(nl, (th * side, 1, d))], axis=1).reshape(-1, d)
    sep = separator.reshape(1, d).astype(tiles.dtype)
    return np.concatenate([g, sep, loc] if global_first else [loc, sep, g], axis=0)


def scatter_images(text_embeds: np.ndarray, tile_embeds: np.ndarray, images_spatial_crop: np.ndarray,
                   images_seq_mask: np.ndarray, newline: np.ndarray, separator: np.ndarray,
                   global_first: bool = True) -> np.ndarray:
    """Write every image's layout into the masked slots of text_embeds [T, D] (in place; also returned)."""
    runs, t0 = [], 0
    for tw, th in np.asarray(images_spatial_crop).reshape(-1, 2).tolist():
        n = 1 + tw * th
        runs.append(layout_image(tile_embeds[t0:t0 + n], tw, th, newline, separator, global_first))
        t0 += n
    if t0 != len(tile_embeds):
        raise ValueError(f"images_spatial_crop accounts for {t0} tiles, the vision graph returned {len(tile_embeds)}")
    mask = np.asarray(images_seq_mask, dtype=bool)
    image_embeds = np.concatenate(runs) if runs else np.zeros((0, text_embeds.shape[1]), text_embeds.dtype)
    if int(mask.sum()) != len(image_embeds):
        raise ValueError(f"images_seq_mask has {int(mask.sum())} image slots, the images fill {len(image_embeds)}")
    text_embeds[mask] = image_embeds
    return text_embeds

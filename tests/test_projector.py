"""Projector unfold order and image-token layout, against hand-derived expectations (reference §1a, §4d)."""

from __future__ import annotations

import pytest
import torch

from vl2edge.model.config import VL2Config
from vl2edge.model.presets import preset_config
from vl2edge.model.projector import Projector, image_token_count, layout_image


def test_unfold_is_channel_major_with_zero_padding():
    cfg = VL2Config.from_dict(preset_config("test-tiny"))
    proj = Projector(cfg)
    C = cfg.vision.width
    x = torch.randn(2, 729, C)
    captured = {}
    proj.layers[0].register_forward_pre_hook(lambda m, a: captured.setdefault("in", a[0]))
    with torch.inference_mode():
        out = proj(x)
    got = captured["in"]
    assert got.shape == (2, 196, 4 * C)

    grid = x.view(2, 27, 27, C)
    expected = torch.zeros(2, 196, 4 * C)
    for i in range(14):
        for j in range(14):
            for dy in range(2):
                for dx in range(2):
                    r, c = 2 * i + dy, 2 * j + dx
                    if r < 27 and c < 27:  # row 27 and column 27 are the zero padding
                        # feature index = channel * 4 + (dy * 2 + dx)
                        expected[:, i * 14 + j, (dy * 2 + dx)::4] = grid[:, r, c]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    # Linear -> exact (erf) GELU -> Linear
    l0, l2 = proj.layers[0], proj.layers[2]
    h = expected @ l0.weight.T + l0.bias
    h = 0.5 * h * (1 + torch.erf(h / 2**0.5))
    torch.testing.assert_close(out, h @ l2.weight.T + l2.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tw,th", [(1, 1), (2, 1), (1, 3), (3, 2), (2, 2)])
def test_layout_global_separator_then_local_rows_with_newlines(tw, th):
    D = 3
    n = 1 + tw * th
    tiles = torch.zeros(n, 196, D)
    for t in range(n):
        for k in range(196):
            tiles[t, k] = t * 1000 + k  # tile t, token k (row k // 14, column k % 14)
    newline, sep = torch.full((D,), -1.0), torch.full((D,), -2.0)
    seq = layout_image(tiles, tw, th, newline, sep)[:, 0].tolist()
    assert len(seq) == image_token_count(tw, th) == 211 + 14 * th * (14 * tw + 1)

    expected = []
    for r in range(14):  # global view: 14 rows of 14, each ended by a newline
        expected += [float(r * 14 + c) for c in range(14)] + [-1.0]
    expected.append(-2.0)
    for gr in range(th * 14):  # local tiles as one big grid, row-major, newline per row
        for gc in range(tw * 14):
            tile = 1 + (gr // 14) * tw + gc // 14
            expected.append(float(tile * 1000 + (gr % 14) * 14 + gc % 14))
        expected.append(-1.0)
    assert seq == expected


def test_layout_rejects_wrong_tile_count():
    with pytest.raises(ValueError, match="needs 5 tiles"):
        layout_image(torch.zeros(3, 196, 2), 2, 2, torch.zeros(2), torch.zeros(2))

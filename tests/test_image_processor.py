"""Image loading (runtime.images) and dynamic tiling (runtime.image_processor) against reference §4."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image, ImageOps

from vl2edge.model.presets import processor_config
from vl2edge.runtime.image_processor import (
    ImageProcessor, image_token_count, pad_to, select_best_resolution, tokens_per_side,
)
from vl2edge.runtime.images import ImageError, load_image, open_image, to_rgb

PCFG = processor_config()
CANDIDATES = [tuple(c) for c in PCFG["candidate_resolutions"]]
IP = ImageProcessor.from_config(PCFG)
PAD = np.float32((np.float32(127) / np.float32(255) - np.float32(0.5)) / np.float32(0.5))  # about -1/255


def normalized(rgb) -> np.ndarray:
    return (np.asarray(rgb, np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)


# --- best resolution ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, best", [
    ((300, 300), (384, 384)), ((640, 480), (768, 768)), ((800, 800), (1152, 1152)), ((1920, 1080), (1536, 768)),
    ((1080, 1920), (768, 1536)), ((1000, 200), (1152, 384)), ((768, 768), (768, 768)), ((769, 768), (1152, 768)),
])
def test_reference_examples(size, best):
    assert select_best_resolution(size, CANDIDATES) == best
    assert IP.best_resolution(size) == best


# §4c table: grid (tw, th) -> image tokens
TOKEN_TABLE = {
    (1, 1): 421, (1, 2): 631, (2, 1): 617, (1, 3): 841, (3, 1): 813, (1, 4): 1051, (4, 1): 1009, (2, 2): 1023,
    (1, 5): 1261, (5, 1): 1205, (1, 6): 1471, (6, 1): 1401, (2, 3): 1429, (3, 2): 1415, (1, 7): 1681, (7, 1): 1597,
    (1, 8): 1891, (8, 1): 1793, (2, 4): 1835, (4, 2): 1807, (1, 9): 2101, (9, 1): 1989, (3, 3): 2017,
}


def test_token_table_covers_every_candidate():
    grids = {(w // 384, h // 384) for w, h in CANDIDATES}
    assert grids == set(TOKEN_TABLE) and len(CANDIDATES) == 23
    assert IP.tokens_per_side == 14
    for (tw, th), n in TOKEN_TABLE.items():
        assert image_token_count((tw, th), IP.tokens_per_side) == n
        assert n == 211 + 14 * th * (14 * tw + 1)
        # an image of exactly the candidate's size selects it
        assert IP.grid((tw * 384, th * 384)) == (tw, th)
        assert IP.num_tokens((tw * 384, th * 384)) == n
        assert IP.num_tiles((tw * 384, th * 384)) == 1 + tw * th


def test_tokens_per_side_is_derived_from_the_config():
    assert tokens_per_side(384, 14, 2) == 14  # ceil(27 / 2)
    assert tokens_per_side(384, 16, 2) == 12
    assert tokens_per_side(384, 14, 3) == 9
    ip = ImageProcessor.from_config({**PCFG, "patch_size": 16})
    assert ip.num_tokens((384, 384)) == 12 * 13 + 1 + 12 * 13


def test_no_cropping_means_one_tile():
    assert IP.best_resolution((1920, 1080), cropping=False) == (384, 384)
    assert IP.num_tokens((1920, 1080), cropping=False) == 421


def _score(size, cand):
    """Independent scorer for the §4a rule: (effective pixels, wasted pixels)."""
    W, H = size
    w, h = cand
    s = min(w / W, h / H)
    eff = min(int(W * s) * int(H * s), W * H)
    return eff, w * h - eff


def _expected_best(size, cands):
    scored = [(-_score(size, c)[0], _score(size, c)[1], i) for i, c in enumerate(cands)]
    return cands[min(scored)[2]]  # most effective, then least wasted, then earliest


sizes = st.tuples(st.integers(1, 5000), st.integers(1, 5000))


@settings(max_examples=300, deadline=None)
@given(sizes)
def test_best_resolution_is_optimal(size):
    best = IP.best_resolution(size)
    assert best in CANDIDATES
    assert best == _expected_best(size, CANDIDATES)
    tw, th = IP.grid(size)
    assert IP.num_tokens(size) == 211 + 14 * th * (14 * tw + 1)
    assert IP.num_tiles(size) == 1 + tw * th


@settings(max_examples=200, deadline=None)
@given(sizes, st.integers(1, 10))
def test_max_tiles_is_respected(size, max_tiles):
    ip = ImageProcessor.from_config(PCFG, max_tiles=max_tiles)
    tw, th = ip.grid(size)
    assert tw * th <= max_tiles
    allowed = [c for c in CANDIDATES if (c[0] // 384) * (c[1] // 384) <= max_tiles]
    assert ip.best_resolution(size) == _expected_best(size, allowed)


def test_max_tiles_validation_and_default():
    assert ImageProcessor.from_config(PCFG, max_tiles=1).grid((4000, 3000)) == (1, 1)
    assert ImageProcessor.from_config(PCFG, max_tiles=9).candidates == IP.candidates
    with pytest.raises(ValueError, match="max_tiles"):
        ImageProcessor.from_config(PCFG, max_tiles=0)


def test_config_validation():
    with pytest.raises(ValueError, match="lacks"):
        ImageProcessor.from_config({"candidate_resolutions": CANDIDATES})
    with pytest.raises(ValueError, match="multiples"):
        ImageProcessor.from_config({**PCFG, "candidate_resolutions": [[384, 384], [500, 384]]})


# --- pixels -------------------------------------------------------------------------------------------------------
def test_padding_colour_and_centring():
    img = Image.new("RGB", (200, 100), (255, 0, 0))  # resized to 384x192, pasted at y = 96
    t = IP.process(img)
    assert t.grid == (1, 1) and t.tiles.shape == (2, 3, 384, 384) and t.tiles.dtype == np.float32
    g = t.tiles[0]
    assert np.all(g[:, :96, :] == PAD) and np.all(g[:, 288:, :] == PAD)
    assert PAD == pytest.approx(127 / 255 * 2 - 1, abs=1e-6)
    centre = g[:, 100:284, :]
    assert np.allclose(centre[0], 1.0) and np.allclose(centre[1:], -1.0)
    np.testing.assert_array_equal(t.tiles[1], t.tiles[0])  # one-tile grid: the local tile is the padded image


def test_tall_image_is_centred_horizontally():
    img = Image.new("RGB", (100, 300), (0, 0, 255))  # 128 wide in 384: x offset 128
    g = IP.process(img).tiles[0]
    assert np.all(g[:, :, :128] == PAD) and np.all(g[:, :, 256:] == PAD)
    assert np.allclose(g[2, 5:379, 130:254], 1.0)


def test_tiles_match_imageops_pad_exactly():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    t = IP.process(img)
    assert t.grid == (2, 2) and t.num_tokens == 1023
    glob = ImageOps.pad(img, (384, 384), method=Image.Resampling.BICUBIC, color=(127, 127, 127))
    np.testing.assert_array_equal(t.tiles[0], normalized(glob).transpose(2, 0, 1))
    local = normalized(ImageOps.pad(img, (768, 768), method=Image.Resampling.BICUBIC, color=(127, 127, 127)))
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        expected = local[r * 384:(r + 1) * 384, c * 384:(c + 1) * 384].transpose(2, 0, 1)
        np.testing.assert_array_equal(t.tiles[1 + k], expected)


@settings(max_examples=40, deadline=None)
@given(st.tuples(st.integers(1, 1200), st.integers(1, 1200)))
def test_pad_to_equals_imageops_pad(size):
    img = Image.new("RGB", size, (10, 20, 30))
    for box in [(384, 384), IP.best_resolution(size)]:
        np.testing.assert_array_equal(np.asarray(pad_to(img, box, (127, 127, 127))),
                                      np.asarray(ImageOps.pad(img, box, color=(127, 127, 127))))


def test_local_crops_are_row_major():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
               (128, 0, 0), (0, 128, 0)]
    img = Image.new("RGB", (1536, 768))
    for k, colour in enumerate(colours):  # 4 x 2 blocks of 384, block k at row k // 4, column k % 4
        img.paste(colour, ((k % 4) * 384, (k // 4) * 384, (k % 4 + 1) * 384, (k // 4 + 1) * 384))
    t = IP.process(img)
    assert t.grid == (4, 2) and t.tiles.shape[0] == 9 and t.num_tokens == 1807
    for k, colour in enumerate(colours):
        np.testing.assert_allclose(t.tiles[1 + k].mean(axis=(1, 2)), normalized(colour), atol=1e-6)


def test_quadrants_of_a_square_image():
    img = Image.new("RGB", (768, 768))
    quads = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 200)]  # TL, TR, BL, BR
    for k, colour in enumerate(quads):
        img.paste(colour, ((k % 2) * 384, (k // 2) * 384, (k % 2 + 1) * 384, (k // 2 + 1) * 384))
    t = IP.process(img)
    assert t.grid == (2, 2)
    for k, colour in enumerate(quads):
        np.testing.assert_allclose(t.tiles[1 + k].mean(axis=(1, 2)), normalized(colour), atol=1e-6)


def test_cropping_off_gives_two_equal_tiles():
    t = IP.process(Image.new("RGB", (1920, 1080), (1, 2, 3)), cropping=False)
    assert t.grid == (1, 1) and t.num_tokens == 421 and t.tiles.shape == (2, 3, 384, 384)
    np.testing.assert_array_equal(t.tiles[0], t.tiles[1])


@pytest.mark.parametrize("size, grid", [((1, 4000), (1, 1)), ((4000, 1), (1, 1)), ((1, 1), (1, 1)),
                                        ((3, 5000), (1, 9)), ((5000, 3), (9, 1))])
def test_extreme_aspect_ratios(size, grid):
    # 1 px across: every candidate keeps 0 effective pixels, so the first (384x384) wins on least waste
    img = load_image(Image.new("RGB", size, (255, 255, 255)))
    t = IP.process(img)
    assert t.grid == grid and t.tiles.shape == (1 + grid[0] * grid[1], 3, 384, 384) and np.isfinite(t.tiles).all()


def test_process_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        IP.process(Image.new("L", (10, 10)))


def test_unnormalized_config():
    ip = ImageProcessor.from_config({**PCFG, "normalize": False})
    t = ip.process(Image.new("RGB", (384, 384), (255, 0, 51)))
    np.testing.assert_allclose(t.tiles[0, :, 0, 0], [1.0, 0.0, 0.2], atol=1e-7)


# --- opening images -----------------------------------------------------------------------------------------------
def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


NOISE = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    data = _encoded(NOISE, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt") as e:
        load_image(path)
    assert str(path) in str(e.value)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])


def test_random_bytes():
    junk = np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError, match="not a readable image") as e:
        load_image(junk)
    assert "<5000 bytes>" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty") as e:
        load_image(empty)
    assert "empty.png" in str(e.value)
    with pytest.raises(ImageError, match="no such file") as e:
        load_image(tmp_path / "missing.jpg")
    assert "missing.jpg" in str(e.value)
    with pytest.raises(ImageError, match="0 bytes"):
        load_image(b"")
    with pytest.raises(ImageError, match="not an image input"):
        load_image(12345)


def test_zero_pixel_image():
    with pytest.raises(ImageError, match="no pixels"):
        open_image(Image.new("RGB", (0, 10)))


def test_decompression_bomb(monkeypatch):
    data = _encoded(Image.new("L", (200, 100)), "PNG")
    with pytest.raises(ImageError, match="20000 pixels exceeds the limit of 10000"):
        open_image(data, max_pixels=10_000)
    assert open_image(data, max_pixels=20_000).size == (200, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15_000)  # between 1x and 2x: our own check
    with pytest.raises(ImageError, match="decompression-bomb"):
        open_image(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)  # beyond 2x: Pillow refuses inside Image.open
    with pytest.raises(ImageError, match="decompression bomb"):
        open_image(data)


def test_inputs_of_every_kind(tmp_path):
    data = _encoded(NOISE, "PNG")
    path = tmp_path / "noise.png"
    path.write_bytes(data)
    expected = np.asarray(NOISE)
    for src in (path, str(path), data, bytearray(data), io.BytesIO(data), NOISE):
        np.testing.assert_array_equal(np.asarray(load_image(src)), expected)
    with open(path, "rb") as f:
        assert open_image(f).size == (96, 64)


def test_rgba_composited_on_white_or_dropped():
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    im.putpixel((1, 1), (255, 0, 0, 255))
    im.putpixel((2, 2), (0, 0, 255, 128))
    out = load_image(_encoded(im, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (255, 0, 0)
    assert out.getpixel((2, 2)) == (127, 127, 255)
    official = load_image(_encoded(im, "PNG"), alpha_background=None)
    assert official.getpixel((0, 0)) == (0, 0, 0) and official.getpixel((2, 2)) == (0, 0, 255)
    la = load_image(Image.new("LA", (2, 2), (50, 0)))
    assert la.getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_and_without_transparency():
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((1, 1), 1)
    assert load_image(_encoded(p, "PNG")).getpixel((0, 0)) == (0, 0, 0)
    transparent = _encoded(p, "PNG", transparency=0)
    out = load_image(transparent)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (255, 0, 0)
    assert load_image(transparent, alpha_background=None).getpixel((0, 0)) == (0, 0, 0)


@pytest.mark.parametrize("mode, value, rgb", [("L", 77, (77, 77, 77)), ("1", 1, (255, 255, 255)),
                                              ("CMYK", (0, 255, 255, 0), (255, 0, 0))])
def test_simple_modes(mode, value, rgb):
    assert load_image(Image.new(mode, (3, 3), value)).getpixel((1, 1)) == rgb


def test_cmyk_jpeg_file():
    cmyk = Image.new("CMYK", (16, 16), (255, 0, 255, 0))  # green
    out = load_image(_encoded(cmyk, "JPEG", quality=95))
    r, g, b = out.getpixel((8, 8))
    assert g > 200 and r < 60 and b < 60


def test_16_bit_is_scaled_not_clipped():
    a = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(a)
    assert img.mode == "I;16"
    out = load_image(_encoded(img, "PNG"))
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 1, 128, 255]
    assert to_rgb(Image.fromarray(np.array([[0, 65535]], np.int32))).getpixel((1, 0)) == (255, 255, 255)
    assert to_rgb(Image.fromarray(np.array([[0, 200]], np.int32))).getpixel((1, 0)) == (200, 200, 200)
    f = to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)))
    assert [f.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    opened = open_image(buf.getvalue())
    assert opened._im.n_frames == 2
    assert opened.load().getpixel((4, 4)) == (255, 0, 0)


def _exif_jpeg(orientation: int) -> bytes:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encoded(img, "JPEG", exif=exif.tobytes(), quality=95)


def test_exif_orientation_default_and_official():
    data = _exif_jpeg(6)  # "rotate 90 degrees clockwise to display"
    opened = open_image(data)
    assert opened.size == (20, 40)  # known from the header, before decoding
    upright = opened.load()
    assert upright.size == (20, 40)
    assert upright.getpixel((10, 5))[0] > 200 and upright.getpixel((10, 35))[2] > 200  # red on top
    official = load_image(data, exif_transpose=False)
    assert official.size == (40, 20) and official.getpixel((5, 10))[0] > 200
    assert IP.grid(open_image(data).size) == (1, 1)


@pytest.mark.parametrize("orientation, size", [(1, (40, 20)), (3, (40, 20)), (5, (20, 40)), (8, (20, 40))])
def test_exif_orientations_sizes(orientation, size):
    assert open_image(_exif_jpeg(orientation)).size == size
    assert load_image(_exif_jpeg(orientation)).size == size


def test_extreme_images_load(tmp_path):
    for size in [(1, 4000), (4000, 1)]:
        path = tmp_path / f"{size[0]}x{size[1]}.png"
        Image.new("RGB", size, (9, 9, 9)).save(path)
        img = load_image(path)
        assert img.size == size
        assert IP.process(img).tiles.shape == (2, 3, 384, 384)

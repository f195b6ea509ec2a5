"""NumPy frames as robotics code holds them (runtime/frames.py): every accepted layout gives the model exactly the
pixels of the same image saved losslessly and opened from its path; BGR only when said; every refusal is one
ImageError naming what was given and what is accepted."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vl2edge.runtime.frames import Frame, bgr
from vl2edge.runtime.images import ImageError, load_image
from vl2edge.runtime.processor import Processor


@pytest.fixture(scope="module")
def processor(test_checkpoints) -> Processor:
    return Processor.from_dir(test_checkpoints["test-tiny"])


def _photo(h=96, w=128, seed=0) -> np.ndarray:
    """Structured pixels (gradients and blocks, no symmetry between channels) so that any swap or shift shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x * 2) % 256, (y * 3) % 256, (x + y) % 256], -1).astype(np.uint8)
    a[h // 4:h // 2, w // 3:w // 2] = rng.integers(0, 256, (h // 2 - h // 4, w // 2 - w // 3, 3), np.uint8)
    return a


def _pixel_values(processor, image) -> np.ndarray:
    return processor("<image>\nWhere?", images=[image]).pixel_values


def _saved(tmp_path, array: np.ndarray, name: str) -> str:
    path = tmp_path / name
    Image.fromarray(array).save(path)  # PNG: lossless
    assert np.array_equal(np.asarray(Image.open(path)), array)
    return str(path)


def test_rgb_and_bgr_arrays_give_the_pixels_of_the_same_image_saved_losslessly(processor, tmp_path):
    rgb = _photo()
    from_file = _pixel_values(processor, _saved(tmp_path, rgb, "photo.png"))
    assert np.array_equal(_pixel_values(processor, rgb), from_file)
    opencv = np.ascontiguousarray(rgb[:, :, ::-1])  # what cv2.imread would hold for photo.png
    assert np.array_equal(_pixel_values(processor, Frame(opencv, "bgr")), from_file)
    assert np.array_equal(_pixel_values(processor, bgr(opencv)), from_file)
    # never guessed: the same BGR array without saying so is read as RGB, and differs
    assert not np.array_equal(_pixel_values(processor, opencv), from_file)


def test_non_contiguous_views_are_read_as_their_values(processor, tmp_path):
    big = _photo(200, 300, seed=1)
    crop = big[10:106:1, 20:148]  # a strided view into a larger buffer
    flipped = big[::-1, ::-1][:96, :128]  # negative strides
    every_other = big[::2, ::2]
    for view in (crop, flipped, every_other):
        assert not view.flags["C_CONTIGUOUS"]
        ref = _pixel_values(processor, _saved(tmp_path, np.ascontiguousarray(view), "v.png"))
        assert np.array_equal(_pixel_values(processor, view), ref)
    # a BGR view with a negative channel stride (OpenCV's frame[:, :, ::-1] trick) too
    rgb = _photo(seed=2)
    assert np.array_equal(_pixel_values(processor, bgr(rgb[:, :, ::-1])), _pixel_values(processor, rgb))


def test_grayscale_and_alpha_layouts_match_their_png_files(processor, tmp_path):
    gray = _photo()[:, :, 1].copy()
    ref_gray = _pixel_values(processor, _saved(tmp_path, gray, "gray.png"))
    assert np.array_equal(_pixel_values(processor, gray), ref_gray)
    assert np.array_equal(_pixel_values(processor, gray[:, :, None]), ref_gray)  # H x W x 1

    rgba = np.concatenate([_photo(seed=3), np.zeros((96, 128, 1), np.uint8)], -1)
    rgba[:, :64, 3] = 255  # left half opaque, right half transparent, partly translucent below
    rgba[48:, 64:, 3] = 100
    ref_rgba = _pixel_values(processor, _saved(tmp_path, rgba, "alpha.png"))
    assert np.array_equal(_pixel_values(processor, rgba), ref_rgba)  # composited over white, as the PNG
    bgra = np.ascontiguousarray(rgba[:, :, [2, 1, 0, 3]])
    assert np.array_equal(_pixel_values(processor, bgr(bgra)), ref_rgba)
    # the composite really happened: transparent pixels are white in the model's input, not their stored colour
    seen = np.asarray(load_image(rgba))
    assert (seen[:40, 70:] == 255).all() and not (rgba[:40, 70:, :3] == 255).all()


def test_the_array_is_copied_when_opened(processor):
    """A driver reusing its buffer for the next frame must not change a frame the model holds."""
    buf = _photo()
    opened = load_image(buf)
    before = np.asarray(opened).copy()
    buf[:] = 0
    assert np.array_equal(np.asarray(opened), before)
    gray = buf[:, :, 0].copy()
    gray[:] = 7
    opened_gray = load_image(gray)
    gray[:] = 200  # Pillow's fromarray may share a 2-D array's memory: the copy must not
    assert (np.asarray(opened_gray) == 7).all()


@pytest.mark.parametrize("array, says", [
    (np.zeros((48, 64, 3), np.float32), "dtype float32 is not accepted (float pixels may mean 0..1 or 0..255"),
    (np.zeros((48, 64, 3), np.uint16), "dtype uint16 is not accepted (convert to 8 bits first)"),
    (np.zeros((48, 64, 3), bool), "dtype bool is not accepted"),
    (np.zeros((48, 64, 3), np.int64), "dtype int64 is not accepted"),
    (np.zeros((48, 64, 2), np.uint8), "shape (48, 64, 2) is not an image layout"),
    (np.zeros((48, 64, 5), np.uint8), "shape (48, 64, 5) is not an image layout"),
    (np.zeros((3, 48, 64), np.uint8), "shape (3, 48, 64) is not an image layout"),  # channels first
    (np.zeros(64, np.uint8), "shape (64,) is not an image layout"),
    (np.zeros((2, 48, 64, 3), np.uint8), "shape (2, 48, 64, 3) is not an image layout"),  # a batch
    (np.zeros((0, 64, 3), np.uint8), "the array has no pixels (64x0)"),
    (np.zeros((48, 0), np.uint8), "the array has no pixels (0x48)"),
])
def test_every_refusal_names_what_was_given_and_what_is_accepted(processor, array, says):
    with pytest.raises(ImageError) as e:
        processor("<image>\nWhere?", images=[array])
    msg = str(e.value)
    assert msg.startswith("image 1 of 1 (<ndarray ") and says in msg
    if "no pixels" not in says:
        assert "accepted: uint8 arrays H x W (grayscale)" in msg


def test_absurd_sizes_are_refused_before_any_copy(processor):
    huge = np.lib.stride_tricks.as_strided(np.zeros(3, np.uint8), (100_000, 100_000, 3), (0, 0, 1))  # no memory
    with pytest.raises(ImageError, match=r"100000x100000 = 10000000000 pixels exceeds the limit"):
        processor("<image>\nWhere?", images=[huge])
    with pytest.raises(ImageError, match="BGR frame .*a Frame must hold a numpy array"):
        processor("<image>\nWhere?", images=[Frame([[1, 2]], "bgr")])
    with pytest.raises(ValueError, match="channels must be one of"):
        Frame(_photo(), "bgra")


def test_a_model_answers_about_an_array_as_about_its_file(tiny_model, tmp_path):
    """Through the API: generate / ground take arrays, and a BGR frame said so answers as its RGB file does."""
    m = tiny_model
    rgb = _photo(120, 160, seed=4)
    path = _saved(tmp_path, rgb, "scene.png")
    by_file = m.generate("<image>\nWhere is the mug?", images=[path], max_new_tokens=6)
    by_bgr = m.generate("<image>\nWhere is the mug?", images=bgr(np.ascontiguousarray(rgb[:, :, ::-1])),
                        max_new_tokens=6, reuse_cache=False)
    assert by_bgr.token_ids == by_file.token_ids and by_bgr.image_sizes == ((160, 120),)
    assert isinstance(m.ground(rgb, "the mug", max_new_tokens=4), list)


def test_chat_messages_carry_arrays_and_frames(tiny_model):
    """Per-message images: a bare array, a list mixing RGB and BGR frames; stream() takes them too."""
    rgb = _photo(seed=5)
    one = tiny_model.chat([{"role": "user", "content": "Describe.", "images": rgb}], stream=False, max_new_tokens=3)
    assert one.image_sizes == ((128, 96),)
    two = tiny_model.chat([{"role": "user", "content": "Compare.", "images": [rgb, bgr(rgb[:, :, ::-1])]}],
                          stream=False, max_new_tokens=3)
    assert two.image_sizes == ((128, 96), (128, 96)) and two.prompt_tokens > one.prompt_tokens
    with tiny_model.stream("<image>\nWhat?", images=[rgb], max_new_tokens=2) as s:
        assert "".join(s) == s.result.text

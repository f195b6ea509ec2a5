"""Processor: a conversation plus its images -> PreparedInputs, the arrays the model consumes (no torch).

Order of work, so that a bad request fails fast and cheaply:
  1. lay out the template and match images to "<image>" tags (chat_template);
  2. read every image's header (size and EXIF orientation only) and derive each grid and token count;
  3. tokenise the text pieces and check the total against the model's context (max_position_embeddings);
  4. only then decode the images and tile them.

Token ids (bos, eos, pad, <image>) come from the tokenizer files, as the official pipeline takes them, not from
config.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from tokenizers import Tokenizer

from .chat_template import IMAGE_TAG, Conversation, Message, build_conversation, render
from .image_processor import ImageProcessor
from .images import WHITE, OpenedImage, describe, open_image

# configuration_deepseek.py's default when language_config has no max_position_embeddings (real configs set 4096)
_OFFICIAL_DEFAULT_CONTEXT = 2048
_DEFAULT_BOS = "<｜begin▁of▁sentence｜>"
_DEFAULT_EOS = "<｜end▁of▁sentence｜>"


class PromptTooLongError(ValueError):
    """The prompt (text + image slots) does not fit the model's context."""


@dataclass(frozen=True, eq=False)
class PreparedInputs:
    """One prompt, ready for the model. Same meanings as the official processor's output for one sample.

    input_ids           int64 [T]: every image slot (newline and separator slots too) holds the <image> id
    images_seq_mask     bool  [T]: True exactly on the image slots
    pixel_values        float32 [tiles, 3, S, S]: per image, global tile then local tiles row-major; [0, 3, S, S]
                        without images
    images_spatial_crop int64 [n_images, 2]: [width tiles, height tiles] per image; [0, 2] without images
    image_sizes         (width, height) of each image as the model saw it (upright), for mapping boxes back
    num_image_tokens    slots per image, in order
    prompt              the prompt as text (special tokens spelled out, one "<image>" per image)
    """

    input_ids: np.ndarray
    pixel_values: np.ndarray
    images_seq_mask: np.ndarray
    images_spatial_crop: np.ndarray
    image_sizes: tuple[tuple[int, int], ...]
    num_image_tokens: tuple[int, ...]
    prompt: str

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_images(self) -> int:
        return len(self.image_sizes)

    def as_batch(self) -> dict[str, np.ndarray]:
        """The official batch-of-one layout (BatchCollateOutput): a leading batch axis, attention_mask, and, with no
        image, one zero tile and one zero spatial-crop row (the official model then skips vision)."""
        images, crop = self.pixel_values, self.images_spatial_crop
        if images.shape[0] == 0:
            images = np.zeros((1, *images.shape[1:]), np.float32)
            crop = np.zeros((1, 2), np.int64)
        return {
            "input_ids": self.input_ids[None],
            "attention_mask": np.ones((1, self.seq_len), bool),
            "images": images[None],
            "images_seq_mask": self.images_seq_mask[None],
            "images_spatial_crop": crop[None],
        }


class Processor:
    """Messages + images -> PreparedInputs, for a checkpoint or exported artifact directory.

    Example:
        proc = Processor.from_dir("deepseek-vl2-tiny")
        inputs = proc([{"role": "user", "content": "<image>\\nWhat is on the table?"}], images=["photo.jpg"])
    """

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor, *,
                 max_length: int | None = None, special_tokens: Mapping[str, str] | None = None,
                 image_token: str = IMAGE_TAG, exif_transpose: bool = True,
                 alpha_background: tuple[int, int, int] | None = WHITE, max_pixels: int | None = None):
        """max_length: refuse prompts longer than this (the model's max_position_embeddings); None = no check.
        special_tokens: {"bos": ..., "eos": ..., "pad": ...} token strings (defaults: DeepSeek's).
        exif_transpose / alpha_background / max_pixels: how images are opened, see runtime.images (the official
        pipeline = exif_transpose=False, alpha_background=None)."""
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_length = max_length
        self.image_options = {"exif_transpose": exif_transpose, "alpha_background": alpha_background,
                              "max_pixels": max_pixels}
        special = {"bos": _DEFAULT_BOS, "eos": _DEFAULT_EOS, "pad": None, **(special_tokens or {})}
        self.bos_token, self.eos_token, self.pad_token = special["bos"], special["eos"], special["pad"]
        self.image_token = image_token
        self.bos_id = self._required_id(self.bos_token, "bos")
        self.eos_id = self._required_id(self.eos_token, "eos")
        self.image_id = self._required_id(image_token, "image")
        self.pad_id = tokenizer.token_to_id(self.pad_token) if self.pad_token else None

    def _required_id(self, token: str, what: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"the tokenizer has no {what} token {token!r}")
        return i

    @classmethod
    def from_dir(cls, path: str | Path, max_tiles: int | None = None, **kwargs) -> "Processor":
        """Read processor_config.json, tokenizer.json (+ tokenizer_config.json / special_tokens_map.json) and
        config.json (for max_position_embeddings) from a checkpoint or artifact directory. kwargs go to __init__
        (max_length overrides the config's context; exif_transpose, alpha_background, max_pixels)."""
        path = Path(path)
        pcfg = _read_json(path / "processor_config.json")
        image_processor = ImageProcessor.from_config(pcfg, max_tiles=max_tiles)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file}: no tokenizer.json in {path}")
        tokenizer = Tokenizer.from_file(str(tok_file))
        special = _special_tokens(path)
        special.setdefault("pad", pcfg.get("pad_token"))  # the official processor adds it when missing
        if "max_length" not in kwargs:
            cfg_file = path / "config.json"
            if cfg_file.is_file():
                lang = _read_json(cfg_file).get("language_config", {})
                kwargs["max_length"] = int(lang.get("max_position_embeddings", _OFFICIAL_DEFAULT_CONTEXT))
        return cls(tokenizer, image_processor, special_tokens=special,
                   image_token=pcfg.get("image_token", IMAGE_TAG), **kwargs)

    # --- text ---------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of plain text, without bos/eos (special-token strings in the text map to their ids)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: Iterable[int]) -> str:
        """Text of generated ids. Drops only bos/eos/pad: the grounding tags (<|ref|>, <|det|>, ...) are special
        tokens too and must survive for runtime.grounding to find the boxes."""
        drop = {self.bos_id, self.eos_id, self.pad_id}
        return self.tokenizer.decode([int(i) for i in ids if int(i) not in drop], skip_special_tokens=False)

    # --- the whole prompt ---------------------------------------------------------------------------------------
    def __call__(self, messages: str | Iterable[Mapping[str, Any] | Message], images: Any = None) -> PreparedInputs:
        """Prepare one prompt.

        messages: a prompt string (one user turn) or [{"role": "system"|"user"|"assistant", "content": str,
                  optionally "images": [...]}, ...]. Images are paths, bytes, binary file objects or PIL images,
                  either per user message ("images") or as one flat `images` list for the whole conversation in the
                  order of the "<image>" tags (a single image may be passed without a list); the number of tags must
                  equal the number of images.
        """
        conv = build_conversation(messages, images, self.image_token)
        opened: list[OpenedImage] = []
        try:
            for k, src in enumerate(conv.images):
                name = f"image {k + 1} of {len(conv.images)} ({describe(src)})"
                opened.append(open_image(src, name=name, **self.image_options))
            return self._prepare(conv, opened)
        finally:
            for im in opened:
                im.close()

    def _prepare(self, conv: Conversation, opened: list[OpenedImage]) -> PreparedInputs:
        ip = self.image_processor
        cropping = len(opened) <= 2  # official rule: tiling only when the whole conversation has <= 2 images
        grids = [ip.grid(im.size, cropping) for im in opened]
        counts = [ip.num_tokens(im.size, cropping) for im in opened]

        ids: list[int] = []
        mask: list[bool] = []
        for seg in conv.segments:
            if seg.kind == "image":
                n = counts[seg.image_index]
                ids.extend([self.image_id] * n)
                mask.extend([True] * n)
                continue
            if seg.kind == "bos":
                piece = [self.bos_id]
            elif seg.kind == "eos":
                piece = [self.eos_id]
            else:  # each text piece on its own, as officially: BPE merges never cross an image or a turn
                piece = self.encode(seg.text)
            ids.extend(piece)
            mask.extend([False] * len(piece))
        self._check_length(len(ids), counts)

        tiles = [ip.process(im.load(), cropping).tiles for im in opened]
        s = ip.image_size
        pixel_values = np.concatenate(tiles) if tiles else np.zeros((0, 3, s, s), np.float32)
        return PreparedInputs(
            input_ids=np.asarray(ids, np.int64),
            pixel_values=pixel_values,
            images_seq_mask=np.asarray(mask, bool),
            images_spatial_crop=np.asarray(grids, np.int64).reshape(len(grids), 2),
            image_sizes=tuple(im.size for im in opened),
            num_image_tokens=tuple(counts),
            prompt=render(conv, self.bos_token, self.eos_token, self.image_token),
        )

    def _check_length(self, n: int, counts: list[int]) -> None:
        if self.max_length is None or n <= self.max_length:
            return
        msg = (f"the prompt is {n} tokens but the model's context (max_position_embeddings) is {self.max_length}: "
               f"{n - self.max_length} tokens too many")
        if counts:
            msg += (f"; the {len(counts)} image(s) take {sum(counts)} of them ({', '.join(map(str, counts))}), "
                    f"a smaller max_tiles or fewer images would shorten the prompt")
        raise PromptTooLongError(msg)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _special_tokens(path: Path) -> dict[str, str]:
    """bos/eos/pad token strings from tokenizer_config.json, else special_tokens_map.json (str or AddedToken dict)."""
    found: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = path / name
        if not f.is_file():
            continue
        d = _read_json(f)
        for key in ("bos", "eos", "pad"):
            v = d.get(f"{key}_token")
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str) and key not in found:
                found[key] = v
    return found

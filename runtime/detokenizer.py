"""Incremental detokenization: generated ids in, text deltas out, never a broken character.

Byte-level BPE (DeepSeek's tokenizer) may split one UTF-8 character over several tokens; decoding the tokens so
far then ends in U+FFFD. The usual window scheme (Hugging Face's TextStreamer, vLLM) avoids decoding everything at
every step and never emits such a tail:

  prefix = decode(ids[prefix_offset:read_offset])     text already emitted, decoded in its context
  full   = decode(ids[prefix_offset:])
  if full is longer than prefix and does not end in U+FFFD: emit full[len(prefix):], slide the window

Special tokens (<|ref|>, <|det|>, ...) are single ids whose text is emitted whole, together with their token; the
ids the Processor drops (bos, eos, pad) are skipped, so the concatenated deltas plus `flush()` equal
Processor.decode(ids) exactly (tests/test_generation.py checks this on random id sequences). A real U+FFFD in the
output (an invalid byte, or the character itself) is held only until the next token or `flush()`.
"""

from __future__ import annotations

from typing import Iterable

REPLACEMENT = "\ufffd"


def special_token_ids(tokenizer) -> list[int]:
    """Ids of the tokenizer's added tokens (bos/eos, <image>, the grounding and role tags, ...): each is one id
    whose text must never be split, whether the tokenizer file marks it special or not."""
    return list(tokenizer.get_added_tokens_decoder())


class IncrementalDetokenizer:
    """detok.add(id) -> text delta ("" while held back); detok.flush() -> whatever was held at the end.

    tokenizer: a `tokenizers.Tokenizer`; skip_ids: ids that produce no text (Processor: bos, eos, pad);
    special_ids: ids whose text is a special token (their places in `text` go to `special_spans`, so that
    stop-string handling never cuts one).
    """

    def __init__(self, tokenizer, skip_ids: Iterable[int | None] = (), special_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.skip = {int(i) for i in skip_ids if i is not None}
        self.special = {int(i) for i in special_ids} - self.skip
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self._prefix_offset = 0
        self._read_offset = 0
        self.special_spans: list[tuple[int, int]] = []  # [start, end) of special-token text within self.text

    @classmethod
    def for_processor(cls, processor, special_ids: Iterable[int] | None = None) -> "IncrementalDetokenizer":
        """Skipping what Processor.decode drops; special_ids default to the tokenizer's added tokens."""
        return cls(processor.tokenizer, (processor.bos_id, processor.eos_id, processor.pad_id),
                   special_token_ids(processor.tokenizer) if special_ids is None else special_ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if ids else ""

    def add(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id in self.skip:
            return ""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
        full = self._decode(self.ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT) or not full.startswith(prefix):
            return ""
        return self._emit(full[len(prefix):])

    def _emit(self, delta: str) -> str:
        """Emit the text of ids[read_offset:] and slide the window; record where special tokens landed."""
        covered = self.ids[self._read_offset:]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        cursor = len(self.text)
        self.text += delta
        for i in covered:  # a special token is one id decoded as its literal content
            if i in self.special:
                content = self.tokenizer.id_to_token(i) or ""
                pos = self.text.find(content, cursor) if content else -1
                if pos >= 0:
                    self.special_spans.append((pos, pos + len(content)))
                    cursor = pos + len(content)
        return delta

    def flush(self) -> str:
        """The held-back tail at the end of generation, made consistent with one decode of all ids."""
        final = self._decode(self.ids)
        if not final.startswith(self.text) or len(final) == len(self.text):
            return ""
        delta = self._emit(final[len(self.text):])
        self._prefix_offset = len(self.ids)
        return delta

    def decode_all(self) -> str:
        return self._decode(self.ids)

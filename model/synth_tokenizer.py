"""A small deterministic byte-level BPE tokenizer with DeepSeek-VL2's special tokens (real strings).

The published tokenizers cannot be downloaded here. What the processor, the chat template and grounding need from a
tokenizer is its special tokens (exact strings) and a reversible byte-level encoding of everything else; this trains
one with the `tokenizers` library on text generated from a fixed seed, so the same call always writes the same files.
bos / eos / pad get ids 0 / 1 / 2, as in the Tiny and VL2 tokenizers. No torch.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE = "<image>"
GROUNDING_TOKENS = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>")
CHAT_TOKENS = ("<|User|>", "<|Assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, IMAGE, *GROUNDING_TOKENS, *CHAT_TOKENS)

_WORDS = (
    "the a an of to in on at by for with from and or but not is are was were be been has have had do does did "
    "what which who where when why how this that these those there here it its they them their we our you your "
    "image picture photo chart table document text page line word number figure graph axis value total year "
    "describe read find show locate count explain answer question left right top bottom middle center corner "
    "red green blue yellow black white gray orange purple brown small large big little long short tall wide "
    "person man woman child dog cat car bus tree house road sky water cup mug bottle table chair door window "
    "robot arm hand box shelf screen sign street book paper pen phone laptop desk wall floor light shadow "
    "one two three four five six seven eight nine ten first second third last next previous many few some all"
).split()
_PUNCT = (".", ",", "?", "!", ":", ";", "-", "(", ")", "\"", "'", "\n", "\n\n")


def _corpus(seed: int, lines: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(3, 18)
        words = []
        for _ in range(n):
            r = rng.random()
            if r < 0.08:
                words.append(str(rng.randint(0, 999)))
            elif r < 0.10:
                words.append(f"[[{rng.randint(0, 999)}, {rng.randint(0, 999)}, {rng.randint(0, 999)}, "
                             f"{rng.randint(0, 999)}]]")
            else:
                w = rng.choice(_WORDS)
                words.append(w.capitalize() if rng.random() < 0.1 else w)
        out.append(" ".join(words) + rng.choice(_PUNCT))
    return out


def train_tokenizer(vocab_size: int, seed: int = 0) -> Tokenizer:
    """Byte-level BPE with `vocab_size` ids in total (special tokens included), deterministic for a seed."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed, 4000), trainer=trainer)
    return tok


def write_tokenizer(out_dir: str | Path, vocab_size: int, seed: int = 0) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json, as an HF checkpoint has them."""
    out_dir = Path(out_dir)
    tok = train_tokenizer(vocab_size, seed)
    tok.save(str(out_dir / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IMAGE, *GROUNDING_TOKENS, *CHAT_TOKENS],
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "legacy": True,
        "model_max_length": 16384,
        "pad_token": PAD,
        "tokenizer_class": "LlamaTokenizerFast",
        "unk_token": None,
    }, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": [IMAGE, *GROUNDING_TOKENS, *CHAT_TOKENS],
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
    }, indent=2, ensure_ascii=False) + "\n")

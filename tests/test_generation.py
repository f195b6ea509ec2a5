"""The generation layer (runtime/generation.py, detokenizer.py) through the Python API, against the PyTorch reference.

Parity: on fp32 artifacts, greedy answers equal the reference's token for token, for every test preset, with no
image, one, two (tiled) and three images (tiling off), and for a second chat turn prefilled on top of the cached
first turn (equal to a fresh prefill of the whole conversation and to the reference on it).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import vl2edge
from vl2edge.export.exporter import export
from vl2edge.model.generate import SamplingConfig, generate
from vl2edge.model.vl2 import DeepseekVL2
from vl2edge.runtime.detokenizer import IncrementalDetokenizer
from vl2edge.runtime.generation import StopGate
from vl2edge.runtime.grounding import parse_grounding
from vl2edge.runtime.processor import PromptTooLongError

PRESETS = ("test-tiny", "test-small", "test-vl2")
SMALL_CONTEXT = 48


def picture(size, seed):
    """A deterministic textured image (so that different images give different tiles)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(base, np.ones((8, 8, 1), np.uint8))[:h, :w])


# grids: 500x300 -> 2x1 (617 slots); 200x500 -> 1x2 (631) + 300x200 -> 1x1 (421); any three -> no tiling, 421 each
CASES = {
    "text": ("Where is the red mug?", []),
    "one-image": ("<image>\nWhat is on the table?", [((500, 300), 1)]),
    "two-images": ("<image>\n<image>\nCompare the two pictures.", [((200, 500), 2), ((300, 200), 3)]),
    "three-images": ("<image>\n<image>\n<image>\nWhich one is different?", [((300, 200), 4), ((500, 300), 5),
                                                                           ((640, 480), 6)]),
}


@pytest.fixture(scope="module")
def artifacts(test_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen-artifacts")
    out = {p: export(test_checkpoints[p], root / p, experts="fp32", block_size=32, progress=False) for p in PRESETS}
    out["small-context"] = export(test_checkpoints["test-tiny"], root / "ctx", experts="fp32", block_size=32,
                                  max_len=SMALL_CONTEXT, progress=False)
    return out


@pytest.fixture(scope="module")
def models(artifacts):
    # one thread each for onnxruntime and torch: on a small shared machine two thread pools taking turns are
    # slower than one thread each, and the results do not depend on it
    return {name: vl2edge.load(path, threads=1) for name, path in artifacts.items()}


@pytest.fixture(scope="module")
def references(test_checkpoints):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {p: DeepseekVL2.from_checkpoint(test_checkpoints[p]) for p in PRESETS}
    torch.set_num_threads(threads)


def reference_tokens(model, proc, messages, images, n):
    inp = proc(messages, images=images)
    return generate(model, inp.input_ids, inp.pixel_values, inp.images_seq_mask, inp.images_spatial_crop,
                    SamplingConfig(max_new_tokens=n), eos_token_id=proc.eos_id).tokens


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_equals_the_reference(models, references, preset, case):
    m = models[preset]
    prompt, specs = CASES[case]
    images = [picture(size, seed) for size, seed in specs]
    r = m.generate(prompt, images=images or None, max_new_tokens=8, reuse_cache=False)
    assert r.token_ids == reference_tokens(references[preset], m.processor, prompt, images or None, 8)
    assert r.stop_reason in ("eos", "max_new_tokens") and r.text == m.processor.decode(r.token_ids)
    assert r.timings["prefill_tokens"] == r.prompt_tokens and r.cached_tokens == 0
    assert r.timings["vision_tiles"] == {0: 0, 1: 3, 2: 5, 3: 6}[len(images)]  # three images: no local tiles
    assert len(r.timings["decode_s"]) == len(r.token_ids) - 1
    top_k = m.config.language.num_experts_per_tok
    fed = r.prompt_tokens + len(r.timings["decode_s"])
    assert all(sum(c) == fed * top_k for c in r.expert_counts.values())  # every fed token, every MoE layer


@pytest.mark.parametrize("preset", PRESETS)
def test_second_turn_reuses_the_cache_and_equals_a_fresh_prefill(models, references, preset):
    m = models[preset]
    m.reset()
    img = picture((500, 300), 11)
    turn1 = [{"role": "user", "content": "<image>\nDescribe the picture.", "images": [img]}]
    r1 = m.chat(turn1, stream=False, max_new_tokens=6)
    turn2 = turn1 + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "And the colour?"}]
    r2 = m.chat(turn2, stream=False, max_new_tokens=6)
    assert r2.cached_tokens >= r1.prompt_tokens  # at least the whole first prompt came from the cache
    assert r2.timings["vision_tiles"] == 0 and r2.timings["prefill_tokens"] == r2.prompt_tokens - r2.cached_tokens
    fresh = m.generate(turn2, max_new_tokens=6, reuse_cache=False)
    assert fresh.cached_tokens == 0 and fresh.timings["vision_tiles"] == 3
    assert r2.token_ids == fresh.token_ids
    assert r2.token_ids == reference_tokens(references[preset], m.processor, turn2, None, 6)


def test_a_third_image_turns_tiling_off_and_forces_a_full_prefill(models, references):
    m = models["test-vl2"]
    m.reset()
    a, b, c = picture((500, 300), 21), picture((200, 500), 22), picture((300, 200), 23)
    turn1 = [{"role": "user", "content": "<image>\n<image>\nCompare.", "images": [a, b]}]
    r1 = m.chat(turn1, stream=False, max_new_tokens=4)
    assert r1.timings["vision_tiles"] == 3 + 3  # both tiled
    turn2 = turn1 + [{"role": "assistant", "content": r1.text},
                     {"role": "user", "content": "<image>\nAnd this one?", "images": [c]}]
    r2 = m.chat(turn2, stream=False, max_new_tokens=4)
    first_image = int(np.flatnonzero(m.prepare(turn2).images_seq_mask)[0])
    assert r2.cached_tokens <= first_image  # the earlier images changed (2 tiles each now): nothing past them kept
    assert r2.timings["vision_tiles"] == 6  # all three images through vision again, one local tile each
    assert r2.token_ids == m.generate(turn2, max_new_tokens=4, reuse_cache=False).token_ids
    assert r2.token_ids == reference_tokens(references["test-vl2"], m.processor, turn2, None, 4)


def test_an_edited_history_reuses_only_the_common_prefix(models):
    m = models["test-small"]
    m.reset()
    img = picture((300, 200), 31)
    base = [{"role": "user", "content": "<image>\nWhat is this?", "images": [img]}]
    m.chat(base, stream=False, max_new_tokens=3)
    edited = [{"role": "user", "content": "<image>\nWhat is that?", "images": [img]}]  # same image, new text
    r = m.chat(edited, stream=False, max_new_tokens=3)
    assert r.timings["vision_tiles"] == 0 and 0 < r.cached_tokens < r.prompt_tokens  # the image part is reused
    other = [{"role": "user", "content": "<image>\nWhat is that?", "images": [picture((300, 200), 32)]}]
    r = m.chat(other, stream=False, max_new_tokens=3)  # another image at the same place: its slots are not reused
    first_slot = int(np.flatnonzero(m.prepare(other).images_seq_mask)[0])
    assert r.timings["vision_tiles"] == 2 and r.cached_tokens <= first_slot
    assert r.token_ids == m.generate(other, max_new_tokens=3, reuse_cache=False).token_ids


# --- streaming ------------------------------------------------------------------------------------------------
def test_streamed_deltas_are_the_text(models):
    m = models["test-tiny"]
    stream = m.generate("<image>\nDescribe.", images=[picture((300, 200), 41)], max_new_tokens=24, stream=True)
    deltas = list(stream)
    r = stream.result
    assert all(deltas) and "".join(deltas) == r.text == m.processor.decode(r.token_ids)
    assert r.grounding == parse_grounding(r.text, (300, 200))  # boxes in pixels of the (last) image
    assert r.timings["ttft_s"] > 0 and r.timings["decode_tokens_per_s"] > 0 and r.timings["prefill_tokens_per_s"] > 0


def test_cancel_mid_stream_then_the_next_request_works(models):
    m = models["test-small"]
    m.reset()
    expected = m.generate("Tell me a story.", max_new_tokens=10, reuse_cache=False).token_ids

    stream = m.generate("Tell me a story.", max_new_tokens=10, stream=True)
    for _ in stream:
        break  # leave after the first delta
    stream.close()
    assert stream.result.stop_reason == "cancelled" and 0 < len(stream.result.token_ids) < 10
    assert m.engine.length <= stream.result.prompt_tokens + len(stream.result.token_ids)
    assert m.generate("Tell me a story.", max_new_tokens=10).token_ids == expected

    stream = m.generate("Tell me a story.", max_new_tokens=10, stream=True)
    got = []
    for delta in stream:
        got.append(delta)
        if len(stream.token_ids) >= 3:
            stream.cancel()  # the flag: the stream ends at the next step and still yields its held-back text
    assert stream.result.stop_reason == "cancelled" and stream.result.token_ids == expected[:len(stream.token_ids)]
    assert "".join(got) == stream.result.text

    abandoned = m.generate("Tell me a story.", max_new_tokens=10, stream=True)
    next(abandoned)  # neither finished nor closed
    assert m.generate("Tell me a story.", max_new_tokens=10).token_ids == expected  # closes it first
    assert abandoned.result.stop_reason == "cancelled"
    with pytest.raises(StopIteration):
        next(abandoned)

    unstarted = m.generate("Tell me a story.", max_new_tokens=10, stream=True)
    unstarted.close()
    assert unstarted.result.stop_reason == "cancelled" and unstarted.result.token_ids == []
    assert m.generate("Tell me a story.", max_new_tokens=10).token_ids == expected


def test_cancel_during_the_prefill_stops_between_chunks(models, monkeypatch):
    """A long prompt is not prefilled to the end once cancelled (a server client that left): the stream ends
    between chunks with no token, the chunks done stay in the cache, and the next request reuses them."""
    m = models["test-tiny"]
    m.reset()
    prompt = "Count the words in this sentence. " * 40
    expected = m.generate(prompt, max_new_tokens=4, reuse_cache=False).token_ids
    m.reset()
    stream = m.generate(prompt, max_new_tokens=4, stream=True, chunk_size=64)
    chunks, forward = [], m.engine.forward

    def counting(embeds):
        chunks.append(len(embeds))
        if len(chunks) == 2:
            stream.cancel()  # as the server's disconnect watcher does, while a chunk runs
        return forward(embeds)

    monkeypatch.setattr(m.engine, "forward", counting)
    assert list(stream) == [] and stream.result.stop_reason == "cancelled" and stream.result.token_ids == []
    assert chunks == [64, 64] and m.engine.length == 128 < stream.result.prompt_tokens
    monkeypatch.setattr(m.engine, "forward", forward)
    again = m.generate(prompt, max_new_tokens=4)
    assert again.cached_tokens == 128 and again.token_ids == expected


def test_stop_string_across_token_boundaries(models):
    m = models["test-vl2"]
    proc = m.processor
    full = m.generate("List the objects.", max_new_tokens=16)
    toks = [t for t in full.token_ids if t != proc.eos_id]
    pieces = [proc.decode([t]) for t in toks]
    for k in range(1, len(toks) - 1):
        stop = proc.decode(toks[k:k + 2])
        at = len(proc.decode(toks[:k]))
        if (len(pieces[k].strip()) and len(pieces[k + 1].strip()) and "\ufffd" not in stop
                and full.text.find(stop) == at):
            break
    else:
        pytest.skip("no pair of printable tokens in this output")
    stream = m.generate("List the objects.", max_new_tokens=16, stop=["never-there", stop], stream=True)
    deltas = list(stream)
    r = stream.result
    assert r.stop_reason == "stop" and r.text == full.text[:at] == "".join(deltas)
    assert r.token_ids == toks[:k + 2]  # stopped at the token that completed the stop string
    assert stop not in r.text


class _ScriptedDetok:
    """The detokenizer interface, replaying given text pieces (one per 'token')."""

    def __init__(self, pieces, specials=()):
        self.pieces, self.text, self.special_spans = list(pieces), "", list(specials)

    def add(self, _):
        self.text += self.pieces.pop(0)

    def flush(self):
        return ""


def gate_run(pieces, stops, specials=()):
    gate = StopGate(_ScriptedDetok(pieces, specials), stops)
    out = [gate.push(i) for i in range(len(pieces)) if not gate.stopped]
    if not gate.stopped:
        out.append(gate.finish())
    return out, gate.stopped


def test_stop_gate_holds_back_possible_stop_prefixes():
    assert gate_run(["abc E", "N", "D more"], ["END"]) == (["abc ", "", ""], True)
    assert gate_run(["abc E", "x", "yz"], ["END"]) == (["abc ", "Ex", "yz", ""], False)
    assert gate_run(["abc E", "N"], ["END"]) == (["abc ", "", "EN"], False)  # the end: held text is released
    assert gate_run(["one\n\nUs", "er: two"], ["\n\nUser:"]) == (["one", ""], True)
    assert gate_run(["xAB", "CD"], ["ABCD", "BCX"]) == (["x", ""], True)
    # a stop string found inside a special token's text cuts before the special token, never through it
    assert gate_run(["a <|ref|>", "mug"], ["ref|>m"], specials=[(2, 9)]) == (["a ", ""], True)


def test_incremental_detokenizer_never_emits_a_broken_character(test_checkpoints):
    from vl2edge.runtime.processor import Processor

    proc = Processor.from_dir(test_checkpoints["test-tiny"])
    tok = proc.tokenizer
    text = "naïve café ☕ 日本語 🚀🚀 <|ref|>the mug<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|> done"
    ids = tok.encode(text, add_special_tokens=False).ids + [proc.eos_id]
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # characters really are split across tokens
    cases = [ids, [proc.bos_id] + ids[:7] + [proc.pad_id] + ids[7:]]
    rng = np.random.default_rng(0)
    cases += [rng.integers(0, tok.get_vocab_size(), 60).tolist() for _ in range(30)]  # any bytes, any specials
    for case in cases:
        detok = IncrementalDetokenizer.for_processor(proc)
        emitted = ""
        for i in case:
            emitted += detok.add(i)
            assert proc.decode(case).startswith(emitted)  # never anything that a later token would change
        emitted += detok.flush()
        assert emitted == proc.decode(case)
        for start, end in detok.special_spans:
            assert emitted[start:end] in {"<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<image>",
                                          "<|User|>", "<|Assistant|>"}
    detok = IncrementalDetokenizer.for_processor(proc)
    assert [detok.add(i) for i in tok.encode("☕", add_special_tokens=False).ids][-1] == "☕"


def test_the_tokenizers_decoder_is_byte_level(models):
    """The detokenizer's window scheme is exact for byte-level decoders (DeepSeek's and the synthesized one)."""
    assert type(models["test-vl2"].processor.tokenizer.decoder).__name__ == "ByteLevel"


# --- the context --------------------------------------------------------------------------------------------------
def test_context_exhaustion_ends_cleanly(models):
    m = models["small-context"]
    assert m.max_len == SMALL_CONTEXT
    stream = m.generate("Hi.", max_new_tokens=500, stream=True)
    deltas = list(stream)
    r = stream.result
    assert r.stop_reason == "context" and "".join(deltas) == r.text
    assert len(r.token_ids) == SMALL_CONTEXT - r.prompt_tokens + 1  # the last token is sampled, not fed back
    assert m.engine.length == SMALL_CONTEXT
    again = m.generate("Hi.", max_new_tokens=500)  # the engine is fine afterwards
    assert again.token_ids == r.token_ids and again.cached_tokens == r.prompt_tokens - 1
    with pytest.raises(PromptTooLongError, match=f"context .* is {SMALL_CONTEXT}"):
        m.generate("word " * 60)
    # a chat that outgrows the context: the next turn is refused with a clear error, the model stays usable
    history = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": r.text},
               {"role": "user", "content": "Tell me more about it, please, with all the details. " * 2}]
    with pytest.raises(PromptTooLongError):
        m.chat(history, stream=False)
    assert m.generate("Hi.", max_new_tokens=3).token_ids == r.token_ids[:3]

"""`vl2edge synth` end to end, the synthesized tokenizer, and sane activations through the synthesized models."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from vl2edge.model.checkpoint import Checkpoint
from vl2edge.model.presets import processor_config
from vl2edge.model.projector import image_token_count
from vl2edge.model.synth_tokenizer import SPECIAL_TOKENS, write_tokenizer
from vl2edge.model.vl2 import DeepseekVL2

CHECKPOINT_FILES = {"config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "model.safetensors"}


def vl2edge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vl2edge.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


# --- CLI ----------------------------------------------------------------------------------------------------------

def test_synth_cli_writes_refuses_and_forces(tmp_path, test_checkpoints):
    out = tmp_path / "ckpt"
    r = vl2edge("synth", str(out), "--preset", "test-tiny", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    assert "synth test-tiny" not in r.stderr  # --quiet: no progress bar
    assert {p.name for p in out.iterdir()} == CHECKPOINT_FILES
    Checkpoint.open(out)
    assert json.loads((out / "processor_config.json").read_text()) == processor_config()
    # another process, same seed: the same bytes as the in-process synthesis (tokenizer included)
    for name in CHECKPOINT_FILES:
        assert (out / name).read_bytes() == (test_checkpoints["test-tiny"] / name).read_bytes(), name

    before = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    r = vl2edge("synth", str(out), "--preset", "test-vl2", "--quiet", cwd=tmp_path)
    assert r.returncode == 2
    assert "--force" in r.stderr and "Traceback" not in r.stderr
    assert hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest() == before

    # a bad --layers is reported before anything is deleted, even with --force
    r = vl2edge("synth", str(out), "--preset", "test-vl2", "--layers", "99", "--force", "--quiet", cwd=tmp_path)
    assert r.returncode != 0
    assert "--layers 99" in r.stderr and "3 layers" in r.stderr and "Traceback" not in r.stderr
    assert hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest() == before

    r = vl2edge("synth", str(out), "--preset", "test-vl2", "--force", "--quiet", "--seed", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ckpt = Checkpoint.open(out)
    assert ckpt.config.language.topk_method == "noaux_tc"


def test_synth_cli_layers(tmp_path, capsys):
    from vl2edge.cli import main

    assert main(["synth", str(tmp_path / "a"), "--preset", "test-small", "--layers", "99", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--layers 99" in err and "3 layers" in err
    assert not (tmp_path / "a").exists()
    assert main(["synth", str(tmp_path / "b"), "--preset", "test-small", "--layers", "1", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "b")
    assert Checkpoint.open(tmp_path / "b").config.language.num_hidden_layers == 1


def test_synth_cli_output_is_a_file(tmp_path, capsys):
    from vl2edge.cli import main

    f = tmp_path / "file"
    f.write_text("x")
    assert main(["synth", str(f), "--preset", "test-tiny", "--force", "--quiet"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert f.read_text() == "x"


@pytest.mark.parametrize("args,needle", [
    (["synth", "OUT", "--preset", "huge"], "invalid choice"),
    (["synth", "OUT"], "--preset"),
    (["synth", "OUT", "--preset", "test-tiny", "--layers", "two"], "invalid int"),
    ([], "command"),
])
def test_synth_cli_usage_errors(args, needle, tmp_path, capsys):
    from vl2edge.cli import main

    args = [str(tmp_path / "x") if a == "OUT" else a for a in args]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_synth_cli_unknown_preset_subprocess(tmp_path):
    r = vl2edge("synth", str(tmp_path / "x"), "--preset", "huge", cwd=tmp_path)
    assert r.returncode == 2
    assert "invalid choice" in r.stderr and "test-tiny" in r.stderr
    assert not (tmp_path / "x").exists()


# --- tokenizer ----------------------------------------------------------------------------------------------------

REAL_SPECIALS = {
    "<｜begin▁of▁sentence｜>": 0,
    "<｜end▁of▁sentence｜>": 1,
    "<｜▁pad▁｜>": 2,
    "<image>": 3,
    "<|ref|>": None, "<|/ref|>": None, "<|det|>": None, "<|/det|>": None, "<|grounding|>": None,
    "<|User|>": None, "<|Assistant|>": None,
}


@pytest.fixture(scope="module")
def tokenizer(test_checkpoints):
    return Tokenizer.from_file(str(test_checkpoints["test-tiny"] / "tokenizer.json"))


@pytest.mark.parametrize("token", list(REAL_SPECIALS))
def test_special_tokens(token, tokenizer):
    assert token in SPECIAL_TOKENS
    ids = tokenizer.encode(token, add_special_tokens=False).ids
    assert len(ids) == 1
    if REAL_SPECIALS[token] is not None:
        assert ids[0] == REAL_SPECIALS[token]
    assert tokenizer.token_to_id(token) == ids[0]
    assert tokenizer.id_to_token(ids[0]) == token
    assert tokenizer.decode(ids, skip_special_tokens=False) == token


def test_special_tokens_inside_text(tokenizer):
    img = tokenizer.token_to_id("<image>")
    text = "<|User|>: <image>\n<|ref|>The giraffe at the back.<|/ref|>.\n\n<|Assistant|>:"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert ids.count(img) == 1
    for t in ("<|User|>", "<|ref|>", "<|/ref|>", "<|Assistant|>"):
        assert ids.count(tokenizer.token_to_id(t)) == 1
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_config_files_agree(test_checkpoints, tokenizer):
    d = test_checkpoints["test-tiny"]
    tc = json.loads((d / "tokenizer_config.json").read_text())
    stm = json.loads((d / "special_tokens_map.json").read_text())
    assert tc["bos_token"] == stm["bos_token"] == "<｜begin▁of▁sentence｜>"
    assert tc["eos_token"] == stm["eos_token"] == "<｜end▁of▁sentence｜>"
    assert tc["pad_token"] == stm["pad_token"] == "<｜▁pad▁｜>"
    for i, entry in tc["added_tokens_decoder"].items():
        assert tokenizer.id_to_token(int(i)) == entry["content"] and entry["special"]
    assert len(tc["added_tokens_decoder"]) == len(SPECIAL_TOKENS)
    cfg = Checkpoint.open(d).config
    assert tokenizer.get_vocab_size() <= cfg.language.vocab_size  # every id has an embedding row
    assert cfg.language.bos_token_id == 0 and cfg.language.eos_token_id == 1


@pytest.mark.parametrize("text", [
    "Describe this image.",
    "Grüße aus Köln — naïve café, 東京タワー, Москва, 🚀🦒 emoji; zero\u200bwidth",
    "  leading and trailing spaces  \n\ttabs\r\nand CRLF",
    "[[580, 270, 999, 900]]",
    "\x00\x01 control chars \x7f",
    "",
])
def test_text_round_trip(text, tokenizer):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=60))
def test_arbitrary_unicode_round_trips(text, tokenizer):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_training_is_deterministic(tmp_path, test_checkpoints):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        write_tokenizer(tmp_path / sub, vocab_size=2048, seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        a = (tmp_path / "a" / name).read_bytes()
        assert a == (tmp_path / "b" / name).read_bytes(), name
        assert a == (test_checkpoints["test-vl2"] / name).read_bytes(), name


# --- activations --------------------------------------------------------------------------------------------------

def rms(t: torch.Tensor) -> float:
    return float(t.float().pow(2).mean().sqrt())


@pytest.mark.parametrize("preset", ["test-tiny", "test-small", "test-vl2"])
def test_activations_stay_sane(preset, test_checkpoints):
    model = DeepseekVL2.from_checkpoint(test_checkpoints[preset], dtype=torch.float32)
    n_img = image_token_count(1, 1)
    assert n_img == 421
    ids = [0, 10, 11, 12] + [3] * n_img + [13, 14, 15]
    mask = [False] * 4 + [True] * n_img + [False] * 3
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(2, 3, 384, 384, generator=g) * 2 - 1

    seen: dict[str, float] = {}
    finite: dict[str, bool] = {}

    def hook(name):
        def f(module, inputs, output):
            seen[name] = rms(output)
            finite[name] = bool(torch.isfinite(output).all())
        return f

    handles = [b.register_forward_hook(hook(f"vision.blocks.{i}")) for i, b in enumerate(model.vision.blocks)]
    handles += [l.register_forward_hook(hook(f"language.layers.{i}"))
                for i, l in enumerate(model.language.model.layers)]
    handles.append(model.projector.register_forward_hook(hook("projector")))
    try:
        logits = model(ids, pixels, mask, [[1, 1]])
    finally:
        for h in handles:
            h.remove()

    cfg = model.cfg
    assert len(seen) == cfg.vision.layers + cfg.language.num_hidden_layers + 1
    for name, value in seen.items():
        assert finite[name], name
        assert 0.05 <= value <= 50, (name, value)
    assert logits.shape == (1, len(ids), cfg.language.vocab_size)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert 0.1 <= float(logits.std()) <= 100

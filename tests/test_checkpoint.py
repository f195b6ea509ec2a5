"""Synthesized checkpoints read back by the safetensors library, the checkpoint reader's validation and error
messages on corrupted directories, and DeepseekVL2.from_checkpoint."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vl2edge.model.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, CheckpointError
from vl2edge.model.checkpoint_layout import checkpoint_shapes
from vl2edge.model.config import VL2Config
from vl2edge.model.presets import preset_config
from vl2edge.model.synth import init_tensor, synthesize
from vl2edge.model.vl2 import DeepseekVL2

PRESETS = ("test-tiny", "test-small", "test-vl2")


def shard_files(d: Path) -> list[Path]:
    index = d / INDEX_FILE
    if index.is_file():
        return [d / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [d / SINGLE_FILE]


def read_all(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read by the safetensors library itself."""
    out: dict[str, torch.Tensor] = {}
    for f in shard_files(d):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                assert k not in out, f"{k} stored twice"
                out[k] = h.get_tensor(k)
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def file_hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def tensors(test_checkpoints):
    return {p: read_all(d) for p, d in test_checkpoints.items()}


# --- round trip ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
def test_open_validates_and_shapes_match_layout(preset, test_checkpoints):
    ckpt = Checkpoint.open(test_checkpoints[preset])
    expected = checkpoint_shapes(ckpt.config)
    assert ckpt.config.raw == preset_config(preset)
    assert set(ckpt.weight_map) == set(expected)
    for name, shape in expected.items():
        assert ckpt.shape(name) == shape
    assert ckpt.processor_config["image_token"] == "<image>"
    assert ckpt.processor_config["patch_size"] == 14 and ckpt.processor_config["downsample_ratio"] == 2


def test_file_layout(test_checkpoints):
    assert not (test_checkpoints["test-tiny"] / INDEX_FILE).exists()
    assert (test_checkpoints["test-tiny"] / SINGLE_FILE).is_file()
    small = test_checkpoints["test-small"]
    names = sorted(p.name for p in small.glob("*.safetensors"))
    assert names == ["model-00001-of-000002.safetensors", "model-00002-of-000002.safetensors"]
    assert not (small / SINGLE_FILE).exists()


@pytest.mark.parametrize("preset", PRESETS)
def test_safetensors_library_reads_every_value(preset, test_checkpoints, tensors, synth_seed):
    """All tensors equal synth.init_tensor cast to their storage dtype (bf16; the MoE correction bias fp32)."""
    d = test_checkpoints[preset]
    cfg = VL2Config.from_file(d / "config.json")
    expected = checkpoint_shapes(cfg)
    got = tensors[preset]
    assert set(got) == set(expected)
    for name, shape in expected.items():
        t = got[name]
        assert tuple(t.shape) == shape, name
        want_dtype = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        assert t.dtype == want_dtype, name
        ref = init_tensor(name, shape, cfg, synth_seed).to(want_dtype)
        assert torch.equal(bits(t), bits(ref)), name
    if preset == "test-vl2":
        assert sum(k.endswith("e_score_correction_bias") for k in got) == cfg.language.num_hidden_layers - 1


@pytest.mark.parametrize("key", [
    "vision.blocks.0.norm1.weight", "vision.blocks.1.attn.qkv.bias", "vision.pos_embed", "vision.norm.bias",
    "vision.attn_pool.latent", "projector.layers.0.bias", "image_newline", "view_seperator",
    "language.model.layers.1.mlp.gate.e_score_correction_bias", "language.model.layers.2.self_attn.kv_b_proj.weight",
    "language.model.layers.1.self_attn.kv_a_layernorm.weight", "language.model.norm.weight",
    "language.lm_head.weight",
])
def test_checkpoint_tensor_matches_safetensors(key, test_checkpoints, tensors):
    ckpt = Checkpoint.open(test_checkpoints["test-vl2"])
    assert torch.equal(bits(ckpt.tensor(key)), bits(tensors["test-vl2"][key]))
    assert ckpt.tensor(key, torch.float32).dtype == torch.float32


def test_norms_and_biases_are_near_their_init(tensors):
    t = tensors["test-vl2"]
    norm = t["language.model.norm.weight"].float()
    assert 0.7 < norm.mean() < 1.3 and norm.std() > 0.02
    bias = t["language.model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and 0.01 < bias.std() < 0.5


@pytest.mark.parametrize("preset", PRESETS)
def test_every_tensor_is_random_and_distinct(preset, tensors):
    """No constant tensor and no two identical tensors: a swapped or mis-ordered tensor changes outputs."""
    seen: dict[bytes, str] = {}
    for name, t in tensors[preset].items():
        assert t.float().std() > 0, f"{name} is constant"
        h = hashlib.sha256(bits(t).numpy().tobytes()).digest()
        assert h not in seen, f"{name} equals {seen.get(h)}"
        seen[h] = name


@pytest.mark.parametrize("preset", PRESETS)
def test_safetensors_header_format(preset, test_checkpoints):
    """The hand-written header: 8-byte LE length, 8-aligned JSON, contiguous offsets covering the file."""
    for f in shard_files(test_checkpoints[preset]):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        assert n % 8 == 0
        header = json.loads(raw[8:8 + n])
        assert header.pop("__metadata__") == {"format": "pt"}
        spans = sorted(v["data_offsets"] for v in header.values())
        assert spans[0][0] == 0
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert spans[-1][1] == len(raw) - 8 - n
        # load_file (the safetensors torch API) agrees
        assert set(load_file(str(f))) == set(header)


def test_index_total_size_and_weight_map(test_checkpoints, tensors):
    d = test_checkpoints["test-small"]
    index = json.loads((d / INDEX_FILE).read_text())
    t = tensors["test-small"]
    assert index["metadata"]["total_size"] == sum(x.numel() * x.element_size() for x in t.values())
    assert set(index["weight_map"]) == set(t)
    for name, shard in index["weight_map"].items():
        with safe_open(str(d / shard), framework="pt") as h:
            assert name in h.keys()
    # both shards hold something, and vision comes first, lm_head last (module order is kept)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 2
    assert index["weight_map"]["vision.patch_embed.proj.weight"] == files[0]
    assert index["weight_map"]["language.lm_head.weight"] == files[1]


@pytest.mark.parametrize("preset", ["test-tiny", "test-small"])
def test_layers_truncation_keeps_layers_bit_identical(preset, test_checkpoints, tensors, tmp_path, synth_seed):
    d = synthesize(tmp_path / "two", preset, seed=synth_seed, layers=2, progress=False)
    ckpt = Checkpoint.open(d)
    assert ckpt.config.language.num_hidden_layers == 2
    assert json.loads((d / "config.json").read_text())["language_config"]["num_hidden_layers"] == 2
    short, full = read_all(d), tensors[preset]
    assert set(short) < set(full)
    assert not any(k.startswith("language.model.layers.2.") for k in short)
    assert any(k.startswith("language.model.layers.1.") for k in short)
    for k, t in short.items():
        assert torch.equal(bits(t), bits(full[k])), k
    if preset == "test-small":  # shard names count the shards actually written
        n = len(shard_files(d))
        assert sorted(p.name for p in d.glob("*.safetensors")) == [
            f"model-{i + 1:05d}-of-{n:06d}.safetensors" for i in range(n)]


def test_real_preset_sharding_plan():
    """Real presets: as many shards as published (1 / 4 / 8), none empty, module order kept; with --layers
    fewer shards may come out, never an empty one."""
    from vl2edge.model.synth import REAL_SHARDS, _split_shards, storage_dtype

    for preset, n in REAL_SHARDS.items():
        for layers in (None, 1):
            cfg = VL2Config.from_dict(preset_config(preset, layers))
            entries = [(k, s, storage_dtype(k)) for k, s in checkpoint_shapes(cfg).items()]
            shards = _split_shards(entries, n)
            assert all(shards) and [e for s in shards for e in s] == entries
            assert len(shards) == n if layers is None else 1 <= len(shards) <= n
            if layers is None and n > 1:
                sizes = [sum(math.prod(s) * d.itemsize for _, s, d in sh) for sh in shards]
                assert max(sizes) < 1.2 * min(sizes)


def test_determinism(tmp_path, test_checkpoints, synth_seed):
    a = synthesize(tmp_path / "a", "test-small", seed=synth_seed, progress=False)
    assert file_hashes(a) == file_hashes(test_checkpoints["test-small"])
    b = synthesize(tmp_path / "b", "test-small", seed=synth_seed + 1, progress=False)
    ha, hb = file_hashes(a), file_hashes(b)
    assert ha.keys() == hb.keys()
    for name in ha:
        if name.endswith(".safetensors"):
            assert ha[name] != hb[name], name
    assert ha["config.json"] == hb["config.json"]


def test_synthesize_refuses_to_overwrite(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="force"):
        synthesize(d, "test-tiny", progress=False)
    # a bad --layers must not delete anything, even with force
    with pytest.raises(ValueError, match="layers"):
        synthesize(d, "test-tiny", layers=99, force=True, progress=False)
    assert (d / "keep.txt").read_text() == "x"
    synthesize(d, "test-tiny", force=True, progress=False)
    assert not (d / "keep.txt").exists()
    Checkpoint.open(d)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        synthesize(f, "test-tiny", force=True, progress=False)
    assert f.read_text() == "x"


# --- corrupted directories ----------------------------------------------------------------------------------------

def open_error(d) -> str:
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(d)
    return str(e.value)


def rewrite(path: Path, edit) -> None:
    """Rewrite a safetensors file with the safetensors library after `edit(dict)`."""
    t = load_file(str(path))
    edit(t)
    save_file(t, str(path), metadata={"format": "pt"})


def test_missing_config(copy_checkpoint):
    d = copy_checkpoint()
    (d / "config.json").unlink()
    assert "no config.json" in open_error(d)


def test_invalid_json_config(copy_checkpoint):
    d = copy_checkpoint()
    (d / "config.json").write_text('{"model_type": "deepseek_vl_v2",')
    msg = open_error(d)
    assert "config.json" in msg and "not valid JSON" in msg


def test_wrong_model_type(copy_checkpoint):
    d = copy_checkpoint()
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "deepseek_v2"
    (d / "config.json").write_text(json.dumps(cfg))
    msg = open_error(d)
    assert "model_type" in msg and "'deepseek_v2'" in msg and "deepseek_vl_v2" in msg


def test_config_error_surfaces_as_checkpoint_error(copy_checkpoint):
    d = copy_checkpoint("test-vl2")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["language_config"]["topk_method"]
    (d / "config.json").write_text(json.dumps(cfg))
    assert "gready" in open_error(d)


def test_config_from_another_model(copy_checkpoint):
    """A config that parses but does not describe these weights: the first mismatch is named."""
    d = copy_checkpoint("test-tiny")
    cfg = json.loads((d / "config.json").read_text())
    cfg["language_config"]["num_hidden_layers"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    msg = open_error(d)
    assert "unexpected tensor" in msg and "language.model.layers.2." in msg


MISSING = "language.model.layers.1.mlp.experts.5.up_proj.weight"


def test_missing_key_single_file(copy_checkpoint):
    d = copy_checkpoint("test-tiny")
    rewrite(d / SINGLE_FILE, lambda t: t.pop(MISSING))
    msg = open_error(d)
    assert repr(MISSING) in msg and "missing" in msg and "[32, 64]" in msg


def test_missing_key_sharded(copy_checkpoint):
    d = copy_checkpoint("test-small")
    index = json.loads((d / INDEX_FILE).read_text())
    shard = d / index["weight_map"][MISSING]
    rewrite(shard, lambda t: t.pop(MISSING))
    # the index still claims the key
    msg = open_error(d)
    assert repr(MISSING) in msg and shard.name in msg
    # the key is gone from the index too
    del index["weight_map"][MISSING]
    (d / INDEX_FILE).write_text(json.dumps(index))
    msg = open_error(d)
    assert repr(MISSING) in msg and "missing" in msg and "[32, 64]" in msg


def test_wrong_shape(copy_checkpoint):
    d = copy_checkpoint("test-vl2")
    key = "language.model.layers.2.self_attn.kv_b_proj.weight"  # [4 * (16 + 16), 32]

    def edit(t):
        t[key] = t[key].T.contiguous()

    rewrite(d / SINGLE_FILE, edit)
    msg = open_error(d)
    assert repr(key) in msg and "[32, 128]" in msg and "[128, 32]" in msg


def test_unexpected_extra_key(copy_checkpoint):
    d = copy_checkpoint("test-tiny")
    extra = "language.model.layers.0.self_attn.rotary_emb.inv_freq"
    rewrite(d / SINGLE_FILE, lambda t: t.__setitem__(extra, torch.ones(8)))
    msg = open_error(d)
    assert "unexpected" in msg and repr(extra) in msg


def test_index_names_missing_shard(copy_checkpoint):
    d = copy_checkpoint("test-small")
    (d / "model-00002-of-000002.safetensors").unlink()
    msg = open_error(d)
    assert "model-00002-of-000002.safetensors" in msg and "missing" in msg


def test_malformed_index(copy_checkpoint):
    d = copy_checkpoint("test-small")
    (d / INDEX_FILE).write_text('{"metadata": {}}')
    assert "malformed index" in open_error(d)
    (d / INDEX_FILE).write_text("[")
    assert "malformed index" in open_error(d)


def test_several_files_without_index(copy_checkpoint):
    d = copy_checkpoint("test-small")
    (d / INDEX_FILE).unlink()
    msg = open_error(d)
    assert "2 safetensors files" in msg and INDEX_FILE in msg


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
@pytest.mark.parametrize("preset", ["test-tiny", "test-small"])
def test_unreadable_safetensors(how, preset, copy_checkpoint):
    d = copy_checkpoint(preset)
    f = shard_files(d)[-1]
    raw = f.read_bytes()
    f.write_bytes({"truncated": raw[: len(raw) - 100], "garbage": b"\x89PNG\r\n" * 50, "empty": b""}[how])
    msg = open_error(d)
    assert str(f) in msg and "not a readable safetensors file" in msg


def test_pickled_weights_refused_never_unpickled(copy_checkpoint, monkeypatch):
    def no_unpickling(*a, **k):
        raise AssertionError("tried to unpickle")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    d = copy_checkpoint("test-tiny")
    (d / SINGLE_FILE).unlink()
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + b"\x00" * 60)  # looks like a torch.save zip
    msg = open_error(d)
    assert "pytorch_model.bin" in msg and "pickled weights" in msg and "safetensors" in msg


def test_no_weights_at_all(copy_checkpoint):
    d = copy_checkpoint("test-tiny")
    (d / SINGLE_FILE).unlink()
    msg = open_error(d)
    assert "no *.safetensors" in msg and "pickled" not in msg


def test_path_is_a_file(test_checkpoints):
    msg = open_error(test_checkpoints["test-tiny"] / "config.json")
    assert "is a file" in msg


@pytest.mark.parametrize("ref", ["no_such_dir", "a/b/c", "./x/y"])
def test_nonexistent_path_not_a_repo_id(ref, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import huggingface_hub

    def no_hub(*a, **k):
        raise AssertionError("must not go to the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    msg = open_error(ref)
    assert "no such directory" in msg and "repo id" in msg
    msg = open_error(tmp_path / "missing" / "dir")
    assert "no such directory" in msg


def test_missing_processor_config_and_unknown_tensor(copy_checkpoint):
    d = copy_checkpoint("test-tiny")
    (d / "processor_config.json").unlink()
    ckpt = Checkpoint.open(d)  # weights are fine
    with pytest.raises(CheckpointError, match="processor_config.json"):
        ckpt.processor_config
    with pytest.raises(CheckpointError, match="not in the checkpoint"):
        ckpt.tensor("language.model.layers.99.mlp.gate.weight")


# --- DeepseekVL2.from_checkpoint ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["test-tiny", "test-vl2"])
def test_from_checkpoint_dtypes(preset, dtype, test_checkpoints, tensors):
    model = DeepseekVL2.from_checkpoint(test_checkpoints[preset], dtype=dtype)
    assert not model.training
    sd = model.state_dict()
    for name, p in sd.items():
        assert p.device.type == "cpu", name
        want = torch.float32 if name.endswith("e_score_correction_bias") else dtype
        assert p.dtype == want, name
        assert torch.equal(p, tensors[preset][name].to(want)), name
    assert model.dtype == dtype
    biases = [n for n in sd if n.endswith("e_score_correction_bias")]
    assert bool(biases) == (preset == "test-vl2")


@pytest.mark.parametrize("preset", PRESETS)
def test_attn_pool_is_in_checkpoint_not_in_model(preset, test_checkpoints):
    ckpt = Checkpoint.open(test_checkpoints[preset])
    model = DeepseekVL2.from_checkpoint(ckpt, dtype=torch.bfloat16)
    pool = {k for k in ckpt.weight_map if k.startswith("vision.attn_pool.")}
    assert len(pool) == 13
    sd = set(model.state_dict())
    assert not pool & sd
    assert sd == set(ckpt.weight_map) - pool
    assert not any(p.is_meta for p in model.parameters())

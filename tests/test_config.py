"""Config parsing, official defaults, and the tensor inventory of the real presets (computed, nothing written).

Expected numbers come from ../shared/reference/deepseek-vl2.md §1-3.
"""

from __future__ import annotations

import copy
import math

import pytest

from vl2edge.model.checkpoint_layout import checkpoint_shapes, parameter_count
from vl2edge.model.config import OFFICIAL_LANGUAGE_DEFAULTS, ConfigError, VL2Config
from vl2edge.model.presets import PRESETS, REAL_PRESETS, TEST_PRESETS, preset_config


def cfg_of(name: str, layers: int | None = None) -> VL2Config:
    return VL2Config.from_dict(preset_config(name, layers), f"preset {name}")


@pytest.fixture(scope="module")
def real_shapes():
    return {p: checkpoint_shapes(cfg_of(p)) for p in REAL_PRESETS}


# --- §2: parameter and tensor counts ------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,params,tensors", [
    ("tiny", 3_370_501_440, 2_582),
    ("small", 16_148_349_504, 5_639),
    ("vl2", 27_480_134_248, 6_973),
])
def test_real_preset_counts(preset, params, tensors, real_shapes):
    cfg = cfg_of(preset)
    assert parameter_count(cfg) == params
    assert len(real_shapes[preset]) == tensors
    assert sum(math.prod(s) for s in real_shapes[preset].values()) == params


@pytest.mark.parametrize("preset,component,expected", [
    # reference §2 per-component rows
    ("tiny", "vision_used", 412_987_248), ("tiny", "attn_pool", 15_238_352),
    ("tiny", "projector", 7_539_200), ("small", "projector", 13_635_584), ("vl2", "projector", 18_355_200),
    ("tiny", "separators", 2_560), ("small", "separators", 4_096), ("vl2", "separators", 5_120),
    ("tiny", "llm", 2_934_734_080), ("small", "llm", 15_706_484_224), ("vl2", "llm", 27_033_548_328),
    ("tiny", "moe_layer", 227_164_160), ("small", "moe_layer", 571_080_704), ("vl2", "moe_layer", 873_123_912),
    ("tiny", "attention", 6_553_600), ("small", "attention", 13_763_072), ("vl2", "attention", 31_883_776),
])
def test_real_preset_component_counts(preset, component, expected, real_shapes):
    s = real_shapes[preset]

    def count(pred):
        return sum(math.prod(v) for k, v in s.items() if pred(k))

    attn1 = "language.model.layers.1.self_attn."
    mlp1 = "language.model.layers.1.mlp."
    preds = {
        "vision_used": lambda k: k.startswith("vision.") and not k.startswith("vision.attn_pool."),
        "attn_pool": lambda k: k.startswith("vision.attn_pool."),
        "projector": lambda k: k.startswith("projector."),
        "separators": lambda k: k in ("image_newline", "view_seperator"),
        "llm": lambda k: k.startswith("language."),
        "moe_layer": lambda k: k.startswith(mlp1),
        "attention": lambda k: k.startswith(attn1),
    }
    assert count(preds[component]) == expected


def test_published_totals_need_attn_pool_and_small_vocab():
    """§2 consistency notes: Small's vocab is 102,400 (129,280 would give 16.26B)."""
    d = preset_config("small")
    d["language_config"]["vocab_size"] = 129_280
    assert round(parameter_count(VL2Config.from_dict(d)) / 1e9, 2) == 16.26


# --- §1b: official defaults for absent keys -----------------------------------------------------------------------

def test_vl2_layers_and_heads_come_from_official_defaults():
    d = preset_config("vl2")
    lm = d["language_config"]
    assert "num_hidden_layers" not in lm and "num_attention_heads" not in lm
    L = VL2Config.from_dict(d).language
    assert L.num_hidden_layers == 30  # transformers' DeepseekV2Config would say 32
    assert L.num_attention_heads == 32
    assert L.num_key_value_heads == 32
    assert L.kv_lora_rank == 512 and L.qk_rope_head_dim == 64 and L.qk_nope_head_dim == 128 and L.v_head_dim == 128
    assert L.rope_theta == 10000.0 and L.rms_norm_eps == 1e-6 and L.rope_scaling is None and L.use_mla
    assert L.bos_token_id == 0 and L.eos_token_id == 1  # from config.json, not the defaults 100000 / 100001
    n_layers = {int(k.split(".")[3]) for k in checkpoint_shapes(VL2Config.from_dict(d)) if k.startswith("language.model.layers.")}
    assert n_layers == set(range(30))


def test_official_defaults_table():
    D = OFFICIAL_LANGUAGE_DEFAULTS
    assert (D["num_hidden_layers"], D["num_attention_heads"], D["q_lora_rank"], D["vocab_size"]) == (30, 32, 1536, 102400)
    assert D["topk_method"] == "gready" and D["use_mla"] is True and D["tie_word_embeddings"] is False


def test_q_lora_rank_explicit_null_vs_absent():
    d = preset_config("vl2")
    assert "q_lora_rank" in d["language_config"] and d["language_config"]["q_lora_rank"] is None
    cfg = VL2Config.from_dict(d)
    assert cfg.language.q_lora_rank is None
    s = checkpoint_shapes(cfg)
    assert s["language.model.layers.0.self_attn.q_proj.weight"] == (6144, 2560)
    assert not any("q_a_proj" in k for k in s)

    del d["language_config"]["q_lora_rank"]
    cfg = VL2Config.from_dict(d)
    assert cfg.language.q_lora_rank == 1536
    s = checkpoint_shapes(cfg)
    assert "language.model.layers.0.self_attn.q_proj.weight" not in s
    assert s["language.model.layers.0.self_attn.q_a_proj.weight"] == (1536, 2560)
    assert s["language.model.layers.0.self_attn.q_a_layernorm.weight"] == (1536,)
    assert s["language.model.layers.0.self_attn.q_b_proj.weight"] == (6144, 1536)


def test_tiny_is_mha_small_and_vl2_are_mla():
    assert not cfg_of("tiny").language.use_mla
    assert cfg_of("tiny").language.head_dim == 128
    assert cfg_of("small").language.use_mla and cfg_of("vl2").language.use_mla
    assert cfg_of("vl2").language.topk_method == "noaux_tc"
    assert cfg_of("vl2").language.scoring_func == "sigmoid"
    assert cfg_of("small").language.vocab_size == 102_400


def test_vision_and_layout_constants():
    cfg = cfg_of("tiny")
    v = cfg.vision
    assert (v.image_size, v.patch_size, v.width, v.layers, v.heads) == (384, 14, 1152, 27, 16)
    assert v.mlp_hidden == 4304 and v.head_dim == 72 and v.grid == 27 and v.num_patches == 729
    assert cfg.tokens_per_tile_side == 14
    assert len(cfg.candidate_resolutions) == 23 and cfg.candidate_resolutions[0] == (384, 384)


# --- §2: KV cache per token ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,elements", [("tiny", 30_720), ("small", 15_552), ("vl2", 17_280)])
def test_kv_cache_elements_per_token(preset, elements):
    assert cfg_of(preset).language.cache_elements_per_token == elements


@pytest.mark.parametrize("preset", TEST_PRESETS)
def test_kv_cache_allocation_matches_formula(preset):
    import torch

    from vl2edge.model.language import KVCache

    L = cfg_of(preset).language
    cache = KVCache(L, batch=1, max_len=7, dtype=torch.bfloat16)
    assert cache.nbytes() == 7 * L.cache_elements_per_token * 2


# --- errors -------------------------------------------------------------------------------------------------------

def _err(d) -> str:
    with pytest.raises(ConfigError) as e:
        VL2Config.from_dict(d, "my/config.json")
    msg = str(e.value)
    assert "my/config.json" in msg
    return msg


def test_unknown_model_type():
    d = preset_config("test-tiny")
    d["model_type"] = "llava"
    msg = _err(d)
    assert "model_type" in msg and "llava" in msg and "deepseek_vl_v2" in msg
    del d["model_type"]
    assert "model_type" in _err(d)


@pytest.mark.parametrize("part", ["language_config", "vision_config", "projector_config"])
def test_missing_sub_config(part):
    d = preset_config("test-vl2")
    del d[part]
    assert part in _err(d)
    d[part] = "not a dict"
    assert part in _err(d)


def test_missing_topk_method_leaves_official_gready():
    d = preset_config("vl2")
    del d["language_config"]["topk_method"]
    msg = _err(d)
    assert "topk_method" in msg and "gready" in msg


def test_unsupported_topk_and_scoring():
    d = preset_config("test-small")
    d["language_config"]["topk_method"] = "bogus"
    assert "bogus" in _err(d)
    d = preset_config("test-small")
    d["language_config"]["scoring_func"] = "tanh"
    assert "scoring_func" in _err(d)


@pytest.mark.parametrize("scaling", [
    {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096},
    {"type": "linear", "factor": 2.0},
])
def test_rope_scaling_refused(scaling):
    d = preset_config("vl2")
    d["language_config"]["rope_scaling"] = scaling
    assert "rope_scaling" in _err(d)


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["projector_config"].__setitem__("n_embed", 7), "n_embed"),
    (lambda d: d.__setitem__("tile_tag", "1D"), "tile_tag"),
    (lambda d: d.__setitem__("global_view_pos", "middle"), "global_view_pos"),
    (lambda d: d["projector_config"].__setitem__("projector_type", "linear"), "projector_type"),
    (lambda d: d["language_config"].__setitem__("hidden_act", "gelu"), "hidden_act"),
    (lambda d: d["language_config"].__setitem__("n_group", 3), "n_group"),
    (lambda d: d["language_config"].__setitem__("kv_lora_rank", None), "MLA"),
    (lambda d: d["language_config"].__setitem__("num_experts_per_tok", None), "num_experts_per_tok"),
    (lambda d: d["vision_config"].__setitem__("heads", 5), "heads"),
])
def test_other_config_errors(mutate, needle):
    d = preset_config("test-vl2")
    mutate(d)
    assert needle in _err(d)


def test_from_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        VL2Config.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        VL2Config.from_file(tmp_path / "config.json")


# --- presets ------------------------------------------------------------------------------------------------------

def test_preset_layers_truncation():
    assert cfg_of("vl2", layers=2).language.num_hidden_layers == 2
    assert preset_config("vl2", 30)["language_config"]["num_hidden_layers"] == 30
    with pytest.raises(ValueError, match="30 layers"):
        preset_config("vl2", 31)
    with pytest.raises(ValueError, match="3 layers"):
        preset_config("test-tiny", 0)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("huge")


def test_preset_config_is_a_fresh_copy():
    a = preset_config("tiny")
    a["language_config"]["hidden_size"] = 1
    assert preset_config("tiny")["language_config"]["hidden_size"] == 1280
    assert PRESETS["tiny"][1]["hidden_size"] == 1280


@pytest.mark.parametrize("preset", TEST_PRESETS)
def test_test_presets_keep_real_image_geometry(preset):
    cfg = cfg_of(preset)
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.tokens_per_tile_side) == (384, 14, 14)
    assert cfg.projector.input_dim == cfg.vision.width and cfg.projector.n_embed == cfg.language.hidden_size


# --- §3: shapes against the reference table -----------------------------------------------------------------------

@pytest.mark.parametrize("preset,key,shape", [
    ("tiny", "language.model.embed_tokens.weight", (129280, 1280)),
    ("tiny", "language.model.layers.3.self_attn.q_proj.weight", (1280, 1280)),
    ("tiny", "language.model.layers.3.self_attn.k_proj.weight", (1280, 1280)),
    ("tiny", "language.model.layers.0.mlp.gate_proj.weight", (6848, 1280)),
    ("tiny", "language.model.layers.11.mlp.experts.63.down_proj.weight", (1280, 896)),
    ("tiny", "language.model.layers.1.mlp.shared_experts.gate_proj.weight", (1792, 1280)),
    ("small", "language.model.embed_tokens.weight", (102400, 2048)),
    ("small", "language.model.layers.5.self_attn.q_proj.weight", (3072, 2048)),
    ("small", "language.model.layers.5.self_attn.kv_a_proj_with_mqa.weight", (576, 2048)),
    ("small", "language.model.layers.5.self_attn.kv_a_layernorm.weight", (512,)),
    ("small", "language.model.layers.5.self_attn.kv_b_proj.weight", (4096, 512)),
    ("small", "language.model.layers.5.self_attn.o_proj.weight", (2048, 2048)),
    ("small", "language.model.layers.0.mlp.down_proj.weight", (2048, 10944)),
    ("small", "language.model.layers.26.mlp.shared_experts.down_proj.weight", (2048, 2816)),
    ("small", "language.lm_head.weight", (102400, 2048)),
    ("vl2", "language.model.layers.29.self_attn.q_proj.weight", (6144, 2560)),
    ("vl2", "language.model.layers.29.self_attn.kv_b_proj.weight", (8192, 512)),
    ("vl2", "language.model.layers.29.self_attn.o_proj.weight", (2560, 4096)),
    ("vl2", "language.model.layers.1.mlp.gate.weight", (72, 2560)),
    ("vl2", "language.model.layers.1.mlp.gate.e_score_correction_bias", (72,)),
    ("vl2", "language.model.layers.29.mlp.experts.71.gate_proj.weight", (1536, 2560)),
    ("vl2", "language.model.layers.0.mlp.up_proj.weight", (12288, 2560)),
    ("vl2", "language.model.norm.weight", (2560,)),
    ("vl2", "vision.patch_embed.proj.weight", (1152, 3, 14, 14)),
    ("vl2", "vision.pos_embed", (1, 729, 1152)),
    ("vl2", "vision.blocks.26.attn.qkv.weight", (3456, 1152)),
    ("vl2", "vision.blocks.26.attn.qkv.bias", (3456,)),
    ("vl2", "vision.blocks.0.mlp.fc1.weight", (4304, 1152)),
    ("vl2", "vision.blocks.0.mlp.fc2.weight", (1152, 4304)),
    ("vl2", "vision.attn_pool.latent", (1, 1, 1152)),
    ("vl2", "vision.attn_pool.kv.weight", (2304, 1152)),
    ("vl2", "vision.attn_pool.mlp.fc1.weight", (4304, 1152)),
    ("vl2", "projector.layers.0.weight", (2560, 4608)),
    ("vl2", "projector.layers.2.weight", (2560, 2560)),
    ("tiny", "image_newline", (1280,)),
    ("small", "view_seperator", (2048,)),
])
def test_reference_shapes(preset, key, shape, real_shapes):
    assert real_shapes[preset][key] == shape


@pytest.mark.parametrize("preset", REAL_PRESETS)
def test_inventory_structure(preset, real_shapes):
    s = real_shapes[preset]
    L = cfg_of(preset).language
    keys = list(s)
    assert keys[0] == "vision.patch_embed.proj.weight" and keys[-1] == "language.lm_head.weight"
    # layer 0 dense, every later layer MoE; VL2 alone has correction biases
    assert "language.model.layers.0.mlp.gate_proj.weight" in s
    assert "language.model.layers.0.mlp.gate.weight" not in s
    bias = [k for k in s if k.endswith("e_score_correction_bias")]
    assert len(bias) == (L.num_hidden_layers - 1 if preset == "vl2" else 0)
    experts = {k.split(".experts.")[1].split(".")[0] for k in s if ".layers.1.mlp.experts." in k}
    assert len(experts) == L.n_routed_experts
    assert not any(k.endswith(("inv_freq", "cos_cached", "sin_cached")) for k in s)
    assert any(".k_proj." in k for k in s) == (preset == "tiny")


def test_sparse_vl2_config_dict_is_not_mutated():
    d = preset_config("vl2")
    before = copy.deepcopy(d)
    VL2Config.from_dict(d)
    assert d == before

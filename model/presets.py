"""Checkpoint presets: the config.json / processor_config.json the synthesizer writes.

Real-dims presets follow ../shared/reference/deepseek-vl2.md §1 key for key (sparse where the published files are
sparse: `vl2` has no layer or head count, exactly like the published config, and relies on the official defaults).
Test presets keep image size 384 and patch 14 so tiling and image-token counts are the real ones, and shrink widths
and depths. This module imports no torch.
"""

from __future__ import annotations

import copy

from .config import CANDIDATE_RESOLUTIONS, MODEL_TYPE

REAL_VISION = {
    "layers": 27,
    "mlp_ratio": 3.7362,
    "model_name": "siglip_so400m_patch14_384",
    "model_type": "vision",
    "patch_size": 14,
    "width": 1152,
}

# language_config as published (absent keys take the official defaults, see config.py)
_TINY_LM = {
    "bos_token_id": 0,
    "eos_token_id": 1,
    "first_k_dense_replace": 1,
    "hidden_size": 1280,
    "intermediate_size": 6848,
    "kv_lora_rank": None,
    "lm_head": True,
    "max_position_embeddings": 4096,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 896,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_attention_heads": 10,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 12,
    "num_key_value_heads": 10,
    "q_lora_rank": None,
    "qk_nope_head_dim": 0,
    "qk_rope_head_dim": 0,
    "rm_head": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "use_mla": False,
    "v_head_dim": 0,
    "vocab_size": 129280,
}
_SMALL_LM = {  # the Small config text was never seen: [DERIVED] values, the official defaults elsewhere
    "bos_token_id": 0,
    "eos_token_id": 1,
    "first_k_dense_replace": 1,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "max_position_embeddings": 4096,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "q_lora_rank": None,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "vocab_size": 102400,
}
_VL2_LM = {  # no num_hidden_layers / num_attention_heads: 30 / 32 from the official defaults
    "bos_token_id": 0,
    "eos_token_id": 1,
    "first_k_dense_replace": 1,
    "hidden_size": 2560,
    "intermediate_size": 12288,
    "lm_head": False,
    "max_position_embeddings": 4096,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1536,
    "n_group": 1,
    "n_routed_experts": 72,
    "n_shared_experts": 2,
    "norm_topk_prob": True,
    "num_experts_per_tok": 6,
    "q_lora_rank": None,
    "rm_head": False,
    "routed_scaling_factor": 2.0,
    "scoring_func": "sigmoid",
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "vocab_size": 129280,
}

# Small dims for tests: 384/14 images, a few layers, narrow widths, enough experts that routing matters.
_TEST_VISION = {"layers": 2, "mlp_ratio": 3.7362, "model_name": "siglip_so400m_patch14_384", "model_type": "vision",
                "patch_size": 14, "width": 64, "heads": 4}
_TEST_COMMON_LM = {
    "bos_token_id": 0,
    "eos_token_id": 1,
    "first_k_dense_replace": 1,
    "hidden_size": 64,
    "intermediate_size": 160,
    "max_position_embeddings": 4096,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 32,
    "n_routed_experts": 16,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 3,
    "q_lora_rank": None,
    "torch_dtype": "bfloat16",
    "vocab_size": 2048,
}
_TEST_TINY_LM = {**_TEST_COMMON_LM, "kv_lora_rank": None, "n_group": 1, "num_attention_heads": 4,
                 "num_key_value_heads": 4, "qk_nope_head_dim": 0, "qk_rope_head_dim": 0, "topk_group": 1,
                 "topk_method": "greedy", "use_mla": False, "v_head_dim": 0}
_TEST_MLA = {"kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
             "num_attention_heads": 4, "num_key_value_heads": 4}
_TEST_SMALL_LM = {**_TEST_COMMON_LM, **_TEST_MLA, "n_group": 1, "topk_group": 1, "topk_method": "greedy"}
# test-vl2 uses 4 groups / keep 2 so the group-limited path of noaux_tc really runs (the real VL2 has 1 / 1).
_TEST_VL2_LM = {**_TEST_COMMON_LM, **_TEST_MLA, "n_group": 4, "topk_group": 2, "norm_topk_prob": True,
                "routed_scaling_factor": 2.0, "scoring_func": "sigmoid", "topk_method": "noaux_tc"}

# Held-out dims (bench/heldout.py): one checkpoint per attention kind unlike the test presets, never used to choose a
# default: grouped KV heads (8 query heads on 2; Tiny has one per query head), wider latents, 24 experts, 4 layers.
_HELDOUT_COMMON_LM = {**_TEST_COMMON_LM, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64,
                      "n_routed_experts": 24, "n_shared_experts": 1, "num_experts_per_tok": 4, "num_hidden_layers": 4}
_HELDOUT_MHA_LM = {**_HELDOUT_COMMON_LM, "kv_lora_rank": None, "n_group": 1, "num_attention_heads": 8,
                   "num_key_value_heads": 2, "qk_nope_head_dim": 0, "qk_rope_head_dim": 0, "topk_group": 1,
                   "topk_method": "greedy", "use_mla": False, "v_head_dim": 0}
_HELDOUT_MLA_LM = {**_HELDOUT_COMMON_LM, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
                   "v_head_dim": 32, "num_attention_heads": 4, "num_key_value_heads": 4, "n_group": 1,
                   "topk_group": 1, "topk_method": "greedy"}

PRESETS: dict[str, tuple[dict, dict]] = {
    # name: (vision_config, language_config)
    "tiny": (REAL_VISION, _TINY_LM),
    "small": (REAL_VISION, _SMALL_LM),
    "vl2": (REAL_VISION, _VL2_LM),
    "test-tiny": (_TEST_VISION, _TEST_TINY_LM),
    "test-small": (_TEST_VISION, _TEST_SMALL_LM),
    "test-vl2": (_TEST_VISION, _TEST_VL2_LM),
    "heldout-mha": (_TEST_VISION, _HELDOUT_MHA_LM),
    "heldout-mla": (_TEST_VISION, _HELDOUT_MLA_LM),
}
REAL_PRESETS = ("tiny", "small", "vl2")
TEST_PRESETS = ("test-tiny", "test-small", "test-vl2")


def preset_config(name: str, layers: int | None = None) -> dict:
    """The config.json dict of a preset; `layers` truncates the language model (for quick benchmark runs)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    vision, lm = (copy.deepcopy(x) for x in PRESETS[name])
    if layers is not None:
        from .config import OFFICIAL_LANGUAGE_DEFAULTS

        full = lm.get("num_hidden_layers", OFFICIAL_LANGUAGE_DEFAULTS["num_hidden_layers"])
        if not 1 <= layers <= full:
            raise ValueError(f"--layers {layers}: preset {name!r} has {full} layers")
        lm["num_hidden_layers"] = layers
    cfg = {
        "architectures": ["DeepseekVLV2ForCausalLM"],
        "candidate_resolutions": [list(c) for c in CANDIDATE_RESOLUTIONS],
        "global_view_pos": "head",
        "language_config": lm,
        "model_type": MODEL_TYPE,
        "projector_config": {"model_type": "mlp_projector", "n_embed": lm["hidden_size"]},
        "tile_tag": "2D",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.38.2",
        "vision_config": vision,
    }
    if vision["width"] != 1152:
        cfg["projector_config"]["input_dim"] = vision["width"]
    return cfg


def test_preset_of(config: dict) -> str | None:
    """The test preset whose dims this config.json has (any number of layers), else None: random-weight models
    that no real-dims verdict (precision policy, speed targets) is stated for."""
    lm = {k: v for k, v in config.get("language_config", {}).items() if k != "num_hidden_layers"}
    for name in TEST_PRESETS:
        vision, test_lm = PRESETS[name]
        if lm == {k: v for k, v in test_lm.items() if k != "num_hidden_layers"} and \
                config.get("vision_config", {}).get("width") == vision["width"]:
            return name
    return None


def processor_config() -> dict:
    """processor_config.json (the keys the official DeepseekVLV2Processor reads)."""
    return {
        "add_special_token": False,
        "candidate_resolutions": [list(c) for c in CANDIDATE_RESOLUTIONS],
        "downsample_ratio": 2,
        "ignore_id": -100,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_token": "<image>",
        "mask_prompt": False,
        "normalize": True,
        "pad_token": "<｜▁pad▁｜>",
        "patch_size": 14,
        "processor_class": "DeepseekVLV2Processor",
        "sft_format": "deepseek",
    }

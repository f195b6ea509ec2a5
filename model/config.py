"""DeepSeek-VL2 configuration: parsing config.json with the OFFICIAL code's defaults.

Reference: ../shared/reference/deepseek-vl2.md §1. The published config.json files are sparse: VL2's has no layer
or head count and relies on the official `DeepseekV2Config` defaults (30 layers, 32 heads, q_lora_rank 1536, ...),
which differ from transformers' DeepseekV2Config defaults. Every key absent from `language_config` therefore takes
the value in OFFICIAL_LANGUAGE_DEFAULTS below, never a library's default.

This module imports no torch: the runtime reads configs too.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPE = "deepseek_vl_v2"

# (width, height) pairs, in the published order: every m x n grid of 384 tiles with m*n <= 9.
CANDIDATE_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (384, 384), (384, 768), (768, 384), (384, 1152), (1152, 384), (384, 1536), (1536, 384), (768, 768),
    (384, 1920), (1920, 384), (384, 2304), (2304, 384), (768, 1152), (1152, 768), (384, 2688), (2688, 384),
    (384, 3072), (3072, 384), (768, 1536), (1536, 768), (384, 3456), (3456, 384), (1152, 1152),
)

# configuration_deepseek.py (official) defaults for every DeepseekV2Config field the model reads.
OFFICIAL_LANGUAGE_DEFAULTS: dict[str, Any] = {
    "vocab_size": 102400,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "moe_intermediate_size": 1407,
    "num_hidden_layers": 30,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "n_shared_experts": None,
    "n_routed_experts": None,
    "ep_size": 1,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "gready",  # sic: the official default matches no branch; real configs always set it
    "n_group": None,
    "topk_group": None,
    "num_experts_per_tok": None,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 0,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "pad_token_id": None,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "use_mla": True,
}

SUPPORTED_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SUPPORTED_SCORING = ("softmax", "sigmoid")


class ConfigError(ValueError):
    """A config.json that this implementation cannot run, with the reason."""


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 384
    patch_size: int = 14
    width: int = 1152
    layers: int = 27
    heads: int = 16
    mlp_ratio: float = 3.7362
    model_name: str = "siglip_so400m_patch14_384"
    global_pool: str = "map"
    ignore_head: bool = True
    select_layer: int = -1
    weight_init: str = "skip"
    deterministic: bool = False
    num_recomputing_layers: int = 0

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)  # truncation, as timm: int(1152 * 3.7362) = 4304

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size  # 27: the last 6 px are never seen

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class ProjectorConfig:
    n_embed: int
    projector_type: str = "downsample_mlp_gelu"
    input_dim: int = 1152
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2
    token_pooling: bool = False


@dataclass(frozen=True)
class LanguageConfig:
    """DeepseekV2Config fields that the model reads, resolved against the official defaults."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    n_shared_experts: int | None
    n_routed_experts: int | None
    routed_scaling_factor: float
    kv_lora_rank: int | None
    q_lora_rank: int | None
    qk_rope_head_dim: int
    v_head_dim: int
    qk_nope_head_dim: int
    topk_method: str
    n_group: int | None
    topk_group: int | None
    num_experts_per_tok: int | None
    moe_layer_freq: int
    first_k_dense_replace: int
    norm_topk_prob: bool
    scoring_func: str
    hidden_act: str
    max_position_embeddings: int
    rms_norm_eps: float
    bos_token_id: int | None
    eos_token_id: int | None
    tie_word_embeddings: bool
    rope_theta: float
    rope_scaling: dict | None
    attention_bias: bool
    use_mla: bool

    # --- derived shapes -------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """MHA head size (Tiny: 1280 / 10 = 128)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def q_head_dim(self) -> int:
        """MLA query/key head size: nope + rope (128 + 64 = 192)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return (self.q_head_dim if self.use_mla else self.head_dim) ** -0.5

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.n_routed_experts is not None
            and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0
        )

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * (self.n_shared_experts or 0)

    @property
    def cache_elements_per_token(self) -> int:
        """KV-cache elements per token for the whole model (MLA: latent + rope key; MHA: K + V)."""
        if self.use_mla:
            return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim)
        return self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim


@dataclass(frozen=True)
class VL2Config:
    vision: VisionConfig
    projector: ProjectorConfig
    language: LanguageConfig
    tile_tag: str = "2D"
    global_view_pos: str = "head"
    candidate_resolutions: tuple[tuple[int, int], ...] = CANDIDATE_RESOLUTIONS
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def tokens_per_tile_side(self) -> int:
        """14: the 27x27 grid padded to 28 and pooled 2x2."""
        return -(-self.vision.grid // self.projector.downsample_ratio)

    # --- parsing ----------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "VL2Config":
        mt = d.get("model_type")
        if mt != MODEL_TYPE:
            raise ConfigError(f"{source}: model_type is {mt!r}, expected {MODEL_TYPE!r} (a DeepSeek-VL2 checkpoint)")
        for part in ("vision_config", "projector_config", "language_config"):
            if not isinstance(d.get(part), dict):
                raise ConfigError(f"{source}: missing or malformed {part!r}")

        vision = _dataclass_from(VisionConfig, d["vision_config"])
        proj = d["projector_config"]
        if "n_embed" not in proj:
            raise ConfigError(f"{source}: projector_config has no 'n_embed'")
        projector = _dataclass_from(ProjectorConfig, proj)

        lang_in = dict(d["language_config"])
        lang = {k: lang_in.get(k, v) for k, v in OFFICIAL_LANGUAGE_DEFAULTS.items()}
        language = _dataclass_from(LanguageConfig, lang)

        tile_tag = d.get("tile_tag", "2D")
        global_view_pos = d.get("global_view_pos", "head")
        cands = tuple(tuple(int(x) for x in c) for c in d.get("candidate_resolutions", CANDIDATE_RESOLUTIONS))
        cfg = cls(vision, projector, language, tile_tag, global_view_pos, cands, raw=dict(d))
        cfg.check(source)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "VL2Config":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json (is this a DeepSeek-VL2 checkpoint directory?)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, str(path))

    def check(self, source: str = "config.json") -> None:
        """Reject what the reference implementation would silently get wrong."""
        L, V, P = self.language, self.vision, self.projector
        if self.tile_tag != "2D":
            raise ConfigError(f"{source}: tile_tag {self.tile_tag!r} is not supported (released checkpoints use '2D')")
        if self.global_view_pos not in ("head", "tail"):
            raise ConfigError(f"{source}: global_view_pos {self.global_view_pos!r} must be 'head' or 'tail'")
        if P.projector_type != "downsample_mlp_gelu":
            raise ConfigError(f"{source}: projector_type {P.projector_type!r} is not supported")
        if P.n_embed != L.hidden_size:
            raise ConfigError(f"{source}: projector n_embed {P.n_embed} != language hidden_size {L.hidden_size}")
        if P.input_dim != V.width:
            raise ConfigError(f"{source}: projector input_dim {P.input_dim} != vision width {V.width}")
        if V.width % V.heads:
            raise ConfigError(f"{source}: vision width {V.width} is not divisible by heads {V.heads}")
        if L.rope_scaling is not None:
            raise ConfigError(f"{source}: rope_scaling {L.rope_scaling!r} is not supported (no VL2 config sets it)")
        if L.hidden_act != "silu":
            raise ConfigError(f"{source}: hidden_act {L.hidden_act!r} is not supported (expected 'silu')")
        if L.n_routed_experts is not None:
            if L.topk_method not in SUPPORTED_TOPK_METHODS:
                raise ConfigError(
                    f"{source}: language_config.topk_method {L.topk_method!r} is not one of {SUPPORTED_TOPK_METHODS}"
                )
            if L.scoring_func not in SUPPORTED_SCORING:
                raise ConfigError(f"{source}: scoring_func {L.scoring_func!r} is not one of {SUPPORTED_SCORING}")
            if not L.num_experts_per_tok:
                raise ConfigError(f"{source}: MoE config without num_experts_per_tok")
            if L.topk_method != "greedy":
                g, tg = L.n_group or 1, L.topk_group or 1
                if L.n_routed_experts % g or tg > g:
                    raise ConfigError(f"{source}: n_group {g} / topk_group {tg} do not fit {L.n_routed_experts} experts")
        if not L.use_mla and L.hidden_size % L.num_attention_heads:
            raise ConfigError(f"{source}: hidden_size {L.hidden_size} not divisible by heads {L.num_attention_heads}")
        if not L.use_mla and L.num_attention_heads % L.num_key_value_heads:
            raise ConfigError(f"{source}: heads {L.num_attention_heads} not a multiple of kv heads {L.num_key_value_heads}")
        if L.use_mla and (not L.kv_lora_rank or not L.qk_rope_head_dim or L.qk_rope_head_dim % 2):
            raise ConfigError(f"{source}: MLA needs kv_lora_rank > 0 and an even qk_rope_head_dim > 0")


def _dataclass_from(cls, d: dict):
    names = {f.name for f in dataclasses.fields(cls)} - {"raw"}
    kwargs = {k: v for k, v in d.items() if k in names}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None

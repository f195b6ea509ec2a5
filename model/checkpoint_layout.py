"""The tensor inventory of a DeepSeek-VL2 checkpoint: every key and its shape, derived from the config.

Reference §3. This single table is what the synthesizer writes and what the loader checks against, so the two
cannot drift apart. Order follows the module tree (vision, projector, separators, language). No torch.
"""

from __future__ import annotations

from .config import VL2Config


def vision_shapes(cfg: VL2Config) -> dict[str, tuple[int, ...]]:
    v = cfg.vision
    C, M, P = v.width, v.mlp_hidden, v.patch_size
    s: dict[str, tuple[int, ...]] = {
        "vision.patch_embed.proj.weight": (C, 3, P, P),
        "vision.patch_embed.proj.bias": (C,),
        "vision.pos_embed": (1, v.num_patches, C),
    }
    for i in range(v.layers):
        b = f"vision.blocks.{i}."
        s.update({
            b + "norm1.weight": (C,), b + "norm1.bias": (C,),
            b + "attn.qkv.weight": (3 * C, C), b + "attn.qkv.bias": (3 * C,),
            b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,),
            b + "norm2.weight": (C,), b + "norm2.bias": (C,),
            b + "mlp.fc1.weight": (M, C), b + "mlp.fc1.bias": (M,),
            b + "mlp.fc2.weight": (C, M), b + "mlp.fc2.bias": (C,),
        })
    s.update({"vision.norm.weight": (C,), "vision.norm.bias": (C,)})
    # The attention-pool head ("map") is built, so its weights are stored; the model never runs it.
    a = "vision.attn_pool."
    s.update({
        a + "latent": (1, 1, C),
        a + "q.weight": (C, C), a + "q.bias": (C,),
        a + "kv.weight": (2 * C, C), a + "kv.bias": (2 * C,),
        a + "proj.weight": (C, C), a + "proj.bias": (C,),
        a + "norm.weight": (C,), a + "norm.bias": (C,),
        a + "mlp.fc1.weight": (M, C), a + "mlp.fc1.bias": (M,),
        a + "mlp.fc2.weight": (C, M), a + "mlp.fc2.bias": (C,),
    })
    return s


def projector_shapes(cfg: VL2Config) -> dict[str, tuple[int, ...]]:
    p = cfg.projector
    D, r = p.n_embed, p.downsample_ratio
    return {
        "projector.layers.0.weight": (D, p.input_dim * r * r),
        "projector.layers.0.bias": (D,),
        "projector.layers.2.weight": (D, D),  # index 1 is the GELU
        "projector.layers.2.bias": (D,),
        "image_newline": (D,),
        "view_seperator": (D,),  # sic: the checkpoint key is misspelled
    }


def attention_shapes(cfg: VL2Config, prefix: str) -> dict[str, tuple[int, ...]]:
    L = cfg.language
    H, D = L.hidden_size, L.num_attention_heads
    if not L.use_mla:
        hd, kv = L.head_dim, L.num_key_value_heads
        return {prefix + "q_proj.weight": (D * hd, H), prefix + "k_proj.weight": (kv * hd, H),
                prefix + "v_proj.weight": (kv * hd, H), prefix + "o_proj.weight": (H, D * hd)}
    s: dict[str, tuple[int, ...]] = {}
    if L.q_lora_rank is None:
        s[prefix + "q_proj.weight"] = (D * L.q_head_dim, H)
    else:
        s[prefix + "q_a_proj.weight"] = (L.q_lora_rank, H)
        s[prefix + "q_a_layernorm.weight"] = (L.q_lora_rank,)
        s[prefix + "q_b_proj.weight"] = (D * L.q_head_dim, L.q_lora_rank)
    s[prefix + "kv_a_proj_with_mqa.weight"] = (L.kv_lora_rank + L.qk_rope_head_dim, H)
    s[prefix + "kv_a_layernorm.weight"] = (L.kv_lora_rank,)
    s[prefix + "kv_b_proj.weight"] = (D * (L.qk_nope_head_dim + L.v_head_dim), L.kv_lora_rank)
    s[prefix + "o_proj.weight"] = (H, D * L.v_head_dim)
    return s


def _mlp_shapes(prefix: str, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "gate_proj.weight": (inter, hidden), prefix + "up_proj.weight": (inter, hidden),
            prefix + "down_proj.weight": (hidden, inter)}


def layer_shapes(cfg: VL2Config, i: int) -> dict[str, tuple[int, ...]]:
    L = cfg.language
    H = L.hidden_size
    b = f"language.model.layers.{i}."
    s = {b + "input_layernorm.weight": (H,)}
    s.update(attention_shapes(cfg, b + "self_attn."))
    s[b + "post_attention_layernorm.weight"] = (H,)
    if not L.is_moe_layer(i):
        s.update(_mlp_shapes(b + "mlp.", H, L.intermediate_size))
        return s
    s[b + "mlp.gate.weight"] = (L.n_routed_experts, H)
    if L.topk_method == "noaux_tc":
        s[b + "mlp.gate.e_score_correction_bias"] = (L.n_routed_experts,)
    for e in range(L.n_routed_experts):
        s.update(_mlp_shapes(b + f"mlp.experts.{e}.", H, L.moe_intermediate_size))
    if L.n_shared_experts:
        s.update(_mlp_shapes(b + "mlp.shared_experts.", H, L.shared_intermediate_size))
    return s


def language_shapes(cfg: VL2Config) -> dict[str, tuple[int, ...]]:
    L = cfg.language
    s = {"language.model.embed_tokens.weight": (L.vocab_size, L.hidden_size)}
    for i in range(L.num_hidden_layers):
        s.update(layer_shapes(cfg, i))
    s["language.model.norm.weight"] = (L.hidden_size,)
    s["language.lm_head.weight"] = (L.vocab_size, L.hidden_size)
    return s


def checkpoint_shapes(cfg: VL2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, in module order."""
    return {**vision_shapes(cfg), **projector_shapes(cfg), **language_shapes(cfg)}


def parameter_count(cfg: VL2Config) -> int:
    total = 0
    for shape in checkpoint_shapes(cfg).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total

"""The reference model against independent implementations in transformers, with the same weights.

- Vision tower vs transformers' SigLIP vision model (SiglipVisionModel; its attention-pool head loads the
  checkpoint's `vision.attn_pool.*` tensors with strict=True, which checks their layout too). timm's
  VisionTransformer would be the other choice, but timm imports torchvision at import time and torchvision has no
  CPU build on this machine (its PyPI wheel's ops need libtorch_cuda).
- Small-like MLA language model (test-small) vs transformers' DeepseekV2ForCausalLM: softmax greedy routing
  without renormalization is the one routing that library reproduces; it expands K/V per head and uses
  complex-number RoPE on interleaved pairs, so absorption and our de-interleave are checked independently.
- Tiny's MHA: one layer vs transformers' LlamaAttention (eager), and the whole test-tiny language model vs
  transformers' DeepseekOcr2TextModel, whose text stack is Llama MHA + DeepseekV2 MoE (same shape as Tiny's LM).
Tolerances are fp32: ~1e-5 relative, far below what a wrong layout, order or scale produces.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vl2edge.model.vl2 import DeepseekVL2  # noqa: E402

RTOL = 2e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def models(test_checkpoints):
    return {p: DeepseekVL2.from_checkpoint(d) for p, d in test_checkpoints.items()}


# --- vision ---------------------------------------------------------------------------------------------------------
def siglip_state(model: DeepseekVL2, sd_ckpt: dict) -> dict:
    v = model.cfg.vision
    s = {
        "embeddings.patch_embedding.weight": sd_ckpt["vision.patch_embed.proj.weight"],
        "embeddings.patch_embedding.bias": sd_ckpt["vision.patch_embed.proj.bias"],
        "embeddings.position_embedding.weight": sd_ckpt["vision.pos_embed"][0],
        "post_layernorm.weight": sd_ckpt["vision.norm.weight"],
        "post_layernorm.bias": sd_ckpt["vision.norm.bias"],
    }
    for i in range(v.layers):
        src, dst = f"vision.blocks.{i}.", f"encoder.layers.{i}."
        q, k, vv = sd_ckpt[src + "attn.qkv.weight"].chunk(3)
        qb, kb, vb = sd_ckpt[src + "attn.qkv.bias"].chunk(3)
        s.update({
            dst + "layer_norm1.weight": sd_ckpt[src + "norm1.weight"], dst + "layer_norm1.bias": sd_ckpt[src + "norm1.bias"],
            dst + "layer_norm2.weight": sd_ckpt[src + "norm2.weight"], dst + "layer_norm2.bias": sd_ckpt[src + "norm2.bias"],
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.q_proj.bias": qb,
            dst + "self_attn.k_proj.weight": k, dst + "self_attn.k_proj.bias": kb,
            dst + "self_attn.v_proj.weight": vv, dst + "self_attn.v_proj.bias": vb,
            dst + "self_attn.out_proj.weight": sd_ckpt[src + "attn.proj.weight"],
            dst + "self_attn.out_proj.bias": sd_ckpt[src + "attn.proj.bias"],
            dst + "mlp.fc1.weight": sd_ckpt[src + "mlp.fc1.weight"], dst + "mlp.fc1.bias": sd_ckpt[src + "mlp.fc1.bias"],
            dst + "mlp.fc2.weight": sd_ckpt[src + "mlp.fc2.weight"], dst + "mlp.fc2.bias": sd_ckpt[src + "mlp.fc2.bias"],
        })
    a, h = "vision.attn_pool.", "head."
    s.update({
        h + "probe": sd_ckpt[a + "latent"],
        h + "attention.in_proj_weight": torch.cat([sd_ckpt[a + "q.weight"], sd_ckpt[a + "kv.weight"]]),
        h + "attention.in_proj_bias": torch.cat([sd_ckpt[a + "q.bias"], sd_ckpt[a + "kv.bias"]]),
        h + "attention.out_proj.weight": sd_ckpt[a + "proj.weight"], h + "attention.out_proj.bias": sd_ckpt[a + "proj.bias"],
        h + "layernorm.weight": sd_ckpt[a + "norm.weight"], h + "layernorm.bias": sd_ckpt[a + "norm.bias"],
        h + "mlp.fc1.weight": sd_ckpt[a + "mlp.fc1.weight"], h + "mlp.fc1.bias": sd_ckpt[a + "mlp.fc1.bias"],
        h + "mlp.fc2.weight": sd_ckpt[a + "mlp.fc2.weight"], h + "mlp.fc2.bias": sd_ckpt[a + "mlp.fc2.bias"],
    })
    return s


def test_vision_tower_matches_transformers_siglip(test_checkpoints, models):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from vl2edge.model.checkpoint import Checkpoint

    ckpt = Checkpoint.open(test_checkpoints["test-tiny"])
    sd = {k: ckpt.tensor(k, torch.float32) for k in ckpt.weight_map if k.startswith("vision.")}
    model = models["test-tiny"]
    v = model.cfg.vision
    hf = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=v.width, intermediate_size=v.mlp_hidden, num_hidden_layers=v.layers,
        num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True, attn_implementation="eager",
    )).eval()
    hf.load_state_dict(siglip_state(model, sd), strict=True)  # every checkpoint vision tensor has a home

    pixels = torch.rand(3, 3, 384, 384, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        ours = model.vision(pixels)
        theirs = hf(pixel_values=pixels).last_hidden_state
    assert ours.shape == (3, 729, v.width)
    assert rel_err(ours, theirs) < RTOL


# --- language: MLA (Small-like) -------------------------------------------------------------------------------------
def hf_lm_state(model: DeepseekVL2) -> dict:
    """Our `language.*` parameters under transformers' names, experts fused into 3-D tensors."""
    cfg = model.cfg.language
    src = {k[len("language."):]: v for k, v in model.state_dict().items() if k.startswith("language.")}
    out = {}
    for k, v in src.items():
        if ".mlp.experts." not in k:
            out[k] = v
    for i in range(cfg.num_hidden_layers):
        if not cfg.is_moe_layer(i):
            continue
        p = f"model.layers.{i}.mlp.experts."
        E = cfg.n_routed_experts
        out[p + "gate_up_proj"] = torch.stack(
            [torch.cat([src[p + f"{e}.gate_proj.weight"], src[p + f"{e}.up_proj.weight"]]) for e in range(E)])
        out[p + "down_proj"] = torch.stack([src[p + f"{e}.down_proj.weight"] for e in range(E)])
    return out


def test_mla_language_model_matches_transformers_deepseek_v2(models):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    model = models["test-small"]
    L = model.cfg.language
    assert L.use_mla and L.topk_method == "greedy" and not L.norm_topk_prob
    hf = DeepseekV2ForCausalLM(DeepseekV2Config(
        vocab_size=L.vocab_size, hidden_size=L.hidden_size, intermediate_size=L.intermediate_size,
        moe_intermediate_size=L.moe_intermediate_size, num_hidden_layers=L.num_hidden_layers,
        num_attention_heads=L.num_attention_heads, num_key_value_heads=L.num_key_value_heads,
        n_shared_experts=L.n_shared_experts, n_routed_experts=L.n_routed_experts,
        routed_scaling_factor=L.routed_scaling_factor, kv_lora_rank=L.kv_lora_rank, q_lora_rank=None,
        qk_rope_head_dim=L.qk_rope_head_dim, v_head_dim=L.v_head_dim, qk_nope_head_dim=L.qk_nope_head_dim,
        n_group=1, topk_group=1, topk_method="greedy", num_experts_per_tok=L.num_experts_per_tok,
        first_k_dense_replace=L.first_k_dense_replace, norm_topk_prob=False, rms_norm_eps=L.rms_norm_eps,
        max_position_embeddings=L.max_position_embeddings, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": L.rope_theta}, attn_implementation="eager",
    )).eval()
    hf.load_state_dict(hf_lm_state(model), strict=True)

    ids = torch.randint(0, L.vocab_size, (1, 57), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        theirs = hf(input_ids=ids).logits
        ours = model.language(model.language.model.embed_tokens(ids), model.new_cache(57), all_logits=True)
        # the same through the latent cache: a prefill chunk then token-by-token decode
        cache = model.new_cache(57)
        steps = [model.language(model.language.model.embed_tokens(ids[:, :40]), cache, all_logits=True)]
        steps += [model.language(model.language.model.embed_tokens(ids[:, t:t + 1]), cache) for t in range(40, 57)]
    assert rel_err(ours, theirs) < RTOL
    assert rel_err(torch.cat(steps, dim=1), theirs) < RTOL


# --- language: Tiny's MHA -------------------------------------------------------------------------------------------
def test_mha_layer_matches_transformers_llama_attention(models):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    model = models["test-tiny"]
    L = model.cfg.language
    ours = model.language.model.layers[1].self_attn
    lcfg = LlamaConfig(hidden_size=L.hidden_size, num_attention_heads=L.num_attention_heads,
                       num_key_value_heads=L.num_key_value_heads, head_dim=L.head_dim, attention_bias=False,
                       rope_parameters={"rope_type": "default", "rope_theta": L.rope_theta},
                       max_position_embeddings=L.max_position_embeddings, attn_implementation="eager")
    hf = LlamaAttention(lcfg, layer_idx=0).eval()
    hf.load_state_dict({k: v for k, v in ours.state_dict().items()}, strict=True)

    t = 23
    x = torch.randn(1, t, L.hidden_size, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(t)[None]
    cos, sin = LlamaRotaryEmbedding(lcfg)(x, pos)
    causal = torch.full((t, t), float("-inf")).triu(1)[None, None]
    with torch.inference_mode():
        theirs, _ = hf(x, position_embeddings=(cos, sin), attention_mask=causal)
        cache = model.new_cache(t)
        mine = ours(x, torch.arange(t), torch.ones(t, t, dtype=torch.bool).tril(), cache)
    assert rel_err(mine, theirs) < RTOL


def test_tiny_language_model_matches_transformers_deepseek_ocr2_text(models):
    from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2TextConfig
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2TextModel

    model = models["test-tiny"]
    L = model.cfg.language
    assert not L.use_mla
    hf = DeepseekOcr2TextModel(DeepseekOcr2TextConfig(
        vocab_size=L.vocab_size, hidden_size=L.hidden_size, intermediate_size=L.intermediate_size,
        moe_intermediate_size=L.moe_intermediate_size, num_hidden_layers=L.num_hidden_layers,
        num_attention_heads=L.num_attention_heads, num_key_value_heads=L.num_key_value_heads,
        n_shared_experts=L.n_shared_experts, n_routed_experts=L.n_routed_experts, num_experts_per_tok=L.num_experts_per_tok,
        routed_scaling_factor=L.routed_scaling_factor, topk_method="greedy", n_group=1, topk_group=1,
        mlp_layer_types=["sparse" if L.is_moe_layer(i) else "dense" for i in range(L.num_hidden_layers)],
        rms_norm_eps=L.rms_norm_eps, max_position_embeddings=L.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": L.rope_theta}, attn_implementation="eager",
    )).eval()
    state = {k[len("model."):]: v for k, v in hf_lm_state(model).items() if k.startswith("model.")}
    hf.load_state_dict(state, strict=True)

    ids = torch.randint(0, L.vocab_size, (1, 41), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        hidden = hf(input_ids=ids).last_hidden_state
        theirs = model.language.lm_head(hidden)  # the text model ends at the final norm
        ours = model.language(model.language.model.embed_tokens(ids), model.new_cache(41), all_logits=True)
    assert rel_err(ours, theirs) < RTOL

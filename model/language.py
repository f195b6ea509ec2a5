"""DeepSeekMoE language model of DeepSeek-VL2 (reference §6, §7): MHA (Tiny) or MLA (Small, VL2), dense layer 0,
routed + shared experts, RMSNorm in fp32, lm_head. Module names mirror the checkpoint keys (`language.model.*`,
`language.lm_head.*`) so the state dict loads by name.

The KV cache is preallocated to the context it will need and written in place: per layer K and V
[b, kv_heads, T, head_dim] for MHA; for MLA only what the official eager path caches, the normed latent c_kv (512)
and the rotated shared key k_pe (64), stored side by side as one [b, T, 576] tensor. MLA attention runs in the
absorbed form: W_UK folded into the query, W_UV applied to the attention-weighted latents — algebraically the same
as expanding K/V per head, and what lets the cache stay latent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LanguageConfig
from .routing import route


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)  # normalize in fp32, cast back, then scale (official order)


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    """cos/sin [T, dim] for rotate-half RoPE, built in fp32 and cast to the activation dtype (as the official)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """MLA's rope dims (x0, x1, x2, ...) -> (x0, x2, ..., x1, x3, ...): rotate-half on the result rotates the
    interleaved pairs (x_2i, x_2i+1). The official code caches k_pe in this permuted order; so do we."""
    *lead, d = x.shape
    return x.view(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)


class KVCache:
    """Preallocated per-layer cache; `length` tokens are valid."""

    def __init__(self, cfg: LanguageConfig, batch: int, max_len: int, dtype: torch.dtype, device=None):
        self.max_len, self.length = max_len, 0
        if cfg.use_mla:
            width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
            self.latent = [torch.zeros(batch, max_len, width, dtype=dtype, device=device)
                           for _ in range(cfg.num_hidden_layers)]
        else:
            shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]

    def nbytes(self) -> int:
        ts = getattr(self, "latent", None) or (self.k + self.v)
        return sum(t.numel() * t.element_size() for t in ts)


class Attention(nn.Module):
    """Tiny: Llama multi-head attention, rotate-half RoPE over the whole head."""

    def __init__(self, cfg: LanguageConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        H, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(H, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(H, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(H, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, H, bias=False)

    def forward(self, x, positions, mask, cache: KVCache):
        cfg = self.cfg
        b, t, _ = x.shape
        hd, end = cfg.head_dim, cache.length + t
        q = self.q_proj(x).view(b, t, cfg.num_attention_heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, cfg.num_key_value_heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, cfg.num_key_value_heads, hd).transpose(1, 2)
        cos, sin = rope_cos_sin(positions, hd, cfg.rope_theta, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.k[self.layer][:, :, cache.length:end] = k
        cache.v[self.layer][:, :, cache.length:end] = v
        keys, values = cache.k[self.layer][:, :, :end], cache.v[self.layer][:, :, :end]
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=cfg.softmax_scale,
                                           enable_gqa=cfg.num_key_value_heads != cfg.num_attention_heads)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class MLAttention(nn.Module):
    """Small / VL2: multi-head latent attention, absorbed form over the latent cache."""

    def __init__(self, cfg: LanguageConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        H, nh = cfg.hidden_size, cfg.num_attention_heads
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(H, nh * cfg.q_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, nh * cfg.q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)  # class-default eps 1e-6, not rms_norm_eps (same value)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(nh * cfg.v_head_dim, H, bias=False)

    def forward(self, x, positions, mask, cache: KVCache):
        cfg = self.cfg
        b, t, _ = x.shape
        nh, nope, rope, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        end = cache.length + t
        q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, nh, nope + rope).transpose(1, 2)
        q_nope, q_pe = q.split([nope, rope], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([r, rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        cos, sin = rope_cos_sin(positions, rope, cfg.rope_theta, x.dtype)
        q_pe = apply_rope(deinterleave(q_pe), cos, sin)
        k_pe = apply_rope(deinterleave(k_pe), cos, sin)

        latent = cache.latent[self.layer]
        latent[:, cache.length:end, :r] = c_kv
        latent[:, cache.length:end, r:] = k_pe
        kv = latent[:, :end].unsqueeze(1)  # [b, 1, S, r + rope], shared by all heads

        w = self.kv_b_proj.weight.view(nh, nope + cfg.v_head_dim, r)
        w_uk, w_uv = w[:, :nope], w[:, nope:]
        q_lat = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)  # W_UK folded into the query
        ctx = F.scaled_dot_product_attention(torch.cat([q_lat, q_pe], dim=-1), kv, kv[..., :r], attn_mask=mask,
                                             scale=cfg.softmax_scale, enable_gqa=True)
        o = torch.einsum("bhtc,hdc->bhtd", ctx, w_uv)  # W_UV applied to the attended latents
        return self.o_proj(o.transpose(1, 2).reshape(b, t, nh * cfg.v_head_dim))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.empty(cfg.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor):
        logits = F.linear(x.float(), self.weight.float())  # router in fp32
        return route(logits, self.cfg, self.e_score_correction_bias)


class MoE(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = MLP(cfg.hidden_size, cfg.shared_intermediate_size) if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, weights = self.gate(flat)
        # Gather the tokens of each chosen expert and run it once on all of them (the official moe_infer);
        # outputs are weighted and summed in fp32, then cast back.
        out = torch.zeros(flat.shape, dtype=torch.float32, device=x.device)
        for e in torch.unique(idx).tolist():
            tok, slot = (idx == e).nonzero(as_tuple=True)
            y = self.experts[e](flat[tok]).float() * weights[tok, slot, None]
            out.index_add_(0, tok, y)
        out = out.to(x.dtype).view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LanguageConfig, i: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, i) if cfg.use_mla else Attention(cfg, i)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(i) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, positions, mask, cache):
        h = x + self.self_attn(self.input_layernorm(x), positions, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderStack(nn.Module):
    """`language.model.*`: embeddings, layers, final norm."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LanguageModel(nn.Module):
    """`language.*`: the decoder stack and lm_head."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DecoderStack(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.cfg, batch, max_len, p.dtype, p.device)

    def forward(self, embeds: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """embeds [b, t, H] at positions cache.length.. -> fp32 logits [b, t or 1, V]; advances the cache."""
        b, t, _ = embeds.shape
        start, end = cache.length, cache.length + t
        if end > cache.max_len:
            raise ValueError(f"{end} tokens exceed the cache of {cache.max_len}")
        positions = torch.arange(start, end, device=embeds.device)
        # bool mask [t, end]: query i sees keys 0 .. start + i
        mask = torch.arange(end, device=embeds.device)[None, :] <= positions[:, None]
        x = embeds
        for layer in self.model.layers:
            x = layer(x, positions, mask, cache)
        cache.length = end
        if not all_logits:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x)).float()

"""SigLIP-so400m vision tower as DeepSeek-VL2 uses it (reference §1a).

A timm-style ViT without class token: patch conv (kernel = stride = 14, so 384 px gives a 27x27 grid and the last
6 px are never seen) + learned absolute positions, pre-norm blocks with qkv bias, tanh-approximated GELU, and the
final LayerNorm. The attention-pool head is in the checkpoint but the model never runs it (`ignore_head`), so it is
not built here; the loader skips its keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig


class VisionAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)  # rows: q, then k, then v; each heads x head_dim
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        # The official code calls xformers' memory-efficient attention: plain softmax attention, scale d^-0.5.
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class VisionMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = VisionAttention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = VisionMlp(cfg.width, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [n, 729, C], row-major over the patch grid


class VisionTower(nn.Module):
    """pixel tiles [n, 3, 384, 384] -> final-LayerNorm'd token grid [n, 729, C]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.width))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        s = self.cfg.image_size
        if pixels.shape[-3:] != (3, s, s):
            raise ValueError(f"vision tower takes tiles [n, 3, {s}, {s}], got {list(pixels.shape)}")
        x = self.patch_embed(pixels) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

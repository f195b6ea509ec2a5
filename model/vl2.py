"""DeepSeek-VL2: vision tower -> projector -> image layout scattered into the text embeddings -> language model.

Takes the processor's prepared inputs (reference §4): `input_ids` [T], `pixel_values` [tiles, 3, 384, 384] (each
image's global view then its local tiles, images in order), `images_seq_mask` [T] (True on exactly the image slots),
`images_spatial_crop` [images, 2] (width tiles, height tiles). numpy arrays or tensors.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from .checkpoint import Checkpoint, CheckpointError
from .config import VL2Config
from .language import KVCache, LanguageModel
from .projector import Projector, layout_image
from .vision import VisionTower


class DeepseekVL2(nn.Module):
    def __init__(self, cfg: VL2Config):
        super().__init__()
        self.cfg = cfg
        D = cfg.projector.n_embed
        self.vision = VisionTower(cfg.vision)
        self.projector = Projector(cfg)
        self.image_newline = nn.Parameter(torch.empty(D))
        self.view_seperator = nn.Parameter(torch.empty(D))
        self.language = LanguageModel(cfg.language)

    @property
    def dtype(self) -> torch.dtype:
        return self.language.lm_head.weight.dtype

    # --- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, ref: str | os.PathLike | Checkpoint, dtype: torch.dtype = torch.float32,
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> "DeepseekVL2":
        """Load from a checkpoint directory or hub repo id; weights cast to `dtype` (fp32 or bf16). The MoE
        correction bias stays fp32: it only enters the fp32 router."""
        ckpt = ref if isinstance(ref, Checkpoint) else Checkpoint.open(ref, revision=revision, cache_dir=cache_dir)
        with torch.device("meta"):
            model = cls(ckpt.config)
        wanted = model.state_dict().keys()
        skipped = set(ckpt.weight_map) - set(wanted)
        not_pool = sorted(k for k in skipped if not k.startswith("vision.attn_pool."))
        if not_pool:  # validate() already checked the inventory; anything else is a model/inventory mismatch
            raise CheckpointError(f"{ckpt.dir}: tensors the model does not use: {not_pool[:3]}")
        state = {}
        for name in wanted:
            keep_fp32 = name.endswith("e_score_correction_bias")
            state[name] = ckpt.tensor(name, torch.float32 if keep_fp32 else dtype)
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    # --- forward ----------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """tiles [n, 3, 384, 384] -> projected tokens [n, 196, D]"""
        return self.projector(self.vision(pixel_values.to(self.dtype)))

    def embed(self, input_ids, pixel_values=None, images_seq_mask=None, images_spatial_crop=None) -> torch.Tensor:
        """Token embeddings with every image's layout scattered into its slots: [1, T, D]."""
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long).reshape(1, -1)
        x = self.language.model.embed_tokens(ids)
        crops = None if images_spatial_crop is None else np.asarray(images_spatial_crop).reshape(-1, 2)
        if crops is None or len(crops) == 0 or pixel_values is None or len(pixel_values) == 0:
            if images_seq_mask is not None and np.asarray(images_seq_mask).any():
                raise ValueError("images_seq_mask marks image slots but no images were given")
            return x
        pixels = torch.as_tensor(np.asarray(pixel_values))
        tokens = self.encode_images(pixels)
        runs, t0 = [], 0
        for tw, th in crops.tolist():
            n = 1 + tw * th
            runs.append(layout_image(tokens[t0:t0 + n], tw, th, self.image_newline, self.view_seperator,
                                     self.cfg.global_view_pos == "head"))
            t0 += n
        if t0 != len(tokens):
            raise ValueError(f"images_spatial_crop accounts for {t0} tiles, pixel_values has {len(tokens)}")
        image_embeds = torch.cat(runs).to(x.dtype)
        mask = torch.as_tensor(np.asarray(images_seq_mask), dtype=torch.bool).reshape(-1)
        if int(mask.sum()) != len(image_embeds):
            raise ValueError(f"images_seq_mask has {int(mask.sum())} image slots, the images fill {len(image_embeds)}")
        x = x.clone()
        x[0, mask] = image_embeds
        return x

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        return self.language.new_cache(batch, max_len)

    @torch.inference_mode()
    def forward(self, input_ids, pixel_values=None, images_seq_mask=None, images_spatial_crop=None,
                cache: KVCache | None = None, all_logits: bool = True) -> torch.Tensor:
        """Whole-prompt logits [1, T, V] (fp32); for generation see generate.py."""
        x = self.embed(input_ids, pixel_values, images_seq_mask, images_spatial_crop)
        cache = cache or self.new_cache(x.shape[1])
        return self.language(x, cache, all_logits=all_logits)

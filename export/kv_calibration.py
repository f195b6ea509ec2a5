"""Static per-channel scales for an int8 KV cache, measured on the checkpoint's own keys and values.

Why int8, why static: a decode step's attention reads the whole cache, and at 4k context Tiny's fp32 cache is 42 MB
per layer, which is what makes a step grow with context. ONNX Runtime's CPU GroupQueryAttention reads an int8
cache (k_quant_type / v_quant_type PER_CHANNEL, kv_cache_bit_width 8): one fp32 scale per (kv head, channel),
fixed in the graph, with which it also quantizes every new token (round, clamp). Measured in isolation on Tiny's
shape (10 heads x 128, 2 threads, buffer 4096): 1.59 ms fp32 vs 0.47 ms int8 per layer at 4000 past tokens. It has
no per-token (dynamic) scales, so the scales must be known at export time: they are measured here.

The MLA latent cache (Small, VL2) is quantized the same way, one static scale per latent channel, but read by our
own decode products (export/latent_cache.py), not by GroupQueryAttention: c_kv channels get max |c_kv|, the rotated
k_pe part the max norm of its rotate-half pair (the reference caches k_pe de-interleaved, pairs (d, d + rope/2)).

How:
  1. a calibration sequence of real-looking inputs: the BOS token, one calibration tile through the reference
     vision tower and projector (image tokens dominate long VL2 contexts, and their activations need not look like
     text's), the image newline / view separator, then a chat-formatted text of prose, numbers, code and grounding;
  2. the reference decoder layers (model/language.py) run ONE AT A TIME, each with only its own weights loaded, the
     hidden states of the whole sequence carried from one to the next; the post-RoPE keys and the values are read
     from the reference's KVCache (MLA: the latent rows [c_kv | k_pe]);
  3. per (kv head, channel): V scale = max |v|; K scale = the max over tokens of the NORM of its rotation pair
     (d, d + head_dim/2): RoPE turns that pair by a position-dependent angle, so at another position the channel
     can carry the pair's whole norm. Times MHA_HEADROOM (new inputs beyond it are clamped), / 127; the latent
     cache's channel equalizer times HEADROOM (its token scales never clamp).

The exporter calls `layer_scales(i)` for i = 0, 1, ... in order, as it builds layer i's attention graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..model.config import VL2Config
from .vision_calibration import calibration_tiles

HEADROOM = 1.25  # scale = HEADROOM * calibration max / 127; see the module docstring
# The MHA cache's (Tiny's): its static scales are all there is, so inputs beyond them clamp. On the sharp-attention
# family (model/synth.py init="sharp") the held-out conversations drove keys and values up to 1.3x past 1.25x the
# calibration's range, and the clamped rows cost up to 0.0096 of worst cosine (docs/precision.md); 2.0 met the
# bound on every held-out MHA checkpoint, sharp, heavy and default, where 1.25 missed on two sharp ones. The MLA
# latent cache keeps HEADROOM: its token scales cover each row, the channel scales only even the channels out.
MHA_HEADROOM = 2.0
QMAX = 127

CALIBRATION_TEXT = (
    "<|User|>: Read the receipt and list every item with its price. Then find the red mug on the shelf.\n\n"
    "<|Assistant|>: The receipt from the corner store, dated 2024-03-17 at 14:52, lists: bread 2.49, milk (1 L) "
    "1.19, coffee beans 450 g 8.75, and a 12% discount on fruit, total $11.87 paid by card ending 4021. "
    "<|ref|>the red mug<|/ref|><|det|>[[412, 233, 587, 498]]<|/det|> It stands left of the green kettle.\n"
    "def parse(line: str) -> dict:\n    key, _, value = line.partition('=')\n    return {key.strip(): value}\n"
    "Quarterly revenue rose from 3.2M to 4.05M (+26.6%), while costs fell; the chart's y-axis is in millions. "
    "Das Fahrzeug biegt links ab. 信号灯是红色的。 Stop at the crosswalk and wait for pedestrians."
)


def _load(module, prefix: str, get: Callable[[str], np.ndarray]):
    import torch
    state = {k: torch.from_numpy(np.ascontiguousarray(get(prefix + k), dtype=np.float32))
             for k in module.state_dict()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def _text_ids(cfg: VL2Config, tokenizer_dir: Path | None) -> list[int]:
    """The calibration text's token ids through the checkpoint's own tokenizer (a fixed pseudo-random id sequence
    when the checkpoint has none)."""
    file = tokenizer_dir / "tokenizer.json" if tokenizer_dir else None
    if file is not None and file.is_file():
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(file)).encode(CALIBRATION_TEXT, add_special_tokens=False).ids
    return np.random.default_rng(0).integers(0, cfg.language.vocab_size, 256).tolist()


def calibration_embeddings(cfg: VL2Config, get: Callable[[str], np.ndarray],
                           tokenizer_dir: Path | None = None) -> tuple[np.ndarray, dict]:
    """The calibration sequence's input embeddings [N, H] (fp32) and what it is made of."""
    import torch
    from ..model.projector import Projector
    from ..model.vision import VisionTower

    embed = get("language.model.embed_tokens.weight")
    bos = cfg.language.bos_token_id if cfg.language.bos_token_id is not None else 0
    text = _text_ids(cfg, tokenizer_dir)
    with torch.device("meta"):
        vision, projector = VisionTower(cfg.vision), Projector(cfg)
    _load(vision, "vision.", get)
    _load(projector, "projector.", get)
    with torch.inference_mode():
        image = projector(vision(torch.from_numpy(calibration_tiles(cfg, n=1)))).reshape(-1, embed.shape[1])
    del vision, projector
    parts = [embed[[bos]], image.numpy(), get("image_newline")[None], get("view_seperator")[None], embed[text]]
    x = np.concatenate(parts).astype(np.float32)
    return x, {"tokens": len(x), "image_tokens": int(len(image)), "text_tokens": len(text)}


class KVCalibration:
    """Runs the reference decoder layer by layer over the calibration sequence; `layer_scales(i)` -> layer i's
    scales (call in order 0, 1, ...): MHA (k_scale, v_scale), each [kv_heads, head_dim] fp32; MLA the latent's
    [kv_lora_rank + qk_rope_head_dim] fp32."""

    def __init__(self, cfg: VL2Config, get: Callable[[str], np.ndarray], tokenizer_dir: Path | None = None,
                 headroom: float | None = None):
        """headroom: None = MHA_HEADROOM for an MHA cache, HEADROOM for the MLA latent cache's equalizer."""
        self.cfg, self.get = cfg, get
        self.headroom = headroom if headroom is not None else HEADROOM if cfg.language.use_mla else MHA_HEADROOM
        self.hidden, self.info = calibration_embeddings(cfg, get, tokenizer_dir)
        self.next_layer = 0
        self.saturation: dict[int, float] = {}

    def layer_scales(self, layer: int) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
        import torch
        from ..model.language import DecoderLayer, KVCache

        if layer != self.next_layer:
            raise ValueError(f"layer {layer} asked for, the calibration is at layer {self.next_layer}")
        L = self.cfg.language
        with torch.device("meta"):
            mod = DecoderLayer(L, layer)
        _load(mod, f"language.model.layers.{layer}.", self.get)
        n = len(self.hidden)
        cache = KVCache(L, 1, n, torch.float32)
        positions = torch.arange(n)
        mask = positions[None, :] <= positions[:, None]
        with torch.inference_mode():
            out = mod(torch.from_numpy(self.hidden)[None], positions, mask, cache)
        self.hidden = out[0].numpy()
        self.next_layer += 1
        if L.use_mla:
            return latent_scales(cache.latent[layer][0].numpy(), L.kv_lora_rank, self.headroom)
        k, v = cache.k[layer][0].numpy(), cache.v[layer][0].numpy()  # [kvH, n, hd]
        return key_scales(k, self.headroom), value_scales(v, self.headroom)


def latent_scales(latent: np.ndarray, kv_lora_rank: int, headroom: float = HEADROOM) -> np.ndarray:
    """latent [n, r + rope] (c_kv | rotated k_pe, de-interleaved) -> [r + rope]: c_kv channels from max |c_kv|, the
    k_pe part as keys (each rotate-half pair's max norm)."""
    c_kv, k_pe = latent[:, :kv_lora_rank], latent[:, kv_lora_rank:]
    return np.concatenate([value_scales(c_kv[None], headroom)[0], key_scales(k_pe[None], headroom)[0]])


def key_scales(k: np.ndarray, headroom: float = HEADROOM) -> np.ndarray:
    """k [kvH, n, hd] (rotated keys) -> scales [kvH, hd]: each rotate-half pair (d, d + hd/2) gets its max norm."""
    half = k.shape[-1] // 2
    pair = np.sqrt(k[..., :half].astype(np.float64) ** 2 + k[..., half:].astype(np.float64) ** 2).max(axis=1)
    return _scale(np.concatenate([pair, pair], axis=-1), headroom)


def value_scales(v: np.ndarray, headroom: float = HEADROOM) -> np.ndarray:
    """v [kvH, n, hd] -> scales [kvH, hd] from each channel's max |v|."""
    return _scale(np.abs(v.astype(np.float64)).max(axis=1), headroom)


def _scale(absmax: np.ndarray, headroom: float) -> np.ndarray:
    tiny = np.finfo(np.float32).tiny * QMAX  # an all-zero channel keeps a usable, nonzero scale
    return (np.maximum(absmax * headroom, tiny) / QMAX).astype(np.float32)


def quantize_cache(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The rule the int8 cache is written with: x [kvH, n, hd], scale [kvH, hd] -> int8 round-to-nearest, clamped
    to [-127, 127]. (Used by tests and tools; the graph's GroupQueryAttention does it at run time.)"""
    return np.clip(np.rint(x / scale[:, None, :]), -QMAX, QMAX).astype(np.int8)

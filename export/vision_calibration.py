"""Which vision Linears may run as int8-dynamic (DynamicQuantizeMatMul), decided on the checkpoint's own activations.

Why: on CPU the vision tower is most of the time to first token (3.9 s per tile on 2 cores). MatMulNBits int8 runs
its M = 729 matmuls at fp32 GEMM speed, while DynamicQuantizeMatMul's u8s8 QGEMM (AMX/VNNI) is ~5x faster
(export/linear.py). But it quantizes a whole activation tensor with ONE uint8 scale, and ViT activations can have
outlier channels that crush every other channel's resolution (a 30x channel gave 17-22% matmul error in a scratch
test, against 1.4% for MatMulNBits). Weight values decide that, so it is measured here, per layer, at export time:

  1. calibration tiles: deterministic structured images (gradients, edges, blobs, text-like stripes, noise), already
     normalized like the processor's output ([-1, 1]);
  2. the PyTorch reference blocks (model/vision.py) run one at a time in fp32, weights from the checkpoint (one
     block in memory), with a hook on every Linear capturing its input X;
  3. per Linear: error = ||X_dq @ W_dq^T - X @ W^T|| / ||X @ W^T|| with X_dq the per-tensor uint8 round trip
     (DynamicQuantizeLinear's rule: range includes 0, scale = (max - min) / 255) and W_dq the per-channel int8
     weight;
  4. int8-dynamic where error <= max_error, MatMulNBits int8 elsewhere.

The projector (M = 196 per tile, 2% of the FLOPs) stays MatMulNBits. The errors are written to the quality report.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..model.config import VL2Config
from ..quant.blockwise import dequantize, quantize_blockwise

MAX_ERROR = 0.03  # per-layer relative matmul error allowed; synthesized (outlier-free) layers measure ~1%
LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def calibration_tiles(cfg: VL2Config, n: int = 2, seed: int = 0) -> np.ndarray:
    """n deterministic [3, S, S] tiles in [-1, 1] with the structure real photos and documents have."""
    s = cfg.vision.image_size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    tiles = []
    for i in range(n):
        chans = []
        for c in range(3):
            a, b, f = rng.uniform(-1, 1, 3)
            img = 0.5 * (a * xx + b * yy) + 0.3 * np.sin(2 * np.pi * (3 + 5 * f) * (xx + c * yy))
            img += np.where((xx * 7 + i) % 1 < 0.15, 0.8, 0.0) * (yy > 0.5)  # text-like stripes
            cy, cx = rng.uniform(0.2, 0.8, 2)
            img += np.where((xx - cx) ** 2 + (yy - cy) ** 2 < 0.02, -0.9, 0.0)  # a blob with a hard edge
            img += 0.05 * rng.standard_normal((s, s)).astype(np.float32)
            chans.append(img)
        tiles.append(np.clip(np.stack(chans), -1, 1))
    return np.stack(tiles).astype(np.float32)


def dynamic_quant_error(x: np.ndarray, w: np.ndarray) -> float:
    """Relative error of per-tensor uint8 activations x [..., K] times per-channel int8 weights w [N, K]."""
    x2 = x.reshape(-1, x.shape[-1]).astype(np.float32)
    lo, hi = min(float(x2.min()), 0.0), max(float(x2.max()), 0.0)
    scale = (hi - lo) / 255 or 1.0
    zp = np.round(-lo / scale)
    x_dq = (np.clip(np.round(x2 / scale) + zp, 0, 255) - zp) * scale
    w_dq = dequantize(quantize_blockwise(w, bits=8, block_size=0, symmetric=True))
    ref = x2 @ w.T
    return float(np.linalg.norm(x_dq @ w_dq.T - ref) / max(np.linalg.norm(ref), 1e-30))


def measure(cfg: VL2Config, get: Callable[[str], np.ndarray], tiles: np.ndarray | None = None) -> dict[str, float]:
    """{"vision.blocks.{i}.attn.qkv" ...: dynamic-quantization error} over the calibration tiles."""
    import torch

    from ..model.vision import PatchEmbed, VisionBlock

    tiles = calibration_tiles(cfg) if tiles is None else tiles
    t = lambda name: torch.from_numpy(np.ascontiguousarray(get(name), dtype=np.float32))  # noqa: E731
    errors: dict[str, float] = {}
    with torch.inference_mode():
        patch = PatchEmbed(cfg.vision)
        patch.load_state_dict({k: t(f"vision.patch_embed.{k}") for k in patch.state_dict()})
        x = patch(torch.from_numpy(tiles)) + t("vision.pos_embed")
        for i in range(cfg.vision.layers):
            prefix = f"vision.blocks.{i}."
            block = VisionBlock(cfg.vision)
            block.load_state_dict({k: t(prefix + k) for k in block.state_dict()})
            hooks = []
            for name in LINEARS:
                linear = block.get_submodule(name)

                def capture(mod, args, key=prefix + name):
                    errors[key] = dynamic_quant_error(args[0].numpy(), mod.weight.numpy())

                hooks.append(linear.register_forward_pre_hook(capture))
            x = block(x)
            for h in hooks:
                h.remove()
    return errors


def choose(errors: dict[str, float], max_error: float = MAX_ERROR) -> set[str]:
    """The Linears (hint prefixes, e.g. "vision.blocks.3.attn.qkv") that run as int8-dynamic."""
    return {name for name, err in errors.items() if err <= max_error}

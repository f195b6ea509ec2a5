"""Synthesize a DeepSeek-VL2 checkpoint in the exact Hugging Face layout, with random weights.

No weights can be downloaded here, so tests and benchmarks run on checkpoints written by this module: real key names
and shapes (checkpoint_layout.py), config.json / processor_config.json in the published key style, a tokenizer with
the real special tokens, and safetensors shards with an index, like the published repos.

Weights: every tensor is random (norm weights, biases, image_newline, view_seperator and VL2's
e_score_correction_bias too) so that a mistake in order or layout changes the output. Scales keep activations in a
sane range through all layers: linear weights ~ N(0, 1/fan_in), residual-branch output projections further scaled by
1/sqrt(2 * layers) so the residual stream does not grow with depth, norm weights ~ 1 + N(0, 0.1^2).
Each tensor is drawn from its own generator seeded by (seed, key), so `--layers N` keeps the first N layers
identical to the full model's.
`init="heavy"` (`--init heavy`): the statistics trained models have and this init does not, for checkpoints that
nothing was tuned on (bench/heldout.py): weights drawn from a Student t (3 degrees of freedom, same variance), a
few outlier channels in every norm weight (1 in 32 scaled x6) and a few token embeddings with large norms (1 in 20
rows x4): inputs that touch them drive activations far beyond what a calibration text sees.
`init="sharp"` (`--init sharp`): sharp attention, as many heads of trained models have (attention sinks, local and
copy heads): the language model's queries at std 3/sqrt(fan_in), so that pre-softmax scores have a standard
deviation near 3 instead of 1; its RMSNorm gains uniform over 0.6-1.4 instead of 1 + N(0, 0.1^2); router weights at
1.5/sqrt(fan_in) and lm_head at 2/sqrt(fan_in). Biases N(0, 0.1^2) and unit-scale embeddings as by default. With flat
attention small probabilities and small score errors hardly matter; with sharp attention a long tail of small
probabilities carries real mass.

Streaming: tensors are generated and written one at a time, so the peak memory is one tensor (the 129280 x 2560
embedding: ~1.3 GB in fp32) whatever the model size. The safetensors library has no streaming writer (save_file
needs the whole shard in memory, plus a bytes copy of it), so `_ShardWriter` writes the documented format itself —
8-byte little-endian header length, JSON header, raw little-endian data — and the tests read every file back with
the safetensors library.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import INDEX_FILE, SINGLE_FILE
from .checkpoint_layout import checkpoint_shapes
from .config import VL2Config
from .presets import REAL_PRESETS, preset_config, processor_config
from .synth_tokenizer import write_tokenizer

# Published shard counts (reference §0): Tiny 1 shard (with an index), Small 4, VL2 8.
REAL_SHARDS = {"tiny": 1, "small": 4, "vl2": 8}
_DTYPE_NAME = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _is_residual_output(name: str) -> bool:
    return name.endswith(("o_proj.weight", "down_proj.weight", "attn.proj.weight", "mlp.fc2.weight"))


INITS = ("default", "heavy", "sharp")
# init="sharp": the language model's weights scaled as trained models' often are (see the module docstring)
_SHARP_SCALE = (("self_attn.q_proj.weight", 3.0), ("self_attn.q_b_proj.weight", 3.0), ("mlp.gate.weight", 1.5),
                ("lm_head.weight", 2.0))


def _heavy_tailed(shape, g) -> torch.Tensor:
    """Student t with 3 degrees of freedom, scaled to unit variance (t3's is 3)."""
    z = torch.randn(shape, generator=g, dtype=torch.float32)
    chi2 = sum(torch.randn(shape, generator=g, dtype=torch.float32) ** 2 for _ in range(3))
    return z / torch.sqrt(chi2 / 3) / math.sqrt(3)


def init_tensor(name: str, shape: tuple[int, ...], cfg: VL2Config, seed: int, init: str = "default") -> torch.Tensor:
    """The fp32 random value of one checkpoint tensor (deterministic in seed, name and init)."""
    g = torch.Generator().manual_seed(_tensor_seed(seed, name))
    x = torch.randn(shape, generator=g, dtype=torch.float32) if init == "default" else _heavy_tailed(shape, g)
    if init == "heavy" and len(shape) >= 1:
        rows = torch.rand(shape[0], generator=g) < (1 / 20 if name.endswith("embed_tokens.weight") else 0)
        x[rows] *= 4  # token embeddings with large norms
        if "norm" in (name.split(".")[-2] if "." in name else "") and name.endswith("weight"):
            x = x.clone()
            outliers = torch.rand(shape, generator=g) < 1 / 32
            return torch.where(outliers, 6.0 * (1.0 + 0.1 * x), 1.0 + 0.1 * x)
    parts = name.split(".")
    leaf, module = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if init == "sharp":
        if name.startswith("language.") and "norm" in module and leaf == "weight":
            return 0.6 + 0.8 * torch.rand(shape, generator=g)  # RMSNorm gains spread over 0.6-1.4
        scale = next((f for suffix, f in _SHARP_SCALE if name.endswith(suffix)), 1.0)
        return init_tensor(name, shape, cfg, seed, "default") * scale
    if name in ("image_newline", "view_seperator", "language.model.embed_tokens.weight"):
        return x  # unit scale, like the token embeddings they sit among
    if name.endswith("e_score_correction_bias"):
        return x * 0.1  # shifts selection among sigmoid scores in (0, 1)
    if "norm" in module:  # LayerNorm / RMSNorm
        return 1.0 + 0.1 * x if leaf == "weight" else 0.05 * x
    if leaf == "bias":
        return 0.1 * x
    if name == "vision.pos_embed":
        return 0.5 * x
    if name.startswith("vision.attn_pool.") and leaf == "latent":
        return 0.02 * x
    fan_in = math.prod(shape[1:])
    x = x / math.sqrt(fan_in)
    if _is_residual_output(name):
        layers = cfg.vision.layers if name.startswith("vision.") else cfg.language.num_hidden_layers
        x = x / math.sqrt(2 * layers)
    return x


def storage_dtype(name: str) -> torch.dtype:
    # DeepSeek-V3 keeps its correction bias in fp32; VL2's is UNVERIFIED (reference §3), so we store it as fp32,
    # which also makes every reader handle a mixed-dtype checkpoint.
    return torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16


class _ShardWriter:
    """Writes one safetensors file whose header is known in advance, tensor by tensor."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in entries:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPE_NAME[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)))
        self.f.write(raw)
        self.order = [e[0] for e in entries]
        self.written = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        assert name == self.order[self.written], f"out of order: {name} != {self.order[self.written]}"
        self.f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
        self.written += 1

    def close(self) -> None:
        assert self.written == len(self.order)
        self.f.close()


def _split_shards(entries, n_shards: int) -> list[list]:
    sizes = [math.prod(s) * torch.empty((), dtype=d).element_size() for _, s, d in entries]
    target = sum(sizes) / n_shards
    shards, cur, acc = [], [], 0
    for e, size in zip(entries, sizes):
        if cur and acc + size > target * (len(shards) + 1) and len(shards) < n_shards - 1:
            shards.append(cur)
            cur = []
        cur.append(e)
        acc += size
    shards.append(cur)
    return shards


def synthesize(out: str | Path, preset: str, seed: int = 0, layers: int | None = None, force: bool = False,
               progress: bool = True, init: str = "default") -> Path:
    """Write a checkpoint directory for `preset`; returns its path. init: the weights' statistics (INITS; see
    the module docstring)."""
    if init not in INITS:
        raise ValueError(f"init {init!r}: choose one of {INITS}")
    out = Path(out)
    # Check the preset and --layers before touching the output: a bad argument must not delete anything.
    config_dict = preset_config(preset, layers)
    cfg = VL2Config.from_dict(config_dict, f"preset {preset}")
    # Init scales (1/sqrt(2 * layers) on residual outputs) use the full depth, so that `layers` truncation keeps
    # the first N layers bit-identical to the full model's.
    init_cfg = cfg if layers is None else VL2Config.from_dict(preset_config(preset), f"preset {preset}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty (use force=True / --force to overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    (out / "processor_config.json").write_text(
        json.dumps(processor_config(), indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    write_tokenizer(out, vocab_size=min(cfg.language.vocab_size, 8000), seed=seed)

    entries = [(k, s, storage_dtype(k)) for k, s in checkpoint_shapes(cfg).items()]
    if preset in REAL_PRESETS:
        n = REAL_SHARDS[preset]
        shards = _split_shards(entries, n)
        # name by the shards actually made: with --layers a huge tensor can leave fewer than n
        names = [f"model-{i + 1:05d}-of-{len(shards):06d}.safetensors" for i in range(len(shards))]
    elif preset == "test-small":  # one test preset is sharded so the index path is exercised
        shards = _split_shards(entries, 2)
        names = [f"model-{i + 1:05d}-of-{2:06d}.safetensors" for i in range(len(shards))]
    else:
        shards, names = [entries], [SINGLE_FILE]

    total_bytes, weight_map = 0, {}
    bar = tqdm(total=len(entries), desc=f"synth {preset}", unit="tensor", disable=not progress)
    for fname, shard in zip(names, shards):
        w = _ShardWriter(out / fname, shard)
        for name, shape, dtype in shard:
            t = init_tensor(name, shape, init_cfg, seed, init).to(dtype)
            w.write(name, t)
            total_bytes += t.numel() * t.element_size()
            weight_map[name] = fname
            bar.update()
        w.close()
    bar.close()
    if names != [SINGLE_FILE]:
        (out / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2) + "\n")
    return out

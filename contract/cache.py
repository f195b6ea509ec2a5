"""The KV / latent cache of an artifact, and how one step of an attention graph binds it (the format's contract).

One set of buffers per decoder layer, preallocated for the artifact's `attention.max_len` positions and never
copied or reallocated; a step of T tokens after `past_len` cached ones binds them so that the graph appends the
T new positions in place. The buffers, by `attention.kind` of the manifest:

  mha_gqa (Tiny)              [past_key, past_value], each [1, kv_heads, max_len, head_dim] of the cache dtype
                              (int8 with static per-channel scales inside the graph, or the io dtype); the SAME
                              buffer is bound as input past_* and output present_* (GroupQueryAttention appends)
  mla_absorbed_gqa (fp16)     [latent] [1, 1, max_len, kv_lora_rank + qk_rope_head_dim]; bound as past_latent and
                              as BOTH present_latent_key and present_latent_value
  mla_latent_matmul (fp32)    [latent] of the io dtype, or [codes uint8, token scales fp32 [1, 1, max_len, 1]] for
                              the 8-bit cache (format 5); the first past_len rows are bound as the read-only
                              past_latent (past_latent_scale), and rows past_len .. past_len+T-1 as the output
                              latent_new (latent_scale_new), by address, so the graph writes them in place

A step's four small inputs (bind_step_inputs): hidden [1, T, H], position_ids [1, T] = past_len .. past_len+T-1,
seqlens_k [1] = past_len + T - 1, total_sequence_length [] = past_len + T. docs/artifact-format.md is this in prose.
Only numpy and onnxruntime (imported where used): the exporter, the torch-free runtime and other programs share it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..model.config import LanguageConfig, VL2Config

MHA_GQA, MLA_GQA, MLA_LATENT = "mha_gqa", "mla_absorbed_gqa", "mla_latent_matmul"


def _lang(cfg: VL2Config | LanguageConfig) -> LanguageConfig:
    return cfg.language if isinstance(cfg, VL2Config) else cfg


def cache_shapes(cfg: VL2Config | LanguageConfig, max_len: int, dtype=np.float32) -> list[tuple[int, ...]]:
    """Shapes of one layer's cache buffers: MHA [k, v], MLA [latent], and the 8-bit (uint8) latent cache's token
    scales [latent, scales] (export/latent_cache.py)."""
    L = _lang(cfg)
    if L.use_mla:
        latent = [(1, 1, max_len, L.kv_lora_rank + L.qk_rope_head_dim)]
        return latent + [(1, 1, max_len, 1)] if np.dtype(dtype) == np.uint8 else latent
    return [(1, L.num_key_value_heads, max_len, L.head_dim)] * 2


def cache_dtypes(cfg: VL2Config | LanguageConfig, dtype) -> list[np.dtype]:
    """Each of one layer's buffers' element type: the cache's, and fp32 for the latent's token scales."""
    n = len(cache_shapes(cfg, 1, dtype))
    return [np.dtype(dtype)] + [np.dtype(np.float32) if _lang(cfg).use_mla else np.dtype(dtype)] * (n - 1)


def new_cache_arrays(cfg: VL2Config | LanguageConfig, max_len: int, dtype=np.float32) -> list[list[np.ndarray]]:
    """Zeroed cache buffers, one list per layer: MHA [past_key, past_value], MLA [past_latent (, its scales)]."""
    L = _lang(cfg)
    return [[np.zeros(s, d) for s, d in zip(cache_shapes(L, max_len, dtype), cache_dtypes(L, dtype), strict=True)]
            for _ in range(L.num_hidden_layers)]


def cache_bytes_per_token(cfg: VL2Config | LanguageConfig, dtype=np.float16) -> int:
    """Cache bytes per token, all layers: MHA layers*2*kvH*head_dim*itemsize, MLA layers*(r + rope)*itemsize, plus
    4 bytes per layer for the 8-bit latent cache's token scale."""
    L = _lang(cfg)
    scale = 4 * L.num_hidden_layers if L.use_mla and np.dtype(dtype) == np.uint8 else 0
    return L.cache_elements_per_token * np.dtype(dtype).itemsize + scale


def cache_ortvalues(arrays: Sequence[np.ndarray]) -> list:
    """Wrap one layer's numpy cache buffers as CPU OrtValues that SHARE their memory (no copy): what the graph
    writes is visible in the arrays. Keep the arrays alive as long as the OrtValues."""
    import onnxruntime as ort

    out = []
    for a in arrays:
        if not (a.flags.c_contiguous and a.flags.writeable):
            raise ValueError("cache buffers must be writeable C-contiguous arrays")
        out.append(ort.OrtValue.ortvalue_from_numpy(a))
    return out


ONNX_TYPE_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}


def session_attention_kind(session) -> str:
    """MHA_GQA, MLA_GQA or MLA_LATENT, read off an attention session's outputs."""
    outs = {o.name for o in session.get_outputs()}
    return MLA_LATENT if "latent_new" in outs else MLA_GQA if "present_latent_key" in outs else MHA_GQA


def bind_cache(binding, kind: str, buffers: Sequence, past_len: int, t: int, device: str = "cpu") -> None:
    """Bind one layer's cache buffers (OrtValues of cache_shapes) for a step of `t` tokens after `past_len`.
    GQA forms: the same OrtValue as past_* input and present_* output(s); GQA appends in place. MLA_LATENT: the
    buffer's first past_len rows as the read-only `past_latent`, and its next t rows as the `latent_new` output,
    by address, so the graph writes the new rows straight into the buffer (no copy, nothing reallocated)."""
    if kind == MLA_LATENT:
        buf, *scales = buffers
        dtype = ONNX_TYPE_DTYPES[buf.data_type()]
        width = buf.shape()[-1]
        row = width * np.dtype(dtype).itemsize
        binding.bind_input("past_latent", device, 0, dtype, [past_len, width], buf.data_ptr())
        binding.bind_output("latent_new", device, 0, dtype, [t, width], buf.data_ptr() + past_len * row)
        for tok in scales:  # the 8-bit cache's token scales, [P, 1] fp32, the same way
            binding.bind_input("past_latent_scale", device, 0, np.float32, [past_len, 1], tok.data_ptr())
            binding.bind_output("latent_scale_new", device, 0, np.float32, [t, 1], tok.data_ptr() + past_len * 4)
    elif kind == MLA_GQA:
        (buf,) = buffers
        binding.bind_ortvalue_input("past_latent", buf)
        binding.bind_ortvalue_output("present_latent_key", buf)
        binding.bind_ortvalue_output("present_latent_value", buf)
    else:
        for name, buf in zip(("key", "value"), buffers, strict=True):
            binding.bind_ortvalue_input(f"past_{name}", buf)
            binding.bind_ortvalue_output(f"present_{name}", buf)


def bind_step_inputs(binding, hidden, past_len: int) -> None:
    """The four small inputs of a step of hidden [1, T, H] (numpy, or an OrtValue wherever it lives) at positions
    past_len .. past_len + T - 1."""
    if isinstance(hidden, np.ndarray):
        t = hidden.shape[1]
        binding.bind_cpu_input("hidden", hidden)
    else:
        t = hidden.shape()[1]
        binding.bind_ortvalue_input("hidden", hidden)
    binding.bind_cpu_input("position_ids", np.arange(past_len, past_len + t, dtype=np.int64)[None])
    binding.bind_cpu_input("seqlens_k", np.array([past_len + t - 1], np.int32))
    binding.bind_cpu_input("total_sequence_length", np.array(past_len + t, np.int32))

"""Decode latency of one attention graph (export.attention) at real dims, ORT CPU. Random weights.

  python -m vl2edge.bench.probes.attention_layer_latency                      # tiny + small, int8, past 512 and 4000
  python -m vl2edge.bench.probes.attention_layer_latency --presets small --past 128 1024 --precision int4
  python -m vl2edge.bench.probes.attention_layer_latency --kv-cache int8      # the 8-bit caches (int4 artifacts' default)

For each preset builds layer 1's attention graph (a MoE layer, so the fp32 router logits are included) with
deterministic random weights of the checkpoint shapes (N(0, 1/fan_in), norms 1), precision --precision with
accuracy_level --accuracy-level, fp32 io, a cache of --max-len positions (--kv-cache int8: 8-bit codes with uniform
per-channel scales, as export/kv_calibration.py would set them). The cache buffer(s) are filled with random rows
(their values do not change the cost). For each past length P, a decode step (T = 1, positions P) is run
--steps times after --warmup untimed steps, every step rewriting row P and attending over P + 1 rows, like the engine.

Two figures per case, median (min) in ms:
  step  : export.attention.run_attention_step as the runtime calls it (fresh IO binding, 4 small inputs, cache
          OrtValue bound to past and present, outputs copied to numpy);
  run   : session.run_with_iobinding alone on a binding prepared once (the graph's own cost).
ORT session: intra_op_num_threads = --threads, inter_op 1, ORT_ENABLE_ALL.
"""

from __future__ import annotations

import argparse
import statistics
import time
import zlib

import numpy as np
import onnxruntime as ort

from ...contract.cache import bind_cache, bind_step_inputs, cache_ortvalues, cache_shapes, session_attention_kind
from ...export.attention import build_attention_graph, run_attention_step
from ...export.linear import Precision
from ...model.checkpoint_layout import layer_shapes
from ...model.config import VL2Config
from ...model.presets import preset_config

LAYER = 1


def random_weights(cfg: VL2Config, layer: int):
    """get(name) -> fp32 array of the checkpoint shape, deterministic per name: N(0, 1/fan_in), norm weights 1."""
    shapes = layer_shapes(cfg, layer)

    def get(name: str) -> np.ndarray:
        shape = shapes[name]
        if len(shape) == 1:
            return np.ones(shape, np.float32)
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])).astype(np.float32)

    return get


def random_cache(cfg: VL2Config, max_len: int, kv_cache: str, rng) -> tuple[list[np.ndarray], object]:
    """One layer's cache buffers filled with random rows, and the kv_scales its graph is built with."""
    L = cfg.language
    if kv_cache == "float":
        return [rng.standard_normal(s, dtype=np.float32) * 0.5 for s in cache_shapes(cfg, max_len)], None
    scale = np.float32(2.0 / 127)
    if L.use_mla:  # uint8 codes around zero point 128 and their token scales (export/latent_cache.py)
        codes, tok = cache_shapes(cfg, max_len, np.uint8)
        return [rng.integers(1, 256, codes).astype(np.uint8), np.full(tok, scale, np.float32)], \
            np.ones(codes[-1], np.float32)
    shapes = cache_shapes(cfg, max_len)
    per_channel = np.full((L.num_key_value_heads, L.head_dim), scale, np.float32)
    return [rng.integers(-127, 128, s).astype(np.int8) for s in shapes], (per_channel, per_channel)


def time_case(cfg: VL2Config, prec: Precision, max_len: int, pasts: list[int], threads: int, steps: int,
              warmup: int, kv_cache: str = "float") -> list[dict]:
    rng = np.random.default_rng(0)
    arrays, kv_scales = random_cache(cfg, max_len, kv_cache, rng)
    g = build_attention_graph(cfg, LAYER, random_weights(cfg, LAYER), prec, np.float32, max_len, kv_scales=kv_scales)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(g.model().SerializeToString(), so, providers=["CPUExecutionProvider"])
    buffers = cache_ortvalues(arrays)
    H = cfg.language.hidden_size
    rows = []
    for past in pasts:
        x = rng.standard_normal((1, 1, H), dtype=np.float32)
        step_ms = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            run_attention_step(sess, buffers, x, past)
            if i >= warmup:
                step_ms.append((time.perf_counter() - t0) * 1e3)
        # the graph alone: one binding, reused
        b = sess.io_binding()
        bind_step_inputs(b, x, past)
        for o in sess.get_outputs():
            if o.name in ("hidden_out", "mlp_in", "router_logits"):
                b.bind_output(o.name)
        bind_cache(b, session_attention_kind(sess), buffers, past, 1)
        ptr = [v.data_ptr() for v in buffers]
        run_ms = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            sess.run_with_iobinding(b)
            if i >= warmup:
                run_ms.append((time.perf_counter() - t0) * 1e3)
        assert [v.data_ptr() for v in buffers] == ptr
        rows.append({"past": past, "step_med": statistics.median(step_ms), "step_min": min(step_ms),
                     "run_med": statistics.median(run_ms), "run_min": min(run_ms)})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--precision", default="int8", choices=["fp32", "int8", "int4"])
    ap.add_argument("--accuracy-level", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--past", type=int, nargs="+", default=[512, 4000])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--kv-cache", default="float", choices=["float", "int8"])
    a = ap.parse_args(argv)
    prec = Precision(a.precision, a.block_size, a.accuracy_level)
    print(f"ORT {ort.__version__} CPU, {a.threads} threads, {prec.describe()}, max_len {a.max_len}, layer {LAYER}, "
          f"{a.kv_cache} cache, {a.steps} timed decode steps after {a.warmup}; ms median (min)")
    for name in a.presets:
        cfg = VL2Config.from_dict(preset_config(name))
        L = cfg.language
        kind = (f"MLA absorbed, {L.num_attention_heads} heads x {L.kv_lora_rank}+{L.qk_rope_head_dim}"
                if L.use_mla else f"MHA, {L.num_attention_heads} heads x {L.head_dim}")
        for r in time_case(cfg, prec, a.max_len, a.past, a.threads, a.steps, a.warmup, a.kv_cache):
            print(f"{name:6s} H {L.hidden_size} {kind:32s} past {r['past']:5d}: "
                  f"step {r['step_med']:.3f} ({r['step_min']:.3f})  run {r['run_med']:.3f} ({r['run_min']:.3f})")


if __name__ == "__main__":
    main()

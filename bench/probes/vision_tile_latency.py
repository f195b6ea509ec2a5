"""Vision graph latency per 384x384 tile at real dims, ORT CPU vs the PyTorch reference. Random weights.

  python -m vl2edge.bench.probes.vision_tile_latency                      # full tower + projector, preset "tiny"
  python -m vl2edge.bench.probes.vision_tile_latency --attn-only          # attention op choice, one block's core

Full mode: builds export.vision.build_vision_graph for the preset's real dims (SigLIP 27 x 1152, projector to the
LLM width) with deterministic random weights (no checkpoint needed; std 0.02 like timm's init), saves it to a temp
dir, and times ORT CPU (intra_op_num_threads = --threads) at each precision against the PyTorch reference
(model.vision.VisionTower + model.projector.Projector, fp32, torch.set_num_threads(--threads)) on the same weights,
for each batch of tiles; variants run interleaved, --reps times after one warm-up. Reports ms per tile (median and
min) and the cosine of each output against torch's. Peak RSS for "tiny": ~5.5 GB (GraphBuilder.save of the fp32
graph alone peaks at ~4.9 GB, 3x its 1.6 GB of weights).

--attn-only: the attention core alone (q, k, v [n, 729, 1152] -> [n, 729, 1152], 16 heads x 72), the three op
choices interleaved run by run: com.microsoft MultiHeadAttention, plain MatMul/Softmax/MatMul (scale as a Mul on q;
the vision graph folds it into the qkv weights instead), and ONNX Attention-23 (its model is stamped opset 23,
which the vision graph's builder does not use), at fp32 and fp16 io.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ...export.linear import Precision
from ...export.onnx_builder import MS_DOMAIN, GraphBuilder
from ...export.vision import build_vision_graph
from ...model.checkpoint_layout import projector_shapes, vision_shapes
from ...model.config import VL2Config
from ...model.presets import preset_config


def random_weights(cfg: VL2Config, std: float = 0.02):
    """get(name) -> fp32 array of the checkpoint shape; deterministic per name, generated on demand."""
    shapes = {**vision_shapes(cfg), **projector_shapes(cfg)}

    def get(name: str) -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        shape = shapes[name]
        if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            return (1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        if name.endswith("bias"):
            return 0.01 * rng.standard_normal(shape, dtype=np.float32)
        return std * rng.standard_normal(shape, dtype=np.float32)

    return get, shapes


def session(path_or_bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: kB


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def full(args) -> None:
    import torch

    from ...model.projector import Projector
    from ...model.vision import VisionTower

    cfg = VL2Config.from_dict(preset_config(args.preset))
    get, shapes = random_weights(cfg)
    rng = np.random.default_rng(0)
    pixels = {n: rng.uniform(-1, 1, (n, 3, 384, 384)).astype(np.float32) for n in args.tiles}
    print(f"preset {args.preset}: vision {cfg.vision.layers} x {cfg.vision.width}, projector -> "
          f"{cfg.projector.n_embed}; ORT {ort.__version__} CPU, {args.threads} threads, attention={args.attention}; "
          f"torch {torch.__version__} fp32, {args.threads} threads")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        for kind in args.precisions:  # build + save one at a time (the builder holds a copy of every weight)
            t0 = time.perf_counter()
            build_vision_graph(cfg, get, Precision(kind), attention=args.attention).save(
                Path(tmp) / f"vision_{kind}.onnx")
            print(f"built {kind} in {time.perf_counter() - t0:.0f} s (peak RSS so far {peak_rss_gb():.1f} GB)",
                  flush=True)
        for kind in args.precisions:
            runners[f"ort {kind}"] = (lambda s: lambda px: s.run(None, {"pixel_values": px})[0])(
                session(str(Path(tmp) / f"vision_{kind}.onnx"), args.threads))
            print(f"session {kind} (peak RSS so far {peak_rss_gb():.1f} GB)", flush=True)
        vision, proj = VisionTower(cfg.vision).eval(), Projector(cfg).eval()
        vision.load_state_dict({k[len("vision."):]: torch.from_numpy(get(k)) for k in shapes
                                if k.startswith("vision.") and not k.startswith("vision.attn_pool.")})
        proj.load_state_dict({k[len("projector."):]: torch.from_numpy(get(k)) for k in shapes
                              if k.startswith("projector.")})

        def torch_run(px):
            with torch.inference_mode():
                return proj(vision(torch.from_numpy(px))).numpy()

        runners["torch fp32"] = torch_run
        print(f"torch model (peak RSS so far {peak_rss_gb():.1f} GB)", flush=True)
        for n in args.tiles:
            px = pixels[n]
            outs = {name: fn(px) for name, fn in runners.items()}  # also the warm-up
            ts: dict[str, list[float]] = {name: [] for name in runners}
            for _ in range(args.reps):  # interleaved, so load from other processes hits every variant alike
                for name, fn in runners.items():
                    t = time.perf_counter()
                    fn(px)
                    ts[name].append(time.perf_counter() - t)
            for name in runners:
                print(f"n={n} {name:10s} {1000 * statistics.median(ts[name]) / n:8.0f} ms/tile median, "
                      f"{1000 * min(ts[name]) / n:8.0f} min; cosine vs torch "
                      f"{cosine(outs[name], outs['torch fp32']):.6f}", flush=True)
    print(f"peak RSS {peak_rss_gb():.1f} GB")


def attention_core_model(kind: str, io_dtype, width: int = 1152, heads: int = 16, tokens: int = 729) -> bytes:
    hd = width // heads
    g = GraphBuilder("attention_core")
    q, k, v = (g.input(name, io_dtype, ["n", tokens, width]) for name in "qkv")
    if kind == "mha":
        o = g.op("MultiHeadAttention", [q, k, v], domain=MS_DOMAIN, num_heads=heads, scale=hd**-0.5)
    elif kind == "onnx-attention-23":
        o = g.op("Attention", [q, k, v], q_num_heads=heads, kv_num_heads=heads, scale=hd**-0.5)
    else:
        hs = g.const("heads_shape", np.array([0, 0, heads, hd], np.int64))
        qs = g.op("Mul", [q, g.const("scale", np.array(hd**-0.5, dtype=io_dtype))])
        qh = g.op("Transpose", [g.op("Reshape", [qs, hs])], perm=[0, 2, 1, 3])
        kt = g.op("Transpose", [g.op("Reshape", [k, hs])], perm=[0, 2, 3, 1])
        vh = g.op("Transpose", [g.op("Reshape", [v, hs])], perm=[0, 2, 1, 3])
        p = g.op("Softmax", [g.op("MatMul", [qh, kt])], axis=-1)
        o = g.op("Transpose", [g.op("MatMul", [p, vh])], perm=[0, 2, 1, 3])
        o = g.op("Reshape", [o, g.const("merge_shape", np.array([0, 0, width], np.int64))])
    g.output(o, "o", io_dtype, ["n", tokens, width])
    m = g.model()
    if kind == "onnx-attention-23":
        for opset in m.opset_import:
            if opset.domain == "":
                opset.version = 23
    return m.SerializeToString()


def attn_only(args) -> None:
    print(f"attention core, 16 heads x 72, 729 tokens; ORT {ort.__version__} CPU, {args.threads} threads")
    kinds = ("mha", "plain", "onnx-attention-23")
    for io_dtype in (np.float32, np.float16):
        for n in args.tiles:
            rng = np.random.default_rng(0)
            feed = {name: rng.standard_normal((n, 729, 1152)).astype(io_dtype) for name in "qkv"}
            sessions = {k: session(attention_core_model(k, io_dtype), args.threads) for k in kinds}
            outs = {k: s.run(None, feed)[0].astype(np.float32) for k, s in sessions.items()}
            ts: dict[str, list[float]] = {k: [] for k in kinds}
            for _ in range(args.reps):  # interleaved, so load from other processes hits all choices alike
                for k, s in sessions.items():
                    t = time.perf_counter()
                    s.run(None, feed)
                    ts[k].append(time.perf_counter() - t)
            for k in kinds:
                diff = float(np.abs(outs[k] - outs["mha"]).max())
                print(f"{np.dtype(io_dtype).name:7s} n={n} {k:18s} {1000 * statistics.median(ts[k]) / n:7.1f} ms/tile "
                      f"(min {1000 * min(ts[k]) / n:.1f}), max |diff| vs mha {diff:.1e}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8", "int4"])
    ap.add_argument("--tiles", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--attention", default="mha", choices=["mha", "plain"])
    ap.add_argument("--attn-only", action="store_true")
    args = ap.parse_args(argv)
    (attn_only if args.attn_only else full)(args)


if __name__ == "__main__":
    main()

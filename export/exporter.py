"""`vl2edge export`: a DeepSeek-VL2 checkpoint -> a runtime artifact directory of split ONNX graphs + manifest.

Graphs: vision (SigLIP + projector), embedding, per layer an attention graph (with the router logits) and an MLP
graph (dense layer 0, or routed + shared experts), head. See each builder's docstring for its I/O contract and
manifest.py for the manifest. The vision tower is also written in parts (runs of blocks, VISION_PART_BYTES of
weights each) that point into vision.onnx's data file, so they add no bytes: `--low-memory` encodes an image
beside the loaded language model one part at a time.

Streaming: tensors are read one at a time from the memory-mapped safetensors and each graph is written before the
next is built, so peak memory is about one graph's weights (the largest: the vision tower, or Small's MoE layer).

Atomic: everything is built in a hidden directory beside OUT and renamed into place only when complete, manifest
last. An interrupted export leaves no OUT (at most a `.OUT.partial-*` directory, which has no manifest and which
the next export into the same OUT removes); a failed one removes its partial directory. An existing OUT is
refused without force=True, and with it is replaced only after the new artifact is complete.

Precision policy (recorded in the manifest):
  cpu  target: fp32 I/O. Routed experts as asked (QMoE int4/int8, accuracy_level 4; or fp32 MoE). With quantized
       experts, the language model's other Linears (attention, dense MLP, shared experts) and lm_head are `dense`
       bits (MatMulNBits at accuracy_level 4: int8 activations, on CPU the fast MatMulNBits
       path, onnxruntime.md §1.2), and the embedding table is INT8 GatherBlockQuantized.
         int8 (default): ~0.5% weight error per tensor.
         int4 (`--dense int4`): a decode step reads every active weight once, so its time is bytes / bandwidth.
               With int8 dense weights the int4 artifact reads 499 MB per token on real-dims Tiny, of which lm_head
               is 165 MB (11.7 of 52 ms/token); measured at M=1 on 2 cores, lm_head takes 8.1 ms in int4 vs
               12.3 ms in int8. The price: ~10% instead of ~0.5% weight error, and on the synthesized test models
               each of lm_head / attention+MLP at int4 adds ~10% relative logit error (all-int4: 13-19%, against
               2-4% for int4 experts alone), and int4 matmuls ~10% slower than int8 at M=512 (prefill). Hence
               opt-in. (llama.cpp's Q4_K_M likewise keeps output.weight at 6 bits.) And on 2 cores the whole
               decode step was not faster (bench: 54.3 vs 51.1 ms/token, within this VM's noise): the M=1
               kernels stream 10-16 GB/s, compute-bound on unpacking, not on bytes. The embedding stays int8: one
               row is read per token, so fewer bits would save memory but no time.
       The vision tower stays INT8 whatever `dense` is: it runs at M = 729 rows per tile, compute-bound, where
       fewer weight bytes buy no time. `vision="int8-dynamic"` (`--vision`; auto picks it with int4/int8 experts)
       runs its block Linears as DynamicQuantizeMatMul where export/vision_calibration.py measures the per-tensor
       activation quantization harmless on this checkpoint (recorded as quantization.vision_dynamic in the
       manifest, what was asked as quantization.vision.asked).
       With fp32 experts everything is fp32: the parity artifact.
  cuda target: fp16 I/O, fp16 non-expert weights (tensor-core GEMMs; int8 activations do not exist there),
       experts as asked (QMoE int4/int8 or fp16 MoE).
  KV cache (`kv_cache`): 8-bit codes with export-time calibrated scales (export/kv_calibration.py) for int4/int8
       experts on cpu (auto), else the I/O dtype: MHA an int8 cache read by GroupQueryAttention, MLA a uint8 latent
       cache read by integer GEMMs (export/latent_cache.py). bench/fidelity.py measures what each choice costs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..contract import ort_compat
from ..contract.cache import cache_bytes_per_token, cache_dtypes, cache_shapes
from ..contract.manifest import FORMAT, FORMAT_VERSION, file_sha256, graph_entry, write_manifest
from ..model.checkpoint import Checkpoint
from ..model.config import VL2Config
from ..quant.report import QualityReport
from .attention import attention_kind, build_attention_graph
from .embedding import KEY as EMBED_KEY
from .embedding import build_embedding_graph
from .fused_layer import fusable, write_fused_layer
from .head import build_head_graph
from .kv_calibration import KVCalibration
from . import expert_cache, mla_absorb, vision_calibration
from .linear import DYNAMIC, Precision
from .mlp import build_mlp_graph
from .vision import build_vision_graph

EXPERT_CHOICES = ("int4", "int8", "fp16", "fp32")
QUANTIZED_EXPERTS = ("int4", "int8")
DENSE_CHOICES = ("int4", "int8")
VISION_CHOICES = ("auto", "int8", DYNAMIC)
KV_CACHE_CHOICES = ("auto", "int8", "float")
COPIED_FILES = ("config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")


class ExportError(ValueError):
    pass


BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK_SIZE = 64


def _block_dims(L) -> dict[str, int]:
    """The dimensions QMoE quantizes along in whole blocks (its K: fc1 reads hidden_size, fc2 the intermediate)."""
    return {"hidden_size": L.hidden_size, "moe_intermediate_size": L.moe_intermediate_size}


def choose_block_size(cfg: VL2Config) -> tuple[int, str]:
    """The block size when none is asked for: DEFAULT_BLOCK_SIZE, or else the largest smaller supported size that
    divides every dimension quantized in whole blocks (a larger block than the default would trade accuracy for
    bytes without being asked). Returns (block size, why) for the log line."""
    dims = _block_dims(cfg.language) if cfg.language.n_routed_experts else {}
    for b in sorted((b for b in BLOCK_SIZES if b <= DEFAULT_BLOCK_SIZE), reverse=True):
        if all(k % b == 0 for k in dims.values()):
            misfits = ", ".join(f"{name} {k}" for name, k in dims.items() if k % DEFAULT_BLOCK_SIZE)
            return b, "the default" if b == DEFAULT_BLOCK_SIZE else f"{DEFAULT_BLOCK_SIZE} does not divide {misfits}"
    raise ExportError(f"no supported block size {BLOCK_SIZES} divides {dims}")


def precision_plan(experts: str, block_size: int, target: str, dense: str | None = None,
                   head: str | None = None) -> dict[str, Precision]:
    """Precision per weight group (see the module docstring). dense, head (lm_head; default: dense's): cpu target
    with quantized experts only."""
    if experts not in EXPERT_CHOICES:
        raise ExportError(f"--experts {experts!r}: choose one of {EXPERT_CHOICES}")
    for flag, bits in (("--dense", dense), ("--head", head)):
        if bits is not None and bits not in DENSE_CHOICES:
            raise ExportError(f"{flag} {bits!r}: choose one of {DENSE_CHOICES}")
        if bits is not None and (target != "cpu" or experts not in QUANTIZED_EXPERTS):
            raise ExportError(f"{flag} applies to --target cpu with int4/int8 experts, not {experts} experts on "
                              f"{target}")
    if block_size not in BLOCK_SIZES:
        raise ExportError(f"--block-size {block_size}: choose 32, 64 or 128")
    if target == "cpu":
        if experts == "fp16":
            raise ExportError("--experts fp16 needs --target cuda: ONNX Runtime's CPU MoE kernel is fp32 only")
        if experts == "fp32":
            everything = Precision("fp32")
            return {"experts": everything, "linear": everything, "vision": everything, "embedding": everything,
                    "lm_head": everything}
        dense_prec = Precision(dense or "int8", block_size, accuracy_level=4)
        int8 = Precision("int8", block_size, accuracy_level=4)
        head_prec = Precision(head, block_size, accuracy_level=4) if head else dense_prec
        return {"experts": Precision(experts, block_size, accuracy_level=4), "linear": dense_prec, "vision": int8,
                "embedding": int8, "lm_head": head_prec}
    if target == "cuda":
        fp16 = Precision("fp16")
        expert = fp16 if experts in ("fp16", "fp32") else Precision(experts, block_size, accuracy_level=0)
        return {"experts": expert, "linear": fp16, "vision": fp16, "embedding": fp16, "lm_head": fp16}
    raise ExportError(f"--target {target!r}: choose cpu or cuda")


# Stages a precision may be set for one at a time; attention, dense_mlp and shared_experts default to plan["linear"].
STAGES = ("vision", "embedding", "attention", "dense_mlp", "shared_experts", "experts", "lm_head")


def with_stage_overrides(plan: dict[str, Precision], overrides: dict[str, Precision] | None) -> dict[str, Precision]:
    if not overrides:
        return plan
    unknown = set(overrides) - set(STAGES)
    if unknown:
        raise ExportError(f"unknown stage(s) {sorted(unknown)}; stages are {STAGES}")
    return {**plan, **overrides}


def choose_kv_cache(kv_cache: str, cfg: VL2Config, target: str, experts: str,
                    floor: ort_compat.Version | None = None) -> str:
    """The KV cache's element type: "int8" (8-bit codes with static per-channel scales, export/kv_calibration.py;
    MLA: export/latent_cache.py) or "float" (the graph's I/O dtype). auto: int8 for quantized experts on cpu
    (int4 and, since it meets the same precision policy with it, int8: docs/precision.md), float
    otherwise, and float for MHA where the asked onnxruntime (`floor`) has no quantized GroupQueryAttention cache
    (MLA's 8-bit latent cache is standard integer ops: every release has it)."""
    if kv_cache not in KV_CACHE_CHOICES:
        raise ExportError(f"--kv-cache {kv_cache!r}: choose one of {KV_CACHE_CHOICES}")
    gqa_int8 = ort_compat.has("gqa_quantized_cache", floor) or cfg.language.use_mla
    if kv_cache == "auto":
        return "int8" if target == "cpu" and experts in QUANTIZED_EXPERTS and gqa_int8 else "float"
    if kv_cache == "int8" and target != "cpu":
        raise ExportError("--kv-cache int8 needs --target cpu: the CUDA graphs keep a float cache")
    if kv_cache == "int8" and not gqa_int8:
        first, what = ort_compat.FEATURES["gqa_quantized_cache"]
        raise ExportError(f"--kv-cache int8 with --min-onnxruntime {ort_compat.version_str(floor)}: {what} first "
                          f"shipped in onnxruntime {ort_compat.version_str(first)}; use --kv-cache float or auto")
    return kv_cache


def graph_features(L, plan: dict[str, Precision], target: str, kv_cache: str, routing_form: str) -> set[str]:
    """The onnxruntime features (contract/ort_compat.FEATURES) the written graphs use: their newest gives the
    artifact's onnxruntime floor."""
    used = set()
    if plan["embedding"].bits:
        used.add("gather_block_quantized_bits")
    if L.n_routed_experts:
        used.add("swiglu_fusion")
        experts = plan["experts"]
        if experts.bits:
            used.add("qmoe_block_size")
            if experts.bits == 4 and target == "cpu":
                used.add("cpu_qmoe_int4")
            if routing_form == "weights":
                used.add("qmoe_router_weights")
            if experts.accuracy_level is not None:
                used.add("qmoe_accuracy_level")
        elif target == "cpu":
            used.add("cpu_moe")
    if kv_cache == "int8" and not L.use_mla:
        used.add("gqa_quantized_cache")
    return used


# Weight bytes per part of the split vision tower (graphs.vision_parts): what `--low-memory` holds beside the language
# model while it encodes an image, instead of dropping the language model for the whole tower (0.43 GB at int8).
# 64 MiB: 4 of SigLIP-so400m's int8 blocks per part, 7 parts.
VISION_PART_BYTES = 64 * 2**20


def vision_parts(cfg: VL2Config, prec: Precision) -> list[range]:
    """The tower's blocks cut into runs of at most VISION_PART_BYTES of weights (at least one block each); one run
    when the whole tower fits."""
    v = cfg.vision
    per_block = (4 * v.width * v.width + 2 * v.width * v.mlp_hidden) * (prec.bits or np.dtype(
        np.float16 if prec.kind == "fp16" else np.float32).itemsize * 8) // 8
    n = max(1, VISION_PART_BYTES // per_block)
    return [range(a, min(a + n, v.layers)) for a in range(0, v.layers, n)]


def choose_vision(vision: str, target: str, experts: str, plan: dict) -> str:
    """The vision Linears' form: "int8" (the plan's precision as it is; fp16/fp32 where the plan says so) or
    int8-dynamic (where calibration allows, export/vision_calibration.py). auto: int8-dynamic for quantized experts
    on cpu, like the KV cache (the vision tower is most of the time to first token; int4 and int8 artifacts meet
    the precision policy with it: docs/precision.md), int8 otherwise."""
    if vision not in VISION_CHOICES:
        raise ExportError(f"--vision {vision!r}: choose one of {VISION_CHOICES}")
    if vision == "auto":
        return DYNAMIC if target == "cpu" and experts in QUANTIZED_EXPERTS else "int8"
    if vision == DYNAMIC and (target != "cpu" or plan["vision"].kind != "int8"):
        raise ExportError("--vision int8-dynamic is for --target cpu with quantized experts (its op, "
                          "DynamicQuantizeMatMul, is a CPU kernel with fp32 I/O)")
    return vision


def routing_precision_note(cfg: VL2Config, experts: str, out="OUT", src="SRC") -> str | None:
    """What the export says when int4 routed experts meet a router under which they measured far from the model:
    sigmoid scores renormalized over the top-k and scaled (VL2), where each chosen expert carries a large share of
    the MoE output. Measured on test-vl2 (docs/precision.md); real weights may differ, hence a note and a
    command, not a refusal."""
    L = cfg.language
    if experts != "int4" or not L.n_routed_experts or L.scoring_func != "sigmoid":
        return None
    return ("note: with sigmoid routing (VL2), int4 routed experts missed the precision policy on synthesized "
            "checkpoints, where --experts int8 met it (docs/precision.md); measure this checkpoint with "
            f"`python -m vl2edge.bench.fidelity {out} --reference {src}`")


def _partial_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def export(src, out, experts: str = "int4", block_size: int | None = None, target: str = "cpu", force: bool = False,
           max_len: int | None = None, progress: bool = True, revision: str | None = None,
           dense: str | None = None, head: str | None = None, vision: str = "auto", kv_cache: str = "auto",
           stage_precision: dict[str, Precision] | None = None, min_onnxruntime: str | None = None) -> Path:
    """stage_precision: per-stage overrides of the precision plan, keys STAGES (the fidelity tool,
    bench/fidelity.py, exports variants with one stage at fp32 to attribute the error); recorded in the manifest.
    min_onnxruntime: write only ops, inputs and attributes this onnxruntime release has (contract/ort_compat.py);
    the manifest's onnxruntime.min is what the written graphs need."""
    import onnx
    import torch
    from safetensors.numpy import save_file
    from tqdm import tqdm

    plan = precision_plan(experts, block_size or DEFAULT_BLOCK_SIZE, target, dense, head)  # bad requests: first
    try:
        floor = ort_compat.parse_version(min_onnxruntime) if min_onnxruntime else None
    except ValueError as e:
        raise ExportError(f"--min-onnxruntime: {e}") from None
    vision_asked, vision = vision, choose_vision(vision, target, experts, plan)
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists (use --force to replace it)")
    ckpt = Checkpoint.open(src, revision=revision)
    cfg: VL2Config = ckpt.config
    L = cfg.language
    if block_size is None:
        block_size, why = choose_block_size(cfg)
        if progress:
            print(f"block size {block_size} ({why}; --block-size sets it)", file=sys.stderr)
        plan = precision_plan(experts, block_size, target, dense, head)
    note = routing_precision_note(cfg, experts, out, src)
    if note and progress:
        print(note, file=sys.stderr)
    plan = with_stage_overrides(plan, stage_precision)
    if floor is not None:
        try:
            ort_compat.check_expressible(floor, target, plan["experts"].kind, bool(L.n_routed_experts))
        except ort_compat.CompatError as e:
            raise ExportError(str(e)) from None
        if plan["experts"].bits and not ort_compat.has("qmoe_accuracy_level", floor):
            # no attribute = QMoE's default: fp32 activations over the same block-quantized weights
            plan = {**plan, "experts": replace(plan["experts"], accuracy_level=None)}
    if vision == DYNAMIC and vision_asked == "auto" and plan["vision"].kind != "int8":
        vision = "int8"  # a stage override made vision exact (bench/fidelity.py): nothing left to make dynamic
    if plan["experts"].bits and L.n_routed_experts:
        for what, k in _block_dims(L).items():
            if k % block_size:  # QMoE quantizes along K in whole blocks
                raise ExportError(f"--block-size {block_size} does not divide {what} {k}; choose a divisor of it")
    max_len = max_len or L.max_position_embeddings
    io_dtype = np.float32 if target == "cpu" else np.float16
    kv_asked, kv_cache = kv_cache, choose_kv_cache(kv_cache, cfg, target, experts, floor)
    cache_dtype = np.dtype(io_dtype if kv_cache != "int8" else np.uint8 if L.use_mla else np.int8)

    for stale in _partial_dirs(out):  # left by an interrupted export into the same OUT
        shutil.rmtree(stale, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        get = lambda name: ckpt.tensor(name, torch.float32).numpy()  # noqa: E731
        report = QualityReport()
        graphs, layers, routed_layers, routers = {}, [], {}, {}
        parts = vision_parts(cfg, plan["vision"])
        steps = 3 + 2 * L.num_hidden_layers + (len(parts) if len(parts) > 1 else 0)
        bar = tqdm(total=steps, desc=f"export {experts}/{target}", unit="graph", disable=not progress)

        def save(g, name, **how):
            g.save(tmp / f"{name}.onnx", **how)
            ckpt.close()  # unmap what this graph read
            bar.update()
            return graph_entry(g, f"{name}.onnx")

        dynamic, calibration = frozenset(), None
        if vision == DYNAMIC:
            errors = vision_calibration.measure(cfg, get)
            dynamic = frozenset(vision_calibration.choose(errors))
            calibration = {"max_error": vision_calibration.MAX_ERROR, "dynamic": len(dynamic), "of": len(errors),
                           "errors": {k: round(v, 5) for k, v in errors.items()}}
            ckpt.close()
        tower = build_vision_graph(cfg, get, plan["vision"], io_dtype, report, dynamic=dynamic)
        graphs["vision"] = save(tower, "vision", record=True)
        if len(parts) > 1:  # the same weights again, as graphs that point into vision.onnx.data: no bytes added
            graphs["vision_parts"] = [
                save(build_vision_graph(cfg, get, plan["vision"], io_dtype, dynamic=dynamic, blocks=r),
                     f"vision_part{j:02d}", stored=tower.written) for j, r in enumerate(parts)]
        del tower
        graphs["embedding"] = save(build_embedding_graph(cfg, get(EMBED_KEY), plan["embedding"], io_dtype, report),
                                   "embedding")
        calibration_kv = KVCalibration(cfg, get, ckpt.dir) if kv_cache == "int8" else None
        # cuda: routing inputs exact under CUDA's QMoE semantics as well as the CPU kernel's (export/mlp.py); an
        # onnxruntime without QMoE's router_weights input gets them the same way
        routing_form = "log_weights" if target == "cuda" or not plan["experts"].bits or not ort_compat.has(
            "qmoe_router_weights", floor) else "weights"
        for i in range(L.num_hidden_layers):
            scales = calibration_kv.layer_scales(i) if calibration_kv else None
            attn = save(build_attention_graph(cfg, i, get, plan.get("attention", plan["linear"]), io_dtype, max_len,
                                              report, kv_scales=scales), f"layer{i:02d}_attention")
            mlp_prec = plan.get("shared_experts" if L.is_moe_layer(i) else "dense_mlp", plan["linear"])
            name = f"layer{i:02d}_{'moe' if L.is_moe_layer(i) else 'mlp'}"
            cacheable = L.is_moe_layer(i) and routing_form == "weights"  # cpu, quantized experts
            g = build_mlp_graph(cfg, i, get, mlp_prec, plan["experts"], io_dtype, report, routing_form)
            mlp = save(g, name, record=cacheable)
            if cacheable:  # the expert cache's view of the same bytes (export/expert_cache.py)
                bar.total += 1
                shared = save(build_mlp_graph(cfg, i, get, mlp_prec, plan["experts"], io_dtype, routed=False),
                              f"layer{i:02d}_shared", stored=g.written)
                routed_layers[str(i)] = {"shared": shared, "data": f"{name}.onnx.data",
                                         "tensors": expert_cache.routed_tensors(g, f"{name}.onnx.data")}
                pfx = f"language.model.layers.{i}."
                routers.update(expert_cache.router_arrays(i, get(pfx + "post_attention_layernorm.weight"),
                                                          get(pfx + "mlp.gate.weight")))
            del g
            layers.append({"attention": attn, "mlp": mlp, "moe": L.is_moe_layer(i)})
            if target == "cpu" and fusable(L, routing_form):  # the same weights, one session (export/fused_layer.py)
                fused = write_fused_layer(tmp, attn["file"], mlp["file"], L, L.is_moe_layer(i), f"layer{i:02d}")
                layers[-1]["layer"] = graph_entry(SimpleNamespace(inputs=fused.graph.input,
                                                                  outputs=fused.graph.output), f"layer{i:02d}.onnx")
        if routed_layers:
            first = next(iter(routed_layers.values()))["tensors"]
            template = expert_cache.build_expert_template(
                L.hidden_size, plan["experts"], io_dtype, {k: t["shape"] for k, t in first.items()},
                {k: t["dtype"] for k, t in first.items()})
            onnx.save_model(template, str(tmp / expert_cache.TEMPLATE))
            io = SimpleNamespace(inputs=template.graph.input, outputs=template.graph.output)
            save_file(routers, str(tmp / expert_cache.ROUTERS))
            graphs["routed_experts"] = {
                "template": graph_entry(io, expert_cache.TEMPLATE), "routers": expert_cache.ROUTERS,
                "expert_bytes": expert_cache.expert_bytes(first), "layers": routed_layers}
        graphs["head"] = save(build_head_graph(cfg, get, plan["lm_head"], io_dtype, report), "head")
        bar.close()

        save_file({"image_newline": get("image_newline").astype(io_dtype),
                   "view_seperator": get("view_seperator").astype(io_dtype)}, str(tmp / "image_tokens.safetensors"))
        if L.topk_method == "noaux_tc":  # the runtime's dispatch needs VL2's selection bias; the graphs do not
            save_file({f"layer{i}": get(f"language.model.layers.{i}.mlp.gate.e_score_correction_bias")
                       for i in range(L.num_hidden_layers) if L.is_moe_layer(i)}, str(tmp / "router_bias.safetensors"))
        for name in COPIED_FILES:
            if (ckpt.dir / name).is_file():
                shutil.copyfile(ckpt.dir / name, tmp / name)
        (tmp / "quality_report.json").write_text(json.dumps(report.summary(), indent=2) + "\n")

        files = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        features = graph_features(L, plan, target, kv_cache, routing_form)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "source": {"checkpoint": str(ckpt.dir), "config": cfg.raw},
            "target": target,
            "io_dtype": np.dtype(io_dtype).name,
            "onnxruntime": {"min": ort_compat.version_str(ort_compat.artifact_floor(features)),
                            "asked": min_onnxruntime and ort_compat.version_str(floor),
                            "features": sorted(features, key=lambda f: (ort_compat.FEATURES[f][0], f))},
            "quantization": {k: p.describe() | ({"asked": vision_asked} if k == "vision" else {})
                             for k, p in plan.items()}
            | {"kv_cache": {"kind": kv_cache, "asked": kv_asked}, "routing": {"form": routing_form}}
            | ({"vision_dynamic": calibration} if calibration else {})
            | ({"mla_absorbed": mla_absorb.INT8_DESCRIPTION} if L.use_mla and mla_absorb.quantized_form(
                plan.get("attention", plan["linear"]), io_dtype) else {}),
            "attention": {"kind": attention_kind(cfg, io_dtype), "max_len": max_len,
                          "cache": {"dtype": cache_dtype.name,
                                    "buffers_per_layer": [list(s) for s in cache_shapes(cfg, max_len, cache_dtype)],
                                    "buffer_dtypes": [d.name for d in cache_dtypes(cfg, cache_dtype)]}
                          | ({"scales": "per token (a second buffer, written with the rows) over a static "
                                        "per-channel equalizer (graph initializers)" if L.use_mla else
                                        "static per (kv head, channel), graph initializers",
                              "calibration": calibration_kv.info | {"headroom": calibration_kv.headroom}} if calibration_kv else {}),
                          "cache_bytes_per_token": cache_bytes_per_token(cfg, cache_dtype)},
            "graphs": {**graphs, "layers": layers},
            "image_tokens": "image_tokens.safetensors",
            "router_bias": "router_bias.safetensors" if L.topk_method == "noaux_tc" else None,
            "quality_report": "quality_report.json",
            "files": files,
            "export_seconds": round(time.perf_counter() - t0, 2),
        }
        write_manifest(tmp, manifest)
        if out.exists():  # --force: swap only now that the new artifact is complete
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

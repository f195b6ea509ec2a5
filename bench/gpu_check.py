"""One command that checks a GPU and measures it: `vl2edge bench --provider cuda --check`.

On a machine with onnxruntime-gpu, a CUDA device and torch, with no network (everything is synthesized here):
  1. preflight: the CUDA provider is in onnxruntime, a session really runs on it (ORT falls back to the CPU
     silently when CUDA libraries are missing), torch sees the device. Otherwise one line says what is missing.
  2. parity, per test preset (test-tiny MHA, test-small MLA, test-vl2 sigmoid routing): export `--target cuda`
     with fp16 experts (the exactness check) and int4 experts (what users run); on each, teacher-forced logits
     against the fp16 PyTorch reference on the same GPU (bench/fidelity.py's comparison: cosine, top-1, expert
     selection), and free-running greedy tokens against the reference's, with the reference's margin at the first
     divergence (a divergence inside `NEAR_TIE` of the top logit is a near-tie, not an error).
  3. speed: real-dims `tiny` synthesized and exported int4 `--target cuda` (cached), then the bench's runtime
     workload on the GPU (vision per tile, prefill, TTFT, decode at 512 / 2k / 4k) and the device memory in use.
     `small` too with `--check-small` (its export alone takes minutes).
One JSON document (`--out DIR/gpu_check.json`) and a table. `provider="cpu"` rehearses the same steps on the CPU
(the tests run it that way; no figure from it means anything for a GPU).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

PRESETS = ("test-tiny", "test-small", "test-vl2")
PARITY_EXPERTS = ("fp16", "int4")
NEAR_TIE = 1e-2  # reference top-1 minus the artifact's token, relative to the step's largest |logit|


class CheckUnavailable(OSError):
    """What this machine lacks for the check, in one line (the CLI prints it and exits with status 2)."""


def preflight(provider: str) -> dict:
    """What the check runs on; CheckUnavailable when onnxruntime-gpu, CUDA or torch's CUDA is missing."""
    import onnxruntime as ort

    info = {"provider": provider, "onnxruntime": ort.__version__}
    try:
        import torch
    except ImportError:
        raise CheckUnavailable("the check compares with the PyTorch reference: install the [export] extra "
                               "(torch)") from None
    info["torch"] = torch.__version__
    if provider == "cpu":
        return info | {"device": "cpu (rehearsal: no GPU involved)"}
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise CheckUnavailable(f"onnxruntime {ort.__version__} has no CUDA provider (it has {', '.join(available)}):"
                               f" install onnxruntime-gpu (README: 'What runs where')")
    if not _runs_on_cuda():
        raise CheckUnavailable("onnxruntime-gpu is installed but could not start a session on CUDA (missing or "
                               "mismatched CUDA / cuDNN libraries; see onnxruntime's warning above)")
    if not torch.cuda.is_available():
        raise CheckUnavailable(f"torch {torch.__version__} sees no CUDA device (built for CUDA {torch.version.cuda}); "
                               f"the reference runs on the same GPU as the runtime")
    free, total = torch.cuda.mem_get_info()
    return info | {"device": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
                   "device_memory_total": total, "device_memory_free_at_start": free}


def _runs_on_cuda() -> bool:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    except Exception:
        return False
    return "CUDAExecutionProvider" in sess.get_providers()


# --- parity -------------------------------------------------------------------------------------------------------
def free_running(model, reference_tokens: list[int], reference_logits: np.ndarray, inp, steps: int) -> dict:
    """The artifact's own greedy answer against the reference's: where they part, and whether that is a near-tie."""
    eng = model.engine
    eng.reset()
    logits = eng.prefill(eng.embed(inp.input_ids, inp.pixel_values, inp.images_seq_mask, inp.images_spatial_crop))
    tokens = [int(np.argmax(logits))]
    while len(tokens) < steps:
        tokens.append(int(np.argmax(eng.decode(tokens[-1]))))
    diverged = next((i for i, (a, b) in enumerate(zip(tokens, reference_tokens)) if a != b), None)
    out = {"tokens_equal": diverged is None, "first_divergence": diverged}
    if diverged is not None:
        ref = reference_logits[diverged].astype(np.float64)
        margin = float(ref[reference_tokens[diverged]] - ref[tokens[diverged]]) / float(np.abs(ref).max())
        out |= {"reference_margin": margin, "near_tie": margin <= NEAR_TIE}
    return out


def parity(preset: str, provider: str, root: Path, steps: int, conversations: int, device: str,
           progress: bool = True) -> dict:
    import torch

    from ..export.exporter import export
    from ..model.synth import synthesize
    from ..model.vl2 import DeepseekVL2
    from ..runtime.api import load
    from ..runtime.processor import Processor
    from .fidelity import artifact_run, compare, prepared_conversations, reference_run, summarize

    ckpt = synthesize(root / preset, preset, seed=0, force=True, progress=False)
    reference = DeepseekVL2.from_checkpoint(ckpt, dtype=torch.float16).to(device)
    inputs = prepared_conversations(Processor.from_dir(ckpt), conversations)
    refs = [reference_run(reference, inp, steps, device=device) for inp in inputs]
    out = {}
    for experts in PARITY_EXPERTS:
        t0 = time.perf_counter()
        art = export(ckpt, root / f"{preset}-{experts}-cuda", experts=experts, block_size=32, target="cuda",
                     force=True, progress=False)
        model = load(art, provider=provider, verify="size")
        per_conv, runs = [], []
        for inp, (tokens, ref_logits, ref_sel) in zip(inputs, refs, strict=True):
            art_logits, art_sel = artifact_run(model.engine, inp, tokens)
            per_conv.append(compare(ref_logits, art_logits, ref_sel, art_sel))
            runs.append(free_running(model, tokens, ref_logits, inp, steps))
        s = summarize(per_conv)
        out[experts] = {"provider": model.provider, "worst_cosine": s["worst_cosine"],
                        "top1_agreement": s["top1_agreement"], "expert_mismatch_mean": s["expert_mismatch_mean"],
                        "greedy": runs,
                        "greedy_ok": all(r["tokens_equal"] or r["near_tie"] for r in runs),
                        "seconds": round(time.perf_counter() - t0, 1)}
        if progress:
            print(f"  {preset} {experts}: worst cosine {s['worst_cosine']:.5f}, top-1 {s['top1_agreement']:.2f}, "
                  f"greedy {'equal' if out[experts]['greedy_ok'] else 'DIFFERENT'} ({model.provider})",
                  file=sys.stderr, flush=True)
        del model
    return out


# --- speed --------------------------------------------------------------------------------------------------------
def speed(model_name: str, provider: str, cache_dir, progress: bool = True) -> dict:
    from .prepare import prepare_artifact, prepare_checkpoint
    from .runtime_bench import bench_runtime
    from .workload import Workload

    ckpt, _ = prepare_checkpoint(model_name, cache_dir=cache_dir, progress=progress)
    t0 = time.perf_counter()
    art = prepare_artifact(ckpt, "int4", target="cuda", cache_dir=cache_dir, progress=progress)
    export_s = time.perf_counter() - t0
    used0 = _device_memory_used(provider)
    w = replace(Workload.quick(), contexts=(512, 2048, 4096))
    rec = bench_runtime(art, None, provider, w, progress=progress)
    used1 = _device_memory_used(provider)
    return {"artifact": str(art), "prepare_s": round(export_s, 1), "runtime": rec,
            "device_memory_used_bytes": None if used0 is None else used1 - used0}


def _device_memory_used(provider: str) -> int | None:
    if provider != "cuda":
        return None
    import torch

    free, total = torch.cuda.mem_get_info()
    return total - free


# --- the whole check ----------------------------------------------------------------------------------------------
def check(provider: str = "cuda", presets=PRESETS, real=("tiny",), steps: int = 8, conversations: int = 3,
          out: str | Path | None = None, cache_dir=None, progress: bool = True, work_dir: str | Path | None = None
          ) -> dict:
    import tempfile

    t0 = time.perf_counter()
    info = preflight(provider)
    device = "cuda" if provider == "cuda" else "cpu"
    doc = {"check": "vl2edge gpu check", "machine": info, "parity": {}, "speed": {}}
    with tempfile.TemporaryDirectory(prefix="vl2edge-gpu-check-", dir=work_dir) as tmp:
        for preset in presets:
            doc["parity"][preset] = parity(preset, provider, Path(tmp), steps, conversations, device, progress)
    for name in real:
        doc["speed"][name] = speed(name, provider, cache_dir, progress)
    doc["ok"] = all(v["greedy_ok"] and v["provider"] == provider for p in doc["parity"].values() for v in p.values())
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_check.json").write_text(json.dumps(doc, indent=1, default=str))
    return doc


def table(doc: dict) -> str:
    lines = [f"gpu check on {doc['machine']['device']} ({doc['machine']['provider']}): "
             f"{'OK' if doc['ok'] else 'FAILED'} in {doc['seconds']} s"]
    for preset, by in doc["parity"].items():
        for experts, r in by.items():
            lines.append(f"  {preset:10} {experts:5} worst cosine {r['worst_cosine']:.5f}  top-1 "
                         f"{r['top1_agreement']:.2f}  greedy {'ok' if r['greedy_ok'] else 'DIFFERENT'}")
    for name, s in doc["speed"].items():
        rt = s["runtime"]
        dec = ", ".join(f"@{d['context']} {d['tokens_per_s']:.1f}" for d in rt.get("decode", []))
        used = s["device_memory_used_bytes"]
        lines.append(f"  {name} int4: decode tok/s {dec}; device memory "
                     f"{'n/a' if used is None else f'{used / 1e9:.2f} GB'}")
    return "\n".join(lines)

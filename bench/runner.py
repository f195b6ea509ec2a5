"""run_bench: the whole suite - prepare the model, measure the machine, each precision and each reference dtype
in its own process, then write the document, the table and the plots.

    from vl2edge.bench import run_bench

    doc = run_bench(model="tiny", precisions=["int4", "int8"], threads=2, out="bench-out")
    print(doc["runtime"]["int4"]["decode"][0]["tokens_per_s"], doc["targets"]["failed"])

The processes run one after another (never two models in memory at once): runtime precisions first, then the
reference dtypes.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from .isolated import run_isolated
from .machine import (bandwidth_summary, load_average, machine_info, measure_bandwidth, memory_available_bytes,
                      memory_total_bytes)
from .prepare import _log, check_precision, prepare_artifact, prepare_checkpoint
from .report import build_document, render_table, write_outputs
from .workload import Workload

QUICK_LAYERS = 2
REFERENCE_DTYPES = ("float32", "bfloat16")


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_bench(model: str = "tiny", precisions=("int4", "int8"), *, threads: int | None = None,
              provider: str = "cpu", out: str | Path | None = None, quick: bool = False, reference: bool = True,
              reference_dtypes=None, layers: int | None = None, block_size: int | None = None,
              workload: Workload | None = None, artifacts: dict | None = None, cache_dir=None,
              force_export: bool = False,
              bandwidth_mb: int = 1024, reference_omp_wait_policy: str | None = "PASSIVE", progress: bool = True,
              in_process: bool = False, command: str | None = None, transient_vision: bool = False,
              low_memory: bool = False, expert_cache: str | None = None) -> dict:
    """Run the suite; returns the document (bench/report.py) and writes it to `out` if given.

    model: a preset name (synthesized and exported on first use, cached under cache_dir / $VL2EDGE_CACHE) or a
    checkpoint directory. quick: the model truncated to QUICK_LAYERS layers (presets) and Workload.quick(), and
    only the fp32 reference unless reference_dtypes says otherwise. artifacts: {precision: path} of existing
    exports to use instead of the cached ones; force_export: export the cached ones again (after an exporter
    change). workload: overrides the full/quick default. in_process: no
    subprocesses (debugging; memory figures then meaningless). transient_vision: the runtime loads the vision
    graph per image and releases it after (Engine option; less resident memory, the load in every vision time).
    low_memory: the runtime is loaded with `low_memory=True` (transient vision, the language model loaded after
    the first images, 256-token prefill chunks). expert_cache: the runtime's `load(expert_cache=...)` (a size or
    "auto"); its hit, prefetch and wait figures land in each runtime record.

    reference_omp_wait_policy: OMP_WAIT_POLICY of the reference's process (None: libgomp's default, threads spin
    in barriers). PASSIVE by default, the counterpart of the runtime's default of no ORT thread spinning: on a
    shared machine a spinning 2-thread OpenMP region waits a scheduler slice for a descheduled thread at every op
    (measured on test-tiny under load ~5: a reference decode step 720 ms with spinning, 9-15 ms passive), which
    would flatter every ratio. An OMP_WAIT_POLICY already in the environment wins.
    """
    precisions = [p.lower() for p in precisions]
    for p in precisions:
        check_precision(p)
    if reference_dtypes is None:
        reference_dtypes = ("float32",) if quick else REFERENCE_DTYPES
    for d in reference_dtypes:
        if d not in REFERENCE_DTYPES:
            raise ValueError(f"reference dtype {d!r}: choose from {REFERENCE_DTYPES}")
    threads = threads or default_threads()
    provider = (provider or "cpu").lower()
    target = "cuda" if provider == "cuda" else "cpu"
    if quick and layers is None and model in ("tiny", "small", "vl2"):
        layers = QUICK_LAYERS
    w = workload or (Workload.quick() if quick else Workload.full())
    mode = "custom" if workload is not None else ("quick" if quick else "full")

    ckpt, model_info = prepare_checkpoint(model, layers, cache_dir=cache_dir, progress=progress)
    config = json.loads((ckpt / "config.json").read_text())
    if block_size is None:  # the exporter's own default, so a small-dims preset benches as it exports
        from ..export.exporter import choose_block_size
        from ..model.config import VL2Config

        block_size, _ = choose_block_size(VL2Config.from_dict(config))
    arts = {}
    for p in precisions:
        given = (artifacts or {}).get(p)
        arts[p] = Path(given) if given else prepare_artifact(ckpt, p, block_size, target, cache_dir, progress,
                                                                 force=force_export)

    _log(progress, f"machine: measuring read bandwidth ({bandwidth_mb} MiB, {threads} threads)")
    machine = machine_info(threads, provider, bandwidth=bandwidth_mb > 0, size_mb=max(bandwidth_mb, 1))

    samples = list(machine["bandwidth"]["samples"]) if bandwidth_mb > 0 else []

    def resample() -> None:  # the machine is shared: probe again between measurements, keep the best
        if bandwidth_mb > 0:
            samples.append(measure_bandwidth(threads, size_mb=bandwidth_mb))
            machine["bandwidth"] = bandwidth_summary(samples)

    runtime, max_len = {}, None
    for p in precisions:
        _log(progress, f"runtime {p}: {arts[p]} ({mode} workload), load average {load_average()}")
        rec = run_isolated("runtime", {"artifact": str(arts[p]), "threads": threads, "provider": provider,
                                       "workload": w.as_dict(), "progress": progress,
                                       "transient_vision": transient_vision, "low_memory": low_memory,
                                       "expert_cache": expert_cache},
                          in_process=in_process)
        runtime[p] = rec
        if "error" in rec:
            _log(progress, f"runtime {p}: FAILED: {rec['error']}")
        else:
            max_len = max_len or rec["max_len"]
        resample()

    ref, skipped = {}, []
    if reference:
        for d in reference_dtypes:
            why = reference_does_not_fit(config, d)
            if why:  # say so instead of letting the OOM killer decide, minutes into a load
                skipped.append(f"reference {d}: {why}")
                _log(progress, f"reference {d}: skipped, {why}")
                continue
            _log(progress, f"reference {d}: {ckpt}, load average {load_average()}")
            env = {} if (reference_omp_wait_policy is None or "OMP_WAIT_POLICY" in os.environ) else \
                {"OMP_WAIT_POLICY": reference_omp_wait_policy}
            rec = run_isolated("reference", {"checkpoint": str(ckpt), "dtype": d, "threads": threads,
                                             "max_len": max_len, "workload": w.as_dict(), "progress": progress},
                               in_process=in_process, env=env)
            ref[d] = rec
            if "error" in rec:
                _log(progress, f"reference {d}: FAILED: {rec['error']}")
            resample()
    machine["load_average_end"] = load_average()

    doc = build_document(command=command or _call_repr(model, precisions, threads, provider, quick, reference),
                         mode=mode, model={**model_info, "checkpoint": str(ckpt)}, config=config, machine=machine,
                         workload=w.as_dict(), runtime=runtime, reference=ref, skipped=skipped)
    if out is not None:
        path = write_outputs(doc, out)
        _log(progress, f"wrote {path} (+ {', '.join(doc['plots'].values()) or 'no plots: matplotlib missing'})")
    return doc


REFERENCE_HEADROOM = 1.25  # weights x this: activations, the cache, the process itself (Tiny fp32: 13.4 GB -> 18-20 GB)


def reference_does_not_fit(config: dict, dtype: str, available: int | None = None) -> str | None:
    """Why the PyTorch reference at `dtype` cannot run here (its weights alone need more than the memory this
    machine has available), or None. The reference materializes every weight (bench/reference_bench.py)."""
    from ..model.checkpoint_layout import parameter_count
    from ..model.config import VL2Config

    need = parameter_count(VL2Config.from_dict(config)) * {"float32": 4, "bfloat16": 2}[dtype] * REFERENCE_HEADROOM
    have = available if available is not None else (memory_available_bytes() or memory_total_bytes() or 0)
    if need <= have:
        return None
    return (f"needs about {need / 1e9:.1f} GB (weights x {REFERENCE_HEADROOM}), this machine has {have / 1e9:.1f} GB "
            f"available")


def _call_repr(model, precisions, threads, provider, quick, reference) -> str:
    return (f"run_bench(model={model!r}, precisions={list(precisions)!r}, threads={threads}, provider={provider!r}, "
            f"quick={quick}, reference={reference})")


def main(args) -> int:
    """`vl2edge bench` (cli.py parses the arguments)."""
    if args.check:
        from .gpu_check import check, table

        doc = check(provider=args.provider, real=("tiny", "small") if args.check_small else ("tiny",),
                    out=args.out or "bench-out", cache_dir=args.cache_dir, progress=not args.quiet)
        print(table(doc))
        return 0 if doc["ok"] else 1
    artifacts = {}
    for item in args.artifact or []:
        prec, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--artifact {item!r}: expected PRECISION=PATH")
        artifacts[prec.lower()] = path
    overrides = {}
    if args.contexts:
        overrides["contexts"] = tuple(int(c) for c in args.contexts.split(","))
    if args.repeats:
        overrides.update(vision_repeats=args.repeats, ttft_repeats=args.repeats, prefill_repeats=args.repeats,
                         decode_repeats=args.repeats)
    if args.decode_steps:
        overrides["decode_steps"] = args.decode_steps
    w = None
    if overrides:
        w = (Workload.quick() if args.quick else Workload.full()).with_(**overrides)
    ref_dtypes = None if args.reference_dtypes is None else tuple(
        {"fp32": "float32", "bf16": "bfloat16"}.get(d, d) for d in args.reference_dtypes.split(","))
    out = args.out or "bench-out"
    precisions = args.precisions or ("int4" if args.quick else "int4,int8")
    doc = run_bench(args.model, precisions.split(","), threads=args.threads, provider=args.provider, out=out,
                    quick=args.quick, reference=not args.no_reference, reference_dtypes=ref_dtypes,
                    layers=args.layers, block_size=args.block_size, workload=w, artifacts=artifacts,
                    cache_dir=args.cache_dir, force_export=args.force_export, bandwidth_mb=args.bandwidth_mb,
                    progress=not args.quiet, transient_vision=args.transient_vision, low_memory=args.low_memory,
                    expert_cache=args.expert_cache, command="vl2edge " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    sys.stdout.write(render_table(doc))
    return 1 if doc["errors"] else 0

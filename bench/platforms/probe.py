"""What one platform (interpreter, machine, onnxruntime) does with a set of artifacts, for bench/platforms/crosscheck.py to
compare with another: torch-free, so it runs on the runtime's own dependencies (an emulated aarch64 Python, a venv
with an older onnxruntime).

  python -m vl2edge.bench.platforms.probe OUT.npz ARTIFACT... [--native NATIVE.npz] [--steps 8] [--cases 0,3]

Per artifact: every graph's session created alone (ok / refused: the schema / no kernel: a CPU wheel without the
op's kernel), then, if all load on CPU, per case (bench/fidelity.py's conversations, text and image):
  without --native: greedy decoding for `steps` tokens; the logits of every step and, per MoE layer, the router
      logits and the experts chosen for every token (prompt and answer);
  with --native (the probe of the platform to compare with): the same prompt, then NATIVE's tokens (teacher
      forcing), with this platform's own routing ("free"), and again with NATIVE's expert choices held ("held": what
      is left is the arithmetic's difference, bench/fidelity.py _HeldRouting), with its router logits.
The installed onnxruntime's floor check (runtime/artifact.check_onnxruntime) is bypassed with --ignore-floor: the
onnxruntime version matrix (bench/platforms/ort_versions.py) measures what the floor should be.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[2]  # the source tree: the `vl2edge` package's root
DEFAULT_STEPS = 8
DEFAULT_CASES = (3, 1)  # a text-only conversation and a one-tile image one (bench/fidelity.CONVERSATIONS)


def source_path(work: Path) -> Path:
    """A directory whose `vl2edge` is a link to the source tree: on another interpreter's PYTHONPATH, the project
    as it is (no build, no install)."""
    d = Path(work) / "src"
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "vl2edge").exists():
        (d / "vl2edge").symlink_to(PROJECT, target_is_directory=True)
    return d


def child_env(pythonpath: str, **extra: str) -> dict[str, str]:
    """This environment without its PYTHON* variables (this venv's), with `pythonpath` and `extra`."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"PYTHONPATH": pythonpath} | extra


def session_status(artifact: Path) -> dict[str, str]:
    """Each graph file of the artifact created as its own CPU session: "ok", or "refused: ..." (onnxruntime does
    not accept the graph: an unknown attribute, a wrong input count) or "no kernel: ..." (accepted, but no CPU
    kernel implements an op: the expected answer of a CPU wheel to a CUDA graph)."""
    import onnxruntime as ort

    from ...runtime.artifact import open_artifact

    out = {}
    for name in open_artifact(artifact, verify="size").graph_files():
        try:
            ort.InferenceSession(str(artifact / name), providers=["CPUExecutionProvider"])
            out[name] = "ok"
        except Exception as e:  # onnxruntime's errors carry the status in the text
            text = " ".join(str(e).split())
            cut = text.find("Error ")  # schema errors: "... , Error Unrecognized attribute: ..."
            why = text[cut + 6:] if cut >= 0 else text
            out[name] = ("no kernel: " if "NOT_IMPLEMENTED" in text else "refused: ") + why[:240]
    return out


class _Recorder:
    """Wraps an Engine's routing: records each MoE layer's router logits and chosen experts, token by token; with
    `held`, routes with those choices instead of its own (weighed with its own router logits)."""

    def __init__(self, engine, held: dict[int, np.ndarray] | None = None):
        self.engine, self.held, self.done = engine, held, {}
        self.logits: dict[int, list[np.ndarray]] = {}
        self.chosen: dict[int, list[np.ndarray]] = {}
        self.original = engine._route

    def __call__(self, i: int, layer, router_logits: np.ndarray):
        from ...contract.routing_feed import expert_graph_inputs
        from ...runtime.dispatch import route, weights_of

        routing = self.engine.routing
        if self.held is None:
            idx, w = route(router_logits, routing, layer.bias)
        else:
            start = self.done.get(i, 0)
            idx = self.held[i][start:start + len(router_logits)]
            self.done[i] = start + len(router_logits)
            w = weights_of(router_logits, idx, routing)
        self.logits.setdefault(i, []).append(np.asarray(router_logits, np.float32))
        self.chosen.setdefault(i, []).append(idx)
        return expert_graph_inputs(idx, w, routing.num_experts, self.engine.io_dtype)


def run_case(engine, inp, steps: int, forced: list[int] | None = None, held: dict[int, np.ndarray] | None = None):
    """(tokens, logits [steps, V], {layer: router logits [N, E]}, {layer: experts [N, k]})."""
    rec = _Recorder(engine, held)
    engine.reset()
    engine._route = rec  # an instance attribute: shadows the method for this run
    try:
        logits = [engine.prefill(engine.embed(inp.input_ids, inp.pixel_values, inp.images_seq_mask,
                                              inp.images_spatial_crop))]
        tokens = [int(np.argmax(logits[-1]))]
        for step in range(steps - 1):
            logits.append(engine.decode(tokens[-1] if forced is None else forced[step]))
            tokens.append(int(np.argmax(logits[-1])))
    finally:
        engine.__dict__.pop("_route", None)
    router = {i: np.concatenate(v) for i, v in rec.logits.items()}
    chosen = {i: np.concatenate(v) for i, v in rec.chosen.items()}
    return (tokens if forced is None else list(forced)), np.stack(logits), router, chosen


def probe(artifacts: list[Path], steps: int, cases: tuple[int, ...], native: dict | None, threads: int | None,
          ignore_floor: bool) -> tuple[dict, dict]:
    import onnxruntime as ort

    from ...runtime import engine as engine_mod
    from ...runtime.processor import Processor
    from ..fidelity import prepared_conversations

    if ignore_floor:
        engine_mod.check_onnxruntime = lambda art, installed: None
    meta = {"machine": platform.machine(), "python": platform.python_version(), "onnxruntime": ort.__version__,
            "steps": steps, "cases": list(cases), "artifacts": {}}
    arrays: dict[str, np.ndarray] = {}
    for art in artifacts:
        name = art.name
        status = session_status(art)
        entry = {"sessions": status}
        meta["artifacts"][name] = entry
        target = json.loads((art / "manifest.json").read_text()).get("target", "cpu")
        if target != "cpu" or any(s != "ok" for s in status.values()):
            continue  # a CUDA graph or one this onnxruntime refuses: sessions only
        try:
            # the two graphs per layer: the recorder replaces the numpy routing between them
            engine = engine_mod.Engine(art, threads=threads, verify="size", fused_layers=False)
        except Exception as e:  # noqa: BLE001 - recorded, the other artifacts go on
            entry["engine_error"] = f"{type(e).__name__}: {e}"
            continue
        convs = prepared_conversations(Processor.from_dir(art), max(cases) + 1)
        try:
            _probe_cases(engine, name, convs, cases, steps, native, arrays)
        except Exception as e:  # noqa: BLE001 - a kernel that accepts the graph and fails when run
            entry["run_error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        del engine
    return meta, arrays


def _probe_cases(engine, name: str, convs, cases, steps: int, native: dict | None, arrays: dict) -> None:
    """Each case's runs into `arrays` (the module docstring)."""
    for c in cases:
        key = f"{name}/{c}"
        forced = held = None
        if native is not None:
            forced = [int(t) for t in native[f"{key}/tokens"]]
            held = {int(k.rsplit("/", 1)[1]): native[k] for k in native if k.startswith(f"{key}/chosen/")}
        tokens, logits, router, chosen = run_case(engine, convs[c], steps, forced)
        arrays[f"{key}/tokens"] = np.array(tokens, np.int64)
        arrays[f"{key}/logits"] = logits
        for i in router:
            arrays[f"{key}/router/{i}"], arrays[f"{key}/chosen/{i}"] = router[i], chosen[i]
        if held:
            _, arrays[f"{key}/held_logits"], router, _ = run_case(engine, convs[c], steps, forced, held)
            for i in router:
                arrays[f"{key}/held_router/{i}"] = router[i]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vl2edge.bench.platforms.probe", description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="the .npz to write (its meta as JSON beside it, OUT.json)")
    ap.add_argument("artifacts", type=Path, nargs="+")
    ap.add_argument("--native", type=Path, default=None, help="the probe of the platform to compare with")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--cases", default=",".join(map(str, DEFAULT_CASES)))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ignore-floor", action="store_true", help="load artifacts whatever their onnxruntime.min")
    args = ap.parse_args(argv)
    native = dict(np.load(args.native)) if args.native else None
    meta, arrays = probe(args.artifacts, args.steps, tuple(int(c) for c in args.cases.split(",")), native,
                         args.threads, args.ignore_floor)
    np.savez(args.out, **arrays)
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{args.out}: {len(arrays)} arrays, onnxruntime {meta['onnxruntime']} on {meta['machine']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

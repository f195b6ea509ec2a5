"""vl2edge.bench: latency and memory benchmarks of the runtime against the PyTorch reference (`vl2edge bench`).

    from vl2edge.bench import run_bench
    doc = run_bench(model="tiny", precisions=["int4", "int8"], threads=2, out="bench-out")

One idea per module:
  workload.py        what is measured, how often (full / quick / tiny)
  machine.py         CPU, cores, versions, load average, measured memory read bandwidth
  roofline.py        bytes read per decoded token -> the best decode rate the bandwidth allows
  step_bytes.py      the same bytes counted from the files: an artifact's initializers, a GGUF's tensors
  runtime_bench.py   the workload on the ONNX runtime (one artifact)
  reference_bench.py the workload on the PyTorch reference (fp32 / bf16, eager)
  memory.py          RSS / peak RSS from /proc; a probe of ORT session options' effect on memory
  isolated.py        each measurement in a fresh process (clean peak RSS)
  prepare.py         the model: synthesize a preset / take a checkpoint directory, export per precision, cached
  targets.py         the issue's targets, pass/fail with the numbers
  report.py          the JSON document (schema), the table, the PNG plots
  runner.py          run_bench and the CLI entry
  profile.py         ORT's profiler over a decode step (or a prefill chunk): time per op and graph
  gpu_check.py       `vl2edge bench --provider cuda --check`: a GPU's parity and speed in one command
Beside the product bench: fidelity.py (logits against the reference, per stage; the precision policy), heldout.py
(the defaults on held-out checkpoints), peer.py (llama.cpp's llama-bench in the same run, bytes per token and the
read ceilings beside it); platforms/ (other
onnxruntime releases, aarch64) and probes/ (single-graph timings, server overhead). README.md: how to run, what is
measured, how to read it.
"""


def run_bench(*args, **kwargs):
    """See bench/runner.py (imported on first use: `import vl2edge.bench` stays light)."""
    from .runner import run_bench as _run

    return _run(*args, **kwargs)


__all__ = ["run_bench"]

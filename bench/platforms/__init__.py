"""The runtime on other platforms and onnxruntime releases, checked against the pinned one on x86-64:

  probe         the child process: one artifact's teacher-forced logits and router logits under this interpreter
  crosscheck    the bound two probes must meet (cosine, max error, near-ties named)
  aarch64       the runtime under qemu aarch64 (../shared/tools/arm64-env) against x86-64
  ort_versions  every artifact kind under PyPI's onnxruntime wheels in throwaway venvs; --speed per release

docs/benchmarks.md, "onnxruntime releases and platforms", has the table they produce; README "What runs where"
the summary.
"""

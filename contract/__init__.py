"""The artifact format as code: what the exporter writes and the runtime (or any other program) reads.

  manifest.py      FORMAT, FORMAT_VERSION and the versions a runtime reads; the manifest's fields; file hashes
  ort_compat.py    which onnxruntime release has which op, input and attribute; an artifact's floor
  cache.py         the per-layer KV / latent cache buffers and how a step binds them in place
  routing_feed.py  how the runtime's routing is fed to the expert graphs (router_probs / router_weights)

Below export/ (which writes the format) and runtime/ (which reads it); numpy and onnxruntime only, no torch, no
onnx. docs/artifact-format.md is the same contract in prose, for programs not written in Python.
"""

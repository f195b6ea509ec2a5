"""One-off probes that answer a maintainer's question about one graph or one layer, outside `vl2edge bench`:

  attention_layer_latency  one attention graph's decode latency at real dims, per cache form (docs/design.md)
  vision_tile_latency      the vision graph per 384x384 tile against the PyTorch tower, and the attention op choice
  server_overhead          `vl2edge serve` against the Python API on the same requests (docs/benchmarks.md)
  head_screen              how many lm_head rows a 4-bit screen of the int8 head must recompute to prove the greedy
                           token, with a certain and an 8-sigma bound (docs/precision.md)

Each is `python -m vl2edge.bench.probes.NAME --help`.
"""

"""vl2edge.runtime: the torch-free runtime (numpy, Pillow, tokenizers, onnxruntime only).

Input side, in the order data flows:
  frames           - numpy frames (RGB, or BGR when said: Frame) checked and copied into images
  images           - open any Pillow-readable image or numpy frame robustly (ImageError on bad input)
  image_processor  - DeepSeek-VL2 dynamic tiling: best grid, pad, global + local 384 tiles, token counts
  chat_template    - the `deepseek` conversation template as text pieces and image slots
  processor        - Processor: messages + images -> PreparedInputs (ids, pixels, masks)
  grounding        - parse <|ref|>/<|det|> boxes (incrementally), draw them, build grounding prompts

Model side:
  artifact, engine - open and verify an exported artifact; ORT sessions, KV cache, one forward step at a time
  dispatch         - top-k expert selection and weights per routing variant; expert counts
  sampling         - greedy / temperature / top-k / top-p / repetition penalty, seeded (numpy)
  detokenizer      - incremental detokenization that never emits a broken character
  generation       - Runner/Stream: chunked prefill, decode, stop strings, cancellation, KV-cache reuse, Result
  api              - load(path) -> Model: generate / chat / ground / watch (also `vl2edge.load`)

The perception loop (Model.watch), in the order frames flow:
  frame_sources    - video files, HTTP / RTSP streams, V4L2 cameras (PyAV), image directories, iterables
  frame_reader     - the reader thread: latest frame wins (or every frame), drops counted
  watch            - Watch: one answer per frame, latency from the frame's decode, the loop's summary
  overlay_writer   - answered frames with their boxes, as a video or PNGs

The HTTP server is an application of this package, not part of it: vl2edge.serve. What an application may import
is listed in vl2edge/__init__.py.

Nothing here may import torch, directly or indirectly (tests/test_runtime_without_torch.py checks it).
Submodules are imported on demand; `from vl2edge.runtime.processor import Processor`.
"""

"""vl2edge.serve: `vl2edge serve`, the runtime behind a local OpenAI-compatible HTTP API (the [server] extra:
starlette + uvicorn).

  openai_request  - an OpenAI chat-completions body -> messages and options, or an ApiError
  media_files     - file:// image URLs, only inside the directories the server was started with
  metrics         - counters and latency quantiles in the Prometheus text format
  server          - the ASGI app: one model thread, bounded queue, SSE streaming, cancel on disconnect

An application of the runtime: it imports only vl2edge's documented surface (vl2edge/__init__.py: load, Model,
Stream, Result, Box, GroundingParser, the input errors), never the engine (tests/test_layering.py checks it).
"""

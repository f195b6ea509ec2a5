"""What `vl2edge serve` adds to a request, against the Python API on the same requests: TTFT and time per token.

    python -m vl2edge.bench.probes.server_overhead ARTIFACT [--requests 16] [--max-tokens 32] [--image] [--threads N]
                                                     [--json OUT]

The server is the `vl2edge serve` command in a subprocess (what users run); the Python API is `vl2edge.load` in
this process, on the same artifact with the same threads. Requests go in pairs, API then server or server then
API (alternating, so neither always runs second), the same prompt within a pair and a new prompt per pair: both
models see the same history, so both reuse the same cached prefix and prefill the same tokens. The client is raw
HTTP (http.client, reading the event stream line by line): what is measured is the server, not a client library.

Timed from the caller's side, streaming, to the end of the answer, with the answer's length fixed:
  ttft       a request for 1 token on a new prompt: its whole prefill and first token (and, on the server,
             parsing, queueing, the event stream's first and last chunks)
  per token  the same prompt again for N + 1 tokens, divided by its tokens: all but the prompt's last token come
             from the cache, so it is N + 1 single-token steps (and, on the server, a chunk per text delta)
Random-weight models often emit tokens that decode to no text; the server sends a chunk only for text, so `chunks`
says how many were sent (a real model sends about one per token).

Overhead = server median - API median, per figure. Each figure is a median over the pairs, with p10/p90.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from ..stats import summarize

PROMPTS = ("Describe the scene in detail.", "What objects are on the table?", "Write a short poem about robots.",
           "List five colours and what they remind you of.", "Explain how a bicycle works.",
           "What is the capital of France, and why?", "Count from one to twenty.", "Tell me about the weather.")


def _image_png() -> bytes:
    from ...reference_backend import demo_image

    buf = io.BytesIO()
    demo_image().save(buf, "PNG")
    return buf.getvalue()


def _api_request(model, prompt: str, image: bytes | None, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    chunks = 0
    stream = model.stream(prompt, [image] if image else None, max_new_tokens=max_tokens)
    for _ in stream:
        chunks += 1
    return {"s": time.perf_counter() - t0, "tokens": len(stream.result.token_ids), "chunks": chunks,
            "text": stream.result.text}


def _server_request(port: int, model_id: str, prompt: str, image: bytes | None, max_tokens: int) -> dict:
    content: object = prompt
    if image:
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]
    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": content}],
                       "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"the server answered {resp.status}: {resp.read()[:300]!r}")
        text, completion, chunks = [], 0, 0
        while True:
            line = resp.readline()
            if not line or line.strip() == b"data: [DONE]":
                break
            if not line.startswith(b"data: "):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                completion = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    chunks += 1
                    text.append(choice["delta"]["content"])
        seconds = time.perf_counter() - t0
    finally:
        conn.close()
    return {"s": seconds, "tokens": completion, "chunks": chunks, "text": "".join(text)}


def start_server(artifact: Path, threads: int | None, model_id: str) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "vl2edge.cli", "serve", str(artifact), "--port", "0", "--log-level", "warning",
           "--model-name", model_id]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    m = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"`vl2edge serve` did not start: {line.strip()} {proc.stderr.read()[-500:]}")
    return proc, int(m.group(1))


def measure(artifact: str | Path, requests: int = 16, max_tokens: int = 32, image: bool = False,
            threads: int | None = None, progress: bool = True) -> dict:
    import vl2edge

    from ..machine import machine_info

    artifact = Path(artifact)
    model = vl2edge.load(artifact, threads=threads, verify="size")
    proc, port = start_server(artifact, threads, "bench")
    png = _image_png() if image else None
    rows: dict[str, list[dict]] = {"api": [], "server": []}
    same_text = 0

    def ask(who: str, prompt: str, n: int) -> dict:
        return (_api_request(model, prompt, png, n) if who == "api"
                else _server_request(port, "bench", prompt, png, n))

    try:
        for who in ("server", "api"):  # first-request costs (allocations, page faults) out of the figures
            ask(who, "Warm up.", 4)
        for i in range(requests):
            prompt = f"{PROMPTS[i % len(PROMPTS)]} (request {i})"
            order = ("api", "server") if i % 2 == 0 else ("server", "api")
            got = {}
            for who in order:
                short = ask(who, prompt, 1)  # a new prompt: its whole prefill and the first token
                long = ask(who, prompt, max_tokens + 1)  # the same again: all but its last token cached
                got[who] = {"ttft_s": short["s"], "long_s": long["s"], "tokens": long["tokens"],
                            "chunks": long["chunks"], "text": long["text"],
                            "per_token_s": long["s"] / long["tokens"]}
                rows[who].append(got[who])
            same_text += got["api"]["text"] == got["server"]["text"]
            if progress:
                print(f"  pair {i + 1}/{requests}: 1 token api {got['api']['ttft_s'] * 1e3:.1f} ms, server "
                      f"{got['server']['ttft_s'] * 1e3:.1f} ms; {max_tokens + 1} tokens api "
                      f"{got['api']['long_s']:.3f} s, server {got['server']['long_s']:.3f} s", file=sys.stderr,
                      flush=True)
    finally:
        proc.terminate()
        proc.wait(60)

    doc = {"artifact": str(artifact), "requests": requests, "max_tokens": max_tokens + 1, "image": image,
           "threads": threads, "machine": machine_info(threads, bandwidth=False), "same_text": same_text}
    for key in ("tokens", "chunks"):
        doc[key] = {who: summarize(r[key] for r in rows[who]) for who in rows}
    for key in ("ttft_s", "per_token_s"):
        api, server = summarize(r[key] for r in rows["api"]), summarize(r[key] for r in rows["server"])
        doc[key] = {"api": api, "server": server, "overhead_s": server["median"] - api["median"],
                    "ratio": server["median"] / api["median"]}
    return doc


def table(doc: dict) -> str:
    lines = [f"{'':10} {'API median':>12} {'server median':>14} {'overhead':>10} {'ratio':>7}"]
    for key, name in (("ttft_s", "TTFT"), ("per_token_s", "per token")):
        d = doc[key]
        lines.append(f"{name:10} {d['api']['median'] * 1e3:10.2f} ms {d['server']['median'] * 1e3:12.2f} ms "
                     f"{d['overhead_s'] * 1e3:7.2f} ms {d['ratio']:7.3f}")
    lines.append(f"{doc['same_text']}/{doc['requests']} pairs gave the same text; median "
                 f"{doc['tokens']['server']['median']:.0f} tokens and {doc['chunks']['server']['median']:.0f} text "
                 f"chunks per long request")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vl2edge.bench.probes.server_overhead", description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--requests", type=int, default=16, help="request pairs (default 16)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--image", action="store_true", help="each request carries the demo's 640x480 image")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, metavar="OUT", help="write the JSON document here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    doc = measure(args.artifact, args.requests, args.max_tokens, args.image, args.threads, not args.quiet)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())

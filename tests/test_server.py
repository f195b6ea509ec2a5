"""`vl2edge serve`: the OpenAI-compatible server, through real clients (the `openai` package and raw HTTP).

The server runs in this process (uvicorn on a thread, port 0) over a test-tiny INT4 artifact, except the RSS test,
which starts the `vl2edge serve` command. Tests that need the model to be busy or slow at a known point hold it
there with an Event (a job in the queue, or a decode step that waits), never with a sleep: nothing here depends
on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from openai import OpenAI
from PIL import Image

import vl2edge
from vl2edge.export.exporter import export
from vl2edge.runtime.generation import Result
from vl2edge.runtime.grounding import parse_grounding
from vl2edge.serve.media_files import allowed_dirs
from vl2edge.serve.openai_request import ApiError, ImagePolicy, parse_chat_request
from vl2edge.serve.server import ChatServer, Job, ServeConfigError, ServerOptions, check_exposure

MODEL_ID = "test-tiny-int4"
MAX_PIXELS = 1_000_000


# --- fixtures and helpers ---------------------------------------------------------------------------------------
class Running:
    """A ChatServer on uvicorn in a background thread, on a free port."""

    def __init__(self, model, **options):
        self.chat = ChatServer(model, ServerOptions(model_id=MODEL_ID, **options))
        config = uvicorn.Config(self.chat.app(), host="127.0.0.1", port=0, log_level="warning")
        started = threading.Event()

        class Server(uvicorn.Server):  # says when its sockets listen (uvicorn itself only sets a flag)
            async def startup(self, sockets=None):
                await super().startup(sockets)
                started.set()

        self.uvicorn = Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        assert started.wait(60) and self.uvicorn.started, "the server did not start"
        self.port = self.uvicorn.servers[0].sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"

    def client(self, **kw) -> OpenAI:
        return OpenAI(base_url=self.base + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)


def request(port: int, method: str, path: str, body=None, headers: dict | None = None):
    """Raw HTTP: (status, headers, parsed JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        ctype = resp.getheader("Content-Type", "")
        return resp.status, dict(resp.getheaders()), json.loads(raw) if "json" in ctype else raw.decode()
    finally:
        conn.close()


def chat_body(content, max_tokens=8, **kw):
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **kw}


def png_bytes(size=(300, 200), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def artifact(test_checkpoints, tmp_path_factory):
    return export(test_checkpoints["test-tiny"], tmp_path_factory.mktemp("serve") / "tiny-int4", experts="int4",
                  block_size=32, progress=False)


@pytest.fixture(scope="module")
def reference(artifact):
    """The Python API on the same artifact: what the server must answer."""
    return vl2edge.load(artifact, threads=1)


@pytest.fixture(scope="module")
def served(artifact, tmp_path_factory):
    """The server, with one allowed media directory (`served.media`) for file:// URLs."""
    model = vl2edge.load(artifact, threads=1)
    model.processor.image_options["max_pixels"] = MAX_PIXELS
    media = tmp_path_factory.mktemp("media")
    server = Running(model, max_queue=8, max_images=3, max_body_bytes=4 * 2 ** 20, allowed_media_dirs=(str(media),))
    server.media = media
    yield server
    server.stop()


# --- answers ----------------------------------------------------------------------------------------------------
def test_openai_client_answers_equal_model_generate(served, reference):
    client = served.client()
    image = png_bytes((300, 200), 1)
    messages = [{"role": "system", "content": "You are a careful robot."},
                {"role": "user", "content": [{"type": "text", "text": "What is on the table?"},
                                             {"type": "image_url", "image_url": {"url": data_url(image)}}]}]
    expected = reference.generate(
        [messages[0], {"role": "user", "content": "<image>\nWhat is on the table?", "images": [image]}],
        max_new_tokens=12, reuse_cache=False)

    r = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == expected.text and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == len(expected.token_ids)
    assert r.usage.prompt_tokens == expected.prompt_tokens
    assert r.choices[0].finish_reason == {"eos": "stop", "max_new_tokens": "length"}[expected.stop_reason]
    extra = r.model_extra["vl2edge"]
    assert extra["stop_reason"] == expected.stop_reason
    assert extra["grounding"]["images"] == [{"width": 300, "height": 200}]
    assert extra["timings"]["vision_tiles"] > 0 and extra["timings"]["ttft_s"] > 0

    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)
    # the same prompt again: everything but its last token comes from the KV cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == expected.prompt_tokens - 1


def test_a_resent_conversation_prefills_only_the_new_turn(served, reference):
    client = served.client()
    image = png_bytes((200, 300), 2)
    turn1 = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                          {"type": "text", "text": "Describe it."}]}]
    r1 = client.chat.completions.create(model=MODEL_ID, messages=turn1, max_tokens=6)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And the colours?"}]
    r2 = client.chat.completions.create(model=MODEL_ID, messages=turn2, max_tokens=6)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens
    assert r2.model_extra["vl2edge"]["timings"]["prefill_tokens"] == r2.usage.prompt_tokens - cached
    assert r2.model_extra["vl2edge"]["timings"]["vision_tiles"] == 0
    expected = reference.generate(
        [{"role": "user", "content": "<image>\nDescribe it.", "images": [image]},
         {"role": "assistant", "content": r1.choices[0].message.content},
         {"role": "user", "content": "And the colours?"}], max_new_tokens=6, reuse_cache=False)
    assert r2.choices[0].message.content == expected.text


def test_a_file_url_is_the_same_image_as_a_data_url(served):
    path = served.media / "scene one.png"
    path.write_bytes(png_bytes((320, 240), 3))
    answers = []
    for url in (data_url(path.read_bytes()), path.as_uri()):
        status, _, body = request(served.port, "POST", "/v1/chat/completions", chat_body(
            [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Read it."}]))
        assert status == 200, body
        answers.append((body["choices"][0]["message"]["content"], body["usage"]["prompt_tokens"]))
    assert answers[0] == answers[1]


class ScriptedModel:
    """Stands in for Model: streams fixed text (grounding tags included), to check how the server maps it."""

    def __init__(self, deltas, image_size):
        self.deltas, self.image_size, self.max_len, self.provider = deltas, image_size, 4096, "cpu"
        self.engine = type("E", (), {"artifact": type("A", (), {"dir": Path("scripted")})})()

    def stream(self, messages, chunk_size=512, **options):
        model = self

        class Stream:
            inputs = type("I", (), {"image_sizes": (model.image_size,)})()
            result = None

            def __iter__(self):
                for d in model.deltas:
                    if isinstance(d, Exception):
                        raise d
                    yield d
                text = "".join(model.deltas)
                self.result = Result(text=text, token_ids=list(range(len(model.deltas))), stop_reason="eos",
                                     prompt_tokens=10, cached_tokens=0, image_sizes=(model.image_size,),
                                     grounding=parse_grounding(text, model.image_size), timings={"ttft_s": 0.01})

            def cancel(self):
                pass

        return Stream()


def test_grounding_boxes_arrive_in_pixels_as_soon_as_they_close():
    deltas = ["<|ref|>", "the mug", "<|/ref|>", "<|det|>", "[[", "100, 0, ", "999, 499", "]]", "<|/det|>", " done"]
    server = Running(ScriptedModel(deltas, (640, 480)))
    try:
        client = server.client()
        msg = [{"role": "user", "content": "<|ref|>the mug<|/ref|>."}]
        chunks = list(client.chat.completions.create(model=MODEL_ID, messages=msg, stream=True))
        with_boxes = [i for i, c in enumerate(chunks) if (c.model_extra.get("vl2edge") or {}).get("boxes")]
        box_chunk = chunks[with_boxes[0]]
        assert box_chunk.choices[0].delta.content.endswith("]") and len(with_boxes) == 1
        (box,) = box_chunk.model_extra["vl2edge"]["boxes"]
        assert box["label"] == "the mug" and box["coords"] == [100, 0, 999, 499]
        assert box["xyxy"] == [round(100 / 999 * 640, 2), 0.0, 640.0, round(499 / 999 * 480, 2)]
        final = chunks[-1].model_extra["vl2edge"]
        assert final["grounding"]["boxes"] == [box] and final["grounding"]["image_index"] == 0
        r = client.chat.completions.create(model=MODEL_ID, messages=msg)
        assert r.model_extra["vl2edge"]["grounding"]["boxes"] == [box]
        assert r.choices[0].finish_reason == "stop"
    finally:
        server.stop()


def test_a_failure_mid_stream_ends_the_stream_with_an_error_event_and_the_server_goes_on():
    server = Running(ScriptedModel(["Hello", RuntimeError("the accelerator fell off")], (64, 64)))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps(chat_body("hi", stream=True)),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        events = [line[6:] for line in resp.read().decode().split("\n\n") if line.startswith("data: ")]
        conn.close()
        assert resp.status == 200 and events[-1] == "[DONE]"
        assert json.loads(events[1])["choices"][0]["delta"]["content"] == "Hello"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and "fell off" in error["message"]
        status, _, body = request(server.port, "POST", "/v1/chat/completions", chat_body("hi"))
        assert status == 500 and "Traceback" not in body["error"]["message"]
        assert request(server.port, "GET", "/health")[0] == 200
    finally:
        server.stop()


# --- errors -----------------------------------------------------------------------------------------------------
BIG_IMAGE = io.BytesIO()
Image.new("RGB", (1200, 1000), (200, 30, 30)).save(BIG_IMAGE, "PNG")
BAD_REQUESTS = {
    "not json": (b"{bad", 400, None),
    "empty body": (b"", 400, None),
    "not an object": ([1, 2], 400, None),
    "no messages": ({"model": MODEL_ID}, 400, "messages"),
    "messages not a list": ({"messages": "hi"}, 400, "messages"),
    "content of the wrong type": ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    "unknown role": ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    "temperature a string": (chat_body("hi", temperature="hot"), 400, "temperature"),
    "temperature out of range": (chat_body("hi", temperature=3), 400, "temperature"),
    "max_tokens zero": (chat_body("hi", max_tokens=0), 400, "max_tokens"),
    "stream not a bool": (chat_body("hi", stream="yes"), 400, "stream"),
    "n of two": (chat_body("hi", n=2), 400, "n"),
    "stop of the wrong type": (chat_body("hi", stop=[1]), 400, "stop"),
    "http image": (chat_body([{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]), 400,
                   "messages[0].content[0].image_url"),
    "bad base64": (chat_body([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]), 400,
                   "messages[0].content[0].image_url"),
    "not an image": (chat_body([{"type": "image_url", "image_url": {"url": data_url(b"hello world")}}]), 400,
                     "messages"),
    "too many pixels": (chat_body([{"type": "image_url", "image_url": {"url": data_url(BIG_IMAGE.getvalue())}}]),
                        400, "messages"),
    "too many images": (chat_body([{"type": "image_url", "image_url": {"url": data_url(png_bytes((40, 40)))}}] * 4),
                        400, "messages"),
    "image in an assistant turn": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes((40, 40)))}}]}]}, 400, "messages[1].content[0]"),
    "tags without images": (chat_body("<image>\n<image>\nCompare."), 400, "messages"),
    "prompt longer than the context": (chat_body("word " * 5000), 400, "messages"),
    "unknown model": (chat_body("hi", model="gpt-4o"), 404, "model"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_their_status_and_a_json_error(served, case):
    body, status, param = BAD_REQUESTS[case]
    got, headers, answer = request(served.port, "POST", "/v1/chat/completions", body)
    assert got == status, answer
    err = answer["error"]
    assert isinstance(err["message"], str) and err["message"] and "Traceback" not in err["message"]
    assert err["type"] and err["param"] == param
    if case == "prompt longer than the context":
        assert err["code"] == "context_length_exceeded" and "tokens too many" in err["message"]
    if case == "too many pixels":
        assert "exceeds the limit" in err["message"] and err["code"] == "invalid_image"


def test_a_body_over_the_limit_is_refused_before_it_is_read(served):
    import socket

    with socket.create_connection(("127.0.0.1", served.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n{" % (5 * 2 ** 20))
        head, _, body = sock.makefile("rb").read().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and json.loads(body)["error"]["code"] == "body_too_large"
    chunked = (b'{"messages": "' + b"x" * (4 * 2 ** 20) + b'"}')  # no Content-Length: counted as it arrives
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", body=iter([chunked[:1000], chunked[1000:]]),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "body_too_large"
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may close before the client has sent everything; it answered and is still up
    finally:
        conn.close()
    assert request(served.port, "GET", "/health")[0] == 200


def test_routes_methods_and_the_server_survives_bad_input(served):
    assert request(served.port, "GET", "/nope")[0] == 404
    status, _, body = request(served.port, "GET", "/v1/chat/completions")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    status, _, body = request(served.port, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == [MODEL_ID]
    assert body["data"][0]["vl2edge"]["context"] == 4096
    assert request(served.port, "GET", f"/v1/models/{MODEL_ID}")[0] == 200
    assert request(served.port, "GET", "/v1/models/other")[0] == 404
    for body in BAD_REQUESTS.values():
        request(served.port, "POST", "/v1/chat/completions", body[0])
    assert request(served.port, "GET", "/health")[2]["status"] == "ok"
    status, _, answer = request(served.port, "POST", "/v1/chat/completions", chat_body("Still there?"))
    assert status == 200 and answer["choices"][0]["finish_reason"] in ("stop", "length")


def test_file_urls_are_refused_without_an_allowed_media_dir():
    body = chat_body([{"type": "image_url", "image_url": {"url": Path(__file__).resolve().as_uri()}}])
    with pytest.raises(ApiError, match="started without --allowed-media-dir"):
        parse_chat_request(body, ImagePolicy())


@pytest.fixture
def media_tree(tmp_path):
    """An allowed dir with an image, a symlink out, a FIFO and a subdirectory; a secret file beside it."""
    import os

    allowed, secret = tmp_path / "allowed", tmp_path / "secret.txt"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "img.png").write_bytes(png_bytes((40, 30)))
    secret.write_text("TOP-SECRET-CONTENT")
    (allowed / "link_out").symlink_to(secret)
    (allowed / "link_in").symlink_to(allowed / "img.png")
    os.mkfifo(allowed / "fifo")
    return allowed, secret


def test_a_file_url_is_read_only_inside_the_allowed_dirs(media_tree):
    allowed, secret = media_tree
    policy = ImagePolicy(allowed_media_dirs=allowed_dirs([allowed]))
    part = lambda url: chat_body([{"type": "image_url", "image_url": {"url": url}}])  # noqa: E731
    ok = [f"file://{allowed}/img.png", f"file://localhost{allowed}/img.png", f"file://{allowed}//sub/../img.png",
          f"file://{allowed}/link_in", f"file://{allowed}%2Fimg%2Epng", f"file://{allowed}/sub/%2E%2E/img.png"]
    for url in ok:
        assert parse_chat_request(part(url), policy).messages[0]["images"] == [(allowed / "img.png").read_bytes()]
    refused = [f"file://{secret}", f"file://{allowed}/../secret.txt", f"file://{allowed}/%2e%2e/secret.txt",
               f"file://{allowed}/link_out", f"file://{allowed}/fifo", f"file://{allowed}/sub",
               f"file://{allowed}/missing.png", f"file://{secret.parent}/no-such-file", "file:///etc/passwd",
               f"file://otherhost{allowed}/img.png", f"file://{allowed}/img.png%00.txt", "file:relative/img.png",
               f"file://{allowed}"]
    messages = set()
    for url in refused:
        with pytest.raises(ApiError) as e:
            parse_chat_request(part(url), policy)
        assert e.value.status == 400 and str(secret.parent) not in str(e.value.body())
        messages.add(e.value.body()["error"]["message"])
    assert len(messages) == 1, messages  # existing or not, outside or a symlink out: one answer


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "::ffff:127.0.0.1"])
def test_loopback_needs_no_key(host):
    check_exposure(host, ServerOptions(model_id="m"))


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.4.1", "10.0.0.2", "::", "fe80::1", "robot.local"])
def test_outside_loopback_a_key_or_no_auth_is_required(host):
    with pytest.raises(ServeConfigError, match=f"listening on {re.escape(host)} .*--api-key.*--no-auth"):
        check_exposure(host, ServerOptions(model_id="m"))
    check_exposure(host, ServerOptions(model_id="m", api_key="k"))
    check_exposure(host, ServerOptions(model_id="m", no_auth=True))


def test_serve_refuses_the_same_in_python():
    from vl2edge.serve.server import serve

    with pytest.raises(ServeConfigError, match="listening on 0.0.0.0 .*needs --api-key"):
        serve(None, ServerOptions(model_id="m"), host="0.0.0.0", port=0)  # before any model or socket is touched


def test_the_serve_command_refuses_an_exposed_address_without_a_key(artifact, tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "VL2EDGE_API_KEY"}
    for args, what in (([], "needs --api-key KEY"), (["--allowed-media-dir", str(tmp_path / "none")],
                                                    "not a directory")):
        r = subprocess.run([sys.executable, "-m", "vl2edge.cli", "serve", str(artifact), "--host", "0.0.0.0",
                            "--port", "0", *args, *(["--api-key", "k"] if args else [])], capture_output=True,
                           text=True, timeout=120, env=env)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
        assert what in r.stderr


def test_no_answer_shows_a_server_path(served, artifact):
    for path in ("/v1/models", f"/v1/models/{MODEL_ID}"):
        status, _, body = request(served.port, "GET", path)
        assert status == 200 and str(artifact) not in json.dumps(body) and str(artifact.parent) not in json.dumps(body)


def test_request_fields_map_to_the_runtime():
    req = parse_chat_request({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "image_url", "image_url": "data:"
                                      "image/png;base64," + base64.b64encode(b"x").decode()},
                                     {"type": "text", "text": "second"}]},
        {"role": "user", "content": [{"type": "text", "text": "A <image> then"},
                                     {"type": "image_url", "image_url": {"url": data_url(b"y")}}]}],
        "max_completion_tokens": 7, "top_p": 0.5, "seed": 3, "stop": "END", "top_k": -1,
        "repetition_penalty": 1.1, "presence_penalty": 0})
    assert req.messages[0] == {"role": "system", "content": "Be brief."}
    assert req.messages[1] == {"role": "user", "content": "<image>\nfirst\nsecond", "images": [b"x"]}
    assert req.messages[2]["content"] == "A <image> then"  # the user's own tag placement is kept
    assert req.options == {"max_new_tokens": 7, "temperature": 0.0, "top_p": 0.5, "top_k": 0,
                           "repetition_penalty": 1.1, "seed": 3, "stop": ["END"]}
    assert req.num_images == 2 and not req.stream


def test_an_api_key_is_required_when_set(reference):
    server = Running(reference, api_key="s3cret")
    try:
        assert request(server.port, "GET", "/health")[0] == 200  # liveness stays open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, hdrs, body = request(server.port, "POST", "/v1/chat/completions", chat_body("hi"), headers)
            assert status == 401 and body["error"]["code"] == "invalid_api_key" and hdrs["www-authenticate"]
            assert request(server.port, "GET", "/metrics", headers=headers)[0] == 401
        r = server.client(api_key="s3cret").chat.completions.create(model=MODEL_ID, messages=[
            {"role": "user", "content": "hi"}], max_tokens=2)
        assert r.usage.completion_tokens >= 1
    finally:
        server.stop()


# --- one at a time: the queue, disconnects ----------------------------------------------------------------------
def test_a_full_queue_refuses_with_429_and_every_request_is_answered(served):
    chat = served.chat
    before = dict(chat.metrics.requests)
    gate, holding = threading.Event(), threading.Event()

    def hold(job):
        holding.set()
        gate.wait(120)

    blocker = Job(hold, asyncio.new_event_loop())  # nobody listens to its events
    chat.scheduler.submit(blocker)
    assert holding.wait(60)
    results: list = [None] * 50
    answered, lock, refused_all = [0], threading.Lock(), threading.Event()

    def send(i):
        results[i] = request(served.port, "POST", "/v1/chat/completions", chat_body(f"Question {i}?", max_tokens=3))
        with lock:
            answered[0] += 1
            if answered[0] == 42:
                refused_all.set()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    # The model is held, so nothing can be answered but a refusal, and a refusal needs a full queue, which cannot
    # drain: once 42 answers are in, exactly 8 wait, whatever the timing.
    assert refused_all.wait(120), sum(r is not None for r in results)
    assert chat.scheduler.depth() == 8 and sorted(r[0] for r in results if r is not None) == [429] * 42
    gate.set()
    for t in threads:
        t.join(120)
    statuses = sorted(r[0] for r in results)
    assert statuses == [200] * 8 + [429] * 42
    for status, headers, body in results:
        if status == 429:
            assert int(headers["retry-after"]) >= 1 and body["error"]["type"] == "rate_limit_error"
        else:
            assert body["choices"][0]["message"]["content"] is not None
    assert chat.metrics.requests["429"] - before.get("429", 0) == 42
    assert request(served.port, "GET", "/health")[2] == {"status": "ok", "model": MODEL_ID, "queue_depth": 0,
                                                         "running": 0}


def test_a_client_that_disconnects_cancels_its_generation(served, reference, monkeypatch):
    chat = served.chat
    engine = chat.model.engine
    steps, reached, gate = [0], threading.Event(), threading.Event()
    decode = engine.decode

    def held_decode(token):
        steps[0] += 1
        if steps[0] == 3:  # hold the third step until the server has seen the disconnect
            reached.set()
            gate.wait(120)
        return decode(token)

    monkeypatch.setattr(engine, "decode", held_decode)
    completion_before = chat.metrics.tokens["completion"]
    counted, count_finished = threading.Event(), chat.metrics.count_finished

    def counting(reason, *args):
        count_finished(reason, *args)
        if reason == "cancelled":
            counted.set()

    monkeypatch.setattr(chat.metrics, "count_finished", counting)
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat_body("Tell me a long story.", 64, stream=True)),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")  # the role chunk
    assert reached.wait(60)
    job = chat.scheduler.running
    conn.sock.shutdown(2)
    conn.close()
    assert job.cancelled.wait(60)  # seen while the model is still inside the held step
    gate.set()
    assert counted.wait(60)  # the job has ended as cancelled
    # stopped at the next token, not at 64: the prompt's token and two decode steps; the held step's logits are
    # never sampled (the stream checks the cancel flag before each token)
    assert chat.metrics.tokens["completion"] - completion_before == 3
    monkeypatch.setattr(engine, "decode", decode)

    r = served.client().chat.completions.create(model=MODEL_ID, messages=[
        {"role": "user", "content": "Tell me a short story."}], max_tokens=10)
    expected = reference.generate("Tell me a short story.", max_new_tokens=10, reuse_cache=False)
    assert r.choices[0].message.content == expected.text


# --- metrics and memory -----------------------------------------------------------------------------------------
def test_metrics_are_prometheus_text(served):
    request(served.port, "POST", "/v1/chat/completions", chat_body("Count to three.", 4))
    status, headers, text = request(served.port, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) vl2edge_\w+ .+", line), line
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    assert samples['vl2edge_requests_total{status="200"}'] >= 1
    assert samples["vl2edge_completion_tokens_total"] >= 1 and samples["vl2edge_queue_depth"] == 0
    assert samples["vl2edge_request_seconds_count"] >= 1
    q50, q99 = samples['vl2edge_ttft_seconds{quantile="0.5"}'], samples['vl2edge_ttft_seconds{quantile="0.99"}']
    assert 0 < q50 <= q99


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_serve_command_keeps_its_memory_over_500_requests(artifact):
    proc = subprocess.Popen([sys.executable, "-m", "vl2edge.cli", "serve", str(artifact), "--port", "0",
                             "--threads", "1", "--log-level", "warning", "--verify", "size", "--model-name", MODEL_ID],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        m = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", line)
        assert m, line
        port = int(m.group(1))
        image = data_url(png_bytes((120, 90), 5))
        rss = {}
        for i in range(500):
            if i % 10 == 0:
                body = chat_body([{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Hi"}],
                                 3)
            elif i % 10 == 1:
                body = b"{broken"
            else:
                body = chat_body(f"Request number {i}.", 3, stream=i % 2 == 0)
            status = request(port, "POST", "/v1/chat/completions", body)[0]
            assert status == (400 if i % 10 == 1 else 200)
            if i + 1 in (100, 500):
                rss[i + 1] = rss_kb(proc.pid)
        growth_mb = (rss[500] - rss[100]) / 1024
        print(f"serve RSS after 100 requests {rss[100] / 1024:.1f} MB, after 500 {rss[500] / 1024:.1f} MB")
        assert growth_mb < 16, rss
    finally:
        proc.terminate()
        proc.wait(60)
    assert proc.returncode in (0, -15)


def test_the_serve_command_refuses_a_bad_artifact_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vl2edge.cli", "serve", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("vl2edge serve: error:") and "no such artifact" in r.stderr


# --- a bounded fuzz: hostile input on loopback ------------------------------------------------------------------
def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels over a few hundred bytes of zlib (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * (1 + 3 * min(width, 4096)) * 64, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def _fuzz_bodies(rng, media: Path, secret: Path) -> list[tuple[str, object]]:
    """(kind, body) pairs: raw bytes or JSON-able objects, from a fixed seed."""
    valid = chat_body("Say something.", 2)
    values = [None, True, -1, 0, 10 ** 30, -10 ** 30, 1e308, -1e-308, "", "x" * 5000, [], {}, [1, "a", None],
              {"nested": {"deep": [1]}}, "NaN", "Infinity"]
    fields = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
              "stop", "stream", "stream_options", "n", "repetition_penalty", "logprobs", "response_format"]
    out: list[tuple[str, object]] = []
    for _ in range(20):  # malformed JSON
        raw = json.dumps(valid).encode()
        cut = int(rng.integers(0, len(raw)))
        noise = bytes(rng.integers(0, 256, int(rng.integers(1, 40)), dtype=np.uint8))
        out.append(("malformed json", raw[:cut] + noise if rng.random() < 0.5 else noise))
    for _ in range(40):  # wrong types, huge and negative numbers
        body = json.loads(json.dumps(valid))
        body[fields[int(rng.integers(len(fields)))]] = values[int(rng.integers(len(values)))]
        out.append(("wrong type", body))
    for _ in range(8):  # unknown fields and message shapes
        body = json.loads(json.dumps(valid))
        body[f"x_{int(rng.integers(1e6))}"] = values[int(rng.integers(len(values)))]
        body["messages"][0][["role", "content", "name"][int(rng.integers(3))]] = values[int(rng.integers(len(values)))]
        out.append(("unknown or mistyped field", body))
    def part(url):
        return chat_body([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}], 2)

    for _ in range(6):  # invalid base64
        junk = "".join(rng.choice(list("!@#$%^&*()ab=="), int(rng.integers(1, 50))))
        out.append(("invalid base64", part("data:image/png;base64," + junk)))
    out += [("image bomb", part(data_url(_bomb_png(w, h)))) for w, h in ((60000, 60000), (5000, 5000), (1, 10 ** 7))]
    out.append(("truncated image", part(data_url(png_bytes()[:200]))))
    traversal = [f"file://{media}/../{secret.name}", f"file://{media}/%2e%2e/{secret.name}",
                 f"file://{media}/link_out", f"file://{media}//..//{secret.name}", f"file://{secret}",
                 f"file://{secret.parent}/no-such-file", f"file://{media}/no-such.png", f"file://{media}/fifo",
                 f"file://{media}", f"file://localhost{secret}", f"file://{media}/img.png%00", "file:///etc/shadow",
                 "file:///proc/self/environ", f"file://{media}/%252e%252e/{secret.name}"]
    out += [("traversal", part(url)) for url in traversal]
    out += [("allowed file", part(f"file://{media}/img.png")), ("valid", valid),
            ("valid stream", {**valid, "stream": True})]
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def _disconnect_mid_stream(port: int) -> None:
    import socket

    body = json.dumps(chat_body("Tell a long story.", 64, stream=True)).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        sock.recv(512)  # the headers and maybe a first chunk, then gone


def test_fuzz_hostile_requests_get_4xx_in_openai_shape_and_leak_nothing(served, tmp_path):
    """~100 requests from a fixed seed: malformed JSON, wrong types, huge and negative numbers, unknown fields,
    invalid base64, image bombs, traversal against the allowed media dir (symlink out, `..`, encoded, a FIFO, a
    secret that exists and a path that does not), disconnects mid-stream. Every answer is a completion or a 4xx in
    OpenAI's error shape with no traceback and nothing of the secret; refused file URLs all get one message."""
    import os

    media = served.media
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT-4242")
    (media / "img.png").write_bytes(png_bytes((64, 48), 7))
    if not (media / "link_out").exists():
        (media / "link_out").symlink_to(secret)
        os.mkfifo(media / "fifo")
    rng = np.random.default_rng(20261203)
    file_messages, kinds = set(), {}
    for i, (kind, body) in enumerate(_fuzz_bodies(rng, media, secret)):
        if i % 25 == 0:
            _disconnect_mid_stream(served.port)
        status, _, answer = request(served.port, "POST", "/v1/chat/completions", body)
        text = answer if isinstance(answer, str) else json.dumps(answer)
        assert "Traceback" not in text and "TOP-SECRET" not in text and str(tmp_path) not in text, (kind, text)
        assert status == 200 or 400 <= status < 500, (kind, status, text)
        if status == 200 and kind != "valid stream":
            assert answer["choices"][0]["message"]["content"] is not None, (kind, answer)
        elif status != 200:
            err = answer["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], (kind, answer)
        if kind == "traversal":
            assert status == 400, (body, answer)
            file_messages.add(answer["error"]["message"])
        kinds.setdefault(kind, set()).add(status)
    assert len(file_messages) == 1, file_messages
    assert kinds["allowed file"] == {200} and kinds["valid"] == {200} and kinds["image bomb"] == {400}
    assert request(served.port, "GET", "/health")[2]["status"] == "ok"
    status, _, answer = request(served.port, "POST", "/v1/chat/completions", chat_body("Still there?"))
    assert status == 200 and answer["choices"][0]["finish_reason"] in ("stop", "length")
    print({k: sorted(v) for k, v in kinds.items()})

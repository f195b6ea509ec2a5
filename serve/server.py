"""`vl2edge serve`: the runtime behind a local OpenAI-compatible HTTP API (the `[server]` extra: starlette, uvicorn).

    POST /v1/chat/completions   text + image_url parts, stream (server-sent events), usage, grounding boxes
    GET  /v1/models             the one model served
    GET  /health                liveness and queue depth (no key needed)
    GET  /metrics               Prometheus text: requests, tokens, queue depth, latency percentiles

One model, one request at a time: the runtime is single-stream, so requests run in arrival order on one worker
thread (`Scheduler`), at most `max_queue` wait behind the running one, and the next gets 429 with a Retry-After
(the median request time times the queue ahead). The model keeps its KV cache between requests, so a chat
client that resends the whole conversation prefills only the new turn (`usage.prompt_tokens_details.cached_tokens`).

The event loop never runs the model. A request is a `Job`: the worker runs it and posts its events (start, text
deltas, done, error) back to the loop, which writes them out. A task per request watches the connection; when the
client goes away the job is cancelled: a waiting job never starts, a running one stops at its next token or
prefill chunk (`Stream.cancel`). A streamed request's status is decided before its headers go out: the events wait until the
model has accepted the prompt, so a prompt that is too long or an unreadable image is a 400, streamed or not.

Every error is JSON in OpenAI's shape {"error": {"message", "type", "param", "code"}} with its status; an
unexpected exception is logged and answered as a 500 with one line, and the server goes on.

Beside OpenAI's fields each answer carries `vl2edge`: the stop reason, the grounding result (boxes in pixels of
the conversation's last image, the one the model's 0..999 coordinates refer to, with every image's size so other
mappings are one multiplication away) and timings (queue, vision, prefill, TTFT, decode tok/s). In a stream, each
box is sent in the chunk where its closing bracket arrives, so a robot can act on it before the answer ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import Box, GroundingParser, ImageError, PromptTooLongError, TemplateError
from .media_files import allowed_dirs, describe
from .metrics import CONTENT_TYPE, Metrics
from .openai_request import ApiError, ChatRequest, ImagePolicy, invalid, parse_chat_request

log = logging.getLogger("vl2edge.server")

FINISH_REASONS = {"eos": "stop", "stop": "stop", "max_new_tokens": "length", "context": "length",
                  "cancelled": "cancelled", "error": "error"}


@dataclass(frozen=True)
class ServerOptions:
    model_id: str
    api_key: str | None = None
    max_queue: int = 8  # requests waiting behind the running one
    max_body_bytes: int = 32 * 2 ** 20
    max_images: int = 8
    # directories file:// image URLs may name files in (serve/media_files.py); none: file:// URLs are refused
    allowed_media_dirs: tuple[str, ...] = ()
    # serve without an API key on an address outside loopback (serve() refuses that unless asked)
    no_auth: bool = False
    default_max_tokens: int = 256
    chunk_size: int | None = None  # prefill chunk (None: the model's default)


# --- jobs on the model's thread --------------------------------------------------------------------------------
class Job:
    """One request's work on the model thread, and the events it posts back to the event loop."""

    def __init__(self, work: Callable[["Job"], None], loop: asyncio.AbstractEventLoop):
        self.work = work
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.stream = None  # the runtime's Stream once the prompt is accepted
        self.t_submit = time.perf_counter()
        self.t_start: float | None = None

    def emit(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening
            pass

    def cancel(self) -> None:
        """Any thread. Before the job runs it never starts; while it runs it stops at the next token."""
        self.cancelled.set()
        stream = self.stream
        if stream is not None:
            stream.cancel()

    def run(self) -> None:
        self.t_start = time.perf_counter()
        if self.cancelled.is_set():
            self.emit("done", None)
            return
        try:
            self.work(self)
        except ApiError as e:
            self.emit("error", e)
        except Exception as e:
            log.exception("the model failed on a request")
            self.emit("error", ApiError(500, f"the model failed on this request ({type(e).__name__}: "
                                             f"{str(e).splitlines()[0] if str(e) else ''})", type="server_error"))


class QueueFull(Exception):
    def __init__(self, waiting: int):
        super().__init__(waiting)
        self.waiting = waiting


class Scheduler:
    """Runs jobs one at a time, in arrival order, on one thread; at most max_queue wait behind the running one."""

    def __init__(self, max_queue: int):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_queue = max_queue
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self.running: Job | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="vl2edge-model", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise ApiError(503, "the server is shutting down", type="server_error")
            if len(self._waiting) + (self.running is not None) > self.max_queue:
                raise QueueFull(len(self._waiting))
            self._waiting.append(job)
            self._cv.notify()

    def depth(self) -> int:
        with self._cv:
            return len(self._waiting)

    def busy(self) -> int:
        return int(self.running is not None)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if not self._waiting:
                    return
                job = self._waiting.popleft()
                self.running = job
            try:
                job.run()
            finally:
                with self._cv:
                    self.running = None

    def close(self) -> None:
        """Cancel everything; the thread ends after the running job's next token."""
        with self._cv:
            self._closed = True
            for job in self._waiting:
                job.cancel()
            if self.running is not None:
                self.running.cancel()
            self._cv.notify_all()


# --- the generation a request runs ------------------------------------------------------------------------------
def generation(model, req: ChatRequest, chunk_size: int | None) -> Callable[[Job], None]:
    def work(job: Job) -> None:
        try:
            stream = model.stream(req.messages, chunk_size=chunk_size, **req.options)
        except PromptTooLongError as e:
            raise invalid(str(e), "messages", "context_length_exceeded") from None
        except ImageError as e:
            raise invalid(str(e), "messages", "invalid_image") from None
        except (TemplateError, ValueError) as e:
            raise invalid(str(e), "messages") from None
        job.stream = stream
        if job.cancelled.is_set():
            stream.cancel()
        job.emit("start", stream.inputs.image_sizes)
        for delta in stream:
            job.emit("delta", delta)
        job.emit("done", stream.result)

    return work


# --- the HTTP side ----------------------------------------------------------------------------------------------
class ChatServer:
    def __init__(self, model, options: ServerOptions):
        self.model = model
        self.options = options
        self.scheduler = Scheduler(options.max_queue)
        self.metrics = Metrics()
        self.metrics.queue_depth = self.scheduler.depth
        self.metrics.running = self.scheduler.busy
        self.created = int(time.time())
        self.policy = ImagePolicy(max_images=options.max_images,
                                  allowed_media_dirs=allowed_dirs(options.allowed_media_dirs),
                                  max_file_bytes=options.max_body_bytes)

    def app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model_info, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ]
        app = Starlette(routes=routes, exception_handlers={ApiError: _api_error, HTTPException: _http_error,
                                                   Exception: _server_error},
                        lifespan=self._lifespan)
        app.state.vl2edge = self
        return app

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        try:
            yield
        finally:  # cancel what waits, stop the running request at its next token
            self.scheduler.close()

    # small endpoints ---------------------------------------------------------------------------------------------
    def _model_card(self) -> dict[str, Any]:
        # no filesystem path of the server in any answer: the artifact is named by the model id alone
        return {"id": self.options.model_id, "object": "model", "created": self.created, "owned_by": "vl2edge",
                "vl2edge": {"context": self.model.max_len, "provider": self.model.provider}}

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model_info(self, request: Request) -> Response:
        self._authorize(request)
        self._check_model(request.path_params["model_id"])
        return JSONResponse(self._model_card())

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.options.model_id, "queue_depth": self.scheduler.depth(),
                             "running": self.scheduler.busy()})

    async def prometheus(self, request: Request) -> Response:
        self._authorize(request)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    def _authorize(self, request: Request) -> None:
        key = self.options.api_key
        if not key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.options.model_id:
            raise ApiError(404, f"the model {name!r} does not exist here; this server serves "
                                f"{self.options.model_id!r} (GET /v1/models)", param="model",
                           code="model_not_found")

    # chat completions -------------------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        t_arrival = time.perf_counter()
        try:
            self._authorize(request)
            req = parse_chat_request(await self._json_body(request), self.policy, self.options.default_max_tokens)
            self._check_model(req.model)
            job = Job(generation(self.model, req, self.options.chunk_size), asyncio.get_running_loop())
            try:
                self.scheduler.submit(job)
            except QueueFull as e:
                raise ApiError(429, f"the model is busy: {e.waiting} request(s) are waiting, the most this server "
                                    f"queues (`--max-queue`); retry later", type="rate_limit_error",
                               code="queue_full", headers={"Retry-After": str(self._retry_after(e.waiting))}) from None
        except ApiError as e:
            return self._error(e)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            kind, value = await job.events.get()
        except BaseException:
            watcher.cancel()
            job.cancel()
            raise
        if kind != "start":  # refused by the processor, failed, or the client left while it waited
            watcher.cancel()
            if kind == "error":
                return self._error(value)
            return self._error(ApiError(499, "the client closed the request", code="client_closed"))
        answer = Answer(self, req, job, value, t_arrival)
        if req.stream:
            return EventStream(answer.sse(), watcher, job)
        try:
            body = await answer.complete()
        finally:
            watcher.cancel()
        if "error" in body:
            return self._error(body["error"])
        self.metrics.count_request(200)
        return JSONResponse(body)

    async def _json_body(self, request: Request) -> Any:
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is {int(declared)} bytes; this server takes at most {limit} "
                                f"(`vl2edge serve --max-body-mb`)", code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is over {limit} bytes, the most this server takes "
                                    f"(`vl2edge serve --max-body-mb`)", code="body_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            raise invalid("the request body is empty; send a JSON object")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise invalid(f"the request body is not valid JSON ({str(e).splitlines()[0][:120]})") from None

    def _retry_after(self, waiting: int) -> int:
        per_request = self.metrics.median("request_seconds") or 1.0
        return int(min(3600, max(1, math.ceil(per_request * (waiting + 1)))))

    def _error(self, e: ApiError) -> Response:
        self.metrics.count_request(e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Answer:
    """Turns one job's events into an OpenAI chat.completion, or a stream of chat.completion.chunk events."""

    def __init__(self, server: ChatServer, req: ChatRequest, job: Job, image_sizes, t_arrival: float):
        self.server = server
        self.req = req
        self.job = job
        self.image_sizes = tuple(image_sizes)
        self.t_arrival = t_arrival
        self.id = "chatcmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        self.boxes = GroundingParser(self.image_sizes[-1] if self.image_sizes else None)

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        while True:
            kind, value = await self.job.events.get()
            yield kind, value
            if kind in ("done", "error"):
                return

    async def complete(self) -> dict[str, Any]:
        text: list[str] = []
        async for kind, value in self.events():
            if kind == "delta":
                text.append(value)
            elif kind == "error":
                return {"error": value}
            elif kind == "done":
                result = value
        self.record(result)
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.server.options.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "logprobs": None, "finish_reason": FINISH_REASONS[result.stop_reason]}],
                "usage": usage(result), "vl2edge": self.extras(result)}

    async def sse(self) -> AsyncIterator[bytes]:
        self.server.metrics.count_request(200)
        yield self._chunk({"role": "assistant", "content": ""})
        async for kind, value in self.events():
            if kind == "delta":
                boxes = [box_dict(ev) for ev in self.boxes.feed(value) if isinstance(ev, Box)]
                yield self._chunk({"content": value}, extra={"boxes": boxes} if boxes else None)
            elif kind == "error":
                yield _sse(value.body())
            elif kind == "done":
                self.record(value)
                yield self._chunk({}, FINISH_REASONS[value.stop_reason], extra=self.extras(value))
                if self.req.include_usage:
                    yield _sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.server.options.model_id, "choices": [], "usage": usage(value)})
        yield b"data: [DONE]\n\n"

    def _chunk(self, delta: dict, finish_reason: str | None = None, extra: dict | None = None) -> bytes:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.server.options.model_id,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if extra:
            body["vl2edge"] = extra
        return _sse(body)

    def queue_s(self) -> float:
        return (self.job.t_start or self.job.t_submit) - self.job.t_submit

    def extras(self, result) -> dict[str, Any]:
        t = result.timings
        ttft = None if t.get("ttft_s") is None else self.queue_s() + t["ttft_s"]
        g = result.grounding
        return {
            "stop_reason": result.stop_reason,
            "grounding": {
                "images": [{"width": w, "height": h} for w, h in result.image_sizes],
                "image_index": len(result.image_sizes) - 1 if result.image_sizes else None,
                "boxes": [box_dict(b) for b in g.boxes],
                "bad_boxes": [{"label": b.label, "raw": b.raw, "reason": b.reason} for b in g.bad_boxes],
                "issues": list(g.issues),
                "text": g.text,
            },
            "timings": {"queue_s": self.queue_s(), "preprocess_s": t.get("preprocess_s"),
                        "vision_s": t.get("vision_s"), "vision_tiles": t.get("vision_tiles"),
                        "prefill_s": t.get("prefill_s"), "prefill_tokens": t.get("prefill_tokens"),
                        "prefill_tokens_per_s": t.get("prefill_tokens_per_s"), "ttft_s": ttft,
                        "decode_tokens_per_s": t.get("decode_tokens_per_s"),
                        "total_s": time.perf_counter() - self.t_arrival},
        }

    def record(self, result) -> None:
        m, t = self.server.metrics, result.timings
        m.count_finished(FINISH_REASONS[result.stop_reason], result.prompt_tokens, result.cached_tokens,
                         len(result.token_ids))
        m.observe("request_seconds", time.perf_counter() - self.t_arrival)
        m.observe("queue_wait_seconds", self.queue_s())
        if t.get("ttft_s") is not None:
            m.observe("ttft_seconds", self.queue_s() + t["ttft_s"])
        if t.get("decode_s"):
            m.observe("time_per_output_token_seconds", sum(t["decode_s"]) / len(t["decode_s"]))
        log.info("%s: %d prompt tokens (%d cached), %d generated, %s", self.id, result.prompt_tokens,
                 result.cached_tokens, len(result.token_ids), result.stop_reason)


def usage(result) -> dict[str, Any]:
    completion = len(result.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}


def box_dict(b: Box) -> dict[str, Any]:
    return {"label": b.label, "coords": list(b.coords),
            "xyxy": None if b.xyxy is None else [round(v, 2) for v in b.xyxy]}


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Wait for the client to go away (the body is already read: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


class EventStream(StreamingResponse):
    """A text/event-stream body from an async iterator; our own __call__, not Starlette's, because the task that
    watches the connection exists before the headers go out (the request may wait in the queue). Ending early (the
    client left, the server stops) cancels the job; the task watching the connection stops with the stream."""

    def __init__(self, chunks: AsyncIterator[bytes], watcher: asyncio.Task, job: Job):
        super().__init__(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                          "X-Accel-Buffering": "no"})
        self.chunks = chunks
        self.watcher = watcher
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        done = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            done = True
        except OSError:  # the client is gone
            pass
        finally:
            self.watcher.cancel()
            if not done:
                self.job.cancel()


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = {404: f"no route {request.url.path!r} (POST /v1/chat/completions, GET /v1/models, /health, "
                    f"/metrics)",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    server = getattr(request.app.state, "vl2edge", None)
    if server is not None and request.url.path == "/v1/chat/completions":
        server.metrics.count_request(exc.status_code)
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": kind}}, status_code=exc.status_code, headers=exc.headers)


async def _api_error(request: Request, exc: ApiError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("unexpected error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return JSONResponse({"error": {"message": f"internal server error ({type(exc).__name__})",
                                   "type": "server_error", "param": None, "code": None}}, status_code=500)


# --- entry point ------------------------------------------------------------------------------------------------
def create_app(model, options: ServerOptions) -> Starlette:
    return ChatServer(model, options).app()


class ServeConfigError(ValueError):
    """A serve configuration refused before anything listens (the CLI exits 2 with its one line)."""


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also as ::ffff:127.x.y.z) and "localhost"; any other name may resolve anywhere."""
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def check_exposure(host: str, options: ServerOptions) -> None:
    """Outside loopback a server needs a key, or the operator's explicit --no-auth."""
    if not is_loopback(host) and not options.api_key and not options.no_auth:
        raise ServeConfigError(f"listening on {host} (not loopback) needs --api-key KEY (or $VL2EDGE_API_KEY), or "
                               f"--no-auth to let anyone who can reach the port use the model")


def serve(model, options: ServerOptions, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          announce: Callable[[str], None] | None = None) -> None:
    """Serve a loaded Model until interrupted (uvicorn; SIGINT/SIGTERM stop it after the running token).
    port 0 = any free port; the bound one is announced (and is what a test or supervisor reads)."""
    import socket

    import uvicorn

    check_exposure(host, options)
    allowed_dirs(options.allowed_media_dirs)  # refused before anything listens
    if not is_loopback(host) and not options.api_key:
        log.warning("listening on %s without an API key (--no-auth): anyone who can reach this port can use the "
                    "model", host)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog from now on, so the announced port is usable at once
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    bound = sock.getsockname()[1]
    config = uvicorn.Config(create_app(model, options), log_level=log_level, timeout_graceful_shutdown=5)
    if announce is not None:
        announce(f"serving {options.model_id!r} ({model.artifact_dir}, {model.provider}, context "
                 f"{model.max_len} tokens, queue {options.max_queue}, file:// media from "
                 f"{describe(allowed_dirs(options.allowed_media_dirs))}) on http://{host}:{bound}/v1")
    uvicorn.Server(config).run(sockets=[sock])

"""An OpenAI chat-completions request body -> what `Model.stream` takes, or an ApiError that names the problem.

Only the request's shape is checked here (no model, no pixels): fields and their types, roles, content parts and
image URLs. Pixels, the template and the prompt length are checked when the model's processor prepares the
request (runtime.processor), and the server maps those errors to the same JSON shape.

Messages: `content` is a string or a list of parts, {"type": "text", "text": ...} and
{"type": "image_url", "image_url": {"url": ...}} (also {"image_url": "..."}). A user turn's images are put first,
one "<image>\\n" each, then its text parts joined by newlines: the layout of the official examples
("<image>\\n<|ref|>...") and of runtime.api for untagged images. A user who wants another layout writes the
"<image>" tags into the text, one per image part, in the order of the parts. Image URLs:
  * data:image/...;base64,...  - the image's bytes (the usual way: works from any language, any machine);
  * file:///abs/path           - a file on the server's machine, only inside the directories the server was
                                 started with (`--allowed-media-dir`; none: refused), serve/media_files.py;
  * http(s)://                 - refused: the server works offline and fetches nothing.

Sampling: temperature (default 0 = greedy, the official README's decoding, not OpenAI's 1), top_p, seed, stop
(a string or up to 16), max_tokens / max_completion_tokens, and the extra fields top_k and repetition_penalty
(vLLM's names). Fields with no equivalent here (n > 1, logprobs, tools, presence/frequency penalties, a json
response_format) are refused rather than silently ignored; unknown fields are ignored, as OpenAI's own clients
send new ones.
"""

from __future__ import annotations

import base64
import binascii
import math
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from .. import IMAGE_TAG
from .media_files import read_allowed

MAX_STOP_STRINGS = 16
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class ChatRequest:
    """A validated request: messages in runtime.chat_template's form (user turns with their own "images")."""

    messages: list[dict[str, Any]]
    options: dict[str, Any]  # keyword arguments of Model.stream
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    model: str | None = None
    num_images: int = 0
    image_bytes: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImagePolicy:
    """max_images per request; allowed_media_dirs: real paths (serve/media_files.allowed_dirs) that file:// URLs
    may name files in, none by default; max_file_bytes: the largest such file."""

    max_images: int = 8
    allowed_media_dirs: tuple[str, ...] = ()
    max_file_bytes: int = 32 * 2 ** 20


def parse_chat_request(body: Any, policy: ImagePolicy = ImagePolicy(), default_max_tokens: int = 256) -> ChatRequest:
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {_json_type(body)}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array of messages", "messages")
    images_total = [0, 0]  # count, bytes
    parsed = [_message(m, i, policy, images_total) for i, m in enumerate(messages)]
    if images_total[0] > policy.max_images:
        raise invalid(f"the conversation has {images_total[0]} images; this server takes at most "
                      f"{policy.max_images} (`vl2edge serve --max-images`)", "messages", "too_many_images")

    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid(f"'model' must be a string, got {_json_type(model)}", "model")
    stream = _typed(body, "stream", bool, False)
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise invalid("'stream_options' must be an object", "stream_options")
        include_usage = _typed(stream_options, "include_usage", bool, False, "stream_options.include_usage")

    _refuse_unsupported(body)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    which = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise invalid(f"'{which}' must be an integer >= 1, got {max_tokens!r}", which)
    temperature = _number(body, "temperature", 0.0, lo=0.0, hi=2.0)
    top_p = _number(body, "top_p", 1.0, lo=0.0, hi=1.0, lo_open=True)
    repetition_penalty = _number(body, "repetition_penalty", 1.0, lo=0.0, hi=10.0, lo_open=True)
    top_k = body.get("top_k", 0)
    if top_k is None or top_k == -1:  # vLLM's "off"
        top_k = 0
    if not _is_int(top_k) or top_k < 0:
        raise invalid(f"'top_k' must be an integer >= 0 (0 or -1 = off), got {top_k!r}", "top_k")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2 ** 63):
        raise invalid(f"'seed' must be a non-negative integer, got {seed!r}", "seed")
    stop = _stop(body.get("stop"))
    options = {"max_new_tokens": int(max_tokens), "temperature": temperature, "top_p": top_p, "top_k": int(top_k),
               "repetition_penalty": repetition_penalty, "seed": seed, "stop": stop}
    return ChatRequest(parsed, options, stream, include_usage, model, images_total[0], images_total[1])


# --- messages ---------------------------------------------------------------------------------------------------
def _message(m: Any, i: int, policy: ImagePolicy, images_total: list[int]) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise invalid(f"{where} must be an object with 'role' and 'content', got {_json_type(m)}", where)
    role = m.get("role")
    if not isinstance(role, str):
        raise invalid(f"{where}.role must be a string", f"{where}.role")
    if role not in _ROLES:
        raise invalid(f"{where}.role {role!r} is not supported here (system, developer, user, assistant; this "
                      f"server has no tools)", f"{where}.role")
    role = _ROLES[role]
    content = m.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise invalid(f"{where}.content must be a string or an array of content parts, got {_json_type(content)}",
                      f"{where}.content")
    texts: list[str] = []
    images: list[Any] = []
    for k, part in enumerate(content):
        pwhere = f"{where}.content[{k}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid(f"{pwhere} must be an object with a 'type'", pwhere)
        kind = part["type"]
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise invalid(f"{pwhere}.text must be a string", f"{pwhere}.text")
            texts.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise invalid(f"{pwhere}: only user messages can carry images, not {role!r} ones", pwhere)
            src, size = _image_source(part.get("image_url"), pwhere, policy)
            images.append(src)
            images_total[0] += 1
            images_total[1] += size
        else:
            raise invalid(f"{pwhere}.type {kind!r} is not supported (text, image_url)", f"{pwhere}.type")
    text = "\n".join(texts)
    out: dict[str, Any] = {"role": role, "content": text}
    if images:
        if text.count(IMAGE_TAG) != len(images):
            text = (IMAGE_TAG + "\n") * len(images) + text
        out = {"role": role, "content": text, "images": images}
    return out


def _image_source(spec: Any, where: str, policy: ImagePolicy) -> tuple[Any, int]:
    """An image_url value -> (bytes or a path, its size in bytes)."""
    if isinstance(spec, dict):
        url = spec.get("url")
    else:
        url = spec
    if not isinstance(url, str) or not url:
        raise invalid(f"{where}.image_url must be {{\"url\": \"data:image/...;base64,...\"}}", f"{where}.image_url")
    head = url[:16].lower()
    if head.startswith("data:"):
        meta, comma, payload = url.partition(",")
        if not comma or ";base64" not in meta.lower():
            raise invalid(f"{where}.image_url: a data URL must be base64 (data:image/png;base64,...)",
                          f"{where}.image_url")
        try:
            data = base64.b64decode(payload.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise invalid(f"{where}.image_url: the data URL is not valid base64", f"{where}.image_url") from None
        if not data:
            raise invalid(f"{where}.image_url: the data URL holds no bytes", f"{where}.image_url")
        return data, len(data)
    if head.startswith("file:"):
        if not policy.allowed_media_dirs:
            raise invalid(f"{where}.image_url: this server takes no file:// URLs (it was started without "
                          f"--allowed-media-dir); send the image as a data URL", f"{where}.image_url")
        parsed = urllib.parse.urlparse(url)
        data = None
        if parsed.netloc in ("", "localhost"):
            data = read_allowed(urllib.parse.unquote(parsed.path), policy.allowed_media_dirs, policy.max_file_bytes)
        if data is None:  # one answer whatever the reason: nothing about the server's files leaks
            raise invalid(f"{where}.image_url: a file:// URL must name a readable file inside the server's media "
                          f"directories (--allowed-media-dir)", f"{where}.image_url")
        if len(data) > policy.max_file_bytes:
            raise invalid(f"{where}.image_url: the file is over {policy.max_file_bytes} bytes, the most this "
                          f"server reads for an image", f"{where}.image_url")
        return data, len(data)
    if head.startswith(("http:", "https:")):
        raise invalid(f"{where}.image_url: this server works offline and does not fetch http(s) URLs; send the "
                      f"image as a data URL (data:image/jpeg;base64,...)", f"{where}.image_url")
    raise invalid(f"{where}.image_url: unsupported URL {url[:40]!r} (data: or file:// URLs)", f"{where}.image_url")


# --- sampling fields --------------------------------------------------------------------------------------------
def _refuse_unsupported(body: dict) -> None:
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise invalid("'n' must be 1: this server generates one choice per request", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v not in (None, 0, 0.0):
            raise invalid(f"'{name}' is not supported; use the extra field 'repetition_penalty' (1 = off)", name)
    if body.get("logprobs") or body.get("top_logprobs"):
        raise invalid("'logprobs' is not supported by this server", "logprobs")
    if body.get("tools") or body.get("functions"):
        raise invalid("this server has no tool calling", "tools")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise invalid("'response_format' other than {\"type\": \"text\"} is not supported", "response_format")


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stop)):
        raise invalid(f"'stop' must be a non-empty string or an array of at most {MAX_STOP_STRINGS} of them", "stop")
    return stop


def _typed(obj: dict, name: str, kind: type, default: Any, param: str | None = None) -> Any:
    v = obj.get(name)
    if v is None:
        return default
    if not isinstance(v, kind):
        raise invalid(f"'{param or name}' must be a {kind.__name__}, got {_json_type(v)}", param or name)
    return v


def _number(obj: dict, name: str, default: float, *, lo: float, hi: float, lo_open: bool = False) -> float:
    v = obj.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise invalid(f"'{name}' must be a number, got {_json_type(v)}", name)
    if v > hi or v < lo or (lo_open and v == lo):
        rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise invalid(f"'{name}' must be in {rng}, got {v}", name)
    return float(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(v), type(v).__name__)

"""The Python API: `vl2edge.load(artifact) -> Model`.

    import vl2edge

    m = vl2edge.load("tiny-int4")                                  # provider: best available (CUDA, then CPU)
    r = m.generate("<image>\\nWhat is on the table?", images=["kitchen.jpg"], max_new_tokens=128)
    print(r.text, r.timings["decode_tokens_per_s"])

    history = [{"role": "user", "content": "<image>\\nDescribe it.", "images": ["kitchen.jpg"]}]
    for delta in m.chat(history):                                   # streams; the KV cache is reused next turn
        print(delta, end="", flush=True)
    history += [{"role": "assistant", "content": m.last_result.text},
                {"role": "user", "content": "Where is the mug?"}]
    answer = m.chat(history, stream=False)                          # only the new turn is prefilled

    boxes = m.ground("kitchen.jpg", "the red mug")                  # [Box(label, coords, xyxy in pixels)]

    for a in m.watch("/dev/video0", "<image>\\n<|ref|>the red mug<|/ref|>.", every=1.0):   # newest frame each time
        print(a.index, a.boxes, a.frame_to_answer_s)

Messages are {"role": "system"|"user"|"assistant", "content": str} dicts (user messages may carry their own
"images" list) or a plain prompt string; images are paths, bytes, file objects, PIL images or uint8 numpy arrays
(RGB; an OpenCV BGR array as `vl2edge.Frame(a, "bgr")`; runtime.frames). Images without "<image>" tags in the text are placed first, one tag per image, as the official
examples do. Every request reuses whatever prefix of its prompt is already in the KV cache (runtime.generation),
so `chat` with a growing history and repeated questions about the same image prefill only what is new; the
results are the same as with `reuse_cache=False` (up to floating-point rounding of a different chunking).

A Model runs one request at a time (not thread-safe); starting a request closes a stream still open.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from .chat_template import IMAGE_TAG, as_image_list, normalize_messages
from .engine import Engine
from .expert_cache import ExpertCacheError, memory_limit_bytes, parse_size
from .generation import Result, Runner, Stream
from .grounding import referring_prompt
from .images import OFFICIAL_PIXELS
from .processor import Processor, PromptTooLongError
from .sampling import SamplingParams

DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_CHUNK_SIZE = 512
# low_memory: the prefill chunk. A chunk's attention probabilities, heads x chunk x context floats, are its largest
# activation and sit in the arena at the peak (84 MB for Tiny at 512 x 4k). The chunk is the largest power of two up
# to LOW_MEMORY_CHUNK_SIZE that keeps them within LOW_MEMORY_ATTENTION_BYTES at the artifact's max_len: 256 for Tiny
# (10 heads), 128 for Small (16 heads; one image + 3,977 tokens, `vl2edge run --low-memory`: peak 9.48 GB against
# 9.65 at 256, prefill 34 vs 36 tok/s).
LOW_MEMORY_CHUNK_SIZE = 256
LOW_MEMORY_ATTENTION_BYTES = 40 << 20


def low_memory_chunk_size(num_heads: int, max_len: int) -> int:
    """The low-memory prefill chunk of a model with `num_heads` query heads and a `max_len` cache (see above)."""
    chunk = LOW_MEMORY_CHUNK_SIZE
    while chunk > 16 and num_heads * chunk * max_len * 4 > LOW_MEMORY_ATTENTION_BYTES:
        chunk //= 2
    return chunk


def expert_cache_budget(art, size: str | int) -> int:
    """Bytes for the expert cache: a size ("3G", bytes) or "auto": the memory this process may use (its cgroup's
    limit, else MemAvailable) less the artifact's weights that stay resident (everything but the routed experts)
    and 1 GiB for activations, the KV cache and the runtime."""
    if str(size).strip().lower() != "auto":
        return parse_size(size)
    limit = memory_limit_bytes()
    routed = art.manifest["graphs"].get("routed_experts") or {}
    per_layer = int(art.manifest["source"]["config"].get("language_config", {}).get("n_routed_experts") or 0)
    experts = int(routed.get("expert_bytes", 0)) * per_layer * len(routed.get("layers", {}))
    rest = sum(f["bytes"] for f in art.manifest["files"].values()) - experts
    budget = (limit or 0) - rest - 2**30
    if budget <= 0:
        raise ExpertCacheError(f"--expert-cache auto: {limit} bytes available, the artifact's other weights need "
                               f"{rest} and the runtime ~1 GiB; give a size")
    return budget


def load(path: str | Path, provider: str | None = None, threads: int | None = None, max_tiles: int | None = None,
         verify: str = "sha256", transient_vision: bool = False, official_pixels: bool = False,
         low_memory: bool = False, expert_cache: str | int | None = None, expert_prefetch: bool = True,
         shared_threads: bool = False, fused_layers: bool = True) -> "Model":
    """Open an exported artifact directory.

    provider: None = best available (CUDA, then CPU), "cpu" or "cuda" (absent -> warning and CPU); threads: ORT
    intra-op threads (None = ORT's default); max_tiles: at most N local tiles per image (latency budget; None =
    the model's own tiling); verify: "sha256" (check every file's hash) or "size" (fast start on a trusted disk);
    transient_vision: load the vision graph for each image and release it after (less resident memory between
    images, its load time added to every image's vision time); official_pixels: open images as the official
    pipeline does (no EXIF rotation, alpha dropped instead of composited over white; runtime.images);
    low_memory: transient_vision, the language model loaded after the first images and released while later images
    are encoded (Engine vision_alone), so vision and language are never resident together, the activations' arena
    given back after every prefill chunk (Engine shrink_arena), and smaller prefill chunks by default
    (low_memory_chunk_size: 256 tokens on Tiny, 128 on Small): the lowest peak RSS (real-dims
    Tiny INT4, one 640x480 image + 3.9k tokens: 2.19 GB, docs/benchmarks.md), at the price of a slower prefill, a vision load per image
    and a language-model load after each image that comes once the conversation has started.
    expert_cache: "3G", "512M", a number of bytes or "auto" (the memory this process may use, less the artifact's
    other weights and 1 GiB): the routed experts stay in the artifact's files and a pool of that size holds the
    recently used ones (runtime/expert_cache.py); the tokens are the same whatever the size. expert_prefetch (with
    expert_cache): during decode, load the experts the next layer's router predicts while this layer runs.
    shared_threads (CPU): one onnxruntime intra-op pool for the whole process instead of one per session (faster
    decode; runtime/thread_pool.py). onnxruntime then refuses any later session of the process that asks for its own
    pool, so it is the caller's choice; `vl2edge run` and `serve` make it.
    fused_layers: run each layer as one graph that routes itself where the artifact has it (Engine's docstring);
    False keeps two graphs per layer with runtime/dispatch.py's routing between them.
    Raises ArtifactError (a ValueError) for a missing, corrupt or mismatched artifact, ValueError for a bad option.
    """
    if verify not in ("sha256", "size"):
        raise ValueError(f"verify={verify!r}: choose 'sha256' or 'size'")
    from .artifact import ArtifactError, open_artifact

    art = open_artifact(path, verify=verify)
    try:
        budget = None if expert_cache is None else expert_cache_budget(art, expert_cache)
        engine = Engine(art, provider=provider, threads=threads, transient_vision=transient_vision or low_memory,
                        vision_alone=low_memory, shrink_arena=low_memory, expert_cache=budget,
                        expert_prefetch=expert_prefetch, shared_threads=shared_threads, fused_layers=fused_layers)
    except ValueError:
        raise
    except Exception as e:  # onnxruntime's own errors for a graph it cannot load
        if type(e).__module__.startswith("onnxruntime"):
            raise ArtifactError(f"{art.dir}: onnxruntime cannot load the artifact ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from e
        raise
    # the cache bounds the context: a prompt must fit it, not just the model's max_position_embeddings
    proc = Processor.from_dir(art.dir, max_tiles=max_tiles, **(OFFICIAL_PIXELS if official_pixels else {}))
    if proc.max_length is None or proc.max_length > engine.max_len:
        proc.max_length = engine.max_len
    chunk = low_memory_chunk_size(engine.config.language.num_attention_heads, engine.max_len) if low_memory \
        else DEFAULT_CHUNK_SIZE
    return Model(engine, proc, chunk_size=chunk)


def with_image_tags(content: str, n_images: int) -> str:
    """Put one "<image>\\n" per image first when the text has no tags (the official examples' layout)."""
    if n_images and IMAGE_TAG not in content:
        return IMAGE_TAG + "\n" + (IMAGE_TAG + "\n") * (n_images - 1) + content
    return content


class Model:
    def __init__(self, engine: Engine, processor: Processor, chunk_size: int = DEFAULT_CHUNK_SIZE):
        self.engine = engine
        self.processor = processor
        self.chunk_size = chunk_size  # default prefill chunk of every request
        self.runner = Runner(engine, processor)
        self.last_result: Result | None = None

    # --- facts --------------------------------------------------------------------------------------------------
    @property
    def config(self):
        return self.engine.config

    @property
    def provider(self) -> str:
        return self.engine.provider

    @property
    def artifact_dir(self) -> Path:
        """The artifact directory this model was loaded from."""
        return self.engine.artifact.dir

    @property
    def max_len(self) -> int:
        """Context (KV-cache) length in tokens."""
        return self.engine.max_len

    @property
    def expert_counts(self):
        """ExpertCounts since load (or reset): tokens per routed expert per MoE layer (`.as_dict()`)."""
        return self.engine.expert_counts

    def reset(self) -> None:
        """Forget the cached conversation (and close a running stream)."""
        self.runner.reset()

    # --- requests -----------------------------------------------------------------------------------------------
    def prepare(self, messages: str | Iterable[Mapping[str, Any]], images: Any = None):
        """PreparedInputs for a prompt string or a message list (tags added for untagged images)."""
        try:
            return self._prepare(messages, images)
        except PromptTooLongError as e:
            if self.engine.max_len < self.config.language.max_position_embeddings:
                raise PromptTooLongError(str(e).replace(
                    "the model's context (max_position_embeddings)",
                    "this artifact's context (its KV cache, `vl2edge export --max-len`)")) from None
            raise

    def _prepare(self, messages, images):
        if isinstance(messages, str):
            n = 0 if images is None else len(as_image_list(images))
            return self.processor(with_image_tags(messages, n), images=images)
        msgs = [dict(m) if isinstance(m, Mapping) else m for m in messages]
        if images is None:
            for m in msgs:
                if isinstance(m, dict) and m.get("role") == "user" and m.get("images") is not None:
                    m["content"] = with_image_tags(m["content"], len(as_image_list(m["images"])))
        else:
            n = len(as_image_list(images))
            tags = sum(m.content.count(IMAGE_TAG) for m in normalize_messages(msgs))
            users = [m for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
            if tags == 0 and n and users:  # untagged flat images go to the first user turn
                users[0]["content"] = with_image_tags(users[0]["content"], n)
        return self.processor(msgs, images=images)

    def stream(self, messages: str | Iterable[Mapping[str, Any]], images: Any = None, *,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: str | Iterable[str] | None = None, chunk_size: int | None = None,
               reuse_cache: bool = True) -> Stream:
        """Start a request; returns a Stream of text deltas (`.result` once it ends, `.cancel()`, `.close()`).
        Input errors (bad image, template, overlong prompt) raise here, before anything runs."""
        t0 = time.perf_counter()
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, seed=seed)
        if chunk_size is None:
            chunk_size = self.chunk_size
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.runner.close_active()
        inputs = self.prepare(messages, images)
        t1 = time.perf_counter()
        return self.runner.start(inputs, params, stop=stop, chunk_size=chunk_size, reuse_cache=reuse_cache,
                                 t_start=t0, preprocess_s=t1 - t0, on_finish=self._finished)

    def _finished(self, result: Result) -> None:
        self.last_result = result

    def generate(self, messages: str | Iterable[Mapping[str, Any]], images: Any = None, *, stream: bool = False,
                 **options) -> Result | Stream:
        """Answer a prompt string or a conversation. stream=False (default): the Result; stream=True: a Stream.

        options: max_new_tokens (256), temperature (0 = greedy), top_p (1), top_k (0), repetition_penalty (1),
        seed, stop (a string or strings; not included in the text), chunk_size (prefill chunk; None = the
        model's, 512, or low_memory_chunk_size with low_memory),
        reuse_cache (True).
        """
        s = self.stream(messages, images, **options)
        return s if stream else s.finish()

    def chat(self, messages: str | Iterable[Mapping[str, Any]], images: Any = None, *, stream: bool = True,
             **options) -> Stream | Result:
        """A conversation turn: `messages` is the whole conversation so far, ending with the new user message
        (the previous answers as assistant messages). Streams text deltas by default (stream=False: the Result).
        The KV cache of the previous turns is reused: only the new turn is prefilled, and only its images go
        through the vision graph. Same options as generate()."""
        return self.generate(messages, images, stream=stream, **options)

    def ground(self, image: Any, query: str, max_new_tokens: int = 64, **options) -> list:
        """Where is `query` in the image? Greedy, with the README's referring prompt
        "<image>\\n<|ref|>query<|/ref|>."; returns the boxes (Box: label, coords 0..999, xyxy in pixels)."""
        options.setdefault("temperature", 0.0)
        result = self.generate(referring_prompt(query), [image], max_new_tokens=max_new_tokens, **options)
        return result.boxes

    def watch(self, source: Any, prompt: str, **options):
        """Answer `prompt` about frame after frame of `source`, always the newest frame: a Watch, an iterator of
        FrameAnswer (runtime/watch.py). source: a video file, http(s):// or rtsp:// URL, /dev/videoN, a directory or
        glob of images, or any iterable of frames (numpy arrays, Frames, PIL images, paths).

        options: system, every (seconds between answers), max_frames, all_frames (answer every frame instead of the
        newest), channels ("bgr" for an iterable of OpenCV arrays), max_tiles (this loop's tiling), fps (of a
        directory), stall_timeout, reconnect, on_text(frame, delta), and generate()'s options.
        Raises SourceError (a ValueError) for a source that cannot be opened, before any frame is read."""
        from .watch import Watch

        options.setdefault("chunk_size", self.chunk_size)
        return Watch(self, source, prompt, **options)

    def __repr__(self) -> str:
        return (f"Model({self.engine.artifact.dir}, provider={self.provider!r}, max_len={self.max_len}, "
                f"cached={self.engine.length})")

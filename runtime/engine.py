"""The engine: ONNX Runtime sessions over an artifact, the KV cache, and one forward step at a time.

State is one conversation: `length` tokens are in the cache. Every step runs, per layer, the attention graph (it
appends to the cache buffers IN PLACE, so no cache is ever copied: GroupQueryAttention gets the same OrtValue as
past_* input and present_* output; the MLA latent form reads the buffer's valid rows and writes its `latent_new`
output at the next rows' address; contract/cache.bind_cache), the dispatch (runtime/dispatch.py: the model's
exact top-k and weights from the router logits), and the expert graph, which computes only the chosen experts. The
head graph gives the last position's logits.

Caches are allocated once, sized to the artifact's max_len, and reused for the whole conversation (`reset()` only
rewinds `length`).
"""

from __future__ import annotations

import ctypes
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file

from ..contract.cache import bind_cache, bind_step_inputs
from ..contract.routing_feed import expert_graph_inputs
from ..model.config import VL2Config
from .artifact import Artifact, ArtifactError, check_onnxruntime, open_artifact
from .dispatch import ExpertCounts, RoutingConfig, route
from .expert_cache import MMAP_THRESHOLD, ExpertCache, ExpertCacheError
from .image_layout import scatter_images
from .residency import page_out_files
from .thread_pool import apply_threads, describe_threads, pool_size, share_threads

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _glibc():
    """glibc, or None where it is not the C library."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def malloc_trim() -> bool:
    """Give glibc's free heap pages back to the OS (Linux/glibc; elsewhere a no-op that returns False)."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
LARGE_BLOCK_BYTES = 1 << 20  # see return_large_blocks


def return_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Process-wide (Linux/glibc; elsewhere a no-op that returns False): malloc maps every block of `threshold` bytes
    or more with mmap and unmaps it when freed, so its pages go back to the OS at once. Fixing the threshold also
    turns off glibc's dynamic one, which rises to the largest block freed so far (up to 32 MiB) and then serves such
    blocks from the heap, where freed pages stay resident and fragment.

    Why: a long prefill in chunks asks for buffers that grow with the context (a chunk's attention probabilities
    over it); an arena keeps every size it was asked for, and so does the heap. The low-memory mode runs the
    language model with no arena and this policy (Engine(arena=False)): real-dims Small memory plan, one image then
    three refills to 4,060 tokens in 128-token chunks with decode steps between, RSS after each refill 8712 / 8721
    / 8724 MiB against 8804 / 8834 / 9018 with the shared arena (peak 8805 vs 9018)."""
    libc = _glibc()
    return libc is not None and hasattr(libc, "mallopt") and libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1


class ContextFullError(ValueError):
    """More tokens than the cache (the model's context) can hold."""


def resolve_providers(provider: str | None) -> tuple[list[str], str]:
    """provider None = best available (CUDA, then CPU); a requested one that is absent falls back with a warning."""
    available = ort.get_available_providers()
    if provider is None:
        name = "cuda" if PROVIDERS["cuda"] in available else "cpu"
    else:
        name = provider.lower()
        if name not in PROVIDERS:
            raise ValueError(f"provider {provider!r}: choose one of {sorted(PROVIDERS)}")
        if PROVIDERS[name] not in available:
            warnings.warn(f"{PROVIDERS[name]} is not available in this onnxruntime ({available}); using CPU",
                          RuntimeWarning, stacklevel=3)
            name = "cpu"
    return ([PROVIDERS["cuda"], PROVIDERS["cpu"]] if name == "cuda" else [PROVIDERS["cpu"]]), name


_SHARED_CPU_ARENA = False


def use_shared_cpu_arena(opts: ort.SessionOptions) -> None:
    """Make every session given these options allocate CPU activations from ONE arena registered on ORT's
    process-wide environment, instead of one arena per session.

    Why: an artifact is 3 + 2*layers sessions (3 + layers fused). A session's arena grows to its largest run and never
    gives memory back, so after one image and one 512-token prefill chunk every session holds its own high-water mark:
    measured on real-dims Tiny int4, RSS went from 2.49 GB after load to 4.15 GB after a 4k prefill, of which the KV
    cache was 0.5 GB. The sessions run one after another, so one shared arena sized by the largest single run is enough."""
    global _SHARED_CPU_ARENA
    if not _SHARED_CPU_ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # kSameAsRequested extension (strategy 1): grow by what is asked, not by doubling, so the high-water mark
        # is the real peak of one run rather than the next power of two above it.
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
        _SHARED_CPU_ARENA = True
    opts.add_session_config_entry("session.use_env_allocators", "1")


@dataclass
class StepTimings:
    """Seconds spent per stage, accumulated (the bench reads these)."""

    attention: float = 0.0
    dispatch: float = 0.0
    experts: float = 0.0
    head: float = 0.0
    embed: float = 0.0
    vision: float = 0.0
    layers: float = 0.0  # fused layer graphs (export/fused_layer.py): attention, routing and experts in one run

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Layer:
    attention: ort.InferenceSession | None
    mlp: ort.InferenceSession | None
    moe: bool
    has_router: bool
    bias: np.ndarray | None = None
    cached: bool = False  # the routed experts run from the expert cache; `mlp` is the layer's shared graph
    fused: ort.InferenceSession | None = None  # the whole layer in one graph, which routes itself; then no others

    @property
    def sessions(self) -> list[ort.InferenceSession]:
        return [s for s in (self.fused, self.attention, self.mlp) if s is not None]


class Engine:
    def __init__(self, artifact: str | Artifact, provider: str | None = None, threads: int | None = None,
                 verify: str = "sha256", spin: bool = False, transient_vision: bool = False,
                 vision_alone: bool = False, arena: bool = True, shrink_arena: bool = False,
                 expert_cache: int | None = None, expert_prefetch: bool = True, shared_threads: bool = False,
                 fused_layers: bool = True):
        """transient_vision: create the vision session for each encode_images call and release it after, instead
        of keeping it for the engine's life: its weights (int8 SigLIP, ~0.43 GB) and prepacked copies are then
        resident only while images are encoded, at the price of loading it again for every image. The language
        model's sessions are then created at first use, after the first images (load_language).
        vision_alone (with transient_vision): images that come once the language model is loaded (a later turn, a
        second request) never have the whole tower resident beside it. Where the artifact has the tower in parts
        (graphs.vision_parts, export/exporter.py VISION_PART_BYTES), they run one session at a time and the language
        model stays; otherwise its sessions are released (release_language) and recreated at the next forward, at
        the price of that reload per image. The KV cache is the engine's own buffers and keeps its contents.
        arena=False (CPU): the language model's sessions allocate activations without an arena, and malloc returns
        large blocks to the OS when they are freed (return_large_blocks, process-wide): a lower peak over long
        conversations, at the price of page faults on every large buffer.
        shrink_arena (CPU, with the arena): the arena is given back at the end of every prefill chunk (the chunk's
        last run, the head, carries ORT's run option memory.enable_memory_arena_shrinkage), with malloc's large-block
        policy too (return_large_blocks), so what it frees leaves the process: a chunk's layers reuse each other's
        blocks, and the next chunk, whose buffers are larger (they grow with the context), does not find the
        previous chunk's sizes still held. Decode steps keep the arena. load(low_memory=True) uses it: real-dims
        Small memory plan, one image + 3,977 tokens, peak 9.00 GB and prefill 26.3 tok/s against 8.99 GB and 20.1
        tok/s with no arena; Tiny INT4 2.19 vs 2.17 GB, 146.6 vs 130.8 tok/s (docs/design.md, the low-memory mode).
        expert_cache (bytes, CPU): the routed experts stay in the artifact's files and a pool of that many bytes of
        prepacked expert sessions holds the recently used ones (runtime/expert_cache.py); the MoE graphs are never
        loaded, each MoE layer runs its shared graph and then the chosen experts, and a prompt is prefilled layer
        by layer (every chunk through layer L before layer L+1), so each layer's experts are read once per prompt.
        expert_prefetch (with expert_cache): in a decode step, while layer L's experts load and run, the next MoE
        layer's experts are predicted (its router on layer L's residual stream) and loaded on the cache's loader
        threads; where the artifact's index has no routers (exports before it had them) nothing is predicted.
        shared_threads (CPU, without spin or expert_cache): make onnxruntime's process-wide intra-op pool of `threads`
        if the process has none (runtime/thread_pool.py: 1.09-1.21x decode on real-dims Tiny; every later session in
        the process must then use it). Where the process has it, the sessions use it whatever this flag;
        `thread_pool` says which pool they got.
        fused_layers: where the artifact has a graph per whole layer that routes itself (graphs.layers[i].layer,
        export/fused_layer.py), run it instead of the attention graph, numpy's routing and the MLP graph: one
        session run per layer instead of two and no routing between them (real-dims Tiny int4 1.05-1.08x decode at
        depth 0, Small's plan 0.97-1.20x, processes alternated: docs/benchmarks.md).
        Its routing weights are onnxruntime's softmax instead of numpy's (the same to the last bits). False keeps
        the two graphs and runtime/dispatch.py's routing (what a caller replacing `_route` needs); the expert cache
        always does."""
        if vision_alone and not transient_vision:
            raise ValueError("vision_alone needs transient_vision (a resident vision session is never alone)")
        self.artifact = artifact if isinstance(artifact, Artifact) else open_artifact(artifact, verify=verify)
        check_onnxruntime(self.artifact, ort.__version__)
        m = self.artifact.manifest
        self.config = VL2Config.from_dict(m["source"]["config"], str(self.artifact.dir / "manifest.json"))
        self.io_dtype = np.dtype(m["io_dtype"])
        self.max_len = int(m["attention"]["max_len"])
        self.providers, self.provider = resolve_providers(provider)
        self.device = "cuda" if self.provider == "cuda" else "cpu"  # where a step's hidden states live
        self.routing_trace: list | None = None  # [(layer, experts [T, k])] while routing is recorded
        self.fused_layers = fused_layers and expert_cache is None  # a prompt through the cache goes layer-major
        self.expert_cache = None
        if expert_cache is not None:
            if self.provider != "cpu":
                raise ExpertCacheError("--expert-cache runs on the CPU provider (the CUDA design: docs/design.md)")
            self.expert_cache = ExpertCache(self.artifact, expert_cache, threads, self.io_dtype, self.providers)
        self.expert_prefetch = expert_prefetch and self.expert_cache is not None and self.expert_cache.predicts
        if shrink_arena and not arena:
            raise ValueError("shrink_arena needs the arena (arena=True)")
        self.arena = arena or self.provider != "cpu"
        shrink_arena = shrink_arena and self.provider == "cpu"  # the CPU arena; a CUDA engine keeps its own
        if self.expert_cache is not None:  # the pool's cost per expert holds at this threshold (expert_cache.py)
            return_large_blocks(MMAP_THRESHOLD)
        elif not self.arena or shrink_arena:
            return_large_blocks()
        self._shrink_after_chunk = None  # the RunOptions of a prefill chunk's last run
        if shrink_arena:
            self._shrink_after_chunk = ort.RunOptions()
            self._shrink_after_chunk.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        # not with the expert cache: its loader threads make sessions while the step runs, and the shared pool's
        # spinning worker takes their core (real-dims Tiny in 1.5 GiB, --expert-cache 600M, alternated: 3.36 / 3.36
        # tok/s with it, 4.34 / 4.11 without)
        shared_threads = shared_threads and self.expert_cache is None
        if shared_threads and self.provider == "cpu" and not spin and share_threads(threads) != int(threads or 0):
            warnings.warn(f"onnxruntime's shared thread pool has {pool_size()} threads in this process (its first "
                          f"engine's), not {threads}: it is fixed per process", stacklevel=2)
        self._opts = self._session_options(threads, spin, arena="none" if not self.arena else
                                           "shared" if self.provider == "cpu" else "own")
        self.thread_pool = describe_threads(threads)  # what every session of the engine gets
        # A transient vision session keeps its own arena, freed with it (its blocks are above glibc's mmap threshold,
        # so they go back to the OS), instead of leaving its high-water mark in the shared arena, where the language
        # model reuses only part of it: real-dims Small, one 640x480 image then a 3.9k prompt in 128-token chunks,
        # RSS after vision 104 vs 205 MiB, peak 8958 vs 8994 MiB.
        self._vision_opts = self._session_options(threads, spin, arena="own") if transient_vision \
            else self._opts
        g = m["graphs"]
        self._vision_file = g["vision"]["file"]
        self._vision_parts = [p["file"] for p in g.get("vision_parts", [])]
        self.transient_vision = transient_vision
        self.vision_alone = vision_alone
        self.vision = None if transient_vision else self._session(self._vision_file)
        self.attention_kind = m["attention"]["kind"]
        self.embedding: ort.InferenceSession | None = None
        self.head: ort.InferenceSession | None = None
        self.layers: list[_Layer] = []
        if not transient_vision:
            self.load_language()
        tokens = load_file(str(self.artifact.path(m["image_tokens"])))
        self.image_newline, self.view_separator = tokens["image_newline"], tokens["view_seperator"]
        self.routing = RoutingConfig.from_language_config(self.config.language) \
            if self.config.language.n_routed_experts else None
        self.expert_counts = ExpertCounts(self.config.language.n_routed_experts or 0)
        self.timings = StepTimings()
        # int8 (MHA) or uint8 (MLA) codes: export/kv_calibration.py
        self.cache_dtype = np.dtype(m["attention"]["cache"].get("dtype", m["io_dtype"]))
        shapes = [tuple(s) for s in m["attention"]["cache"]["buffers_per_layer"]]
        # format 5: the 8-bit latent cache's token scales are an fp32 buffer beside the codes
        names = m["attention"]["cache"].get("buffer_dtypes", [self.cache_dtype.name] * len(shapes))
        dtypes = [np.dtype(d) for d in names]
        self._allocate_caches(shapes, dtypes, len(g["layers"]))
        self.length = 0

    @property
    def arena_policy(self) -> str:
        """How the language model's activations are allocated: "kept" (the arena), "shrunk per prefill chunk"
        (shrink_arena) or "none" (arena=False)."""
        if not self.arena:
            return "none"
        return "shrunk per prefill chunk" if self._shrink_after_chunk is not None else "kept"

    @staticmethod
    def _session_options(threads: int | None, spin: bool, arena: str) -> ort.SessionOptions:
        """arena: "shared" (the process-wide CPU arena, use_shared_cpu_arena), "own" (the session's own arena, freed
        with it) or "none" (no CPU arena; see return_large_blocks). Threads: the process's shared pool if it has one,
        else `threads` of the session's own (runtime/thread_pool.py)."""
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        apply_threads(opts, threads)
        # ORT's worker threads busy-wait between ops by default. On a small shared machine that steals the cores
        # from everything else (measured: 152 vs 1590 tok/s on test-tiny with a second busy process). Worse, every
        # session has its own intra-op pool, so with 2 + 2*layers sessions spin=True leaves ~25 threads spinning on
        # the cores: real-dims Tiny int4 decoded at 782 ms/token with it vs 45 without (2 cores). The process-wide
        # pool (shared_threads) has one worker per extra core, so its spinning costs little and gains (thread_pool.py).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        if arena == "none":
            opts.enable_cpu_mem_arena = False
        elif arena == "shared":
            use_shared_cpu_arena(opts)
        return opts

    def load_language(self) -> None:
        """Create the language model's sessions (embedding, per-layer attention and experts, head) unless they exist.

        With transient_vision they are created at first use, AFTER the first images are encoded and the vision
        session released, so a one-shot request never holds the vision graph and the language model at once: its
        peak RSS is the larger of the two instead of their sum (real-dims Tiny int4: vision ~0.65 GB, language
        model ~2.1 GB)."""
        if self.embedding is not None:
            return
        m = self.artifact.manifest
        g = m["graphs"]
        bias = load_file(str(self.artifact.path(m["router_bias"]))) if m.get("router_bias") else {}
        layers = []
        cached = self.expert_cache.layers if self.expert_cache is not None else {}
        for i, entry in enumerate(g["layers"]):
            if self.fused_layers and "layer" in entry:
                files = (entry["layer"]["file"], entry["attention"]["file"], entry["mlp"]["file"])
                layers.append(_Layer(None, None, entry["moe"], False, fused=self._session(*files)))
                continue
            outs = [v["name"] for v in entry["attention"]["outputs"]]
            mlp = cached[i]["shared"]["file"] if i in cached else entry["mlp"]["file"]  # routed experts: the pool's
            layers.append(_Layer(self._session(entry["attention"]["file"]), self._session(mlp),
                                 entry["moe"], "router_logits" in outs, bias.get(f"layer{i}"), i in cached))
        self.layers = layers
        self.head = self._session(g["head"]["file"])
        self.embedding = self._session(g["embedding"]["file"])  # last: it marks the language model as loaded

    def release_language(self) -> None:
        """Drop the language model's sessions and give their memory back; load_language makes them again. The KV
        cache (the engine's buffers) and `length` are kept, so the conversation goes on where it was."""
        if self.embedding is None:
            return
        self.embedding, self.head, self.layers = None, None, []
        malloc_trim()

    def _session(self, file: str, *data_of: str) -> ort.InferenceSession:
        """A session of graph `file`; `data_of`: the graphs whose data files it reads (a fused layer's)."""
        opts = self._vision_opts if file == self._vision_file or file in self._vision_parts else self._opts
        try:
            session = ort.InferenceSession(str(self.artifact.path(file)), sess_options=opts,
                                           providers=self.providers)
        except Exception as e:  # onnxruntime's own errors for a graph it cannot load
            if type(e).__module__.startswith("onnxruntime"):
                first = str(e).splitlines()[0] if str(e) else ""
                raise ArtifactError(f"{self.artifact.dir}: onnxruntime cannot load {file} ({type(e).__name__}: "
                                    f"{first})") from e
            raise
        # What the session read while loading (QMoE's block scales, weights it prepacked) stays mapped and resident
        # unless given back; what its kernels still read faults back in on use (runtime/residency.py). This graph's
        # files only: the pages other sessions read in place at every step (an embedding row, MLA's W_UK) stay put
        # when a transient vision session is made.
        for f in (file, *data_of):
            page_out_files(self.artifact.path(f))
        return session

    def _allocate_caches(self, shapes: list[tuple[int, ...]], dtypes: list[np.dtype], n_layers: int) -> None:
        """One set of buffers per layer, bound in place at every step. On CPU the OrtValues share the numpy arrays'
        memory; on CUDA they live on the device."""
        self.cache_arrays, self.caches = [], []
        self._cache_dtypes = dtypes
        for _ in range(n_layers):
            if self.provider == "cuda":
                vals = [ort.OrtValue.ortvalue_from_shape_and_type(list(s), d.type, "cuda", 0)
                        for s, d in zip(shapes, dtypes, strict=True)]
                arrays = None
            else:
                arrays = [np.zeros(s, d) for s, d in zip(shapes, dtypes, strict=True)]
                vals = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
            self.cache_arrays.append(arrays)
            self.caches.append(vals)

    def cache_nbytes(self) -> int:
        return sum(v.numpy().nbytes if self.provider == "cpu" else int(np.prod(v.shape())) * d.itemsize
                   for layer in self.caches for v, d in zip(layer, self._cache_dtypes))

    def reset(self) -> None:
        """Forget the conversation (the buffers are kept and overwritten)."""
        self.length = 0

    def truncate(self, length: int) -> None:
        """Keep only the first `length` cached tokens (attention reads only positions below `length`, so rewinding
        is just this; later steps overwrite the rest)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length

    # --- inputs -----------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: np.ndarray, batch: int | None = None) -> np.ndarray:
        """tiles [n, 3, 384, 384] -> [n, 196, D], `batch` tiles per vision call (bounded activation memory).

        Default batch: 1 on CPU, 4 on CUDA. On CPU a tile is already 729 rows per matmul, so batching buys no
        speed, while the shared arena keeps the largest run's activations: measured on real-dims Tiny int4, 4 tiles
        in 3.81 s/tile at batch 1 vs 3.91 at batch 4, RSS after them 2.61 vs 2.81 GiB."""
        batch = batch or (4 if self.provider == "cuda" else 1)
        in_parts = self.vision_alone and bool(self._vision_parts) and self.embedding is not None
        if self.vision_alone and not in_parts:
            self.release_language()
        t0 = time.perf_counter()
        outs = [pixel_values[i:i + batch].astype(self.io_dtype) for i in range(0, len(pixel_values), batch)]
        if in_parts:  # beside the loaded language model, one part of the tower at a time
            for file in self._vision_parts:
                part = self._session(file)
                name = part.get_inputs()[0].name
                outs = [part.run(None, {name: x})[0] for x in outs]
                del part
                malloc_trim()
        else:
            vision = self.vision or self._session(self._vision_file)  # transient: loaded here, released on return
            outs = [vision.run(None, {"pixel_values": x})[0] for x in outs]
            del vision
        if self.vision is None and not in_parts:
            # The released session's weights and activations sit in glibc's free lists, still resident. Measured on
            # real-dims Tiny int4 (5 tiles, then a 3.9k prefill and 16 steps): RSS at the end 2.68 GB with this,
            # 3.05 GB without.
            malloc_trim()
        self.timings.vision += time.perf_counter() - t0
        return np.concatenate(outs) if outs else np.zeros((0, 0, 0), self.io_dtype)

    def embed(self, input_ids, pixel_values=None, images_seq_mask=None, images_spatial_crop=None) -> np.ndarray:
        """Token embeddings [T, H] with every image's layout in its slots. Images first: with transient_vision the
        language model is loaded only after them (load_language)."""
        tiles = None
        if pixel_values is not None and len(pixel_values):
            tiles = self.encode_images(np.asarray(pixel_values))
        self.load_language()
        t0 = time.perf_counter()
        x = self.embedding.run(None, {"input_ids": np.asarray(input_ids, np.int64).reshape(-1)})[0]
        self.timings.embed += time.perf_counter() - t0
        if tiles is not None:
            scatter_images(x, tiles, images_spatial_crop, images_seq_mask, self.image_newline, self.view_separator,
                           self.config.global_view_pos == "head")
        return x

    # --- forward ----------------------------------------------------------------------------------------------
    def forward(self, embeds: np.ndarray) -> np.ndarray:
        """Append embeds [T, H] to the conversation; returns the last position's logits [V] (fp32)."""
        t = embeds.shape[0]
        past = self.length
        self.load_language()
        if past + t > self.max_len:
            raise ContextFullError(f"{past + t} tokens exceed the context of {self.max_len} "
                                   f"(over by {past + t - self.max_len})")
        x = embeds.reshape(1, t, -1).astype(self.io_dtype, copy=False)
        logits = self._layers(x, past, t)
        self.length = past + t
        return logits

    def _layers(self, x: np.ndarray, past: int, t: int) -> np.ndarray:
        """Every layer, then the head. The hidden states stay where the kernels run (`self.device`): each layer's
        `hidden_out` and `mlp_in` are OrtValues bound straight into the next session, so on CUDA nothing of a
        hidden state crosses to the host inside a step. Only what the host must read does: the router logits
        (dispatch runs in numpy), the routing it hands back, and the last logits. On CPU the same binding is also
        the cheaper path: measured on real-dims Tiny int4 (int8 KV, 2 threads, interleaved in one process) 24.3 vs
        25.8 ms per step at 512 and 27.9 vs 28.3 at 2k against numpy feeds through session.run, 0.72 vs 0.81 ms on
        test-tiny."""
        dev = self.device
        for i, layer in enumerate(self.layers):
            if layer.fused is not None:
                x = self._fused_layer(i, layer, x, past, t, dev)
                continue
            outs = self._attention(i, layer, x, past, t, dev)
            t1 = time.perf_counter()
            if layer.cached:
                x = self._cached_moe(i, layer, outs[0], outs[1], outs[2].numpy())
                continue
            m = layer.mlp.io_binding()
            m.bind_ortvalue_input("hidden", outs[0])
            m.bind_ortvalue_input("mlp_in", outs[1])
            if layer.moe:
                probs, weights = self._route(i, layer, outs[2].numpy())
                m.bind_cpu_input("router_probs", probs)
                m.bind_cpu_input("router_weights", weights)
            t2 = time.perf_counter()
            self.timings.dispatch += t2 - t1
            m.bind_output("hidden_out", dev)
            layer.mlp.run_with_iobinding(m)
            x = m.get_outputs()[0]
            self.timings.experts += time.perf_counter() - t2
        t0 = time.perf_counter()
        h = self.head.io_binding()
        if isinstance(x, np.ndarray):  # the last layer ran from the expert cache
            h.bind_cpu_input("hidden", x)
        else:
            h.bind_ortvalue_input("hidden", x)
        h.bind_output("logits", "cpu")
        self.head.run_with_iobinding(h, self._shrink_after_chunk if t > 1 else None)
        logits = h.get_outputs()[0].numpy()[0]
        self.timings.head += time.perf_counter() - t0
        return logits

    def _fused_layer(self, i: int, layer: _Layer, x, past: int, t: int, device: str):
        """Layer i as one graph (export/fused_layer.py) on x [1, t, H], appending to its cache in place: its
        hidden_out as an OrtValue on `device`; a MoE layer's chosen experts are counted (and traced)."""
        t0 = time.perf_counter()
        b = layer.fused.io_binding()
        bind_step_inputs(b, x, past)
        b.bind_output("hidden_out", device)
        if layer.moe:
            b.bind_output("expert_ids", "cpu")
        bind_cache(b, self.attention_kind, self.caches[i], past, t, self.provider)
        layer.fused.run_with_iobinding(b)
        outs = b.get_outputs()
        if layer.moe:
            self._record_routing(i, outs[1].numpy())
        self.timings.layers += time.perf_counter() - t0
        return outs[0]

    def _attention(self, i: int, layer: _Layer, x, past: int, t: int, device: str) -> list:
        """Layer i's attention graph on x [1, t, H] (numpy or OrtValue) after `past` cached tokens, appending to its
        cache in place: [hidden_out, mlp_in (, router_logits on the CPU)] as OrtValues on `device`."""
        t0 = time.perf_counter()
        b = layer.attention.io_binding()
        bind_step_inputs(b, x, past)
        b.bind_output("hidden_out", device)
        b.bind_output("mlp_in", device)
        if layer.has_router:
            b.bind_output("router_logits", "cpu")
        bind_cache(b, self.attention_kind, self.caches[i], past, t, self.provider)
        layer.attention.run_with_iobinding(b)
        self.timings.attention += time.perf_counter() - t0
        return b.get_outputs()

    def _choose(self, i: int, layer: _Layer, router_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The experts and weights for layer i (dispatch), counted, and recorded when routing is traced."""
        idx, w = route(router_logits, self.routing, layer.bias)
        self._record_routing(i, idx)
        return idx, w

    def _record_routing(self, i: int, idx: np.ndarray) -> None:
        """Count layer i's chosen experts [T, k], and keep them while routing is traced."""
        self.expert_counts.add(i, idx)
        if self.routing_trace is not None:
            self.routing_trace.append((i, idx))

    def _route(self, i: int, layer: _Layer, router_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx, w = self._choose(i, layer, router_logits)
        return expert_graph_inputs(idx, w, self.routing.num_experts, self.io_dtype)

    def _cached_moe(self, i: int, layer: _Layer, hidden, mlp_in, router_logits: np.ndarray) -> np.ndarray:
        """A MoE layer from the expert cache: the shared graph, plus the chosen experts run one by one."""
        t0 = time.perf_counter()
        idx, w = self._choose(i, layer, router_logits)
        t1 = time.perf_counter()
        self.timings.dispatch += t1 - t0
        x, h = mlp_in.numpy()[0], hidden.numpy()[0]
        then = None
        if self.expert_prefetch and len(h) == 1 and i + 1 < len(self.layers) and self.layers[i + 1].cached:
            predicted, _ = route(self.expert_cache.router_logits(i + 1, h), self.routing, self.layers[i + 1].bias)
            then = (i + 1, predicted)
        out = self._moe_from_cache(i, layer, h, x, idx, w, [(0, len(x))], then)
        self.timings.experts += time.perf_counter() - t1
        return out[None]

    def _moe_from_cache(self, i: int, layer: _Layer, hidden: np.ndarray, mlp_in: np.ndarray, idx: np.ndarray,
                        w: np.ndarray, spans: list[tuple[int, int]], then=None) -> np.ndarray:
        """hidden + (routed + shared) for tokens [T, H]: the MoE graph's own association (export/mlp.py), so the
        sums are the QMoE path's bit for bit where QMoE adds in the same order (one thread). The shared experts run
        from the layer's shared graph span by span (bounded activations) with hidden 0, which gives exactly their
        output; the routed ones from the expert cache, `then` its prefetch (ExpertCache.run)."""
        shared = np.empty_like(mlp_in)
        for a, b in spans:
            x = mlp_in[None, a:b]
            shared[a:b] = layer.mlp.run(None, {"hidden": np.zeros_like(x), "mlp_in": x})[0][0]
        return hidden + (self.expert_cache.run(i, mlp_in, idx, w, then=then) + shared)

    def prefill(self, embeds: np.ndarray, chunk_size: int = 512,
                stop: Callable[[], bool] | None = None) -> np.ndarray | None:
        """Feed a prompt in chunks (bounded activation memory: the official "incremental prefilling"). `stop` is
        asked before each chunk after the first; when it says so the prefill ends there (the cache holds the
        chunks done, `length` counts them) and None is returned instead of logits."""
        if self.length + len(embeds) > self.max_len:
            raise ContextFullError(f"prompt of {len(embeds)} tokens after {self.length} in the cache exceeds the "
                                   f"context of {self.max_len} (over by {self.length + len(embeds) - self.max_len})")
        step = chunk_size if chunk_size > 0 else len(embeds)
        if self.expert_cache is not None:
            return self._prefill_layer_major(embeds, step, stop)
        logits = None
        for c in range(0, len(embeds), step):
            if c and stop is not None and stop():
                return None
            logits = self.forward(embeds[c:c + step])
        return logits

    def _prefill_layer_major(self, embeds: np.ndarray, step: int, stop: Callable[[], bool] | None) -> np.ndarray | None:
        """The prompt through one layer at a time, in chunks of `step` within each layer (bounded activations), so a
        layer's routed experts are read into the expert cache once for the whole prompt, not once per chunk. A
        chunk's attention at layer L reads the cache rows the earlier chunks wrote at layer L. `stop` is asked
        between layers; when it says so nothing of this prompt is kept (the cache keeps what it had)."""
        self.load_language()
        base, total = self.length, len(embeds)
        spans = [(a, min(a + step, total)) for a in range(0, total, step)]
        x = np.ascontiguousarray(embeds, dtype=self.io_dtype)
        for i, layer in enumerate(self.layers):
            if i and stop is not None and stop():
                return None
            hidden, mlp_in = np.empty_like(x), np.empty_like(x)
            logits = []
            for a, b in spans:
                outs = self._attention(i, layer, x[None, a:b], base + a, b - a, "cpu")
                hidden[a:b], mlp_in[a:b] = outs[0].numpy()[0], outs[1].numpy()[0]
                if layer.has_router:
                    logits.append(outs[2].numpy())
            t1 = time.perf_counter()
            if layer.cached:
                idx, w = self._choose(i, layer, np.concatenate(logits))
                out = self._moe_from_cache(i, layer, hidden, mlp_in, idx, w, spans)
            else:
                out = np.empty_like(x)
                for k, (a, b) in enumerate(spans):
                    feeds = {"hidden": hidden[None, a:b], "mlp_in": mlp_in[None, a:b]}
                    if layer.moe:
                        feeds["router_probs"], feeds["router_weights"] = self._route(i, layer, logits[k])
                    out[a:b] = layer.mlp.run(None, feeds)[0][0]
            self.timings.experts += time.perf_counter() - t1
            x = out
        t0 = time.perf_counter()
        logits = self.head.run(None, {"hidden": x[None, -1:]})[0][0]
        self.timings.head += time.perf_counter() - t0
        self.length = base + total
        return logits

    def decode(self, token: int) -> np.ndarray:
        return self.forward(self.embed([token]))

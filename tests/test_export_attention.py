"""export.attention: per-layer attention graphs (GroupQueryAttention over an in-place cache) against the PyTorch
reference layer, step by step: a prefill chunk, single-token decode steps, then another chunk on top of the cache.

The reference is model/language.py run piece by piece with its own KVCache:
  h = x + self_attn(input_layernorm(x), positions, mask, cache); mlp_in = post_attention_layernorm(h);
  router_logits = F.linear(mlp_in.float(), gate.weight.float()).
The ORT cache buffers are compared with the reference KVCache directly: the graphs keep the reference's layout
(MHA: rotated K and V in BNSH; MLA: [c_kv | k_pe] with k_pe in the reference's de-interleaved order).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
from onnx import numpy_helper
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from vl2edge.contract.cache import cache_bytes_per_token, cache_ortvalues, new_cache_arrays
from vl2edge.export.attention import AttentionSession, attention_kind, build_attention_graph, run_attention_step
from vl2edge.export.linear import Precision
from vl2edge.model.checkpoint import Checkpoint
from vl2edge.model.config import VL2Config
from vl2edge.model.language import KVCache
from vl2edge.model.presets import preset_config
from vl2edge.model.vl2 import DeepseekVL2
from vl2edge.quant.report import QualityReport

MAX_LEN = 96
CHUNKS = [37] + [1] * 20 + [5]  # prefill, 20 decode steps, then a chunk with a past
FP32_TOL = 1e-4  # max |ort - ref| / max |ref|, per output and step


@pytest.fixture(scope="module")
def loaded(test_checkpoints):
    """preset -> (config, get(name) -> fp32 numpy, reference model); loaded once per module."""
    out = {}

    def load(preset):
        if preset not in out:
            path = test_checkpoints[preset]
            ckpt = Checkpoint.open(path)
            out[preset] = (ckpt.config, lambda n: ckpt.tensor(n, torch.float32).numpy(),
                           DeepseekVL2.from_checkpoint(path))
        return out[preset]

    return load


class RefLayer:
    """The reference layer's attention half, stepping its own KVCache."""

    def __init__(self, model: DeepseekVL2, layer: int, max_len: int):
        self.cfg, self.layer = model.cfg.language, layer
        self.mod = model.language.model.layers[layer]
        self.cache = KVCache(self.cfg, 1, max_len, torch.float32)

    @torch.no_grad()
    def step(self, x: np.ndarray):
        m, t, past = self.mod, x.shape[1], self.cache.length
        xt = torch.from_numpy(x)
        pos = torch.arange(past, past + t)
        mask = torch.arange(past + t)[None, :] <= pos[:, None]
        attn = m.self_attn(m.input_layernorm(xt), pos, mask, self.cache)
        h = xt + attn
        self.cache.length = past + t
        mlp_in = m.post_attention_layernorm(h)
        logits = F.linear(mlp_in.float(), m.mlp.gate.weight.float())[0] if self.cfg.is_moe_layer(self.layer) else None
        return attn.numpy(), h.numpy(), mlp_in.numpy(), None if logits is None else logits.numpy()

    def cache_rows(self, end: int) -> list[np.ndarray]:
        """Valid cache rows in the ORT buffer layout: MHA [k, v] [kvH, end, hd]; MLA [latent] [end, r + rope]."""
        if self.cfg.use_mla:
            return [self.cache.latent[self.layer][0, :end].numpy()]
        return [self.cache.k[self.layer][0, :, :end].numpy(), self.cache.v[self.layer][0, :, :end].numpy()]


def ort_rows(arrays: list[np.ndarray], end: int, mla: bool) -> list[np.ndarray]:
    return [arrays[0][0, 0, :end]] if mla else [a[0, :, :end] for a in arrays]


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def session(g) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(g.model().SerializeToString(), so, providers=["CPUExecutionProvider"])


# --- fp32: exact match with the reference, cache in place --------------------------------------------------------

@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("preset", ["test-tiny", "test-small", "test-vl2"])
def test_fp32_matches_reference_and_writes_cache_in_place(loaded, preset, layer):
    cfg, get, model = loaded(preset)
    L = cfg.language
    sess = session(build_attention_graph(cfg, layer, get, Precision("fp32"), max_len=MAX_LEN))
    names = {o.name for o in sess.get_outputs()}
    assert ("router_logits" in names) == L.is_moe_layer(layer) == (layer == 1)

    arrays = new_cache_arrays(cfg, MAX_LEN, np.float32)[layer]
    buffers = cache_ortvalues(arrays)
    ptrs = [b.data_ptr() for b in buffers]
    assert ptrs == [a.ctypes.data for a in arrays]  # the OrtValues ARE the numpy arrays' memory
    ref = RefLayer(model, layer, MAX_LEN)
    rng = np.random.default_rng(layer)
    past = 0
    for t in CHUNKS:
        x = rng.standard_normal((1, t, L.hidden_size)).astype(np.float32)
        before = [a[..., past:past + t, :].copy() for a in arrays]
        hidden_out, mlp_in, logits = run_attention_step(sess, buffers, x, past)
        r_attn, r_h, r_mlp_in, r_logits = ref.step(x)
        past += t
        where = f"{preset} layer {layer} step T={t} past={past - t}"
        assert hidden_out.shape == mlp_in.shape == (1, t, L.hidden_size)
        assert rel(hidden_out - x, r_attn) < FP32_TOL, where  # the attention branch alone, not hidden by x
        assert rel(hidden_out, r_h) < FP32_TOL, where
        assert rel(mlp_in, r_mlp_in) < FP32_TOL, where
        if r_logits is None:
            assert logits is None
        else:
            assert logits.dtype == np.float32 and logits.shape == (t, L.n_routed_experts)
            assert rel(logits, r_logits) < FP32_TOL, where
        # in place: same buffers, written through the numpy arrays we own, equal to the reference cache
        assert [b.data_ptr() for b in buffers] == ptrs, where
        for a, b in zip(arrays, before):
            assert not np.array_equal(a[..., past - t:past, :], b), where  # the new rows landed in OUR array
        for got, want in zip(ort_rows(arrays, past, L.use_mla), ref.cache_rows(past)):
            assert rel(got, want) < FP32_TOL, where
    for a in arrays:  # nothing written beyond the context
        assert not a[..., past:, :].any()


def test_graph_structure(loaded):
    """GQA forms: one GQA per layer writing straight into the graph's present outputs (an Identity there would
    break the aliasing). MLA (fp32, CPU): an If on the chunk length; decoding, the valid cache prefix feeds exactly
    two MatMuls (scores, the cache as A read as its rows lie; context, the cache as B), so a step reads the cache
    twice in all and never copies it; the new rows are the graph output `latent_new`. MLA fp16 (CUDA): one cache input feeding
    past_key and past_value of GQA. RoPE outside the attention. W_UK/W_UV: fp16 in the fp16 form; int8 codes with
    [nh, 1, N] scales in the fp32 form with quantized linears, multiplied on MatMulInteger with uint8 activations
    when decoding and dequantized (no activation quantization) for a prefill chunk."""
    cases = [("test-tiny", np.float32), ("test-small", np.float32), ("test-small", np.float16)]
    for preset, io in cases:
        cfg, get, _ = loaded(preset)
        prec = Precision("int8") if io == np.float32 else Precision("fp16")
        m = build_attention_graph(cfg, 1, get, prec, io_dtype=io, max_len=MAX_LEN).model()
        gqa = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
        assert not any(n.op_type == "Identity" for n in m.graph.node)
        assert [i.name for i in m.graph.input][:4] == ["hidden", "position_ids", "seqlens_k", "total_sequence_length"]
        ops = [n.op_type for n in m.graph.node]
        inits = {t.name: t for t in m.graph.initializer}
        outputs = [o.name for o in m.graph.output]
        if cfg.language.use_mla:
            assert ops.count("RotaryEmbedding") == 2
            assert ops.count("MatMulNBits") == (2 if io == np.float32 else 0)  # [q | kv_a] fused, o
            if io == np.float16:
                w = [t for n, t in inits.items() if n.endswith(("w_uk", "w_uv_t"))]
                assert len(w) == 2 and all(t.data_type == 10 for t in w)  # io dtype
            else:
                codes = {n: t for n, t in inits.items() if n.endswith((".w_uk.int8", ".w_uv_t.int8"))}
                assert len(codes) == 2 and all(t.data_type == 3 for t in codes.values())  # int8
                scales = {n: t for n, t in inits.items() if n.endswith((".w_uk.scales", ".w_uv_t.scales"))}
                assert sorted(list(t.dims) for t in scales.values()) == [[4, 1, 16], [4, 1, 32]]  # [nh, 1, N]
                assert not any(n.endswith(("w_uk", "w_uv_t")) for n in inits)  # no fp32 copy
        if cfg.language.use_mla and io == np.float32:
            assert gqa == [] and attention_kind(cfg, io) == "mla_latent_matmul"
            assert not any("past_latent" in n.input for n in m.graph.node)  # only the If's branches read the cache
            (if_node,) = [n for n in m.graph.node if n.op_type == "If"]
            branches = {a.name: a.g for a in if_node.attribute}
            decode, prefill = branches["then_branch"], branches["else_branch"]
            # decode: the prefix feeds exactly two MatMuls, scores with the cache as A (streamed as its rows lie;
            # MLAS packs only the small queries) and context with it as B: two reads, no copy; prefill: GQA over a
            # copy of [prefix | chunk]
            readers = [n for n in decode.node if "past_latent" in n.input]
            assert [n.op_type for n in readers] == ["MatMul", "MatMul"]
            assert sorted(list(n.input).index("past_latent") for n in readers) == [0, 1]
            consts = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}  # a branch's constants
            scaled = [n for n in decode.node if n.op_type == "Mul" and any(i in consts for i in n.input)
                      and consts[next(i for i in n.input if i in consts)].size == 1]
            (mul,) = scaled  # the queries times 1/sqrt(192), once
            assert consts[next(i for i in mul.input if i in consts)].item() == pytest.approx((16 + 8) ** -0.5)
            # the absorbed products read the int8 codes: decode on MatMulInteger, prefill dequantized
            d_ops, p_ops = [n.op_type for n in decode.node], [n.op_type for n in prefill.node]
            assert d_ops.count("DynamicQuantizeLinear") == 2 and "DequantizeLinear" not in d_ops
            assert sorted(n.input[1] for n in decode.node if n.op_type == "MatMulInteger") == sorted(codes)
            assert sorted(n.input[0] for n in prefill.node if n.op_type == "DequantizeLinear") == sorted(codes)
            assert "MatMulInteger" not in p_ops and "DynamicQuantizeLinear" not in p_ops
            (pgqa,) = [n for n in prefill.node if n.op_type == "GroupQueryAttention"]
            attrs = {a.name: a for a in pgqa.attribute}
            assert attrs["kv_num_heads"].i == 1 and attrs["do_rotary"].i == 0
            assert attrs["scale"].f == pytest.approx((16 + 8) ** -0.5)
            assert outputs[-1] == "latent_new" and not any(o.startswith("present_") for o in outputs)
            continue
        assert len(gqa) == 1
        attrs = {a.name: a for a in gqa[0].attribute}
        if cfg.language.use_mla:
            assert attention_kind(cfg, io) == "mla_absorbed_gqa"
            assert list(gqa[0].input[3:5]) == ["past_latent", "past_latent"]
            assert list(gqa[0].output[1:]) == ["present_latent_key", "present_latent_value"]
            assert attrs["kv_num_heads"].i == 1 and attrs["do_rotary"].i == 0
            assert attrs["scale"].f == pytest.approx((16 + 8) ** -0.5)  # 1/sqrt(nope + rope), not 1/sqrt(40)
        else:
            assert attention_kind(cfg, io) == "mha_gqa"
            assert list(gqa[0].output[1:]) == ["present_key", "present_value"]
            assert attrs["do_rotary"].i == 1 and attrs["rotary_interleaved"].i == 0
            assert ops.count("MatMulNBits") == 2  # fused qkv, o
        assert outputs[:2] == ["hidden_out", "mlp_in"] and "router_logits" in outputs


# --- quantized and fp16 graphs: close to the fp32 reference ------------------------------------------------------

# Error model: a block-quantized weight with relative error e (QualityReport rel_err, measured here: int8 ~0.0054,
# int4 ~0.098 for the N(0, 1/fan_in) synthesized weights) perturbs a matmul output by ~e relative. The branch
# o_proj(attention(q, k, v)) chains two quantized stages with three parallel inputs (q, k, v) into the first, and
# accuracy_level 4 also quantizes activations to int8, so its relative error is a small multiple of e: allowing
# 5e gives cosine >= 1 - (5e)^2 / 2 = 0.9996 (int8) / 0.88 (int4); measured minima 0.99975 / 0.946 per step.
# hidden_out adds the unit-scale residual, so its cosine is much closer to 1.
QUANT_CASES = {"int8": (0.9995, 0.99999), "int4": (0.88, 0.999)}  # min cosine: attention branch, hidden_out


def run_against_reference(cfg, get, model, layer, prec, io_dtype, report=None):
    """Worst per-step cosines (branch, hidden_out) of the graph vs the fp32 reference over CHUNKS."""
    sess = session(build_attention_graph(cfg, layer, get, prec, io_dtype=io_dtype, max_len=MAX_LEN, report=report))
    arrays = new_cache_arrays(cfg, MAX_LEN, io_dtype)[layer]
    buffers = cache_ortvalues(arrays)
    ref = RefLayer(model, layer, MAX_LEN)
    rng = np.random.default_rng(7)
    worst, past = [1.0, 1.0], 0
    for t in CHUNKS:
        x = rng.standard_normal((1, t, cfg.language.hidden_size)).astype(np.float32)
        xq = x.astype(io_dtype)  # the graph sees x rounded to io dtype; so must the reference
        hidden_out, mlp_in, logits = run_attention_step(sess, buffers, xq, past)
        r_attn, r_h, _, _ = ref.step(xq.astype(np.float32))
        assert hidden_out.dtype == io_dtype and np.isfinite(hidden_out).all()
        branch = hidden_out.astype(np.float32) - xq.astype(np.float32)
        worst = [min(worst[0], cosine(branch, r_attn)), min(worst[1], cosine(hidden_out, r_h))]
        past += t
    return worst


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("preset", ["test-tiny", "test-small"])
def test_quantized_close_to_reference(loaded, preset, kind):
    cfg, get, model = loaded(preset)
    report = QualityReport()
    branch, hidden = run_against_reference(cfg, get, model, 1, Precision(kind, accuracy_level=4), np.float32, report)
    kinds = {"attention.qkv", "attention.o"}  # MLA: q_proj and kv_a_proj_with_mqa are one fused linear
    if cfg.language.use_mla:
        kinds.add("attention.kv_b")  # W_UK / W_UV, int8 per head and column whatever the linears' precision
    assert set(report.summary()) == kinds
    min_branch, min_hidden = QUANT_CASES[kind]
    assert branch > min_branch and hidden > min_hidden, (branch, hidden)


@pytest.mark.parametrize("preset", ["test-tiny", "test-small"])
def test_fp16_io_runs_on_cpu(loaded, preset):
    """fp16 I/O and cache (the GPU layout) also runs on the CPU kernels: fp16 rounding only."""
    cfg, get, model = loaded(preset)
    branch, hidden = run_against_reference(cfg, get, model, 1, Precision("fp16"), np.float16)
    assert branch > 0.9999 and hidden > 0.99999, (branch, hidden)


# --- helpers: session wrapper, saved graphs, cache sizes, guards -------------------------------------------------

def test_attention_session_from_saved_graph(loaded, tmp_path):
    cfg, get, model = loaded("test-vl2")
    path = build_attention_graph(cfg, 1, get, Precision("fp32"), max_len=MAX_LEN).save(tmp_path / "attn_1.onnx")
    assert (tmp_path / "attn_1.onnx.data").exists()
    s = AttentionSession(path, cfg, MAX_LEN)
    ref = RefLayer(model, 1, MAX_LEN)
    x = np.random.default_rng(3).standard_normal((1, 9, cfg.language.hidden_size)).astype(np.float32)
    for past, chunk in ((0, x[:, :6]), (6, x[:, 6:7]), (7, x[:, 7:])):
        hidden_out, mlp_in, logits = s.step(chunk, past)
        _, r_h, r_mlp_in, r_logits = ref.step(chunk)
        assert rel(hidden_out, r_h) < FP32_TOL and rel(mlp_in, r_mlp_in) < FP32_TOL and rel(logits, r_logits) < FP32_TOL
    assert rel(s.arrays[0][0, 0, :9], ref.cache_rows(9)[0]) < FP32_TOL
    with pytest.raises(ValueError, match="do not fit"):
        s.step(np.zeros((1, MAX_LEN - 8, cfg.language.hidden_size), np.float32), 9)


def test_cache_bytes_per_token_real_presets():
    real = {name: VL2Config.from_dict(preset_config(name)) for name in ("tiny", "small", "vl2")}
    assert cache_bytes_per_token(real["tiny"], np.float16) == 12 * 2 * 10 * 128 * 2 == 61_440
    assert cache_bytes_per_token(real["small"], np.float16) == 27 * 576 * 2 == 31_104
    assert cache_bytes_per_token(real["vl2"], np.float16) == 30 * 576 * 2 == 34_560
    assert cache_bytes_per_token(real["small"].language, np.float32) == 62_208
    bufs = new_cache_arrays(real["small"], 16, np.float16)
    assert len(bufs) == 27 and [b.shape for b in bufs[0]] == [(1, 1, 16, 576)]
    bufs = new_cache_arrays(real["tiny"], 16, np.float16)
    assert len(bufs) == 12 and [b.shape for b in bufs[0]] == [(1, 10, 16, 128)] * 2
    per_token = sum(b.nbytes for layer in bufs for b in layer) // 16
    assert per_token == cache_bytes_per_token(real["tiny"], np.float16)


def test_runtime_helpers_import_without_torch_or_onnx():
    """The runtime (torch-free, onnx-free) can use the contract's cache helpers and run_attention_step."""
    script = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "onnx", "transformers"):
                    raise ImportError(name)
        sys.meta_path.insert(0, Block())
        from vl2edge.contract.cache import bind_cache, new_cache_arrays, cache_bytes_per_token
        from vl2edge.export.attention import run_attention_step, AttentionSession
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "OK", out.stderr


def test_roofline_counts_the_attention_bytes_the_graph_stores(loaded):
    """bench.roofline's attention bytes per layer (int8 linears, block 32) equal the projection initializers of the
    built graph, for MLA with int8 W_UK/W_UV (manifest quantization.mla_absorbed) and for the fp32-weight form."""
    from vl2edge.bench import roofline
    from vl2edge.export import mla_absorb

    cfg, get, _ = loaded("test-small")
    prec = Precision("int8", block_size=16)
    m = build_attention_graph(cfg, 1, get, prec, max_len=MAX_LEN).model()
    stored = sum(numpy_helper.to_array(t).nbytes for t in m.graph.initializer
                 if any(k in t.name for k in ("q_kv_a_proj", "o_proj", "w_uk", "w_uv_t")))
    plan = {k: prec.describe() for k in ("experts", "linear", "embedding", "lm_head")}
    per_layer = roofline.active_weight_bytes(cfg, plan | {"mla_absorbed": mla_absorb.INT8_DESCRIPTION})["attention"]
    assert stored == per_layer // cfg.language.num_hidden_layers
    fp32 = roofline.active_weight_bytes(cfg, plan)["attention"] // cfg.language.num_hidden_layers
    L = cfg.language
    assert fp32 - stored == L.num_attention_heads * (L.qk_nope_head_dim + L.v_head_dim) * L.kv_lora_rank * 3 \
        - L.num_attention_heads * (L.kv_lora_rank + L.v_head_dim) * 4

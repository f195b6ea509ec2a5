"""A greedy decode loop over a vl2edge artifact written from docs/artifact-format.md alone: onnxruntime, numpy,
tokenizers, safetensors and Pillow, no vl2edge import (tests/test_artifact_format.py runs it with vl2edge blocked).

  python tests/artifact_format_loop.py ARTIFACT PROMPT [IMAGE] --max-new-tokens N  ->  JSON {"tokens": [...]}

Section numbers (§) are the page's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps
from safetensors.numpy import load_file
from tokenizers import Tokenizer

NP = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8}
CHUNK = 512  # prefill chunk (§7): any size; the runtime's default, so the tokens match bit for bit


def open_manifest(art: Path) -> dict:  # §2, §9
    m = json.loads((art / "manifest.json").read_text())
    assert m["format"] == "vl2edge-artifact" and m["format_version"] <= 5, m["format_version"]
    for name, meta in m["files"].items():
        data = (art / name).read_bytes()
        assert len(data) == meta["bytes"] and hashlib.sha256(data).hexdigest() == meta["sha256"], name
    need = tuple(int(x) for x in (m.get("onnxruntime") or {}).get("min", "1.31.1").split("."))
    assert tuple(int(x) for x in ort.__version__.split(".")[:3]) >= need
    return m


def special_token(art: Path, key: str) -> str:  # §4
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = art / name
        if p.is_file():
            tok = json.loads(p.read_text()).get(key)
            if tok is not None:
                return tok["content"] if isinstance(tok, dict) else tok
    raise KeyError(key)


# --- §4: tiling, pixels, slots ------------------------------------------------------------------------------------
def best_resolution(w: int, h: int, candidates) -> tuple[int, int]:
    best, best_eff, best_waste = None, 0, float("inf")
    for cw, ch in candidates:
        s = min(cw / w, ch / h)
        eff = min(int(w * s) * int(h * s), w * h)
        waste = cw * ch - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (cw, ch), eff, waste
    return best


def tiles_of(image: Image.Image, pcfg: dict, cropping: bool) -> tuple[np.ndarray, tuple[int, int]]:
    mean = np.asarray(pcfg.get("image_mean", [0.5] * 3), np.float32)
    std = np.asarray(pcfg.get("image_std", [0.5] * 3), np.float32)
    color = tuple(int(x * 255) for x in mean)

    def pixels(size):
        x = np.asarray(ImageOps.pad(image, size, Image.Resampling.BICUBIC, color=color), np.uint8)
        return (x.astype(np.float32) / np.float32(255) - mean) / std

    w, h = best_resolution(*image.size, pcfg["candidate_resolutions"]) if cropping else (384, 384)
    tw, th = w // 384, h // 384
    local = pixels((w, h)).reshape(th, 384, tw, 384, 3).transpose(0, 2, 1, 3, 4).reshape(th * tw, 384, 384, 3)
    tiles = np.concatenate([pixels((384, 384))[None], local]).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(tiles), (tw, th)


def slots(tw: int, th: int, s: int = 14) -> int:
    return s * (s + 1) + 1 + (th * s) * (tw * s + 1)


def layout(embeds: np.ndarray, tw: int, th: int, newline: np.ndarray, sep: np.ndarray, head: bool) -> np.ndarray:
    s, d = 14, embeds.shape[-1]
    g = np.concatenate([embeds[0].reshape(s, s, d), np.tile(newline, (s, 1, 1))], axis=1).reshape(-1, d)
    loc = embeds[1:].reshape(th, tw, s, s, d).transpose(0, 2, 1, 3, 4).reshape(th * s, tw * s, d)
    loc = np.concatenate([loc, np.tile(newline, (th * s, 1, 1))], axis=1).reshape(-1, d)
    parts = [g, sep[None], loc]
    return np.concatenate(parts if head else parts[::-1])


# --- §6: routing ---------------------------------------------------------------------------------------------------
def route(logits: np.ndarray, lc: dict, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    E, k = lc["n_routed_experts"], lc["num_experts_per_tok"]
    n_group, topk_group = lc.get("n_group") or 1, lc.get("topk_group") or 1
    logits = logits.astype(np.float32)
    if lc.get("scoring_func", "softmax") == "softmax":
        e = np.exp(logits - logits.max(-1, keepdims=True))
        scores = e / e.sum(-1, keepdims=True)
    else:
        scores = 1 / (1 + np.exp(-logits))
    top = lambda v, n: np.argsort(-v, axis=-1, kind="stable")[:, :n]  # noqa: E731  ties to the lower index
    method = lc["topk_method"]
    choice = scores + bias[None] if method == "noaux_tc" else scores
    if method == "greedy":
        idx = top(scores, k)
    else:
        grouped = choice.reshape(len(choice), n_group, -1)
        gscore = grouped.max(-1) if method == "group_limited_greedy" else -np.sort(-grouped, -1)[..., :2].sum(-1)
        keep = np.zeros_like(gscore, bool)
        np.put_along_axis(keep, top(gscore, topk_group), True, 1)
        idx = top(np.where(np.repeat(keep, E // n_group, 1), choice, 0.0), k)
    w = np.take_along_axis(scores, idx, 1)
    if k > 1 and lc.get("norm_topk_prob", False):
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return idx, (w * lc.get("routed_scaling_factor", 1.0)).astype(np.float32)


# --- §5 and §7 ---------------------------------------------------------------------------------------------------
class Loop:
    def __init__(self, art: Path):
        self.art, self.m = art, open_manifest(art)
        self.io = NP[self.m["io_dtype"]]
        g = self.m["graphs"]
        sess = lambda f: ort.InferenceSession(str(art / f), providers=["CPUExecutionProvider"])  # noqa: E731
        self.vision, self.embedding, self.head = (sess(g[n]["file"]) for n in ("vision", "embedding", "head"))
        self.layers = [(sess(x["attention"]["file"]), sess(x["mlp"]["file"]), x["moe"]) for x in g["layers"]]
        c = self.m["attention"]["cache"]
        self.caches = [[np.zeros(s, NP[d]) for s, d in zip(c["buffers_per_layer"], c["buffer_dtypes"])]
                       for _ in self.layers]
        self.kind, self.P = self.m["attention"]["kind"], 0
        self.lc = {**self.m["source"]["config"]["language_config"]}
        self.lc.setdefault("topk_method", "greedy")
        self.bias = load_file(str(art / self.m["router_bias"])) if self.m.get("router_bias") else {}
        tokens = load_file(str(art / self.m["image_tokens"]))
        self.newline, self.sep = tokens["image_newline"], tokens["view_seperator"]

    def bind_cache(self, b, i: int, T: int) -> None:
        bufs, P = self.caches[i], self.P
        if self.kind == "mha_gqa":
            for name, buf in zip(("key", "value"), bufs):
                v = ort.OrtValue.ortvalue_from_numpy(buf)
                b.bind_ortvalue_input(f"past_{name}", v)
                b.bind_ortvalue_output(f"present_{name}", v)
        elif self.kind == "mla_latent_matmul":
            lat = bufs[0]
            w = lat.shape[-1]
            b.bind_input("past_latent", "cpu", 0, lat.dtype, [P, w], lat.ctypes.data)
            b.bind_output("latent_new", "cpu", 0, lat.dtype, [T, w], lat.ctypes.data + P * w * lat.itemsize)
            if len(bufs) == 2:
                sc = bufs[1]
                b.bind_input("past_latent_scale", "cpu", 0, np.float32, [P, 1], sc.ctypes.data)
                b.bind_output("latent_scale_new", "cpu", 0, np.float32, [T, 1], sc.ctypes.data + P * 4)
        else:
            raise NotImplementedError(self.kind)  # mla_absorbed_gqa: CUDA artifacts

    def forward(self, x: np.ndarray) -> np.ndarray:
        T = len(x)
        h = x.reshape(1, T, -1).astype(self.io)
        for i, (att, mlp, moe) in enumerate(self.layers):
            b = att.io_binding()
            b.bind_cpu_input("hidden", h)
            b.bind_cpu_input("position_ids", np.arange(self.P, self.P + T, dtype=np.int64)[None])
            b.bind_cpu_input("seqlens_k", np.array([self.P + T - 1], np.int32))
            b.bind_cpu_input("total_sequence_length", np.array(self.P + T, np.int32))
            outs = ["hidden_out", "mlp_in"] + (["router_logits"] if moe else [])
            for name in outs:
                b.bind_output(name, "cpu")
            self.bind_cache(b, i, T)
            att.run_with_iobinding(b)
            res = [v.numpy() for v in b.get_outputs()[:len(outs)]]
            feeds = {"hidden": res[0], "mlp_in": res[1]}
            if moe:
                idx, w = route(res[2], self.lc, self.bias.get(f"layer{i}"))
                probs = np.zeros((T, self.lc["n_routed_experts"]), self.io)
                weights = np.zeros_like(probs)
                np.put_along_axis(probs, idx, 1.0, 1)
                np.put_along_axis(weights, idx, w.astype(self.io), 1)
                feeds |= {"router_probs": probs, "router_weights": weights}
            h = mlp.run(None, feeds)[0]
        self.P += T
        return self.head.run(None, {"hidden": h})[0][0]

    def prompt(self, text: str, images: list[Image.Image]) -> np.ndarray:
        tok = Tokenizer.from_file(str(self.art / "tokenizer.json"))
        bos, eos = (tok.token_to_id(special_token(self.art, k)) for k in ("bos_token", "eos_token"))
        pcfg = json.loads((self.art / "processor_config.json").read_text())
        image_id = tok.token_to_id(pcfg.get("image_token", "<image>"))
        tiled = [tiles_of(im.convert("RGB"), pcfg, cropping=len(images) <= 2) for im in images]
        pieces = ("<|User|>: " + text.strip() + "\n\n<|Assistant|>:").split("<image>")
        assert len(pieces) == len(images) + 1
        ids = [bos]
        for j, piece in enumerate(pieces):
            ids += tok.encode(piece, add_special_tokens=False).ids if piece else []
            if j < len(images):
                ids += [image_id] * slots(*tiled[j][1])
        ids = np.asarray(ids, np.int64)
        x = self.embedding.run(None, {"input_ids": ids})[0]
        if images:
            head = self.m["source"]["config"].get("global_view_pos", "head") == "head"
            runs = [layout(np.concatenate([self.vision.run(None, {"pixel_values": t[None].astype(self.io)})[0]
                                           for t in tiles]), *grid, self.newline, self.sep, head)
                    for tiles, grid in tiled]
            x[ids == image_id] = np.concatenate(runs)
        self.eos = eos
        return x

    def generate(self, text: str, images: list[Image.Image], max_new_tokens: int) -> list[int]:
        x = self.prompt(text, images)
        for c in range(0, len(x), CHUNK):
            logits = self.forward(x[c:c + CHUNK])
        out = []
        while len(out) < max_new_tokens and self.P < self.m["attention"]["max_len"]:
            t = int(np.argmax(logits))
            out.append(t)
            if t == self.eos:
                break
            logits = self.forward(self.embedding.run(None, {"input_ids": np.array([t], np.int64)})[0])
        return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", type=Path)
    ap.add_argument("prompt")
    ap.add_argument("image", nargs="?")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    a = ap.parse_args()
    images = [Image.open(a.image)] if a.image else []
    print(json.dumps({"tokens": Loop(a.artifact).generate(a.prompt, images, a.max_new_tokens)}))

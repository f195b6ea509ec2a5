"""The model under test: a checkpoint (a synthesized preset or a Hugging Face directory) and one exported artifact
per precision, built on first use and cached.

Cache root: $VL2EDGE_CACHE/bench, else ~/.cache/vl2edge/bench.
  checkpoints/<preset>[-L<layers>]-seed<seed>/          synthesized (random weights, real dims)
  checkpoints/<preset>[-L<layers>]-seed<seed>.done      written once the synthesis completed
  artifacts/<checkpoint key>-<precision>-b<block>[-<target>]/   `vl2edge export` of it (atomic: no manifest, no
                                                        artifact)
An artifact is reused when its manifest names the same checkpoint directory, precision and block size; otherwise it
is exported again. A checkpoint directory given by path is keyed by its name and a hash of its absolute path.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from ..contract.manifest import FORMAT_VERSION
from ..model.presets import PRESETS


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("VL2EDGE_CACHE", Path.home() / ".cache" / "vl2edge")).expanduser() / "bench"


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


def prepare_checkpoint(model: str, layers: int | None = None, seed: int = 0, cache_dir=None,
                       progress: bool = True) -> tuple[Path, dict]:
    """-> (checkpoint directory, {"name", "source": "preset"|"directory", "layers"})."""
    if model in PRESETS:
        name = f"{model}{f'-L{layers}' if layers else ''}-seed{seed}"
        ckpt = cache_root(cache_dir) / "checkpoints" / name
        done = ckpt.parent / f"{name}.done"
        if not done.is_file():
            from ..model.synth import synthesize

            _log(progress, f"synthesizing preset {model!r}{f' ({layers} layers)' if layers else ''} into {ckpt} "
                           f"(random weights, real dims; once)")
            synthesize(ckpt, model, seed=seed, layers=layers, force=True, progress=progress)
            done.write_text("ok\n")
        return ckpt, {"name": model, "source": "preset", "layers": layers, "seed": seed}
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {model!r}: neither a preset ({', '.join(sorted(PRESETS))}) nor a checkpoint "
                         f"directory with a config.json")
    if layers:
        raise ValueError("--layers truncates a synthesized preset; it does not apply to a checkpoint directory")
    return path.resolve(), {"name": path.name, "source": "directory", "layers": None, "seed": None}


def checkpoint_key(ckpt: Path) -> str:
    ckpt = Path(ckpt).resolve()
    return f"{ckpt.name}-{hashlib.sha1(str(ckpt).encode()).hexdigest()[:8]}"


# A bench precision names an export: the routed experts' kind, then "-dense4" when the language model's other
# Linears and lm_head are int4 too (`vl2edge export --dense int4`; plain int4/int8 keep them int8), then "-head8" when
# lm_head stays int8 all the same (`--head int8`, the memory plan for Small in README), then "-vdyn" / "-v8" when
# the vision matmuls are asked to be int8-dynamic / int8 (`--vision`) and "-kv8" / "-kvf" when the KV cache is asked
# to be int8 / float (`--kv-cache`), instead of the exporter's auto choices. E.g. "int4-v8": int4 with fp32-activation
# vision (the int8 artifact's before commit 8df3731, 2026-12-01).
SUFFIXES = {"-dense4": ("dense", "int4"), "-head8": ("head", "int8"), "-vdyn": ("vision", "int8-dynamic"),
            "-v8": ("vision", "int8"), "-kv8": ("kv_cache", "int8"), "-kvf": ("kv_cache", "float")}


def export_options(precision: str) -> dict:
    """Bench precision -> export() keyword arguments."""
    opts = {}
    for suffix, (key, value) in SUFFIXES.items():
        if suffix in precision:
            opts[key] = value
            precision = precision.replace(suffix, "")
    return {"experts": precision, **opts}


BASE_PRECISIONS = ("int4", "int8", "fp32", "fp16")


def check_precision(precision: str) -> None:
    """A known experts kind, with suffixes only where the export accepts them (quantized experts)."""
    opts = export_options(precision)
    if opts["experts"] not in BASE_PRECISIONS or (len(opts) > 1 and opts["experts"] not in ("int4", "int8")) \
            or ("head" in opts and "dense" not in opts):  # -head8 alone is plain int4/int8
        raise ValueError(f"precision {precision!r}: one of {BASE_PRECISIONS}, int4/int8 optionally followed by "
                         f"{' and/or '.join(SUFFIXES)} (e.g. int4-dense4-vdyn; -head8 after -dense4 only)")


def precision_name(quantization: dict) -> str:
    """A manifest's "quantization" record -> its bench precision name (the inverse of export_options)."""
    experts = quantization["experts"]["kind"]
    name = experts
    if experts in ("int4", "int8") and quantization.get("linear", {}).get("kind") == "int4":
        name += "-dense4"
        if quantization.get("lm_head", {}).get("kind") == "int8":
            name += "-head8"
    vision = quantization.get("vision", {}).get("asked", "auto")
    if vision != "auto":
        name += {"int8-dynamic": "-vdyn", "int8": "-v8"}[vision]
    kv = quantization.get("kv_cache", {})
    if kv.get("asked", "auto") != "auto":
        name += {"int8": "-kv8", "float": "-kvf"}[kv["kind"]]
    return name


def _auto_choices_current(m: dict) -> bool:
    """Whether the exporter would still make the artifact's auto choices (KV cache, vision form) as recorded: one
    exported before they changed is made again (since 8df3731, int8 experts take int4's 8-bit cache and int8-dynamic
    vision)."""
    from ..export.exporter import DYNAMIC, choose_kv_cache, choose_vision

    q, target = m["quantization"], m.get("target")
    experts = q["experts"]["kind"]
    kv = q.get("kv_cache", {})
    if kv.get("asked") == "auto" and kv["kind"] != choose_kv_cache("auto", None, target, experts):
        return False
    if q["vision"].get("asked") == "auto":
        return ("vision_dynamic" in q) == (choose_vision("auto", target, experts, None) == DYNAMIC)
    return True


def _matches(art: Path, ckpt: Path, precision: str, block_size: int, target: str) -> bool:
    try:
        m = json.loads((art / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    q = m.get("quantization", {}).get("experts", {})
    return (m.get("format_version") == FORMAT_VERSION  # an older exporter's artifact is made again
            and "asked" in m["quantization"].get("vision", {})  # as is one from before the vision default was auto
            and all("grid" in d for d in m["quantization"].values()  # and one from before the 16-level int4 grid
                    if isinstance(d, dict) and d.get("kind") == "int4")
            and _auto_choices_current(m)
            and Path(m["source"]["checkpoint"]).resolve() == Path(ckpt).resolve()
            and precision_name(m["quantization"]) == precision
            and (q.get("block_size", block_size) == block_size or precision in ("fp32", "fp16"))
            and m.get("target") == target)


def prepare_artifact(ckpt: Path, precision: str, block_size: int = 64, target: str = "cpu", cache_dir=None,
                     progress: bool = True, force: bool = False) -> Path:
    """The cached export of `ckpt` at `precision` (routed experts; see export/exporter.py for the rest).
    force: export again even if a matching one is cached (after a change to the exporter: the cache does not know
    which code made an artifact; the report records its creation time)."""
    suffix = "" if target == "cpu" else f"-{target}"
    art = cache_root(cache_dir) / "artifacts" / f"{checkpoint_key(ckpt)}-{precision}-b{block_size}{suffix}"
    if not force and _matches(art, ckpt, precision, block_size, target):
        return art
    from ..export.exporter import export

    _log(progress, f"exporting {ckpt} ({precision}, block {block_size}, {target}) into {art} (once)")
    return export(ckpt, art, block_size=block_size, target=target, force=True, progress=progress,
                  **export_options(precision))

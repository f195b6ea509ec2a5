"""Which onnxruntime release accepts what the exporter writes, and the artifact for an older one
(`vl2edge export --min-onnxruntime VERSION`).

Jetson's onnxruntime (NVIDIA's index, JetPack 6: 1.20-1.23) and Python 3.10 (no cp310 wheel after 1.23.2) lag PyPI,
so an artifact names the oldest onnxruntime it needs (manifest `onnxruntime.min`) and the exporter can write one
for an older release. The floors below are each release's registered schemas
(`onnxruntime.capi._pybind_state.get_all_operator_schema()` of the PyPI CPU wheels 1.20.1 ... 1.32.0) and, for the
kernels, sessions created and run (`python -m vl2edge.bench.platforms.ort_versions`, docs/benchmarks.md):

  feature                      first release   what the exporter writes without it
  GatherBlockQuantized bits     1.23.0          (none: the int8 embedding needs it)
  MoE/QMoE swiglu_fusion        1.23.0          (none: below 1.23 an artifact with experts is refused)
  CPU MoE kernel (fp32 experts) 1.23.1          (none)
  QMoE block_size               1.23.2          (none: 1.23.0/1.23.1 quantize per column only)
  CPU QMoE 4-bit, right         1.24.3          (none: --experts int8 runs on 1.23.2) 1.23.2 - 1.24.2 accept
                                                block-wise 4-bit experts and compute something else: cosine 0.021
                                                against a numpy MoE over the same dequantized weights, where 1.24.3
                                                and newer agree to 3e-7 (and int8 agrees on 1.23.2)
  QMoE router_weights input     1.25.0          routing form "log_weights": the weights reach QMoE as log(w) in
                                                router_probs and the output is scaled by sum(w) (export/mlp.py),
                                                exact under every QMoE semantics
  GQA quantized KV cache (CPU)  1.27.0          a float cache for MHA (Tiny); MLA's uint8 latent cache is
                                                standard integer ops and stays. 1.25.0 and 1.26.0 accept the
                                                graph (14 inputs, k_quant_type) and fail when it runs ("Tensor
                                                type mismatch" in GroupQueryAttention)
  QMoE accuracy_level           1.31.0          the attribute is left out: QMoE then multiplies with fp32
                                                activations (its default), the same weights

An artifact's floor is the newest feature it uses, so `--min-onnxruntime` only ever removes features and the
manifest records what the written graphs need, which may be older than what was asked.
"""

from __future__ import annotations

import re

Version = tuple[int, int, int]

# the onnxruntime the project pins for exporting and testing (pyproject's [dev]/[export] extras)
PINNED = (1, 31, 1)
# artifacts written before the manifest named a floor were made with the pinned onnxruntime of their day
LEGACY_FLOOR = (1, 31, 1)

FEATURES: dict[str, tuple[Version, str]] = {
    "gather_block_quantized_bits": ((1, 23, 0), "GatherBlockQuantized's bits attribute (the int8 embedding)"),
    "swiglu_fusion": ((1, 23, 0), "MoE/QMoE's swiglu_fusion attribute"),
    "cpu_moe": ((1, 23, 1), "a CPU kernel for the fp32 MoE op"),
    "qmoe_block_size": ((1, 23, 2), "QMoE's block_size attribute (block-wise expert scales)"),
    "cpu_qmoe_int4": ((1, 24, 3), "a CPU QMoE kernel that computes block-wise 4-bit experts right"),
    "qmoe_router_weights": ((1, 25, 0), "QMoE's router_weights input"),
    "gqa_quantized_cache": ((1, 27, 0), "a CPU GroupQueryAttention kernel for the quantized KV cache"),
    "qmoe_accuracy_level": ((1, 31, 0), "QMoE's accuracy_level attribute"),
}


def parse_version(text: str) -> Version:
    """'1.23.2' -> (1, 23, 2); '1.24' -> (1, 24, 0); a local or pre-release suffix ('1.23.0+cu126') is ignored."""
    m = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if not m:
        raise ValueError(f"{text!r} is not an onnxruntime version (expected MAJOR.MINOR[.PATCH], e.g. 1.23.2)")
    return int(m[1]), int(m[2]), int(m[3] or 0)


def version_str(v: Version) -> str:
    return ".".join(map(str, v))


def has(feature: str, floor: Version | None) -> bool:
    """Whether an artifact for onnxruntime >= floor may use the feature (floor None: the pinned release)."""
    return (floor or PINNED) >= FEATURES[feature][0]


def artifact_floor(features: set[str]) -> Version:
    """The oldest onnxruntime that has every feature an artifact's graphs use."""
    return max((FEATURES[f][0] for f in features), default=(1, 20, 0))


class CompatError(ValueError):
    """An export that no graph form can give the asked onnxruntime."""


def check_expressible(floor: Version, target: str, experts: str, moe: bool) -> None:
    """Refuse, naming the missing feature and the release that has it, what cannot be written for `floor`."""
    if not moe:
        return
    needed = ["swiglu_fusion"]
    if experts in ("int4", "int8"):
        needed.append("qmoe_block_size")
        if experts == "int4" and target == "cpu":
            needed.append("cpu_qmoe_int4")
    elif target == "cpu":
        needed.append("cpu_moe")
    for f in needed:
        first, what = FEATURES[f]
        if floor < first:
            raise CompatError(f"--min-onnxruntime {version_str(floor)}: {what} first shipped in onnxruntime "
                              f"{version_str(first)}, and a {target} artifact with {experts} experts needs it: "
                              f"choose {version_str(first)} or newer"
                              + (", or --experts int8" if f == "cpu_qmoe_int4" else ""))

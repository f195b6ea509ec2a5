"""Quantization quality report: how far each dequantized tensor is from its original, grouped by tensor kind.

Per tensor (computed in float64, whatever the input dtype):
  rel_err      ||W - W_hat|| / ||W||  (Frobenius); 0 when both are all-zero, inf when only W is
  cosine       <W, W_hat> / (||W|| ||W_hat||) over the flattened tensors; 1 when both are all-zero, 0 when one is
  max_abs_err  max |W - W_hat|

QualityReport groups tensors by a free-form kind ("expert.fc1", "attention.q_proj", "embedding", ...) and
summarizes each kind as count / numel / mean, max and min of every metric, plus the worst tensor by rel_err.
summary() is plain JSON (no NaN/inf: non-finite values become null), ready for the exporter to write into the
artifact.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

METRICS = ("rel_err", "cosine", "max_abs_err")


def tensor_error(original, dequantized, chunk: int = 1 << 22) -> dict[str, float]:
    """rel_err, cosine and max_abs_err of one tensor (same shape). Sums are accumulated in float64 over chunks of
    `chunk` elements, so a 129,280 x 2560 embedding table costs a few MB of temporaries, not gigabytes."""
    if np.shape(original) != np.shape(dequantized):
        raise ValueError(f"shape mismatch: {np.shape(original)} vs {np.shape(dequantized)}")
    w_all, h_all = np.asarray(original).reshape(-1), np.asarray(dequantized).reshape(-1)
    ww = hh = dd = wh = 0.0
    max_abs = 0.0
    for i in range(0, w_all.size, chunk):
        # float64: sums of squares of fp16 (or large fp32) weights would overflow or lose digits in their own dtype
        w, w_hat = w_all[i:i + chunk].astype(np.float64), h_all[i:i + chunk].astype(np.float64)
        diff = w - w_hat
        ww, hh, dd, wh = ww + w @ w, hh + w_hat @ w_hat, dd + diff @ diff, wh + w @ w_hat
        max_abs = max(max_abs, float(np.abs(diff).max()))
    norm_w, norm_hat, norm_diff = math.sqrt(ww), math.sqrt(hh), math.sqrt(dd)
    if norm_w > 0:
        rel_err = norm_diff / norm_w
    else:
        rel_err = 0.0 if norm_diff == 0 else math.inf
    if norm_w > 0 and norm_hat > 0:
        cosine = wh / (norm_w * norm_hat)
    else:
        cosine = 1.0 if norm_w == norm_hat else 0.0  # both zero: identical; one zero: orthogonal by convention
    return {"rel_err": rel_err, "cosine": cosine, "max_abs_err": max_abs}


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


class QualityReport:
    """Collects tensor_error() per named tensor and summarizes by kind."""

    def __init__(self) -> None:
        self._by_kind: dict[str, list[tuple[str, int, dict[str, float]]]] = defaultdict(list)

    def add(self, kind: str, name: str, original, dequantized) -> dict[str, float]:
        """Measure one tensor, record it under `kind`, and return its metrics."""
        metrics = tensor_error(original, dequantized)
        self._by_kind[kind].append((name, int(np.size(original)), metrics))
        return metrics

    def summary(self, include_tensors: bool = False) -> dict:
        """{kind: {"count", "numel", "<metric>": {"mean", "max", "min"}, "worst": {"name", "rel_err"}}}.

        include_tensors=True adds "tensors": {name: metrics} per kind (large for a full model).
        """
        out = {}
        for kind in sorted(self._by_kind):
            records = self._by_kind[kind]
            entry: dict = {"count": len(records), "numel": sum(n for _, n, _ in records)}
            for metric in METRICS:
                values = np.array([m[metric] for _, _, m in records], dtype=np.float64)
                with np.errstate(invalid="ignore"):  # mean of [inf, ...] is inf, not an error
                    stats = {"mean": values.mean(), "max": values.max(), "min": values.min()}
                entry[metric] = {k: _json_float(v) for k, v in stats.items()}
            worst_name, _, worst = max(records, key=lambda r: r[2]["rel_err"])
            entry["worst"] = {"name": worst_name, "rel_err": _json_float(worst["rel_err"])}
            if include_tensors:
                entry["tensors"] = {name: {k: _json_float(v) for k, v in m.items()} for name, _, m in records}
            out[kind] = entry
        return out

"""Outlier diagnostics from calibration statistics: why a model is hard to quantize.

* **Outlier features** (LLM.int8, Dettmers et al. 2022): hidden dim ``d`` is an outlier
  feature when ``|x_d| ≥ 6`` on at least 6% of the tokens of a layer's hidden-state input
  (the normalized inputs of q/k/v and of gate/up), in at least 25% of the layers.  Per
  input the statistic is the ``outliers`` observer's ``channel_rows[d] / rows``.
* **Massive activations** (Sun et al. 2024): residual-stream entries with ``|x| > 100``
  and ``|x| ≥ ~1000 × median|x|`` of that layer's residual; the rows they sit on come
  from the ``absmax_token`` observer (per window and position), the dims from
  ``absmax_channel``, the median from a sample of rows.
* **Super weights** (Yu et al. 2024): in ``down_proj``'s ``W[K, N]`` an entry ``W[k, n]``
  whose input channel ``k`` spikes (``max|x_k| ≥ 10 × median_k``), whose output channel
  ``n`` spikes, and whose product ``max|x_k|·|W[k, n]|`` explains at least half of that
  output spike — a single weight producing a massive activation.
* **fp16 range**: every residual-stream value and linear input whose calibrated ``max|x|``
  passes fp16's largest finite value 65504 (it would be ``inf`` in an fp16 graph), or comes
  within a factor ``fp16_headroom`` of it (a slightly different text may pass it).
* **Severity** of each linear input: ``max|x| / std(x)`` in classes (< 10 mild,
  < 20 moderate, < 30 high, else severe) and the kurtosis ``E[(x − μ)⁴]/σ⁴`` (3 for a
  Gaussian), both over the sampled rows except ``max|x|`` (all calibration rows).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Criteria:
    threshold: float = 6.0
    min_token_fraction: float = 0.06
    min_layer_fraction: float = 0.25
    massive_abs: float = 100.0
    massive_ratio: float = 1000.0
    spike_ratio: float = 10.0
    super_share: float = 0.5
    severity_bounds: tuple[float, float, float] = (10.0, 20.0, 30.0)
    fp16_headroom: float = 4.0


def fp16_range(values: list[tuple[str, int, str, float]], crit: Criteria = Criteria()) -> dict[str, Any]:
    """Values past (or within ``fp16_headroom`` of) fp16's range: ``(label, layer, value, max|x|)`` each."""
    from qcompiler.floattype import FP16_MAX

    over = [{"label": lb, "layer": layer, "value": v, "absmax": a} for lb, layer, v, a in values if a > FP16_MAX]
    near = [{"label": lb, "layer": layer, "value": v, "absmax": a} for lb, layer, v, a in values
            if FP16_MAX / crit.fp16_headroom < a <= FP16_MAX]
    top = max((a for *_, a in values), default=0.0)
    return {"limit": FP16_MAX, "headroom": crit.fp16_headroom, "max_abs": top, "fp16_safe": not over,
            "overflow": over, "near": near}


SEVERITY_CLASSES = ("mild", "moderate", "high", "severe")


def outlier_features(inputs: list[tuple[int, np.ndarray, np.ndarray]], num_layers: int,
                     crit: Criteria = Criteria()) -> dict[str, Any]:
    """LLM.int8 outlier dims from ``[(layer, channel_fraction[C], absmax[C])]`` of hidden inputs."""
    if not inputs:
        return {"dims": [], "fraction": np.zeros((0, 0))}
    frac = np.stack([f for _, f, _ in inputs])  # [inputs, C]
    absmax = np.stack([a for _, _, a in inputs])
    layers = np.array([layer for layer, _, _ in inputs])
    flagged = frac >= crit.min_token_fraction
    per_layer = np.zeros((max(num_layers, 1), frac.shape[1]), dtype=bool)
    for i, layer in enumerate(layers):
        per_layer[layer] |= flagged[i]
    layer_fraction = per_layer.sum(axis=0) / max(num_layers, 1)
    dims = []
    for d in np.nonzero(layer_fraction >= crit.min_layer_fraction)[0]:
        dims.append({
            "dim": int(d),
            "layer_fraction": float(layer_fraction[d]),
            "layers": [int(x) for x in np.nonzero(per_layer[:, d])[0]],
            "mean_token_fraction": float(frac[:, d].mean()),
            "max_abs": float(absmax[:, d].max()),
        })
    return {"dims": dims, "fraction": frac, "layer_fraction": layer_fraction}


def massive_activations(label: str, layer: int, absmax_token: np.ndarray, absmax_channel: np.ndarray,
                        median_abs: float, crit: Criteria = Criteria()) -> dict[str, Any]:
    """Massive rows/dims of one residual value (``absmax_token[windows, positions]``)."""
    limit = max(crit.massive_abs, crit.massive_ratio * median_abs)
    tok = np.atleast_2d(absmax_token)
    rows = np.argwhere(tok > limit)
    dims = np.nonzero(absmax_channel > limit)[0]
    positions = Counter(int(p) for _, p in rows)
    return {
        "value": label,
        "layer": layer,
        "median_abs": float(median_abs),
        "max_abs": float(tok.max()) if tok.size else 0.0,
        "limit": float(limit),
        "dims": [int(d) for d in dims],
        "rows": len(rows),
        "row_fraction": float(len(rows) / max(tok.size, 1)),
        "positions": {str(p): c for p, c in sorted(positions.items())},
        "windows": int(tok.shape[0]),
    }


def massive_examples(label: str, layer: int, seq: np.ndarray, ids: np.ndarray, median_abs: float,
                     crit: Criteria = Criteria(), decode: Any = None, limit_count: int = 8) -> list[dict[str, Any]]:
    """Exact (window, position, dim, value, token) of massive entries in full sequences ``[B, T, C]``."""
    limit = max(crit.massive_abs, crit.massive_ratio * median_abs)
    out = []
    for b, t, d in np.argwhere(np.abs(seq) > limit)[:limit_count]:
        tid = int(ids[b, t])
        out.append({
            "value": label, "layer": layer, "window": int(b), "position": int(t), "dim": int(d),
            "x": float(seq[b, t, d]), "ratio": float(abs(seq[b, t, d]) / max(median_abs, 1e-30)),
            "token_id": tid, "token": decode(tid) if decode is not None else str(tid),
        })
    return out


def super_weights(layer: int, key: str, w: np.ndarray, in_absmax: np.ndarray, out_absmax: np.ndarray,
                  crit: Criteria = Criteria(), top: int = 3) -> list[dict[str, Any]]:
    """Super-weight candidates of one ``down_proj`` ``W[K, N]`` (see module docstring)."""
    med_in = float(np.median(in_absmax)) or 1e-30
    med_out = float(np.median(out_absmax)) or 1e-30
    w_std = float(w.std()) or 1e-30
    found = []
    for k in np.argsort(-in_absmax)[:top * 4]:
        if in_absmax[k] < crit.spike_ratio * med_in:
            break
        contrib = in_absmax[k] * np.abs(w[k])
        n = int(np.argmax(contrib))
        share = float(contrib[n] / max(out_absmax[n], 1e-30))
        if out_absmax[n] < crit.spike_ratio * med_out or share < crit.super_share:
            continue
        found.append({
            "layer": layer, "linear": key, "row": int(k), "col": int(n), "weight": float(w[k, n]),
            "weight_z": float(abs(w[k, n]) / w_std), "input_absmax": float(in_absmax[k]),
            "input_spike": float(in_absmax[k] / med_in), "output_absmax": float(out_absmax[n]),
            "output_spike": float(out_absmax[n] / med_out), "contribution_share": min(share, 1.0),
        })
    found.sort(key=lambda s: -s["input_absmax"] * abs(s["weight"]))
    return found[:top]


def severity(absmax: float, rows: np.ndarray, crit: Criteria = Criteria()) -> dict[str, Any]:
    """``max|x|/std`` class and kurtosis of an activation (``rows`` a sample of it)."""
    x = rows.astype(np.float64).ravel()
    mu = float(x.mean()) if x.size else 0.0
    std = float(x.std()) if x.size else 0.0
    kurt = float(np.mean((x - mu) ** 4) / std**4) if std > 0 else 0.0
    ratio = absmax / std if std > 0 else 0.0
    cls = SEVERITY_CLASSES[int(np.searchsorted(np.asarray(crit.severity_bounds), ratio, side="right"))]
    return {"absmax": float(absmax), "std": std, "ratio": float(ratio), "class": cls, "kurtosis": kurt}

"""smooth-scale (SmoothQuant): move activation outliers into the weights, exactly.

For a group of linears reading ``X[T, K]`` (q/k/v, gate/up, o, down) and any ``s > 0``::

    Y = X·W = (X·diag(s)⁻¹)·(diag(s)·W)

``diag(s)⁻¹`` folds upstream of X (``passes/_channels.py``: into the RMSNorm weight
``γ ← γ/s`` for q/k/v and gate/up, into v_proj's columns for o — tied across the query
heads sharing a kv head — and into up_proj's columns for down, or an explicit ``Mul``
when nothing can take it, logged), ``diag(s)`` into W's rows.  Before quantization the
model is unchanged (up to float rounding).  SmoothQuant's choice::

    s_j = max|X_j|^α / max|W_j|^(1−α)      (max|X_j| over calibration data, max|W_j| over the group's W rows)

flattens X's channel ranges (α → 1) at the cost of W's (α → 0).  By default each ``s_j`` is
rounded to a power of two (``pow2``): dividing and multiplying by ``2^k`` is exact in binary
floating point, so every product ``x_j·w_j`` — and the float model's logits — stay bit-identical.  With ``search`` (the
default) α is chosen per group from a grid (plus "no smoothing") to minimize that group's
quantized output error on sampled calibration rows (and, for wide groups, a seeded sample
of output columns: per-column errors are independent, so the sample estimates their sum)::

    err(α) = Σ_W ‖X·W − Q_a(X/s)·Q_w(diag(s)·W)‖² / ‖X·W‖²

with ``Q_w`` symmetric int8 per output channel and ``Q_a`` the activation quantizer the
recipe will use (``act=per-token``: per-row abs-max; ``act=static``: one scale from the
calibration abs-max of X/s, ``max_j max|X_j|/s_j``).  Groups whose input comes through
a previous linear (o, down) are smoothed first, so the q/k/v and gate/up searches see the
final v/up weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from qcompiler.passes._channels import (
    LinearGroup,
    Upstream,
    apply_input_scale,
    channel_absmax,
    find_upstream,
    linear_groups,
    set_weight,
    tie,
)
from qcompiler.passes.canonicalize import canonical_summary
from tqdm import tqdm

from qcompiler.calibrate import StatRequest
from qcompiler.errors import CalibrationError
from qcompiler.pipeline import QCPass, register_pass
from qcompiler.spec import linear_info

log = logging.getLogger(__name__)

GROUP_KINDS = ("qkv", "gate_up", "o_proj", "down_proj")
_EPS = 1e-5


@dataclass(frozen=True)
class SmoothScaleConfig:
    alpha: float = 0.5  # migration strength when search is off
    search: bool = True  # per-group α grid search on calibration rows
    alpha_min: float = 0.0
    alpha_max: float = 1.0
    grid: int = 11  # number of α values in [alpha_min, alpha_max]
    act: str = "per-token"  # activation quantizer the search assumes: per-token | static
    groups: str = "qkv:gate_up:o_proj:down_proj"  # ':'-separated group kinds to smooth
    rows: int = 256  # calibration rows sampled for the search
    cols: int = 512  # output columns (of the group's concatenated W) sampled for the search
    pow2: bool = True  # round s to powers of two: the rescaled model is then bit-exact in float
    report_channels: bool = False  # put per-channel ranges and scales into the report

    def __post_init__(self) -> None:
        for name in ("alpha", "alpha_min", "alpha_max"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"alpha_min {self.alpha_min} is above alpha_max {self.alpha_max}")
        if self.grid < 1:
            raise ValueError(f"grid must be at least 1, got {self.grid}")
        if self.act not in ("per-token", "static"):
            raise ValueError(f"act must be per-token or static, got {self.act}")
        unknown = set(filter(None, self.groups.split(":"))) - set(GROUP_KINDS)
        if unknown:
            raise ValueError(f"unknown group kind(s) {', '.join(sorted(unknown))}; choose from {', '.join(GROUP_KINDS)}")
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"rows and cols must be positive, got {self.rows} and {self.cols}")

    def alphas(self) -> list[float]:
        if not self.search:
            return [self.alpha]
        if self.grid == 1:
            return [self.alpha_min]
        return [float(a) for a in np.linspace(self.alpha_min, self.alpha_max, self.grid)]


def smoothing_scales(act_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float, pow2: bool = False) -> np.ndarray:
    """``s_j = max|X_j|^α / max|W_j|^(1−α)`` (channels that are zero on either side keep ``s_j = 1``).

    With ``pow2`` each ``s_j`` is rounded to the nearest power of two (in log scale), so that
    ``x/s`` and ``s·w`` are exact in binary floating point and the products ``x_j·w_j`` unchanged.
    """
    a = np.asarray(act_absmax, np.float64)
    w = np.asarray(w_absmax, np.float64)
    s = np.power(np.maximum(a, _EPS), alpha) / np.power(np.maximum(w, _EPS), 1.0 - alpha)
    s = np.where((a > 0) & (w > 0) & np.isfinite(s), s, 1.0)
    s = np.clip(s, 2.0**-20, 2.0**20)
    return np.exp2(np.round(np.log2(s))) if pow2 else s


def quantize_per_channel_int8(w: np.ndarray) -> np.ndarray:
    """Symmetric int8 per-output-column fake quantization of ``W[K, N]``."""
    s = np.abs(w).max(axis=0, keepdims=True) / 127.0
    s = np.where(s > 0, s, 1.0).astype(np.float32)
    return (np.clip(np.rint(w / s), -127, 127) * s).astype(np.float32)


def quantize_act(x: np.ndarray, kind: str, absmax: float | None = None) -> np.ndarray:
    """Fake-quantize rows ``X[T, K]``: per-token abs-max, or static with the tensor abs-max ``absmax``."""
    if kind == "per-token":
        s = np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-8) / 127.0
    else:
        s = np.float32(max(float(absmax or 0.0), 1e-8) / 127.0)
    return (np.clip(np.rint(x / s), -127, 127) * s).astype(np.float32)


def group_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray | None, act: str,
                act_absmax: np.ndarray, refs: list[np.ndarray]) -> float:
    """Relative squared error of the group's quantized outputs with smoothing ``s`` (None: no smoothing)."""
    s32 = np.ones(x.shape[1], np.float32) if s is None else s.astype(np.float32)
    xq = quantize_act(x / s32, act, float(np.max(act_absmax / s32)))
    num = den = 0.0
    for w, ref in zip(weights, refs):
        y = xq @ quantize_per_channel_int8(w * s32[:, None])
        num += float(np.sum((y - ref) ** 2, dtype=np.float64))
        den += float(np.sum(ref.astype(np.float64) ** 2))
    return num / max(den, 1e-30)


def group_kind(group: LinearGroup) -> str:
    return group.key.rsplit(".", 1)[-1]


@register_pass
class SmoothScale(QCPass):
    """SmoothQuant with a per-group α search, folded exactly (see the module docstring)."""

    name = "smooth-scale"
    Config = SmoothScaleConfig
    needs_canonical = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg: SmoothScaleConfig = self.config
        summary = canonical_summary(model)
        kinds = set(filter(None, cfg.groups.split(":")))
        groups = [g for g in linear_groups(model) if group_kind(g) in kinds]
        if not groups:
            log.warning("smooth-scale: no linear group to smooth")
            return ir.passes.PassResult(model, modified=False)
        ups = [find_upstream(g, summary.norms.get(linear_info(g.linears[0]).key)) for g in groups]  # type: ignore[union-attr]
        calibrate = self.context.require_calibration(self.name)
        names = [g.x.name for g in groups]
        t0 = time.perf_counter()
        stats = calibrate(model, [StatRequest(n, ("absmax_channel",)) for n in names])
        absmax = {g.x.name: _stat(stats, g, "absmax_channel") for g in groups}
        samples = _capture(calibrate, model, names, cfg.rows) if cfg.search else {}
        t1 = time.perf_counter()
        log.info("smooth-scale: statistics of %d inputs in %.1fs", len(names), t1 - t0)

        report: dict[str, Any] = {}
        order = sorted(range(len(groups)), key=lambda i: (ups[i].kind != "linear", i))
        for i in tqdm(order, desc="smooth-scale", unit="group", leave=False):
            g, up = groups[i], ups[i]
            report[g.key] = self._smooth(model.graph, g, up, absmax[g.x.name], samples.get(g.x.name))
        self.context.report[self.name] = {
            "act": cfg.act,
            "search": cfg.search,
            "groups": {k: report[k] for k in sorted(report, key=_layer_order)},
        }
        explicit = [k for k, r in report.items() if r["folded_into"] == "mul"]
        if explicit:
            log.warning("smooth-scale: %d group(s) got an explicit Mul: %s", len(explicit), ", ".join(explicit[:6]))
        log.info("smooth-scale: %d groups smoothed in %.1fs", len(report), time.perf_counter() - t1)
        return ir.passes.PassResult(model, modified=True)

    def _smooth(self, graph: ir.Graph, g: LinearGroup, up: Upstream, a: np.ndarray,
                x: np.ndarray | None) -> dict[str, Any]:
        cfg: SmoothScaleConfig = self.config
        weights = g.weights()
        a = tie(np.asarray(a, np.float64), up)
        w_max = tie(np.max([channel_absmax(w) for w in weights], axis=0).astype(np.float64), up)
        candidates: list[tuple[float | None, np.ndarray | None]] = [
            (al, smoothing_scales(a, w_max, al, cfg.pow2)) for al in cfg.alphas()]
        errs: dict[str, float] = {}
        best_alpha, best_s = candidates[0]
        if x is not None:
            x = x.astype(np.float32)
            w_cat = np.concatenate(weights, axis=1)
            if w_cat.shape[1] > cfg.cols:  # per-column errors are independent: a column sample estimates their sum
                cols = np.random.default_rng(0).choice(w_cat.shape[1], cfg.cols, replace=False)
                w_cat = w_cat[:, np.sort(cols)]
            search_w = [np.ascontiguousarray(w_cat, np.float32)]
            refs = [x @ w for w in search_w]
            candidates.append((None, None))
            best_err = np.inf
            for al, s in candidates:
                e = group_error(x, search_w, s, cfg.act, a.astype(np.float32), refs)
                errs["none" if al is None else f"{al:.2f}"] = e
                if e < best_err:
                    best_err, best_alpha, best_s = e, al, s
        entry: dict[str, Any] = {
            "linears": [linear_info(n).key for n in g.linears],  # type: ignore[union-attr]
            "alpha": None if best_alpha is None else round(float(best_alpha), 3),
            "folded_into": up.where,
            "range_before": float(a.max()),
            "flatness_before": _flatness(a),
        }
        if up.kind == "mul" and up.reason:
            entry["why_not_folded"] = up.reason
        if errs:
            entry["error_none"] = errs["none"]
            entry["error"] = min(errs.values())
        if best_s is None:
            entry.update(range_after=entry["range_before"], flatness_after=entry["flatness_before"], folded_into="none")
            return entry
        if up.kind == "mul":
            log.info("smooth-scale: %s: explicit Mul (%s)", g.key, up.reason)
        apply_input_scale(graph, g, up, 1.0 / best_s, g.key.replace(".", "_") + "_smooth")
        for node in g.linears:
            set_weight(graph, node, LinearGroup.weight(node).astype(np.float64) * best_s[:, None])
        after = a / best_s
        entry.update(range_after=float(after.max()), flatness_after=_flatness(after))
        if cfg.report_channels:
            entry.update(channel_absmax_before=_floats(a), channel_absmax_after=_floats(after), scales=_floats(best_s))
        return entry


def _stat(stats: Any, g: LinearGroup, observer: str) -> np.ndarray:
    try:
        arr = np.asarray(stats.get(g.x.name, observer), np.float64)
    except CalibrationError as e:
        raise CalibrationError(f"smooth-scale: {g.key}: {e}") from None
    except KeyError:
        raise CalibrationError(f"smooth-scale: {g.key}: no '{observer}' statistics for value '{g.x.name}'") from None
    if arr.shape != (g.channels,) or not np.all(np.isfinite(arr)):
        raise CalibrationError(f"smooth-scale: {g.key}: '{observer}' statistics of value '{g.x.name}' have shape "
                               f"{arr.shape} or non-finite entries; expected {g.channels} finite channels")
    return arr


def _capture(calibrate: Any, model: ir.Model, names: list[str], rows: int) -> dict[str, np.ndarray]:
    """Bounded row samples of each value (the same rows for all)."""
    capture = getattr(calibrate, "capture", None)
    if capture is not None:
        found = capture(model, names, rows)
    else:
        stats = calibrate(model, [StatRequest(n, ("sample",)) for n in names])
        found = {n: stats.get(n, "sample") for n in names}
    out = {}
    for n in names:
        if n not in found:
            raise CalibrationError(f"smooth-scale: no calibration rows of value '{n}'")
        out[n] = np.asarray(found[n].rows, np.float32)[:rows]
    return out


def _flatness(a: np.ndarray) -> float:
    return float(a.max() / max(float(np.median(a)), 1e-12))


def _floats(a: np.ndarray) -> list[float]:
    return [float(f"{v:.5g}") for v in np.asarray(a, np.float64)]


def _layer_order(key: str) -> tuple[int, str]:
    parts = key.split(".")
    return (int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 1 << 30, key)

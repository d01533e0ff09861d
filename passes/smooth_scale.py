"""smooth-scale (SmoothQuant): move activation outliers into the weights, exactly.

For a group of linears reading ``X[T, K]`` (q/k/v, gate/up, o, down) and any ``s > 0``::

    Y = X·W = (X·diag(s)⁻¹)·(diag(s)·W)

``diag(s)⁻¹`` folds upstream of X (``passes/_channels.py``: into the norm for q/k/v and
gate/up — RMSNorm ``γ ← γ/s``, LayerNorm ``γ ← γ/s, β ← β/s``, Gemma ``w ← (1 + w)/s − 1`` —,
into v_proj's columns (and bias) for o — tied across the query heads sharing a kv head — and
into up_proj's columns (and bias) for down, or an explicit ``Mul`` when nothing can take it,
logged and reported with the reason), ``diag(s)`` into W's rows.  A parallel block's norm
feeding attention and MLP (cohere, falcon, phi) is one group ``qkv+gate_up`` / ``qkv+up``:
one ``s`` shared by all its consumers, folded into that norm.  Before quantization the
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
calibration abs-max of X/s, ``max_j max|X_j|/s_j``).  For static activations the range a
row is quantized with is computed *without its own calibration window* (leave one window
out, from per-window channel maxima): a per-tensor range flattened by α → 1 sits exactly at
every channel's calibration maximum, and unseen text exceeding a channel's maximum then
saturates; the held-out range lets the search see that.  Groups whose input comes through
a previous linear (o, down) are smoothed first, so the q/k/v and gate/up searches see the
final v/up weights.

The searches of one phase (first o/down, then q/k/v and gate/up) are independent:
:func:`search_alpha` is a pure function of the group's arrays (statistics, the column
sample of W, the sampled rows), mapped over the groups by the context's executor — in this
process, or as Ray tasks with ``--ray`` (the same function on the same arrays: the same
choice) — and the chosen scales are folded in group order afterwards.
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
    group_kinds,
    linear_groups,
    set_weight,
    tie,
)
from qcompiler.passes.canonicalize import canonical_summary

from qcompiler.calibrate import StatRequest
from qcompiler.distributed import Executor, Resources
from qcompiler.errors import CalibrationError, InputError
from qcompiler.pipeline import QCPass, register_pass
from qcompiler.quant.smoothing import group_error, smoothing_scales
from qcompiler.spec import linear_info

log = logging.getLogger(__name__)

GROUP_KINDS = ("qkv", "gate_up", "o_proj", "down_proj")


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


def selected(group: LinearGroup, kinds: set[str]) -> bool:
    """The group is one of ``kinds`` (a parallel block's shared group is both ``qkv`` and ``gate_up``)."""
    return bool(group_kinds(group.roles) & kinds)


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
        groups = [g for g in linear_groups(model) if selected(g, kinds)]
        if not groups:
            log.warning("smooth-scale: no linear group to smooth")
            return ir.passes.PassResult(model, modified=False)
        ups = [find_upstream(g, summary.norms.get(linear_info(g.linears[0]).key)) for g in groups]  # type: ignore[union-attr]
        calibrate = self.context.require_calibration(self.name)
        names = [g.x.name for g in groups]
        t0 = time.perf_counter()
        loo = cfg.search and cfg.act == "static"
        observers = ("absmax_channel", "absmax_channel_window") if loo else ("absmax_channel",)
        stats = calibrate(model, [StatRequest(n, observers) for n in names])
        absmax = {g.x.name: _stat(stats, g, "absmax_channel") for g in groups}
        per_window = {g.x.name: _window_stat(stats, g) for g in groups} if loo else {}
        samples = _capture(calibrate, model, names, cfg.rows) if cfg.search else {}
        t1 = time.perf_counter()
        log.info("smooth-scale: statistics of %d inputs in %.1fs", len(names), t1 - t0)

        report: dict[str, Any] = {}
        executor = self.context.executor or Executor()
        # o/down first (they fold into v/up), then q/k/v and gate/up: independent searches within a phase
        for phase in ([i for i in range(len(groups)) if ups[i].kind == "linear"],
                      [i for i in range(len(groups)) if ups[i].kind != "linear"]):
            jobs = [self._search_job(groups[i], ups[i], absmax[groups[i].x.name], samples.get(groups[i].x.name),
                                     per_window.get(groups[i].x.name)) for i in phase]
            memory = max((sum(a.nbytes for a in job[:5] if isinstance(a, np.ndarray)) * 4 for job in jobs), default=0)
            found = executor.map(search_alpha, jobs, Resources(1.0, memory + (256 << 20)),
                                 desc=f"smooth-scale: α search of {len(jobs)} group(s)")
            for i, job, result in zip(phase, jobs, found):
                report[groups[i].key] = self._apply(model.graph, groups[i], ups[i], job[0], result)
        self.context.report[self.name] = {
            "act": cfg.act,
            "search": cfg.search,
            "static_range_estimate": "leave-one-window-out" if loo and any(v is not None for v in per_window.values())
            else None,
            "groups": {k: report[k] for k in sorted(report, key=_layer_order)},
        }
        explicit = [k for k, r in report.items() if r["folded_into"] == "mul"]
        if explicit:
            log.warning("smooth-scale: %d group(s) got an explicit Mul: %s", len(explicit), ", ".join(explicit[:6]))
        log.info("smooth-scale: %d groups smoothed in %.1fs", len(report), time.perf_counter() - t1)
        return ir.passes.PassResult(model, modified=True)

    def _search_job(self, g: LinearGroup, up: Upstream, a: np.ndarray, sample: tuple[np.ndarray, np.ndarray] | None,
                    per_window: Any = None) -> tuple[Any, ...]:
        """The arguments of :func:`search_alpha` for group ``g`` (its weights as they are now)."""
        cfg: SmoothScaleConfig = self.config
        weights = g.weights()
        a = tie(np.asarray(a, np.float64), up)
        x = sample[0] if sample is not None else None
        windows = None
        if per_window is not None and sample is not None:
            pos = {int(w): i for i, w in enumerate(per_window.windows)}
            row_window = np.array([pos.get(int(w), -1) for w in sample[1]], np.int64)
            if (row_window >= 0).all():
                wa = np.stack([tie(np.asarray(r, np.float64), up) for r in per_window.absmax]).astype(np.float32)
                windows = (wa, row_window)
        w_max = tie(np.max([channel_absmax(w) for w in weights], axis=0).astype(np.float64), up)
        w_search = None
        if x is not None:
            x = x.astype(np.float32)
            w_cat = np.concatenate(weights, axis=1)
            if w_cat.shape[1] > cfg.cols:  # per-column errors are independent: a column sample estimates their sum
                cols = np.random.default_rng(0).choice(w_cat.shape[1], cfg.cols, replace=False)
                w_cat = w_cat[:, np.sort(cols)]
            w_search = np.ascontiguousarray(w_cat, np.float32)
        return (a, w_max, w_search, x, windows, tuple(cfg.alphas()), cfg.pow2, cfg.act, g.key)

    def _apply(self, graph: ir.Graph, g: LinearGroup, up: Upstream, a: np.ndarray,
               found: tuple[float | None, np.ndarray | None, dict[str, float]]) -> dict[str, Any]:
        """Fold the chosen scales of group ``g`` and describe the group for the report."""
        cfg: SmoothScaleConfig = self.config
        best_alpha, best_s, errs = found
        entry: dict[str, Any] = {
            "linears": [linear_info(n).key for n in g.linears],  # type: ignore[union-attr]
            "alpha": None if best_alpha is None else round(float(best_alpha), 3),
            "folded_into": up.where,
            "range_before": float(a.max()),
            "flatness_before": _flatness(a),
        }
        if up.kind == "mul" and up.reason:
            entry["why_not_folded"] = up.reason
        if up.kind == "norm" and up.norm is not None:
            entry["norm_form"] = up.norm.form
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


def _window_stat(stats: Any, g: LinearGroup) -> Any:
    try:
        found = stats.get(g.x.name, "absmax_channel_window")
    except (CalibrationError, KeyError):
        log.info("smooth-scale: %s: no per-window statistics; static ranges from all windows", g.key)
        return None
    return found if found.absmax.ndim == 2 and found.absmax.shape[1] == g.channels else None


def _capture(calibrate: Any, model: ir.Model, names: list[str], rows: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Bounded row samples of each value (the same rows for all) and each row's calibration window."""
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
        sample = found[n]
        out[n] = (np.asarray(sample.rows, np.float32)[:rows], np.asarray(sample.index)[:rows, 0])
    return out


def _flatness(a: np.ndarray) -> float:
    return float(a.max() / max(float(np.median(a)), 1e-12))


def _floats(a: np.ndarray) -> list[float]:
    return [float(f"{v:.5g}") for v in np.asarray(a, np.float64)]


def _layer_order(key: str) -> tuple[int, str]:
    parts = key.split(".")
    return (int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 1 << 30, key)


def search_alpha(a: np.ndarray, w_max: np.ndarray, w_search: np.ndarray | None, x: np.ndarray | None,
                 windows: tuple[np.ndarray, np.ndarray] | None, alphas: tuple[float, ...], pow2: bool, act: str,
                 key: str) -> tuple[float | None, np.ndarray | None, dict[str, float]]:
    """α of one group (module docstring): ``(best α or None for "no smoothing", its s, error per α)``.

    A pure function of its arguments (a task under ``--ray``).  Without sampled rows ``x``
    the first α is taken.
    """
    try:
        candidates: list[tuple[float | None, np.ndarray | None]] = [
            (al, smoothing_scales(a, w_max, al, pow2)) for al in alphas]
    except ValueError as e:  # NaN/Inf in the statistics or the weights
        raise InputError(f"smooth-scale: {key}: {e}") from None
    errs: dict[str, float] = {}
    best_alpha, best_s = candidates[0]
    if x is not None and w_search is not None:
        search_w = [w_search]
        refs = [x @ w for w in search_w]
        candidates.append((None, None))
        best_err = np.inf
        for al, s in candidates:
            e = group_error(x, search_w, s, act, a.astype(np.float32), refs, windows)
            errs["none" if al is None else f"{al:.2f}"] = e
            if e < best_err:
                best_err, best_alpha, best_s = e, al, s
    return best_alpha, best_s, errs

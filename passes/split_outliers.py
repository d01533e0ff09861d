"""split-outliers: outlier channel splitting (Zhao et al., 2019), exact in float.

For a linear group reading ``X[T, K]`` and an input channel j, either side of the product
``X_j·W_j`` (``W_j`` = row j of W) can be halved and duplicated::

    activation split:  X_j·W_j = (X_j/2)·W_j + (X_j/2)·W_j       X gains a copy of X_j/2, W a copy of row W_j
    weight split:      X_j·W_j = X_j·(W_j/2) + X_j·(W_j/2)       X gains a copy of X_j,   W a copy of W_j/2

and an activation channel can be split again (``2^m`` copies of ``X_j/2^m``).  With ``m_j``
the split level of each activation channel (``A`` lists channel j ``2^m_j − 1`` times) and
``B`` the weight-split channels::

    X' = Concat(X⊙d, Gather(X⊙d, A ++ B))       d_j = 2^−m_j
    W' = [W with rows B halved; W[A]; W[B]/2]    and  X'·W' = X·W

The factor ``d`` folds upstream like a smoothing factor (into the RMSNorm weight, up_proj's
columns, ...; see ``passes/_channels.py``); the Gather/Concat is the only new work.  Halving
is exact in floating point, so the float model is unchanged up to summation order.

Why: a static per-tensor activation scale is set by the largest channel ``max_j a_j/2^m_j``;
the pass repeatedly doubles the copies of the channel that sets it (costing ``2^m_j`` extra
channels) while the budget allows, and keeps the split only if the range shrinks by at
least ``min_gain``.  Per-output-channel weight
scales are set by each column's largest entry; the rest of the budget goes, greedily, to
the rows whose halving shrinks the column ranges most (``Σ_n log(max_n / max'_n)``).
``budget`` bounds the extra channels per group (a fraction of K, e.g. 0.05 = 5%).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from qcompiler.passes._channels import (
    LinearGroup,
    Upstream,
    apply_input_scale,
    find_upstream,
    linear_groups,
    set_weight,
)
from qcompiler.passes.canonicalize import canonical_summary
from qcompiler.passes.smooth_scale import GROUP_KINDS, selected
from tqdm import tqdm

from qcompiler.calibrate import StatRequest
from qcompiler.errors import CalibrationError
from qcompiler.irutil import gather_channels
from qcompiler.pipeline import QCPass, register_pass
from qcompiler.spec import linear_info

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitOutliersConfig:
    budget: float = 0.05  # extra input channels per group, fraction of K
    mode: str = "both"  # act | weight | both
    groups: str = "qkv:gate_up:o_proj:down_proj"
    min_gain: float = 1.05  # split activations only if the group's range shrinks by at least this factor

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if self.mode not in ("act", "weight", "both"):
            raise ValueError(f"mode must be act, weight or both, got {self.mode}")
        unknown = set(filter(None, self.groups.split(":"))) - set(GROUP_KINDS)
        if unknown:
            raise ValueError(f"unknown group kind(s) {', '.join(sorted(unknown))}; choose from {', '.join(GROUP_KINDS)}")
        if self.min_gain < 1.0:
            raise ValueError(f"min_gain must be >= 1, got {self.min_gain}")


def pick_activation_levels(absmax: np.ndarray, budget: int, min_gain: float = 1.0) -> np.ndarray:
    """Split level ``m_j`` of each channel: greedily double the channel setting ``max_j a_j/2^m_j``.

    Doubling channel j costs ``2^m_j`` extra channels; stops at the budget.  All zeros when
    the range shrinks by less than ``min_gain``.
    """
    a = np.asarray(absmax, np.float64)
    m = np.zeros(len(a), np.int64)
    if len(a) == 0 or a.max() <= 0:
        return m
    cost = 0
    while True:
        j = int(np.argmax(a / 2.0**m))
        extra = 1 << int(m[j])
        if cost + extra > budget:
            break
        m[j] += 1
        cost += extra
    if a.max() / float((a / 2.0**m).max()) < min_gain:
        return np.zeros(len(a), np.int64)
    return m


def split_cost(levels: np.ndarray) -> int:
    """Extra channels of the activation split levels (``Σ 2^m_j − 1``)."""
    return int(np.sum((1 << np.asarray(levels, np.int64)) - 1))


def pick_weight_rows(w: np.ndarray, budget: int, exclude: np.ndarray, min_gain: float = 1e-3) -> np.ndarray:
    """Greedy rows of ``W[K, N]`` whose halving most shrinks the per-column abs-max (log gain summed over columns).

    After b halvings each column's two largest entries are among its original top ``b + 2``
    (at most b rows changed, and unchanged rows keep their order), so only those are tracked.
    """
    k, n = w.shape
    budget = min(budget, k)
    if budget <= 0 or k < 2:
        return np.zeros(0, np.int64)
    t = min(budget + 2, k)
    a = np.abs(w).astype(np.float32)
    top_rows = np.argpartition(-a, t - 1, axis=0)[:t] if t < k else np.broadcast_to(np.arange(k)[:, None], (k, n))
    vals = np.take_along_axis(a, top_rows, axis=0)  # [t, N]
    banned = np.zeros(k, bool)
    banned[exclude] = True
    chosen: list[int] = []
    cols = np.arange(n)
    for _ in range(budget):
        order = np.argsort(-vals, axis=0)[:2]
        first, second = vals[order[0], cols], vals[order[1], cols]
        arg = top_rows[order[0], cols]
        gain_col = np.log(np.maximum(first, 1e-30) / np.maximum(np.maximum(first / 2, second), 1e-30))
        gain = np.bincount(arg, weights=gain_col, minlength=k)
        gain[banned] = -1.0
        j = int(np.argmax(gain))
        if gain[j] / n < min_gain:
            break
        chosen.append(j)
        banned[j] = True
        vals[top_rows == j] /= 2
    return np.array(chosen, np.int64)


@register_pass
class SplitOutliers(QCPass):
    """Outlier channel splitting of activations and weights under a channel budget."""

    name = "split-outliers"
    Config = SplitOutliersConfig
    needs_canonical = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg: SplitOutliersConfig = self.config
        summary = canonical_summary(model)
        kinds = set(filter(None, cfg.groups.split(":")))
        groups = [g for g in linear_groups(model) if selected(g, kinds)]
        if not groups:
            log.warning("split-outliers: no linear group to split")
            return ir.passes.PassResult(model, modified=False)
        absmax: dict[str, np.ndarray] = {}
        if cfg.mode != "weight":
            stats = self.context.require_calibration(self.name)(
                model, [StatRequest(g.x.name, ("absmax_channel",)) for g in groups])
            for g in groups:
                try:
                    absmax[g.x.name] = np.asarray(stats.get(g.x.name, "absmax_channel"), np.float64)
                except (CalibrationError, KeyError) as e:
                    raise CalibrationError(f"split-outliers: {g.key}: statistics missing for value '{g.x.name}': {e}") from None
        report: dict[str, Any] = {}
        extra = total = 0
        for g in tqdm(groups, desc="split-outliers", unit="group", leave=False):
            up = find_upstream(g, summary.norms.get(linear_info(g.linears[0]).key))  # type: ignore[union-attr]
            entry = self._split(model.graph, g, up, absmax.get(g.x.name))
            total += g.channels if entry is None else entry["channels"]
            if entry is not None:
                report[g.key] = entry
                extra += entry["extra"]
        self.context.report[self.name] = {"budget": cfg.budget, "mode": cfg.mode, "extra_channels": extra,
                                          "extra_fraction": round(extra / max(total, 1), 4), "groups": report}
        log.info("split-outliers: %d extra input channels (%.2f%%) over %d groups", extra,
                 100 * extra / max(total, 1), len(report))
        return ir.passes.PassResult(model, modified=extra > 0)

    def _split(self, graph: ir.Graph, g: LinearGroup, up: Upstream, a: np.ndarray | None) -> dict[str, Any] | None:
        cfg: SplitOutliersConfig = self.config
        k = g.channels
        budget = int(np.floor(cfg.budget * k))
        weights = g.weights()
        levels = np.zeros(k, np.int64)
        if a is not None and cfg.mode in ("act", "both"):
            if a.shape != (k,):
                raise CalibrationError(f"split-outliers: {g.key}: statistics of '{g.x.name}' have shape {a.shape}, "
                                       f"expected ({k},)")
            levels = pick_activation_levels(a, budget, cfg.min_gain)
            if levels.any() and up.kind == "linear" and up.ties:
                tied = _tie_levels(levels, up)  # halving a v_proj column halves every o channel it feeds
                if split_cost(tied) <= budget:
                    levels = tied
                else:
                    up = Upstream("mul", "the split channels' kv-head tie sets exceed the budget")
        act_ch = np.nonzero(levels)[0]
        act = np.repeat(act_ch, (1 << levels[act_ch]) - 1).astype(np.int64)
        wrows = np.zeros(0, np.int64)
        if cfg.mode in ("weight", "both") and budget > len(act):
            wrows = pick_weight_rows(np.concatenate(weights, axis=1), budget - len(act), act_ch)
        if len(act) == 0 and len(wrows) == 0:
            return None
        d = 2.0 ** -levels.astype(np.float64)
        tag = g.key.replace(".", "_") + "_split"
        if len(act):
            if up.kind == "mul":
                log.info("split-outliers: %s: explicit Mul for the halving (%s)", g.key, up.reason)
            apply_input_scale(graph, g, up, d, tag)
        idx = np.concatenate([act, wrows]).astype(np.int64)
        x = g.x
        gather = gather_channels(graph, x, idx, f"{tag}_Gather", f"{tag}_idx")
        cat = ir.node("Concat", [x, gather.outputs[0]], {"axis": -1}, name=f"{tag}_Concat")
        cat.outputs[0].name = f"{tag}_input"
        cat.outputs[0].type = x.type
        if x.shape is not None and len(x.shape):  # shaped as made: no shape inference for the fusions later
            last = x.shape[-1]
            cat.outputs[0].shape = ir.Shape([*list(x.shape)[:-1], last + len(idx) if isinstance(last, int) else None])
        graph.insert_before(g.linears[0], [gather, cat])
        for node, w in zip(g.linears, weights):
            w = w.astype(np.float64)
            rows = w.copy()
            rows[wrows] *= 0.5
            set_weight(graph, node, np.concatenate([rows, w[act], w[wrows] * 0.5], axis=0))
            node.replace_input_with(0, cat.outputs[0])
        g.x = cat.outputs[0]
        entry: dict[str, Any] = {
            "linears": [linear_info(n).key for n in g.linears],  # type: ignore[union-attr]
            "channels": k + len(idx),
            "extra": len(idx),
            "act_channels": act_ch.tolist(),
            "act_levels": levels[act_ch].tolist(),
            "weight_channels": wrows.tolist(),
            "halving_folded_into": up.where if len(act) else None,
        }
        if a is not None:
            after = a * d
            entry.update(range_before=float(a.max()), range_after=float(after.max()))
        return entry


def _tie_levels(levels: np.ndarray, up: Upstream) -> np.ndarray:
    """Split levels made equal on each kv-head tie set (the largest level of the set)."""
    out = levels.copy()
    for members in up.ties.values():
        out[members] = levels[members].max()
    return out

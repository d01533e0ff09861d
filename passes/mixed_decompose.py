"""mixed-decompose (LLM.int8, Dettmers et al. 2022): outlier input channels in float, the rest in int8.

With ``O`` the outlier input channels of ``Y = X·W`` and ``keep = 1 − 1_O``::

    X·W = (X ⊙ keep)·W  +  X[:, O]·W[O, :]                       (exact: the channels partition K)
        ≈ Q_tok(X ⊙ keep)·Q_ch(W ⊙ keep)  +  X[:, O]·W[O, :]

the int8 product with per-token activation scales (the outliers no longer set the row
scale) and per-output-channel weight scales computed *without* W's outlier rows, the
float side product a ``Gather`` of |O| columns and a small MatMul.  This is the portable
outlier-split form of :mod:`qcompiler.ops.emit` (``emit_outlier_split``); ``lower-w8a8-cpu``
lowers its int8 MatMul on CPU, ``lower-qc-ops`` the whole of it into
``qcompiler.W8A8OutlierMatMul`` on CUDA (``custom_op=true`` writes that op directly).
``quantize=false`` writes the decomposition in float (the algebra above, no rounding).

Which channels (LLM.int8's criteria, thresholds configurable): a channel of a linear's input
is a candidate when ``|x| ≥ threshold`` (6) on at least ``min_tokens`` (6%) of the calibration
tokens.  Residual-stream dims (the inputs of q/k/v and gate/up, one feature space through
the model) are outliers when they are candidates in at least ``min_layers`` (25%) of the
layers, and are then decomposed in every such input; the inputs of o and down use their own
candidates.  At most ``max_fraction`` of K per linear (the most frequent first).  Linears
without outliers get plain per-token W8A8.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from qcompiler.passes._channels import LinearGroup, linear_groups
from tqdm import tqdm

from qcompiler.calibrate import StatRequest
from qcompiler.errors import CalibrationError
from qcompiler.floattype import float_array, float_type, graph_float_type
from qcompiler.irutil import QUANT_OPSET, add_initializer, ensure_opset
from qcompiler.ops.emit import emit_outlier_split, outlier_side
from qcompiler.pipeline import QCPass, register_pass
from qcompiler.quant.emit import stored_spec
from qcompiler.quant.numerics import quantize_weight
from qcompiler.quant.w8a8 import attach_activation, emit_int8_weight, emit_per_token_activation
from qcompiler.spec import Granularity, QuantSpec, Role, linear_info, set_weight_spec

log = logging.getLogger(__name__)

_RESIDUAL = frozenset({Role.Q, Role.K, Role.V, Role.GATE, Role.UP})


@dataclass(frozen=True)
class MixedDecomposeConfig:
    threshold: float = 6.0  # |x| at or above which a value is an outlier
    min_tokens: float = 0.06  # fraction of tokens a channel must be an outlier in
    min_layers: float = 0.25  # fraction of layers a residual-stream dim must be an outlier in
    max_fraction: float = 0.05  # at most this fraction of K per linear goes to float
    quantize: bool = True  # false: the float decomposition only (no rounding)
    custom_op: bool = False  # write qcompiler.W8A8OutlierMatMul instead of the portable form
    weight_clip: str = "minmax"  # minmax | mse
    rows: int = 4096  # sampled rows when threshold differs from the calibrator's outlier threshold

    def __post_init__(self) -> None:
        if self.threshold <= 0:
            raise ValueError(f"threshold must be positive, got {self.threshold}")
        for name in ("min_tokens", "min_layers", "max_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.weight_clip not in ("minmax", "mse"):
            raise ValueError(f"weight_clip must be minmax or mse, got {self.weight_clip}")


def select_outliers(fractions: dict[str, np.ndarray], residual: set[str], layers: dict[str, int],
                    cfg: MixedDecomposeConfig) -> dict[str, np.ndarray]:
    """Outlier channels of each input from its per-channel outlier-token fractions (module docstring)."""
    out: dict[str, np.ndarray] = {}
    cand = {n: f >= cfg.min_tokens for n, f in fractions.items()}
    res = [n for n in fractions if n in residual]
    global_dims = np.zeros(0, np.int64)
    if res:
        width = {fractions[n].shape[0] for n in res}
        if len(width) == 1:
            per_layer: dict[int, np.ndarray] = {}
            for n in res:  # a dim counts once per layer (attention or MLP input)
                prev = per_layer.get(layers[n])
                per_layer[layers[n]] = cand[n] if prev is None else (prev | cand[n])
            count = np.sum(list(per_layer.values()), axis=0)
            global_dims = np.nonzero(count >= max(1.0, cfg.min_layers * len(per_layer)))[0]
    for n, f in fractions.items():
        k = f.shape[0]
        idx = global_dims if n in residual else np.nonzero(cand[n])[0]
        cap = int(np.floor(cfg.max_fraction * k))
        if len(idx) > cap:
            idx = idx[np.argsort(-f[idx], kind="stable")[:cap]]
        out[n] = np.sort(idx).astype(np.int64)
    return out


@register_pass
class MixedDecompose(QCPass):
    """LLM.int8: outlier input channels through a float side MatMul, the rest per-token int8."""

    name = "mixed-decompose"
    Config = MixedDecomposeConfig
    needs_canonical = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg: MixedDecomposeConfig = self.config
        groups = linear_groups(model)
        if not groups:
            log.warning("mixed-decompose: no float decoder linear")
            return ir.passes.PassResult(model, modified=False)
        names = [g.x.name for g in groups]
        fractions = self._fractions(model, groups)
        residual = {g.x.name for g in groups if set(g.roles) <= _RESIDUAL}
        layers = {g.x.name: g.layer for g in groups}
        chosen = select_outliers(fractions, residual, layers, cfg)
        graph = model.graph
        counts: Counter[str] = Counter()
        report: dict[str, Any] = {}
        for g, name in tqdm(list(zip(groups, names)), desc="mixed-decompose", unit="input", leave=False):
            idx = chosen[name]
            report[g.key] = {"outlier_dims": idx.tolist(), "count": len(idx), "channels": g.channels,
                             "candidate_dims": np.nonzero(fractions[name] >= cfg.min_tokens)[0].tolist(),
                             "top_fraction": round(float(fractions[name].max()), 4)}
            if len(idx) == 0 and cfg.quantize:
                self._per_token(graph, g)
                counts["per-token int8"] += len(g.linears)
                continue
            for node in g.linears:
                key = linear_info(node).key  # type: ignore[union-attr]
                w = LinearGroup.weight(node)
                if not cfg.quantize:
                    _float_split(graph, node, w, idx, key.replace(".", "_"))
                    counts["float decomposition"] += 1
                    continue
                wz = w.copy()
                wz[idx] = 0.0
                spec = stored_spec(self._wspec(), graph, node)
                qw = quantize_weight(wz, spec)
                emit_outlier_split(graph, node, qw.q, qw.scale.reshape(-1), idx, w[idx],
                                   base=key.replace(".", "_"), custom_op=cfg.custom_op)
                set_weight_spec(node, spec)
                counts["int8 + float outliers"] += 1
        ensure_opset(model, "", QUANT_OPSET)
        self.context.report[self.name] = {"threshold": cfg.threshold, "min_tokens": cfg.min_tokens,
                                          "min_layers": cfg.min_layers, "linears": dict(counts), "inputs": report,
                                          "float": "lm_head, attention score MatMuls and the KV cache"}
        log.info("mixed-decompose: %s", ", ".join(f"{v} {k}" for k, v in counts.items()))
        return ir.passes.PassResult(model, modified=True)

    def _wspec(self) -> QuantSpec:
        return QuantSpec(bits=8, symmetric=True, granularity=Granularity.CHANNEL, method="rtn",
                         clip=self.config.weight_clip)

    def _fractions(self, model: ir.Model, groups: list[LinearGroup]) -> dict[str, np.ndarray]:
        cfg: MixedDecomposeConfig = self.config
        calibrate = self.context.require_calibration(self.name)
        names = [g.x.name for g in groups]
        stats = calibrate(model, [StatRequest(n, ("outliers",)) for n in names])
        out: dict[str, np.ndarray] = {}
        resample: list[str] = []
        for g in groups:
            try:
                o = stats.get(g.x.name, "outliers")
            except (CalibrationError, KeyError) as e:
                raise CalibrationError(f"mixed-decompose: {g.key}: statistics missing for value '{g.x.name}': {e}") from None
            if abs(o.threshold - cfg.threshold) > 1e-9:
                resample.append(g.x.name)
            else:
                out[g.x.name] = np.asarray(o.channel_fraction, np.float64)
        if resample:
            log.info("mixed-decompose: threshold %g differs from the calibrator's; using %d sampled rows",
                     cfg.threshold, cfg.rows)
            capture = getattr(calibrate, "capture", None)
            if capture is None:
                raise CalibrationError(f"mixed-decompose: threshold {cfg.threshold} needs row samples the calibrator "
                                       "cannot capture; use the calibrator's outlier threshold")
            for n, sample in capture(model, resample, cfg.rows).items():
                out[n] = np.mean(np.abs(np.asarray(sample.rows)) >= cfg.threshold, axis=0)
        return out

    def _per_token(self, graph: ir.Graph, g: LinearGroup) -> None:
        base = g.key.replace(".", "_")
        emit_per_token_activation(graph, g.linears[0], base)
        for n in g.linears[1:]:
            attach_activation(n, g.linears[0].inputs[0], "per-token")  # type: ignore[arg-type]
        for n in g.linears:
            key = linear_info(n).key  # type: ignore[union-attr]
            spec = stored_spec(self._wspec(), graph, n)
            qw = quantize_weight(LinearGroup.weight(n), spec)
            emit_int8_weight(graph, n, qw.q, qw.scale.reshape(-1), f"{key}.weight")
            set_weight_spec(n, spec)


def _float_split(graph: ir.Graph, node: ir.Node, w: np.ndarray, idx: np.ndarray, base: str) -> None:
    """``MatMul(X, W)`` → ``MatMul(X ⊙ keep, W ⊙ keep) + MatMul(Gather(X, O), W[O])`` in float."""
    x, y = node.inputs[0], node.outputs[0]
    ft = float_type(node.inputs[1], x, y, default=graph_float_type(graph))  # the weight's float type
    wz = w.copy()
    wz[idx] = 0.0
    mask, gather, side = outlier_side(graph, x, y, idx, w.shape[0], w[idx], base, ft)
    main = ir.node("MatMul", [mask.outputs[0], add_initializer(graph, f"{base}_w_inlier", float_array(wz, ft))],
                   name=f"{base}_MatMul")
    main.outputs[0].shape, main.outputs[0].type = y.shape, y.type
    add = ir.node("Add", [main.outputs[0], side.outputs[0]], name=f"{base}_outlier_Add")
    main.meta.update(node.meta)
    main.metadata_props.update(node.metadata_props)
    graph.insert_before(node, [mask, gather, side, main, add])
    y.replace_all_uses_with(add.outputs[0], replace_graph_outputs=True)
    name, y.name = y.name, None
    add.outputs[0].name = name
    add.outputs[0].shape, add.outputs[0].type = y.shape, y.type
    old_w = node.inputs[1]
    graph.remove(node, safe=False)
    if old_w is not None and not old_w.uses() and old_w.name in graph.initializers:
        del graph.initializers[old_w.name]

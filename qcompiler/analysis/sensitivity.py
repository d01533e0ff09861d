"""Sensitivity: how much quantizing one linear perturbs the model's output distribution.

Local errors (:mod:`qcompiler.analysis.local_error`) compare linears in their own units:
an error in ``q_proj`` passes through softmax, one in ``down_proj`` lands straight in
the residual stream.  To compare them, each linear ``j`` of decoder layer ``l`` gets a
*gain*, measured by recomputing that one layer from cached residual rows
``r_in(l)`` (full token windows, :mod:`qcompiler.analysis.sessions`) with only ``Ŵ_j``
swapped in, for the reference candidate ``c₀``::

    block(j)   = mean_t ‖Δr_out,t‖² / ‖r_out,t‖²     Δr_out = r̂_out − r_out   (per token)

A relative error of layer ``l``'s output does not reach the logits unchanged.  Two
bounds are at hand from the same rerun, with ``r_L`` the residual entering the final norm
(captured on the same windows)::

    skip(j)    = mean_t ‖Δr_out,t‖² / ‖r_L,t‖²       the skip path carries Δ to r_L, later
                                                     layers add to it but ignore it
    block(j)                                         later layers, reading through their norms,
                                                     keep the relative error as it is

Early layers' residual is ~100× smaller than ``r_L``, so the two differ by up to 100× there.
Neither says what the later layers do with the error.  ``final(j)`` is one of three
measures (``--sensitivity``, :data:`SENSITIVITY_METHODS`)::

    kl           = mean_t KL(p_t ‖ p̂_t)      p, p̂ = softmax of the final logits, float and with Ŵ_j,
                                            the rest of the model run from r_in(l) on the same windows
    output-error = block(j)^(1−β) · skip(j)^β     (β = MeasureConfig.propagation)
    blend        = √(kl · output-error)         (β as set; both from the same run)
    logit-skip   = mean_t KL(p_t ‖ softmax(head(norm(r_L,t + Δr_out,t))))   (later layers ignored)

and then, for every candidate::

    G_j        = final(j) / rel_j(c₀)                (rel on the same tokens)
    S_j(c)     = G_j · rel_j(c)                      (any candidate c)

``kl`` (the default) is the quantity the end-to-end check measures, on the calibration
windows: the layer rerun's session is cut at ``r_in(l)`` and also outputs the logits, so
one run per linear gives both.  Fisher- or Hessian-weighted output errors are its
second-order expansion (``KL ≈ ½ Δzᵀ F Δz``, ``F`` the Fisher of the logits) — measuring
the KL itself needs no gradient (an ONNX graph has none) and loses nothing to the
expansion, at the price of running the rest of the model once per linear (≈ 7·L/2 model
runs on the ``block_windows`` for L layers; SmolLM2-135M: 32 min on 2 busy cores against
3.3 min for ``output-error``).

Measured on SmolLM2-135M (``tools/sensitivity_eval.py``, numbers in ``docs/analysis.md``):
calibrated on the GPL-3 (2 windows of 128 tokens), checked against the KL of the final
logits with one linear at int4 g128 on 1,024 tokens of git's 2.4.0 release notes for a fixed
stratified subset of 70 linears (every linear of layers 0, 2, 4, 7, 11, 14, 18, 22, 25, 29).
Spearman over all 70: ``output-error`` 0.87, ``kl`` 0.84, ``logit-skip`` 0.27, β = 1 0.24,
local ``rel`` 0.53; over the 20 linears the ablation finds most damaging (those a budget
promotes): ``kl`` 0.59, ``output-error`` 0.20; of its top 10, ``kl`` finds 7 and
``output-error`` 5.  The most damaging linear, ``layers.11.down_proj`` (it holds the super
weight), is ``kl``'s first and ``output-error``'s 71st of 210: its error in the layer's
output is small, but the later layers amplify it.  Perplexity changes of one linear
(−0.4 … +0.9 on those tokens) are dominated by per-token gains and losses that cancel;
KL (≥ 0 per token) is the end-to-end measure the ranking is checked against.

Other candidates are scaled by their local error (first order: a small output error ``E``
of linear ``j`` reaches the layer output through a Jacobian whose gain on ``E``'s energy
does not depend on which quantizer made ``E``).  ``S`` is additive over linears to first
order, which is what :mod:`qcompiler.analysis.allocate` minimizes.  The end-to-end check
runs the whole model with one linear swapped and reports ``KL(p_float ‖ p_quant)`` of the
final logits per token, averaged.

Layers are independent given their captured ``r_in``: with an executor from ``--ray``
(:mod:`qcompiler.distributed`) and the model's file, :func:`block_gains` runs chunks of
consecutive layers as tasks (each loads the graph — weights stay memory-mapped — and
gets only its layers' residual rows), and collects the rows in layer order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from qcompiler.analysis.candidates import Candidate, fake_quant_weight
from qcompiler.analysis.local_error import output_error
from qcompiler.analysis.sessions import PartRunner
from qcompiler.analysis.structure import LayerSites, ModelSites
from qcompiler.distributed import Executor, Resources
from qcompiler.errors import QCError
from qcompiler.eval import kl_per_token

log = logging.getLogger(__name__)


def token_rel_error(ref: np.ndarray, test: np.ndarray, scale: np.ndarray | None = None) -> float:
    """``mean_t ‖test_t − ref_t‖² / ‖s_t‖²`` over all rows (last axis = channels; ``s = scale`` or ``ref``)."""
    r = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    e = test.reshape(-1, ref.shape[-1]).astype(np.float64) - r
    d = r if scale is None else scale.reshape(-1, scale.shape[-1]).astype(np.float64)
    return float(np.mean(np.einsum("ij,ij->i", e, e) / np.maximum(np.einsum("ij,ij->i", d, d), 1e-30)))


#: ``--sensitivity`` choices: what ``final(j)`` measures (module docstring)
SENSITIVITY_METHODS = ("kl", "output-error", "blend", "logit-skip")
DEFAULT_SENSITIVITY = "kl"


def check_method(method: str) -> str:
    if method not in SENSITIVITY_METHODS:
        raise QCError(f"unknown sensitivity '{method}': expected one of {', '.join(SENSITIVITY_METHODS)}")
    return method


def block_gains(model: ir.Model, sites: ModelSites, ids: np.ndarray, residuals: Mapping[str, np.ndarray],
                reference: Candidate, threads: int | None = None, progress: bool = True,
                propagation: float = 0.0, executor: Executor | None = None, model_path: str | None = None,
                lm_head: bool = False, method: str = DEFAULT_SENSITIVITY,
                also: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """``{key: {"block", "skip", "final", "local": rel_j(c₀), "gain": G_j, …}}`` per linear of a complete layer.

    ``ids[B, T]`` are the windows whose residual values ``residuals[name][B, T, C]`` were captured;
    without the final residual among them ``skip`` is ``block``.  ``method`` chooses what
    ``final`` is (module docstring); the measures of ``also`` are recorded too (keys ``kl``,
    ``logit_skip``), for comparing rankings.  With a distributed ``executor`` and
    ``model_path`` (the file ``model`` was loaded from, unchanged; ``lm_head`` as given to
    ``find_sites``) chunks of layers run as tasks (module docstring).
    """
    check_method(method)
    measures = tuple(dict.fromkeys(check_method(m) for m in (method, *also)))
    if "blend" in measures:
        measures = (*measures, "kl")
    last = sites.layers[-1].r_out if sites.layers else None
    r_final = residuals.get(last) if last else None
    if "logit-skip" in measures and r_final is None:
        raise QCError("sensitivity 'logit-skip' needs the residual entering the final norm, which was not found")
    todo = [ls for ls in sites.layers if ls.r_in in residuals and ls.r_out and ls.linears]
    if executor is not None and executor.distributed and model_path is not None and todo:
        n = max(1, min(len(todo), 2 * executor.workers()))
        chunks = [todo[i * len(todo) // n : (i + 1) * len(todo) // n] for i in range(n)]
        jobs = [(model_path, lm_head, [ls.layer for ls in c], ids, {ls.r_in: residuals[ls.r_in] for ls in c}, r_final,
                 reference, propagation, measures) for c in chunks]
        weights = max(sum(s.k * s.n * 4 for ls in c for s in ls.linears.values()) for c in chunks)
        if "kl" in measures:  # each task also runs the rest of the model
            weights = sum(s.k * s.n * 4 for s in sites.linears.values())
        memory = 3 * weights + sites.graph_bytes + (384 << 20)
        parts = executor.map(_layers_task, jobs, Resources(1.0, memory), desc="layer sensitivity")
        return {k: v for part in parts for k, v in part.items()}
    out: dict[str, dict[str, float]] = {}
    bar = tqdm(total=sum(len(ls.linears) for ls in todo), desc="layer sensitivity", unit="linear",
               leave=False, disable=not progress)
    head = _Head(model, last, ids, r_final, threads) if "logit-skip" in measures else None  # type: ignore[arg-type]
    try:
        for ls in todo:
            out.update(_layer_gains(model, ls, ids, residuals[ls.r_in], r_final, reference, threads, propagation,
                                    bar.update, measures, head))
    finally:
        bar.close()
        if head is not None:
            head.close()
    return out


class _Head:
    """Final norm + lm_head on fixed ``r_L`` rows: ``KL(head(r_L) ‖ head(r_L + Δ))`` (logit-skip)."""

    def __init__(self, model: ir.Model, r_final_name: str, ids: np.ndarray, r_final: np.ndarray,
                 threads: int | None) -> None:
        self.name, self.ids, self.r_final = r_final_name, ids, r_final
        self.runner = PartRunner(model, ["logits"], cuts=[r_final_name], threads=threads)
        (self.ref,) = self.runner.run(ids, {r_final_name: r_final})

    def kl(self, delta: np.ndarray) -> float:
        (logits,) = self.runner.run(self.ids, {self.name: (self.r_final + delta).astype(self.r_final.dtype)})
        return kl_per_token(self.ref, logits)

    def close(self) -> None:
        self.runner.close()


def _layer_gains(model: ir.Model, ls: LayerSites, ids: np.ndarray, r_in: np.ndarray, r_final: np.ndarray | None,
                 reference: Candidate, threads: int | None, propagation: float,
                 tick: Callable[[int], object] | None = None, measures: Sequence[str] = ("output-error",),
                 head: _Head | None = None) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    members = list(ls.linears.values())
    extra = list(dict.fromkeys(s.input for s in members))
    logits = ["logits"] if "kl" in measures else []
    runner = PartRunner(model, [ls.r_out, *logits, *extra], cuts=[ls.r_in],  # type: ignore[list-item]
                        overridable=[s.weight for s in members], threads=threads)
    try:
        feeds = {ls.r_in: r_in}  # type: ignore[dict-item]
        ref, *rest = runner.run(ids, feeds)
        ref_logits = rest.pop(0) if logits else None
        x_of = dict(zip(extra, rest))
        for s in members:
            w = s.weight_array()
            w_hat = fake_quant_weight(w, reference.weight) if reference.weight is not None else w
            x = x_of[s.input].reshape(-1, s.k)
            local = output_error(x @ w, x @ w_hat).rel
            test, *test_logits = runner.run(ids, feeds, {s.weight: w_hat}, outputs=[ls.r_out, *logits])  # type: ignore[list-item]
            block = token_rel_error(ref, test)
            skip = token_rel_error(ref, test, r_final) if r_final is not None else block
            row = {"block": block, "skip": skip, "local": local}
            if ref_logits is not None:
                row["kl"] = kl_per_token(ref_logits, test_logits[0])
            if head is not None:
                row["logit_skip"] = head.kl(test - ref)
            layer_error = block ** (1 - propagation) * skip**propagation
            final = {"output-error": layer_error, "kl": row.get("kl"), "logit-skip": row.get("logit_skip"),
                     "blend": (row.get("kl", 0.0) * layer_error) ** 0.5}[measures[0]]
            row.update(final=final, gain=final / local if local > 0 else 0.0)  # type: ignore[operator]
            out[s.key] = row  # type: ignore[assignment]
            if tick is not None:
                tick(1)
    finally:
        runner.close()
    return out


def _layers_task(model_path: str, lm_head: bool, layers: list[int], ids: np.ndarray, r_in: dict[str, np.ndarray],
                 r_final: np.ndarray | None, reference: Candidate, propagation: float,
                 measures: Sequence[str] = ("output-error",)) -> dict[str, dict[str, float]]:
    """A Ray task: :func:`_layer_gains` of ``layers``, the graph loaded from ``model_path`` (weights mapped)."""
    from qcompiler.analysis.structure import find_sites
    from qcompiler.irutil import load_model

    model = load_model(model_path)
    found = find_sites(model, lm_head)
    by_layer = {ls.layer: ls for ls in found.layers}
    head = (_Head(model, found.layers[-1].r_out, ids, r_final, 1)  # type: ignore[arg-type]
            if "logit-skip" in measures and r_final is not None else None)
    out: dict[str, dict[str, float]] = {}
    try:
        for layer in layers:
            ls = by_layer[layer]
            out.update(_layer_gains(model, ls, ids, r_in[ls.r_in], r_final, reference, 1, propagation,  # type: ignore[index]
                                    None, measures, head))
    finally:
        if head is not None:
            head.close()
    return out


class EndToEnd:
    """The whole model with every linear's weight swappable: KL of final logits against float."""

    def __init__(self, model: ir.Model, sites: ModelSites, ids: np.ndarray, threads: int | None = None) -> None:
        self.sites = sites
        self.ids = ids
        self.runner = PartRunner(model, ["logits"], overridable=[s.weight for s in sites.linears.values()],
                                 threads=threads)
        self.ref = self._logits({})

    def _logits(self, overrides: Mapping[str, np.ndarray]) -> np.ndarray:
        # one window at a time: logits of a window are T × vocab floats
        return np.stack([self.runner.run(self.ids[i : i + 1], overrides=overrides)[0][0]
                         for i in range(self.ids.shape[0])])

    def kl(self, weights: Mapping[str, np.ndarray]) -> float:
        """KL with the given ``{linear key: Ŵ}`` swapped in."""
        overrides = {self.sites.linears[k].weight: w for k, w in weights.items()}
        return kl_per_token(self.ref, self._logits(overrides))

    def kl_of_assignment(self, assignment: Mapping[str, Candidate],
                         quantize: Callable[[str, Candidate], np.ndarray] | None = None) -> float:
        """KL with each linear in ``assignment`` quantized by its (weight) candidate."""
        def default(key: str, cand: Candidate) -> np.ndarray:
            return fake_quant_weight(self.sites.linears[key].weight_array(), cand.weight)  # type: ignore[arg-type]

        q = quantize or default
        return self.kl({k: q(k, c) for k, c in assignment.items() if c.weight is not None})

    def close(self) -> None:
        self.runner.close()


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    if len(a) < 3:
        return float("nan")
    return float(spearmanr(a, b).statistic)

"""Sensitivity: how much quantizing one linear perturbs its decoder layer's output, and the model's.

Local errors (:mod:`qcompiler.analysis.local_error`) compare linears in their own units:
an error in ``q_proj`` passes through softmax, one in ``down_proj`` lands straight in
the residual stream.  To compare them, each linear ``j`` of decoder layer ``l`` gets a
*gain*, measured by recomputing that one layer from cached residual rows
``r_in(l)`` (full token windows, :mod:`qcompiler.analysis.sessions`) with only ``Ŵ_j``
swapped in, for the reference candidate ``c₀``::

    block(j)   = mean_t ‖r̂_out,t − r_out,t‖² / ‖r_out,t‖²       (per-token, like ``rel``)
    G_j        = block(j) / rel_j(c₀)                            (rel on the same tokens)
    S_j(c)     = G_j · rel_j(c)                                  (any candidate c)

so ``S_j(c₀)`` is the measured layer-output error and other candidates are scaled by
their local error (first order: a small output error ``E`` of linear ``j`` reaches the
layer output through the layer's Jacobian, whose gain on ``E``'s energy does not depend
on which quantizer made ``E``).  ``S`` is additive over linears to first order, which
is what :mod:`qcompiler.analysis.allocate` minimizes.  The end-to-end check runs the
whole model with one linear swapped and reports ``KL(p_float ‖ p_quant)`` of the final
logits per token, averaged.
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
from qcompiler.analysis.structure import ModelSites

log = logging.getLogger(__name__)


def token_rel_error(ref: np.ndarray, test: np.ndarray) -> float:
    """``mean_t ‖test_t − ref_t‖² / ‖ref_t‖²`` over all rows (last axis = channels)."""
    r = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    e = test.reshape(-1, ref.shape[-1]).astype(np.float64) - r
    return float(np.mean(np.einsum("ij,ij->i", e, e) / np.maximum(np.einsum("ij,ij->i", r, r), 1e-30)))


def block_gains(model: ir.Model, sites: ModelSites, ids: np.ndarray, residuals: Mapping[str, np.ndarray],
                reference: Candidate, threads: int | None = None,
                progress: bool = True) -> dict[str, dict[str, float]]:
    """``{key: {"block": block(j), "local": rel_j(c₀), "gain": G_j}}`` for every linear in a full layer.

    ``ids[B, T]`` are the windows whose residual values ``residuals[name][B, T, C]`` were captured.
    """
    out: dict[str, dict[str, float]] = {}
    todo = [ls for ls in sites.layers if ls.r_in in residuals and ls.r_out and ls.linears]
    bar = tqdm(total=sum(len(ls.linears) for ls in todo), desc="layer sensitivity", unit="linear",
               leave=False, disable=not progress)
    try:
        for ls in todo:
            members = list(ls.linears.values())
            extra = list(dict.fromkeys(s.input for s in members))
            runner = PartRunner(model, [ls.r_out, *extra], cuts=[ls.r_in],
                                overridable=[s.weight for s in members], threads=threads)
            try:
                feeds = {ls.r_in: residuals[ls.r_in]}
                ref, *xs = runner.run(ids, feeds)
                x_of = dict(zip(extra, xs))
                for s in members:
                    w = s.weight_array()
                    w_hat = fake_quant_weight(w, reference.weight) if reference.weight is not None else w
                    x = x_of[s.input].reshape(-1, s.k)
                    local = output_error(x @ w, x @ w_hat).rel
                    (test,) = runner.run(ids, feeds, {s.weight: w_hat}, outputs=[ls.r_out])
                    block = token_rel_error(ref, test)
                    out[s.key] = {"block": block, "local": local, "gain": block / local if local > 0 else 0.0}
                    bar.update(1)
            finally:
                runner.close()
    finally:
        bar.close()
    return out


def kl_per_token(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """``mean_t KL(softmax(ref_t) ‖ softmax(q_t))`` in nats (float64 accumulation)."""
    from qcompiler.eval import log_softmax

    lp = log_softmax(ref_logits.reshape(-1, ref_logits.shape[-1]))
    lq = log_softmax(logits.reshape(-1, logits.shape[-1]))
    return float(np.mean((np.exp(lp) * (lp - lq)).sum(axis=-1, dtype=np.float64)))


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

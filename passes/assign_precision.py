"""assign-precision: one weight option per linear, least predicted error under a bit or size budget.

With options ``o`` (e.g. ``w4g128, w4g64, w4g32, w8c``) of cost ``c_jo`` and predicted
error ``S_j(o)`` for linear ``j`` (the relative error of its decoder layer's output when only
``j`` is quantized, :mod:`qcompiler.analysis.sensitivity`; additive to first order)::

    min Σ_j S_j(o_j)   s.t.   Σ_j bits(o_j) ≤ B·Σ_j P_j      (--budget B average bits)
                       and/or Σ_j bytes(o_j) ≤ M − F_rest   (--max-size M MB)

— a multiple-choice knapsack solved exactly as a MILP (:mod:`qcompiler.analysis.allocate`).
``bits`` counts scales and zero points (``w4g128`` = 4 + 36/128 bits for float32 scales),
``bytes`` the stored layout, padding included (:mod:`qcompiler.analysis.candidates`).
The errors come from a ``qc analyze`` report (``report=PATH``, its per-linear
``sensitivity``) or are measured here with the calibration data (``--calib``).  The pass
writes a ``QuantSpec`` on every linear (``qcompiler.spec.set_weight_spec``) that
``quantize-weights`` then applies; a budget below the cheapest possible model is an
error that states that minimum.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from qcompiler.analysis import budget as bud
from qcompiler.analysis.candidates import DEFAULT_OPTIONS, Candidate, parse_candidate, parse_candidates
from qcompiler.analysis.structure import ModelSites, find_sites
from qcompiler.errors import InputError, QCError
from qcompiler.pipeline import QCPass, register_pass
from qcompiler.spec import set_weight_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AssignPrecisionConfig:
    budget: float | None = None  # average bits per weight (scales and zero points included)
    max_size_mb: float | None = None  # whole model, MB = 10^6 bytes
    options: tuple[str, ...] = DEFAULT_OPTIONS
    sym: bool = False
    method: str = "rtn"
    clip: str = "minmax"
    lm_head: bool = False
    report: str | None = None  # report.json of qc analyze: reuse its measured errors
    reference: str = "w4g128"  # the candidate whose layer rerun calibrates the gains
    samples: int = 8
    seq_len: int = 512
    rows: int = 256
    block_windows: int = 2
    block_seq_len: int = 128
    propagation: float = 0.0  # β of qcompiler.analysis.sensitivity (sensitivity=output-error)
    sensitivity: str = "kl"  # kl | output-error | blend | logit-skip (qcompiler.analysis.sensitivity)

    def __post_init__(self) -> None:
        if self.budget is not None and self.budget <= 0:
            raise ValueError(f"budget must be positive, got {self.budget}")
        if self.max_size_mb is not None and self.max_size_mb <= 0:
            raise ValueError(f"max_size_mb must be positive, got {self.max_size_mb}")
        for name in ("samples", "seq_len", "rows", "block_windows", "block_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.propagation <= 1.0:
            raise ValueError(f"propagation must be in [0, 1], got {self.propagation}")
        from qcompiler.analysis.sensitivity import SENSITIVITY_METHODS

        if self.sensitivity not in SENSITIVITY_METHODS:
            raise ValueError(f"sensitivity must be one of {', '.join(SENSITIVITY_METHODS)}, got '{self.sensitivity}'")


@register_pass
class AssignPrecision(QCPass):
    """Annotate each linear with the option of an exact budgeted assignment (see module docstring)."""

    name = "assign-precision"
    Config = AssignPrecisionConfig
    needs_canonical = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg: AssignPrecisionConfig = self.config
        if cfg.budget is None and cfg.max_size_mb is None:
            raise QCError("assign-precision needs a budget: --budget AVG_BITS or --max-size MB")
        options = parse_candidates(cfg.options, cfg.sym, cfg.method, cfg.clip)
        if any(o.activation is not None or o.weight is None for o in options):
            raise QCError("assign-precision options are weight options (w<bits>g<group> or w<bits>c); "
                          f"got {', '.join(o.name for o in options)}")
        sites = find_sites(model, cfg.lm_head)
        keys = list(sites.linears)
        bud.check_feasible(sites, keys, options, cfg.budget, cfg.max_size_mb)
        errors = self._errors_from_report(cfg, keys, options) if cfg.report else self._measure(model, sites, options)
        sol = bud.solve(sites, keys, errors, options, budget=cfg.budget, max_size_mb=cfg.max_size_mb)
        counts: dict[str, int] = {}
        for key, cand in sol.assignment.items():
            set_weight_spec(sites.linears[key].node, cand.weight)
            counts[cand.name] = counts.get(cand.name, 0) + 1
        self.context.report["assign-precision"] = {
            "budget_avg_bits": cfg.budget,
            "max_size_mb": cfg.max_size_mb,
            "avg_bits": round(sol.avg_bits, 4),
            "estimated_size_mb": round(sol.size_bytes / bud.MB, 3),
            "minimum_avg_bits": round(sol.minimum_avg_bits, 4),
            "predicted_error": sol.predicted_error,
            "errors_from": cfg.report or "measured",
            "sensitivity": None if cfg.report else cfg.sensitivity,
            "options": counts,
            "assignment": {k: c.name for k, c in sol.assignment.items()},
        }
        log.info("assign-precision: %.3f average bits, ~%.1f MB, options %s", sol.avg_bits, sol.size_bytes / bud.MB,
                 counts)
        return ir.passes.PassResult(model, modified=True)

    def _measure(self, model: ir.Model, sites: ModelSites, options: list[Candidate]) -> dict[str, dict[str, float]]:
        from qcompiler.analysis.measure import MeasureConfig, measure

        cfg: AssignPrecisionConfig = self.config
        calibrator = self.context.require_calibration(self.name)
        reference = parse_candidate(cfg.reference, cfg.sym, cfg.method, cfg.clip)
        cands = parse_candidates([reference.name, *(o.name for o in options)], cfg.sym, cfg.method, cfg.clip)
        threads = self.context.options.get("threads")
        mcfg = MeasureConfig(cfg.samples, cfg.seq_len, cfg.rows, cfg.block_windows, cfg.block_seq_len, threads,
                             propagation=cfg.propagation, sensitivity=cfg.sensitivity)
        ms = measure(model, sites, calibrator, cands, cands[0], mcfg)
        log.info("assign-precision: measured %d linears in %s", len(sites.linears),
                 ", ".join(f"{k} {v:.1f}s" for k, v in ms.seconds.items()))
        return ms.sensitivity

    @staticmethod
    def _errors_from_report(cfg: AssignPrecisionConfig, keys: list[str],
                            options: list[Candidate]) -> dict[str, dict[str, float]]:
        path = Path(cfg.report)  # type: ignore[arg-type]
        try:
            report = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"assign-precision: no such report: {path}") from None
        except (OSError, ValueError) as e:
            raise InputError(f"assign-precision: cannot read {path} as JSON: {e}") from None
        from qcompiler.analysis.schema import SCHEMA_ID, SCHEMA_VERSION

        if not isinstance(report, dict) or report.get("schema") != SCHEMA_ID:
            raise InputError(f"assign-precision: {path} is not a qc analyze report")
        if report.get("schema_version") != SCHEMA_VERSION:
            raise InputError(f"assign-precision: {path} has schema version {report.get('schema_version')}, "
                             f"this qcompiler reads {SCHEMA_VERSION}")
        if report.get("config", {}).get("sym", False) != cfg.sym:
            raise InputError(f"assign-precision: {path} was measured with sym={report['config'].get('sym')}, "
                             f"the pass runs with sym={cfg.sym}")
        by_key = {r["key"]: r["sensitivity"] for r in report.get("layers", [])}
        missing = [k for k in keys if k not in by_key]
        if missing:
            raise InputError(f"assign-precision: {path} has no errors for {len(missing)} linear(s) of this model "
                             f"(e.g. {missing[0]}): it was made for another model")
        lacking = sorted({o.name for o in options for k in keys if o.name not in by_key[k]})
        if lacking:
            raise InputError(f"assign-precision: {path} has no measured errors for option(s) {', '.join(lacking)}; "
                             "rerun qc analyze with them in --options")
        return {k: {o.name: float(by_key[k][o.name]) for o in options} for k in keys}

"""Collecting what the analysis and ``assign-precision`` need: one calibration sweep, one capture, layer reruns.

1. **Statistics sweep** (:class:`qcompiler.calibrate.Calibrator`, ``samples`` windows of
   ``seq_len`` tokens): for every distinct linear input ``minmax`` and a seeded sample of
   ``rows`` rows (the *same* token rows for every value), plus whatever extra requests
   the caller adds (outlier counts, residual-stream statistics) — cached on disk by
   model, data and settings like every calibration.
2. **Capture** of the residual stream ``r_in(l)`` of every layer on ``block_windows``
   full windows of ``block_seq_len`` tokens.
3. **Local errors** of every candidate on the sampled rows
   (:mod:`qcompiler.analysis.local_error`) and **layer gains** from rerunning each
   layer on the captured windows (:mod:`qcompiler.analysis.sensitivity`), giving the
   predicted error ``S_j(c) = G_j·rel_j(c)`` of every linear and candidate.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from qcompiler.analysis.candidates import Candidate
from qcompiler.analysis.local_error import ErrorStats, LinearErrors
from qcompiler.analysis.sensitivity import DEFAULT_SENSITIVITY, SENSITIVITY_METHODS, block_gains
from qcompiler.analysis.structure import ModelSites
from qcompiler.calibrate import Calibrator, StatRequest
from qcompiler.errors import QCError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MeasureConfig:
    samples: int = 8
    seq_len: int = 512
    rows: int = 256
    block_windows: int = 2
    block_seq_len: int = 128
    threads: int | None = None
    progress: bool = True
    propagation: float = 0.0  # β of sensitivity.block_gains: 0 = layer output, 1 = skip path only
    sensitivity: str = DEFAULT_SENSITIVITY  # what ranks the linears (sensitivity.SENSITIVITY_METHODS)
    also: tuple[str, ...] = ()  # other sensitivities recorded in the gains, for comparison

    def __post_init__(self) -> None:
        for m in (self.sensitivity, *self.also):
            if m not in SENSITIVITY_METHODS:
                raise ValueError(f"sensitivity must be one of {', '.join(SENSITIVITY_METHODS)}, got '{m}'")
        if not 0.0 <= self.propagation <= 1.0:
            raise ValueError(f"propagation must be in [0, 1], got {self.propagation}")
        for name in ("samples", "seq_len", "rows", "block_windows", "block_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class Measurements:
    sites: ModelSites
    candidates: list[Candidate]
    reference: Candidate
    errors: dict[str, dict[str, ErrorStats]]  # linear key → candidate → local error
    gains: dict[str, dict[str, float]]  # linear key → block / local / gain
    sensitivity: dict[str, dict[str, float]]  # linear key → candidate → S
    stats: Any  # CalibrationStats of the sweep
    samples: dict[str, np.ndarray]  # value → sampled rows [rows, C]
    block_ids: np.ndarray  # [B, T] token ids of the captured windows
    residuals: dict[str, np.ndarray]  # value → [B, T, C]
    stats_ids: np.ndarray  # [samples, seq_len] token ids of the statistics windows
    seconds: dict[str, float] = field(default_factory=dict)


def derived_calibrator(base: Calibrator, samples: int, seq_len: int, rows: int) -> Calibrator:
    """A calibrator on the same text with its own window count/length and sample size."""
    cfg = dataclasses.replace(base.config, samples=samples, seq_len=seq_len,
                              observer=dataclasses.replace(base.config.observer, sample_rows=rows))
    return Calibrator(base.model_dir, cfg, base.executor)


def measure(model: ir.Model, sites: ModelSites, calibrator: Calibrator, candidates: list[Candidate],
            reference: Candidate, cfg: MeasureConfig = MeasureConfig(),
            extra_requests: list[StatRequest] | None = None, model_path: str | None = None,
            lm_head: bool = False) -> Measurements:
    """Run steps 1–3 of the module docstring.

    The calibrator's executor (``--ray``) runs the calibration shards, and — given
    ``model_path``, the file ``model`` was loaded from unchanged — the layer reruns.
    """
    if not isinstance(calibrator, Calibrator):
        raise QCError("the analysis needs qcompiler's calibrator (pass --calib PATH)")
    if reference.weight is None or reference.activation is not None:
        raise QCError(f"the reference candidate must be weight-only, got '{reference.name}'")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    stats_cal = derived_calibrator(calibrator, cfg.samples, cfg.seq_len, cfg.rows)
    inputs = sites.inputs()
    requests = [StatRequest(v, ("minmax", "sample")) for v in inputs]
    stats = stats_cal(model, requests + list(extra_requests or []))
    samples = {v: stats.get(v, "sample").rows for v in stats.values() if stats.has(v, "sample")}
    seconds["statistics"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    block_cal = derived_calibrator(calibrator, cfg.block_windows, cfg.block_seq_len,
                                   cfg.block_windows * cfg.block_seq_len)
    wanted = list(dict.fromkeys(v for ls in sites.layers for v in (ls.r_in, ls.r_out) if v))
    residuals: dict[str, np.ndarray] = {}
    block_ids = block_cal.windows.ids
    if wanted:
        captured = block_cal.capture(model, wanted, max_rows=cfg.block_windows * cfg.block_seq_len)
        b, t = block_ids.shape
        for name, smp in captured.items():
            if smp.rows.shape[0] != b * t:
                raise QCError(f"internal error: captured {smp.rows.shape[0]} rows of {name}, expected {b * t}")
            residuals[name] = smp.rows.reshape(b, t, -1)
    seconds["capture"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    errors: dict[str, dict[str, ErrorStats]] = {}
    for s in tqdm(sites.linears.values(), desc="local errors", unit="linear", leave=False, disable=not cfg.progress):
        mm = stats.get(s.input, "minmax")
        le = LinearErrors(samples[s.input], s.weight_array(), absmax=mm.absmax)
        errors[s.key] = {c.name: le.error(c) for c in candidates}
    seconds["local_errors"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    gains = block_gains(model, sites, block_ids, residuals, reference, cfg.threads, cfg.progress, cfg.propagation,
                        executor=calibrator.executor, model_path=model_path, lm_head=lm_head,
                        method=cfg.sensitivity, also=cfg.also)
    seconds["layer_reruns"] = time.perf_counter() - t0
    sensitivity = predicted_errors(sites, errors, gains)
    return Measurements(sites, candidates, reference, errors, gains, sensitivity, stats, samples, block_ids,
                        residuals, stats_cal.windows.ids, seconds)


def predicted_errors(sites: ModelSites, errors: dict[str, dict[str, ErrorStats]],
                     gains: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``S_j(c) = G_j·rel_j(c)``; a linear without a measured gain gets its role's median gain."""
    by_role: dict[str, list[float]] = {}
    for key, g in gains.items():
        by_role.setdefault(sites.linears[key].role.value, []).append(g["gain"])
    out: dict[str, dict[str, float]] = {}
    missing = []
    for key, errs in errors.items():
        if key in gains:
            gain = gains[key]["gain"]
        else:
            role_gains = by_role.get(sites.linears[key].role.value)
            gain = float(np.median(role_gains)) if role_gains else 1.0
            missing.append(key)
        out[key] = {c: gain * e.rel for c, e in errs.items()}
    if missing:
        log.warning("analysis: %d linear(s) have no measured layer gain (residual stream not found): %s",
                    len(missing), ", ".join(missing[:6]))
    return out

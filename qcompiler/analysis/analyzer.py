"""``qc analyze``: diagnostics, per-linear errors, sensitivity, a budgeted assignment, report.json + report.html.

Pipeline (each step's algebra is in its module):

1. statistics sweep + residual capture + local errors + layer reruns
   (:mod:`~qcompiler.analysis.measure`);
2. outlier features, massive activations, super weights, severity
   (:mod:`~qcompiler.analysis.diagnostics`);
3. ranking by the predicted layer-output error ``S_j(c₀)`` of the reference candidate;
   end-to-end KL of the final logits for the ``e2e_top`` most sensitive linears
   (:class:`~qcompiler.analysis.sensitivity.EndToEnd`);
4. the exact assignment at ``budget`` average bits (:mod:`~qcompiler.analysis.budget`)
   and at ``pareto_budgets``, against uniform configurations: the size/accuracy front;
5. a recommendation per linear (:mod:`~qcompiler.analysis.recommend`);
6. ``report.json`` (schema in :mod:`~qcompiler.analysis.schema`, also written as
   ``report.schema.json``) and ``report.html`` with the plots, atomically.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler import __version__
from qcompiler.analysis import budget as bud
from qcompiler.analysis import diagnostics as dg
from qcompiler.analysis import html, plots
from qcompiler.analysis.candidates import (
    DEFAULT_CANDIDATES,
    DEFAULT_OPTIONS,
    Candidate,
    fake_quant_weight,
    parse_candidate,
    parse_candidates,
)
from qcompiler.analysis.measure import MeasureConfig, Measurements, measure
from qcompiler.analysis.recommend import recommend
from qcompiler.analysis.schema import SCHEMA, SCHEMA_ID, SCHEMA_VERSION, validate_report
from qcompiler.analysis.sensitivity import EndToEnd, spearman
from qcompiler.analysis.structure import ModelSites, find_sites
from qcompiler.artifact import atomic_output_dir, check_output_dir, open_model_dir, write_json
from qcompiler.calibrate import CalibConfig, Calibrator, ObserverConfig, StatRequest, parse_memory
from qcompiler.calibrate.windows import load_windows
from qcompiler.data import load_tokenizer, read_text
from qcompiler.distributed import Executor
from qcompiler.errors import OutputError, QCError
from qcompiler.finite import check_model_weights
from qcompiler.irutil import load_model
from qcompiler.islands import IslandCriteria, select_nodes
from qcompiler.spec import Role

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalyzeConfig:
    calib: str
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    reference: str = "w4g128"
    options: tuple[str, ...] = DEFAULT_OPTIONS
    curve: tuple[str, ...] = ("w8c", "w4g32", "w4g64", "w4g128", "w3g128")
    budget: float = 4.5
    pareto_budgets: tuple[float, ...] = (4.35, 4.5, 4.75, 5.0)
    e2e_top: int = 5
    pareto_e2e: bool = True
    e2e_windows: int = 4
    e2e_seq_len: int = 256
    weight_cache_mb: float = 768.0
    sym: bool = False
    method: str = "rtn"
    clip: str = "minmax"
    seed: int = 0
    max_memory: str | None = None
    cache_dir: str | None = None
    lm_head: bool = False
    criteria: dg.Criteria = field(default_factory=dg.Criteria)
    act_snr_db: float = 30.0
    sensitive_fraction: float = 0.1


def analyze(model_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: AnalyzeConfig,
            force: bool = False, executor: Executor | None = None) -> dict[str, Any]:
    """Analyze the model folder ``model_dir`` and write the report folder ``out_dir``; returns the report.

    ``executor`` (``--ray``): calibration shards and the per-layer sensitivity reruns as tasks.
    """
    t_start = time.perf_counter()
    src = open_model_dir(model_dir)
    out = Path(out_dir)
    check_output_dir(out, force, (src.path, cfg.calib))
    _probe_writable(out)
    read_text(cfg.calib)  # a missing or empty calibration text fails before any work
    if cfg.budget <= 0:
        raise QCError(f"--budget must be positive, got {cfg.budget:g}")
    model = load_model(src.model_path)
    check_model_weights(model)
    sites = find_sites(model, cfg.lm_head)
    names = list(dict.fromkeys([cfg.reference, *cfg.candidates, *cfg.options, *cfg.curve]))
    cands = parse_candidates(names, cfg.sym, cfg.method, cfg.clip)
    by_name = {c.name: c for c in cands}
    reference = by_name[parse_candidate(cfg.reference).name]
    options = [by_name[parse_candidate(o).name] for o in cfg.options]
    bud.check_feasible(sites, list(sites.linears), options, budget=cfg.budget)
    calibrator = Calibrator(src.path, CalibConfig(
        calib=cfg.calib, seed=cfg.seed, max_memory=parse_memory(cfg.max_memory), cache_dir=cfg.cache_dir,
        threads=cfg.measure.threads, progress=cfg.measure.progress,
        observer=ObserverConfig(seed=cfg.seed, outlier_threshold=cfg.criteria.threshold)), executor)
    ms = measure(model, sites, calibrator, cands, reference, cfg.measure, _extra_requests(sites),
                 model_path=str(src.model_path), lm_head=cfg.lm_head)
    timing = {f"{k}_s": round(v, 2) for k, v in ms.seconds.items()}

    outliers = _diagnostics(sites, ms, cfg, src.path, model)
    ref = reference.name
    ranking = sorted(sites.linears, key=lambda k: -ms.sensitivity[k][ref])
    keys = list(sites.linears)

    t0 = time.perf_counter()
    e2e_ids = load_windows(src.path, cfg.calib, cfg.e2e_windows, cfg.e2e_seq_len, cfg.seed + 1).ids
    e2e_runner = EndToEnd(model, sites, e2e_ids, cfg.measure.threads) if (cfg.e2e_top or cfg.pareto_e2e) else None
    cache = WeightCache(sites, cfg.weight_cache_mb)
    e2e_results = []
    try:
        if e2e_runner is not None:
            for key in ranking[: cfg.e2e_top]:
                kl = e2e_runner.kl_of_assignment({key: reference}, cache.get)
                e2e_results.append({"key": key, "predicted": ms.sensitivity[key][ref], "kl": kl})
                log.info("end-to-end: %s %s KL %.3g (predicted %.3g)", key, ref, kl, ms.sensitivity[key][ref])
        timing["e2e_s"] = round(time.perf_counter() - t0, 2)

        t0 = time.perf_counter()
        mixed = bud.solve(sites, keys, ms.sensitivity, options, budget=cfg.budget)
        points = _pareto_points(sites, keys, ms, options, cfg, e2e_runner, cache)
        timing["pareto_s"] = round(time.perf_counter() - t0, 2)
    finally:
        if e2e_runner is not None:
            e2e_runner.close()
    rho = spearman([r["predicted"] for r in e2e_results], [r["kl"] for r in e2e_results])
    kl_by_key = {r["key"]: r["kl"] for r in e2e_results}

    sev_by_value = {s["value"]: s for s in outliers["severity"]}
    n_sensitive = max(1, round(cfg.sensitive_fraction * len(ranking)))
    layers = []
    for rank, key in enumerate(ranking):
        s = sites.linears[key]
        sev = sev_by_value[s.input]
        g = ms.gains.get(key)
        layers.append({
            "key": key, "layer": s.layer, "role": s.role.value, "shape": [s.k, s.n], "params": s.params,
            "errors": {c: e.to_dict() for c, e in ms.errors[key].items()},
            "gain": g["gain"] if g else None, "block_error": g["block"] if g else None,
            "skip_error": g["skip"] if g else None, "final_error": g["final"] if g else None,
            "sensitivity": dict(ms.sensitivity[key]), "rank": rank, "e2e_kl": kl_by_key.get(key),
            "recommendation": recommend(key, mixed.assignment[key], ms.errors[key], rank < n_sensitive,
                                        sev["outlier_channels"], sev["class"], cfg.act_snr_db),
        })
    layers.sort(key=lambda r: list(sites.linears).index(r["key"]))

    stats_ids = ms.stats_ids
    report: dict[str, Any] = {
        "schema": SCHEMA_ID,
        "schema_version": SCHEMA_VERSION,
        "qcompiler_version": __version__,
        "model": {"path": str(src.path), "num_layers": len(sites.layers), "hidden": sites.hidden,
                  "linears": len(sites.linears), "params": sum(s.params for s in sites.linears.values()),
                  "float_mb": sites.float_bytes / bud.MB},
        "calibration": {"source": str(cfg.calib), "samples": int(stats_ids.shape[0]), "seq_len": int(stats_ids.shape[1]),
                        "rows": int(next(iter(ms.samples.values())).shape[0]) if ms.samples else 0,
                        "block_windows": int(ms.block_ids.shape[0]), "block_seq_len": int(ms.block_ids.shape[1])},
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "outliers": {k: v for k, v in outliers.items() if k != "_fraction"},
        "candidates": [_candidate_entry(c, sites) for c in cands],
        "reference": ref,
        "layers": layers,
        "ranking": ranking,
        "e2e": {"candidate": ref, "windows": int(e2e_ids.shape[0]), "tokens": int(e2e_ids.size),
                "results": e2e_results, "spearman": None if rho != rho else rho},
        "mixed": {"options": [o.name for o in options], "budget": cfg.budget, "avg_bits": mixed.avg_bits,
                  "size_mb": mixed.size_bytes / bud.MB, "predicted_error": mixed.predicted_error,
                  "minimum_avg_bits": mixed.minimum_avg_bits,
                  "assignment": {k: c.name for k, c in mixed.assignment.items()}},
        "pareto": points,
        "error_vs_bits": _curve(sites, ms, [by_name[parse_candidate(c).name] for c in cfg.curve]),
        "timing": timing,
    }
    validate_report(report)
    t0 = time.perf_counter()
    figures = _figures(report, outliers)
    page = html.render(report, figures)
    report["timing"]["plots_s"] = round(time.perf_counter() - t0, 2)
    report["timing"]["total_s"] = round(time.perf_counter() - t_start, 2)
    try:
        with atomic_output_dir(out, force, (src.path, cfg.calib)) as tmp:
            write_json(tmp / "report.json", report)
            write_json(tmp / "report.schema.json", SCHEMA)
            (tmp / "report.html").write_text(page, encoding="utf-8")
    except OSError as e:
        raise OutputError(f"cannot write the report into {out}: {e.strerror or e}") from None
    log.info("wrote %s in %.1fs", out, report["timing"]["total_s"])
    return report


def _probe_writable(out: Path) -> None:
    """Create and remove a folder beside ``out``: an unwritable destination fails before any work."""
    parent = out.resolve().parent
    try:
        Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent)).rmdir()
    except OSError as e:
        raise OutputError(f"cannot write the report folder {out}: {e.strerror or e}") from None


def _extra_requests(sites: ModelSites) -> list[StatRequest]:
    reqs = [StatRequest(v, ("absmax_channel", "outliers")) for v in sites.inputs()]
    reqs += [StatRequest(v, ("absmax_channel", "absmax_token", "sample")) for _, _, v in sites.residuals()]
    for ls in sites.layers:
        down = ls.by_role(Role.DOWN)
        if down is not None:
            reqs.append(StatRequest(down.output, ("absmax_channel",)))
    return reqs


def _diagnostics(sites: ModelSites, ms: Measurements, cfg: AnalyzeConfig, model_dir: Path,
                 model: ir.Model | None = None) -> dict[str, Any]:
    st, crit = ms.stats, cfg.criteria
    hidden = sites.hidden_inputs()
    int8 = dg.outlier_features([(layer, st.get(v, "outliers").channel_fraction, st.get(v, "absmax_channel"))
                                for layer, v in hidden], len(sites.layers), crit)
    tok = load_tokenizer(model_dir)

    def decode(i: int) -> str:
        return tok.decode([i]) or tok.id_to_token(i) or str(i)

    by_value, examples = [], []
    for label, layer, v in sites.residuals():
        med = float(np.median(np.abs(ms.samples[v])))
        by_value.append(dg.massive_activations(label, layer, st.get(v, "absmax_token"), st.get(v, "absmax_channel"),
                                               med, crit))
        if v in ms.residuals and len(examples) < 24:
            examples += dg.massive_examples(label, layer, ms.residuals[v], ms.block_ids, med, crit, decode, 4)
    supers = []
    for ls in sites.layers:
        down = ls.by_role(Role.DOWN)
        if down is not None:
            supers += dg.super_weights(ls.layer, down.key, down.weight_array(), st.get(down.input, "absmax_channel"),
                                       st.get(down.output, "absmax_channel"), crit)
    severity = []
    for v, readers in sites.inputs().items():
        s0 = sites.linears[readers[0]]
        sev = dg.severity(st.get(v, "minmax").absmax, ms.samples[v], crit)
        frac = st.get(v, "outliers").channel_fraction
        severity.append({"value": v, "layer": s0.layer, "linears": readers, **sev,
                         "outlier_channels": int((frac >= crit.min_token_fraction).sum())})
    ranges = [(label, layer, v, float(np.max(st.get(v, "absmax_channel")))) for label, layer, v in sites.residuals()]
    ranges += [(f"{sites.linears[r[0]].key} input", sites.linears[r[0]].layer, v, float(st.get(v, "minmax").absmax))
               for v, r in sites.inputs().items()]
    fp16 = dg.fp16_range(ranges, crit)
    if model is not None:  # what keep-fp32 would keep, from the values measured here (passes/keep_fp32.py)
        guard = IslandCriteria()
        fp16["keep_fp32"] = {"limit": guard.limit, "ops": [n.name for n in select_nodes(
            model.graph, {v for *_, v, a in ranges if not a <= guard.limit})]}
        if fp16["keep_fp32"]["ops"]:
            log.warning("analyze: an fp16 export keeps %d op(s) in float32 (keep-fp32, with --calib): %s",
                        len(fp16["keep_fp32"]["ops"]), ", ".join(fp16["keep_fp32"]["ops"][:6]))
    if not fp16["fp16_safe"]:
        log.warning("analyze: %d value(s) pass fp16's range (max |x| = %.4g > 65504) on the calibration text: "
                    "export with --dtype fp32 or bf16, or quantize the fp16 export with --calib (keep-fp32 keeps the ops "
                    "that overflow in float32; docs/half.md)", len(fp16["overflow"]), fp16["max_abs"])
    dims = sorted({d for m in by_value for d in m["dims"]})
    positions = sorted({int(p) for m in by_value for p in m["positions"]})
    return {
        "llm_int8": {"criteria": {"threshold": crit.threshold, "min_token_fraction": crit.min_token_fraction,
                                  "min_layer_fraction": crit.min_layer_fraction},
                     "inputs": [{"layer": layer, "value": v} for layer, v in hidden], "dims": int8["dims"]},
        "massive": {"criteria": {"abs": crit.massive_abs, "median_ratio": crit.massive_ratio},
                    "dims": dims, "positions": positions, "by_value": by_value, "examples": examples},
        "super_weights": supers,
        "severity": severity,
        "fp16_range": fp16,
        "_fraction": (int8["fraction"], [f"{layer}:{'attn' if i % 2 == 0 else 'mlp'}" for i, (layer, _) in
                                         enumerate(hidden)]),
    }


def _candidate_entry(c: Candidate, sites: ModelSites) -> dict[str, Any]:
    bits = bud.avg_bits(sites, dict.fromkeys(sites.linears, c)) if c.weight is not None else None
    return {"name": c.name, "description": c.describe(), "weight": c.weight.to_dict() if c.weight else None,
            "activation": c.activation, "bits_per_weight": bits}


class WeightCache:
    """``Ŵ`` per (linear, candidate), kept until ``limit_mb`` is used (configurations share most of them)."""

    def __init__(self, sites: ModelSites, limit_mb: float) -> None:
        self.sites = sites
        self.limit = int(limit_mb * 1e6)
        self.used = 0
        self.store: dict[tuple[str, str], np.ndarray] = {}

    def get(self, key: str, cand: Candidate) -> np.ndarray:
        hit = self.store.get((key, cand.name))
        if hit is not None:
            return hit
        w = fake_quant_weight(self.sites.linears[key].weight_array(), cand.weight)  # type: ignore[arg-type]
        if self.used + w.nbytes <= self.limit:
            self.store[(key, cand.name)] = w
            self.used += w.nbytes
        return w


def _pareto_points(sites: ModelSites, keys: list[str], ms: Measurements, options: list[Candidate],
                   cfg: AnalyzeConfig, e2e: EndToEnd | None, cache: WeightCache) -> list[dict[str, Any]]:
    points = []
    # the reference first: mixed assignments are mostly the cheapest option, so its weights get cached
    for o in sorted(options, key=lambda o: o.name != ms.reference.name):
        assignment = dict.fromkeys(keys, o)
        points.append({"label": o.name, "kind": "uniform", "budget": None, "assignment": assignment})
    for b in cfg.pareto_budgets:
        try:
            sol = bud.solve(sites, keys, ms.sensitivity, options, budget=b)
        except QCError as e:
            log.info("pareto: budget %g skipped (%s)", b, e)
            continue
        points.append({"label": f"mixed {b:g}", "kind": "mixed", "budget": b, "assignment": sol.assignment})
    out = []
    for p in points:
        a = p.pop("assignment")
        p.update({"avg_bits": bud.avg_bits(sites, a), "size_mb": bud.size_bytes(sites, a) / bud.MB,
                  "predicted_error": float(sum(ms.sensitivity[k][c.name] for k, c in a.items())),
                  "kl": e2e.kl_of_assignment(a, cache.get) if (e2e is not None and cfg.pareto_e2e) else None})
        log.info("pareto: %s avg bits %.3f, %.1f MB, KL %s", p["label"], p["avg_bits"], p["size_mb"], p["kl"])
        out.append(p)
    metric = "kl" if all(p["kl"] is not None for p in out) else "predicted_error"
    for p in out:
        p["pareto"] = not any(q is not p and q["size_mb"] <= p["size_mb"] and q[metric] <= p[metric]
                              and (q["size_mb"] < p["size_mb"] or q[metric] < p[metric]) for q in out)
    return out


def _curve(sites: ModelSites, ms: Measurements, curve: list[Candidate]) -> list[dict[str, Any]]:
    out = []
    for c in curve:
        snr = np.array([ms.errors[k][c.name].snr_db for k in sites.linears])
        sens = np.array([ms.sensitivity[k][c.name] for k in sites.linears])
        out.append({"candidate": c.name, "bits_per_weight": bud.avg_bits(sites, dict.fromkeys(sites.linears, c)),
                    "median_snr_db": float(np.median(snr)), "p10_snr_db": float(np.percentile(snr, 10)),
                    "p90_snr_db": float(np.percentile(snr, 90)), "median_sensitivity": float(np.median(sens))})
    return out


def _figures(report: dict[str, Any], outliers: dict[str, Any]) -> dict[str, bytes]:
    fraction, labels = outliers["_fraction"]
    return {
        "ranges": plots.activation_ranges(report["outliers"]["severity"], report["outliers"]["massive"]["by_value"]),
        "heatmap": plots.outlier_heatmap(np.asarray(fraction), labels,
                                         [d["dim"] for d in report["outliers"]["llm_int8"]["dims"]],
                                         report["outliers"]["llm_int8"]["criteria"]["threshold"]),
        "sensitivity": plots.sensitivity_bars(report["layers"], report["reference"]),
        "error_vs_bits": plots.error_vs_bits(report["error_vs_bits"], report["pareto"]),
        "pareto": plots.pareto_front(report["pareto"]),
    }

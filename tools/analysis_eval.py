"""Check a ``qc analyze`` report against end-to-end perplexity on an evaluation text.

    python tools/analysis_eval.py MODEL_DIR REPORT_DIR/report.json --text EVAL.txt \\
        [--max-tokens 2048] [--top 15] [--budgets 4.35,4.5,4.75,5.0] [--json out.json]
        [--skip-ablation | --skip-budgets] [--cache ablations.json]

1. **Ablation**: for the ``top`` most sensitive linears of the report's ranking, quantize
   only that linear with the report's reference candidate and measure perplexity (and
   KL against float) on the evaluation windows; print the Spearman correlation of the
   predicted error ``S`` (and, for comparison, of the purely local ``rel`` and ``−SNR``)
   with the perplexity increase.
2. **Budgets**: every uniform option of the report and the exact ``assign-precision``
   assignment (errors from the report) at each budget: average bits, estimated size,
   perplexity and KL — the performance/precision curve.

Quantized weights are swapped into one ONNX Runtime session over the float model
(``qcompiler.analysis.sessions``): the same numbers as the ``DequantizeLinear``/
``MatMulNBits`` model ``qc quantize`` writes (``tests/analysis`` checks this), without
writing a model per configuration.  Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from qcompiler.passes.assign_precision import AssignPrecision, AssignPrecisionConfig

from qcompiler.analysis import budget as bud
from qcompiler.analysis.candidates import Candidate, fake_quant_weight, parse_candidate, parse_candidates
from qcompiler.analysis.sensitivity import EndToEnd, spearman
from qcompiler.analysis.structure import ModelSites, find_sites
from qcompiler.data import make_windows, read_text, tokenize
from qcompiler.eval import kl_per_token, perplexity
from qcompiler.irutil import load_model


def _metrics(e2e: EndToEnd, ids: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    return perplexity(logits, ids), kl_per_token(e2e.ref, logits)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("report", type=Path)
    p.add_argument("--text", required=True)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--budgets", default="4.35,4.5,4.75,5.0")
    p.add_argument("--skip-ablation", action="store_true")
    p.add_argument("--skip-budgets", action="store_true", help="only the ablation")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="write the numbers here too")
    p.add_argument("--cache", type=Path, default=None,
                   help="JSON file of single-linear ablations already measured (same text and windows): reused, extended")
    args = p.parse_args(argv)

    report = json.loads(args.report.read_text())
    sym = bool(report["config"].get("sym", False))
    model = load_model(args.model_dir / "model.onnx")
    sites = find_sites(model)
    ids = make_windows(tokenize(args.model_dir, read_text(args.text)), args.seq_len, args.max_tokens).ids
    t0 = time.perf_counter()
    e2e = EndToEnd(model, sites, ids, args.threads)
    float_ppl, _ = _metrics(e2e, ids, e2e.ref)
    print(f"float: perplexity {float_ppl:.3f} on {ids.size} tokens ({len(ids)} windows of {ids.shape[1]})", flush=True)
    out: dict[str, object] = {"float_ppl": float_ppl, "tokens": int(ids.size)}

    if not args.skip_ablation:
        ref = parse_candidate(report["reference"], sym=sym)
        by_key = {r["key"]: r for r in report["layers"]}
        rows = []
        cache: dict[str, list[float]] = {}
        tag = f"{ref.name}:{args.text}:{args.seq_len}:{args.max_tokens}"
        if args.cache is not None and args.cache.is_file():
            cache = json.loads(args.cache.read_text()).get(tag, {})
        print(f"\n| linear | predicted S ({ref.name}) | local rel | local SNR dB | PPL | ΔPPL | KL |")
        print("|---|---|---|---|---|---|---|")
        for key in report["ranking"][: args.top]:
            site = sites.linears[key]
            if key in cache:
                ppl, kl = cache[key]
            else:
                w_hat = {site.weight: fake_quant_weight(site.weight_array(), ref.weight)}
                ppl, kl = _metrics(e2e, ids, e2e._logits(w_hat))
                cache[key] = [ppl, kl]
                if args.cache is not None:
                    store = json.loads(args.cache.read_text()) if args.cache.is_file() else {}
                    store[tag] = cache
                    args.cache.write_text(json.dumps(store, indent=1))
            r = by_key[key]
            rows.append({"key": key, "predicted": r["sensitivity"][ref.name], "rel": r["errors"][ref.name]["rel"],
                         "snr_db": r["errors"][ref.name]["snr_db"], "ppl": ppl, "dppl": ppl - float_ppl, "kl": kl})
            x = rows[-1]
            print(f"| {key} | {x['predicted']:.3g} | {x['rel']:.3g} | {x['snr_db']:.1f} | {ppl:.3f} | "
                  f"{x['dppl']:+.3f} | {kl:.4f} |", flush=True)
        dppl = [x["dppl"] for x in rows]
        rho = {
            "predicted_vs_dppl": spearman([x["predicted"] for x in rows], dppl),
            "local_rel_vs_dppl": spearman([x["rel"] for x in rows], dppl),
            "neg_snr_vs_dppl": spearman([-x["snr_db"] for x in rows], dppl),
            "predicted_vs_kl": spearman([x["predicted"] for x in rows], [x["kl"] for x in rows]),
        }
        print(f"\nSpearman over the {len(rows)} most sensitive linears: " +
              ", ".join(f"{k} {v:.3f}" for k, v in rho.items()), flush=True)
        out["ablation"] = {"rows": rows, "spearman": rho}

    if args.skip_budgets:
        return _finish(args, out, e2e, t0)
    options = parse_candidates(report["mixed"]["options"], sym=sym)
    keys = list(sites.linears)
    errors = AssignPrecision._errors_from_report(
        AssignPrecisionConfig(report=str(args.report), options=tuple(o.name for o in options), sym=sym), keys, options)
    configs = [(o.name, dict.fromkeys(keys, o)) for o in options]
    for b in (float(x) for x in args.budgets.split(",") if x.strip()):
        sol = bud.solve(sites, keys, errors, options, budget=b)
        configs.append((f"mixed {b:g}", sol.assignment))
    table = []
    print("\n| configuration | avg bits | est. size MB | PPL | ΔPPL % | KL |")
    print("|---|---|---|---|---|---|")
    for label, a in configs:
        ppl, kl = _metrics(e2e, ids, e2e._logits({sites.linears[k].weight: _fq(sites, k, c) for k, c in a.items()}))
        row = {"config": label, "avg_bits": bud.avg_bits(sites, a), "size_mb": bud.size_bytes(sites, a) / bud.MB,
               "ppl": ppl, "kl": kl}
        table.append(row)
        print(f"| {label} | {row['avg_bits']:.3f} | {row['size_mb']:.1f} | {ppl:.3f} | "
              f"{100 * (ppl / float_ppl - 1):+.1f} | {kl:.4f} |", flush=True)
    out["budgets"] = table
    return _finish(args, out, e2e, t0)


def _finish(args: argparse.Namespace, out: dict[str, object], e2e: EndToEnd, t0: float) -> int:
    out["seconds"] = round(time.perf_counter() - t0, 1)
    e2e.close()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


_CACHE: dict[tuple[str, str], np.ndarray] = {}


def _fq(sites: ModelSites, key: str, cand: Candidate) -> np.ndarray:
    """``Ŵ``, caching the w4g128 ones (the option most configurations share)."""
    hit = _CACHE.get((key, cand.name))
    if hit is not None:
        return hit
    w = fake_quant_weight(sites.linears[key].weight_array(), cand.weight)
    if cand.name == "w4g128":
        _CACHE[(key, cand.name)] = w
    return w


if __name__ == "__main__":
    sys.exit(main())

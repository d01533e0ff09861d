#!/usr/bin/env python3
"""Sensitivity rankings against the one-linear ablation (every linear, cached).

    python tools/sensitivity_eval.py ablate MODEL_DIR --text EVAL.txt --cache runs/ablation.json \\
        [--candidate w4g128] [--tokens 1024] [--seq-len 512] [--sym]
    python tools/sensitivity_eval.py score MODEL_DIR --calib CALIB.txt --ablation runs/ablation.json \\
        [--methods output-error,logit-skip,kl] [--json runs/scores.json]

1. **ablate**: for every linear ``j``, quantize only ``j`` with ``--candidate`` (RTN, as
   ``quantize-weights`` writes it) and measure, on the evaluation text, the KL of the final
   logits against float (mean per token, nats) and the perplexity.  Linear ``j`` of layer
   ``l`` changes nothing before ``r_in(l)``, so each run starts there: the float
   ``r_in(l)`` of every window is captured once, and one session per layer (cut at
   ``r_in(l)``, ``qcompiler.analysis.sessions``) runs the rest of the model with ``Ŵ_j`` fed
   in — the same numbers as the whole model with ``Ŵ_j``, at about 60% of the cost.
   Results go to ``--cache`` after every linear (keyed by candidate, text, windows), so an
   interrupted run resumes.
2. **score**: measure each ``--methods`` sensitivity on the calibration text
   (``qcompiler.analysis.measure``, the same settings as ``qc analyze``) and print the Spearman
   correlation of each with the ablation's KL and ΔPPL, over every linear of the cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from qcompiler.analysis.candidates import fake_quant_weight, parse_candidate
from qcompiler.analysis.sensitivity import SENSITIVITY_METHODS, kl_per_token, spearman
from qcompiler.analysis.sessions import PartRunner
from qcompiler.analysis.structure import find_sites
from qcompiler.data import make_windows, read_text, tokenize
from qcompiler.eval import perplexity
from qcompiler.irutil import load_model


def _ppl(ids: np.ndarray, logits: np.ndarray) -> float:
    return perplexity(logits, ids)


def _spread(items: list) -> list:
    """``items`` in an order whose every prefix spreads over the whole list (0, n−1, n/2, n/4, 3n/4, …)."""
    n = len(items)
    if n < 3:
        return list(items)
    order, seen = [0, n - 1], {0, n - 1}
    step = n - 1
    while len(order) < n:
        step /= 2
        for i in range(1, int((n - 1) / step) + 1, 2):
            j = round(i * step)
            if j not in seen:
                seen.add(j)
                order.append(j)
        if step < 0.5:
            order += [j for j in range(n) if j not in seen]
            break
    return [items[j] for j in order]


def ablate(args: argparse.Namespace) -> int:
    model = load_model(args.model_dir / "model.onnx")
    sites = find_sites(model)
    cand = parse_candidate(args.candidate, sym=args.sym)
    ids = make_windows(tokenize(args.model_dir, read_text(args.text)), args.seq_len, args.tokens).ids
    tag = f"{cand.name}{'-sym' if args.sym else ''}:{args.text}:{args.seq_len}:{ids.size}"
    store = json.loads(args.cache.read_text()) if args.cache.is_file() else {}
    done: dict[str, dict[str, float]] = store.setdefault(tag, {})
    layers = [ls for ls in _spread(sites.layers) if ls.r_in and any(k not in done for k in ls.linears)]
    keys = args.keys.split(",") if args.keys else None
    t0 = time.perf_counter()
    full = PartRunner(model, ["logits", *[ls.r_in for ls in sites.layers if ls.r_in]], threads=args.threads)
    outs = [full.run(ids[i : i + 1]) for i in range(len(ids))]
    full.close()
    ref = np.concatenate([o[0] for o in outs])
    r_in = {name: np.concatenate([o[1 + j] for o in outs])
            for j, name in enumerate(ls.r_in for ls in sites.layers if ls.r_in)}
    store["_float"] = {tag: {"ppl": _ppl(ids, ref), "tokens": int(ids.size)}}
    print(f"float: perplexity {store['_float'][tag]['ppl']:.3f} on {ids.size} tokens "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)
    for ls in layers:
        todo = [s for k, s in ls.linears.items() if k not in done and (keys is None or k in keys)]
        if not todo:
            continue
        runner = PartRunner(model, ["logits"], cuts=[ls.r_in], overridable=[s.weight for s in todo],  # type: ignore[list-item]
                            threads=args.threads)
        try:
            for s in todo:
                t1 = time.perf_counter()
                w_hat = {s.weight: fake_quant_weight(s.weight_array(), cand.weight)}  # type: ignore[arg-type]
                logits = np.concatenate([runner.run(ids[i : i + 1], {ls.r_in: r_in[ls.r_in][i : i + 1]}, w_hat)[0]  # type: ignore[dict-item]
                                         for i in range(len(ids))])
                done[s.key] = {"kl": kl_per_token(ref, logits), "ppl": _ppl(ids, logits)}
                tmp = args.cache.with_suffix(".tmp")
                tmp.write_text(json.dumps(store, indent=1))
                tmp.replace(args.cache)  # a killed run leaves the cache whole
                print(f"{s.key}: KL {done[s.key]['kl']:.5f} PPL {done[s.key]['ppl']:.3f} "
                      f"({time.perf_counter() - t1:.1f}s)", flush=True)
        finally:
            runner.close()
    print(f"{len(done)} linears in {args.cache} [{tag}] ({time.perf_counter() - t0:.0f}s)")
    return 0


#: rankings compared by ``score``: name → function of (gains row, local errors of the candidate)
SCORES = {
    "local rel": lambda g, e: e["rel"],
    "local mse (|ΔW·X|²)": lambda g, e: e["mse"],
    "-SNR": lambda g, e: -e["snr_db"],
    "output-error (block, β=0)": lambda g, e: g["block"],
    "skip (β=1)": lambda g, e: g["skip"],
    "β=0.5": lambda g, e: (g["block"] * g["skip"]) ** 0.5,
    "logit-skip": lambda g, e: g.get("logit_skip"),
    "kl": lambda g, e: g.get("kl"),
    "blend √(kl·output-error)": lambda g, e: (g["kl"] * g["block"]) ** 0.5 if "kl" in g else None,
}


def score(args: argparse.Namespace) -> int:
    from qcompiler.analysis.candidates import parse_candidates
    from qcompiler.analysis.measure import MeasureConfig, measure
    from qcompiler.calibrate import CalibConfig, Calibrator

    store = json.loads(args.ablation.read_text())
    tags = [t for t in store if not t.startswith("_")]
    tag = args.tag or tags[0]
    abl = store[tag]
    cand = parse_candidate(tag.split(":")[0].removesuffix("-sym"), sym=tag.split(":")[0].endswith("-sym"))
    float_ppl = store["_float"][tag]["ppl"]
    if args.measured is not None and args.measured.is_file():
        measured = json.loads(args.measured.read_text())
    else:
        model = load_model(args.model_dir / "model.onnx")
        sites = find_sites(model)
        methods = [m for m in args.methods.split(",") if m]
        cal = Calibrator(args.model_dir, CalibConfig(calib=args.calib, seed=0, threads=args.threads,
                                                      cache_dir=args.cache_dir))
        mcfg = MeasureConfig(block_windows=args.block_windows, block_seq_len=args.block_seq_len, threads=args.threads,
                             sensitivity=methods[0], also=tuple(methods[1:]))
        t0 = time.perf_counter()
        ms = measure(model, sites, cal, parse_candidates([cand.name], cand.weight.symmetric), cand, mcfg)  # type: ignore[union-attr]
        measured = {"seconds": {k: round(v, 1) for k, v in ms.seconds.items()},
                    "total_s": round(time.perf_counter() - t0, 1),
                    "gains": ms.gains, "errors": {k: v[cand.name].to_dict() for k, v in ms.errors.items()}}
        if args.measured is not None:
            args.measured.write_text(json.dumps(measured, indent=1))
    keys = [k for k in abl if k in measured["gains"]]
    if args.layers:
        wanted = {int(x) for x in args.layers.split(",")}
        keys = [k for k in keys if int(k.split(".")[1]) in wanted]
    kl = [abl[k]["kl"] for k in keys]
    dppl = [abl[k]["ppl"] - float_ppl for k in keys]
    rows = []
    print(f"\n{len(keys)} linears, ablation {tag}; measured on {args.calib} ({measured['seconds']})")
    print("\n| ranking | Spearman vs KL | Spearman vs ΔPPL | top-10 overlap (KL) |")
    print("|---|---|---|---|")
    top = set(sorted(keys, key=lambda k: -abl[k]["kl"])[:10])
    for name, f in SCORES.items():
        vals = [f(measured["gains"][k], measured["errors"][k]) for k in keys]
        if any(v is None for v in vals):
            continue
        mine = set(k for _, k in sorted(zip(vals, keys), reverse=True)[:10])
        r = {"ranking": name, "rho_kl": spearman(vals, kl), "rho_dppl": spearman(vals, dppl),
             "top10": len(mine & top)}
        rows.append(r)
        print(f"| {name} | {r['rho_kl']:.3f} | {r['rho_dppl']:.3f} | {r['top10']}/10 |")
    by_role: dict[str, list[str]] = {}
    for k in keys:
        by_role.setdefault(k.split(".")[-1], []).append(k)
    print("\nwithin each role (Spearman vs KL):", ", ".join(
        f"{role} " + "/".join(f"{spearman([f(measured['gains'][k], measured['errors'][k]) for k in ks], [abl[k]['kl'] for k in ks]):.2f}"
                              for f in (SCORES['output-error (block, β=0)'], SCORES['kl']) if f(measured['gains'][ks[0]], measured['errors'][ks[0]]) is not None)
        for role, ks in by_role.items()))
    if args.json:
        args.json.write_text(json.dumps({"tag": tag, "linears": len(keys), "rows": rows}, indent=1))
    return 0


#: ranking → the gains entry that is its ``final(j)``; ``blend``: the geometric mean of kl and output-error
FINAL = {"kl": "kl", "output-error": "block", "logit-skip": "logit_skip"}


def _final(g: dict[str, float], method: str) -> float:
    if method == "blend":
        return (g["kl"] * g["block"]) ** 0.5
    return g[FINAL[method]]


def mixed(args: argparse.Namespace) -> int:
    """Exact assignments at ``--budget`` from each ranking of ``--measured``; perplexity on each text."""
    from qcompiler.analysis import budget as bud
    from qcompiler.analysis.candidates import parse_candidates
    from qcompiler.analysis.local_error import LinearErrors
    from qcompiler.analysis.measure import derived_calibrator
    from qcompiler.analysis.sensitivity import EndToEnd
    from qcompiler.calibrate import CalibConfig, Calibrator, StatRequest

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tools.ood_eval import DEFAULT_TEXTS, mid_windows, text_of

    measured = json.loads(args.measured.read_text())
    model = load_model(args.model_dir / "model.onnx")
    sites = find_sites(model)
    keys = list(sites.linears)
    options = parse_candidates(args.options.split(","))
    ref = options[0]
    # local errors of every option on the calibration rows (the statistics sweep is cached)
    cal = derived_calibrator(Calibrator(args.model_dir, CalibConfig(calib=args.calib, seed=0, threads=args.threads,
                                                                    cache_dir=args.cache_dir)), 8, 512, 256)
    stats = cal(model, [StatRequest(v, ("minmax", "sample")) for v in sites.inputs()])
    rel = {}
    for k, site in sites.linears.items():
        le = LinearErrors(stats.get(site.input, "sample").rows, site.weight_array())
        rel[k] = {o.name: le.error(o).rel for o in options}
    configs: list[tuple[str, dict]] = [(f"uniform {o.name}", dict.fromkeys(keys, o)) for o in options[:1]]
    chosen: dict[str, list[str]] = {}
    for method in args.methods.split(","):
        g = measured["gains"]
        final = {k: _final(g[k], method) for k in keys}
        errors = {k: {o.name: final[k] / g[k]["local"] * rel[k][o.name] for o in options} for k in keys}
        sol = bud.solve(sites, keys, errors, options, budget=args.budget)
        configs.append((f"mixed {args.budget:g} ({method})", sol.assignment))
        chosen[method] = sorted((k for k, c in sol.assignment.items() if c.name != ref.name),
                                key=lambda k: (sites.linears[k].layer, keys.index(k)))
    texts = {}
    for spec in args.texts.split(","):
        kind, _, path = spec.partition("=")
        body = text_of([path] if path else DEFAULT_TEXTS[kind])
        if body is None:
            print(f"{kind}: no text on this machine, skipped")
            continue
        texts[kind] = mid_windows(args.model_dir, body, args.tokens, args.seq_len)
    rows = [{"config": label, "avg_bits": bud.avg_bits(sites, a), "size_mb": bud.size_bytes(sites, a) / bud.MB,
             "assignment": a} for label, a in configs]
    floats = {}
    for kind, ids in texts.items():
        e2e = EndToEnd(model, sites, ids, args.threads)
        floats[kind] = _ppl(ids, e2e.ref)
        for r in rows:
            logits = e2e._logits({sites.linears[k].weight: fake_quant_weight(sites.linears[k].weight_array(),
                                                                             c.weight) for k, c in r["assignment"].items()})
            r[kind] = {"ppl": _ppl(ids, logits), "kl": kl_per_token(e2e.ref, logits)}
            print(f"{kind} {r['config']}: PPL {r[kind]['ppl']:.3f} KL {r[kind]['kl']:.4f}", flush=True)
        e2e.close()
    head = " | ".join(f"PPL {k} (Δ%) | KL {k}" for k in texts)
    print(f"\n| configuration | avg bits | est. size MB | {head} |")
    print("|---|---|---|" + "---|---|" * len(texts))
    print(f"| float | 32 | {sites.float_bytes / bud.MB:.1f} | " +
          " | ".join(f"{floats[k]:.3f} | 0" for k in texts) + " |")
    for r in rows:
        print(f"| {r['config']} | {r['avg_bits']:.3f} | {r['size_mb']:.1f} | " + " | ".join(
            f"{r[k]['ppl']:.3f} ({100 * (r[k]['ppl'] / floats[k] - 1):+.1f}%) | {r[k]['kl']:.4f}" for k in texts) + " |")
    for method, ks in chosen.items():
        print(f"\n{method}: {len(ks)} linears not {ref.name}: " +
              ", ".join(f"{k} ({next(r for r in rows if r['config'].endswith(f'({method})'))['assignment'][k].name})"
                        for k in ks))
    if args.json:
        for r in rows:
            r["assignment"] = {k: c.name for k, c in r["assignment"].items()}
        args.json.write_text(json.dumps({"float": floats, "rows": rows, "chosen": chosen}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ablate")
    a.add_argument("model_dir", type=Path)
    a.add_argument("--text", required=True)
    a.add_argument("--cache", type=Path, required=True)
    a.add_argument("--candidate", default="w4g128")
    a.add_argument("--sym", action="store_true")
    a.add_argument("--tokens", type=int, default=1024)
    a.add_argument("--seq-len", type=int, default=512)
    a.add_argument("--keys", default=None, help="only these linears (comma-separated keys)")
    a.add_argument("--threads", type=int, default=None)
    s = sub.add_parser("score")
    s.add_argument("model_dir", type=Path)
    s.add_argument("--calib", required=True)
    s.add_argument("--ablation", type=Path, required=True)
    s.add_argument("--tag", default=None, help="which ablation of the cache (default: the first)")
    s.add_argument("--methods", default=",".join(SENSITIVITY_METHODS),
                   help=f"sensitivities measured ({', '.join(SENSITIVITY_METHODS)})")
    s.add_argument("--block-windows", type=int, default=2)
    s.add_argument("--block-seq-len", type=int, default=128)
    s.add_argument("--measured", type=Path, default=None, help="JSON of the measured scores: written, or reused")
    s.add_argument("--cache-dir", default=None, help="calibration cache")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--layers", default=None, help="only the ablated linears of these layers (a fixed subset)")
    s.add_argument("--json", type=Path, default=None)
    m = sub.add_parser("mixed")
    m.add_argument("model_dir", type=Path)
    m.add_argument("--calib", required=True)
    m.add_argument("--measured", type=Path, required=True, help="the scores 'score --measured' wrote")
    m.add_argument("--methods", default="kl,output-error")
    m.add_argument("--options", default="w4g128,w8c", help="the first is the uniform baseline")
    m.add_argument("--budget", type=float, default=4.5)
    m.add_argument("--texts", default="relnotes,code", help="KIND or KIND=PATH (tools/ood_eval.py's kinds)")
    m.add_argument("--tokens", type=int, default=2048)
    m.add_argument("--seq-len", type=int, default=512)
    m.add_argument("--cache-dir", default=None)
    m.add_argument("--threads", type=int, default=None)
    m.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    return {"ablate": ablate, "score": score, "mixed": mixed}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

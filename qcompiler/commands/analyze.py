"""qc analyze MODEL_DIR --calib PATH --out REPORT_DIR [options]"""

from __future__ import annotations

import argparse
import json


def _names(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.replace(":", ",").split(",") if p.strip())


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got '{text}'") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="outliers, per-layer error and sensitivity, mixed precision: report.json + report.html",
        description="Diagnose a model folder: outlier channels, massive activations, super weights, the error "
        "of each linear under each candidate, a sensitivity ranking, recommendations and an exact "
        "mixed-precision assignment under --budget; writes REPORT_DIR/report.json and report.html atomically.",
    )
    p.add_argument("model_dir", help="model folder (from qc export)")
    p.add_argument("--calib", required=True, help="calibration text: .txt, .jsonl or folder of .txt")
    p.add_argument("--out", required=True, help="report folder to write")
    p.add_argument("--force", action="store_true", help="replace REPORT_DIR if it exists")
    p.add_argument("--samples", type=int, default=8, help="statistics windows (default 8)")
    p.add_argument("--seq-len", type=int, default=512, help="statistics window length (default 512)")
    p.add_argument("--rows", type=int, default=256, help="token rows sampled per value for local errors (default 256)")
    p.add_argument("--block-windows", type=int, default=2, help="windows for layer reruns (default 2)")
    p.add_argument("--block-seq-len", type=int, default=128, help="their length (default 128)")
    p.add_argument("--sensitivity", choices=["kl", "output-error", "blend", "logit-skip"], default="kl",
                   help="what ranks the linears: kl (default) = KL of the final logits with one linear quantized, "
                        "the rest of the model run from its layer; output-error = relative error of its layer's "
                        "output (the ranking before); blend = √(kl·output-error); logit-skip = that error added to the final residual "
                        "(docs/analysis.md)")
    p.add_argument("--propagation", type=float, default=0.0,
                   help="with --sensitivity output-error, β in [0, 1]: 0 rates a layer's error against its own "
                        "output, 1 against the final residual (default 0, see qcompiler/analysis/sensitivity.py)")
    p.add_argument("--candidates", type=_names, default=None,
                   help="candidates, e.g. w4g128,w4g32,w8c,a8tensor,a8token (the default)")
    p.add_argument("--reference", default="w4g128", help="candidate of the ranking and the KL check")
    p.add_argument("--options", type=_names, default=None, help="mixed-precision options (default w4g128,w4g64,w4g32,w8c)")
    p.add_argument("--budget", type=float, default=4.5, help="average bits of the recommended assignment (4.5)")
    p.add_argument("--pareto-budgets", type=_floats, default=None, help="budgets of the size/accuracy front")
    p.add_argument("--e2e-top", type=int, default=5, help="end-to-end KL check of the N most sensitive (5)")
    p.add_argument("--e2e-windows", type=int, default=4, help="windows of the end-to-end KL checks (default 4)")
    p.add_argument("--e2e-seq-len", type=int, default=256, help="their length (default 256)")
    p.add_argument("--no-pareto-e2e", action="store_true", help="predicted errors only on the Pareto plot")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=False, help="symmetric weights")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric weights (default)")
    p.add_argument("--clip", choices=["minmax", "mse"], default="minmax", help="weight range")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--max-memory", default=None, help="calibration memory bound, e.g. 4GB")
    from qcompiler.distributed import add_ray_argument

    add_ray_argument(p, "calibration shards and the per-layer sensitivity reruns")
    p.add_argument("--text", default=None,
                   help="a second text (another domain): which linear inputs leave their calibrated static range "
                        "on it, by how much, on which tokens (OUT/ranges.json, ranges.md)")
    p.add_argument("--text-tokens", type=int, default=2048, help="tokens of --text, from a third of it on (2048)")
    p.add_argument("--ranges-only", action="store_true", help="with --text: only the range check, no other analysis")
    p.set_defaults(func=run)


def _ranges(args: argparse.Namespace) -> dict:
    """The out-of-domain range check of ``--text`` (qcompiler/analysis/ranges.py)."""
    from qcompiler.analysis.ranges import format_table, range_shift
    from qcompiler.calibrate.windows import load_windows
    from qcompiler.data import read_text, tokenize

    calib = load_windows(args.model_dir, args.calib, args.samples, args.seq_len, args.seed).ids
    ids = tokenize(args.model_dir, read_text(args.text))
    start = len(ids) // 3 if len(ids) - len(ids) // 3 >= args.text_tokens else max(0, len(ids) - args.text_tokens)
    n = max(1, min(args.text_tokens, len(ids) - start) // args.seq_len)
    seq = min(args.seq_len, len(ids) - start)
    text_ids = ids[start:start + n * seq].reshape(n, seq)
    result = range_shift(args.model_dir, calib, text_ids, threads=args.threads)
    result.update(calibration=str(args.calib), text=str(args.text))
    result["table"] = format_table(result)
    return result


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from qcompiler.artifact import write_json
    from qcompiler.errors import OptionError

    if args.ranges_only:
        if args.text is None:
            raise OptionError("--ranges-only needs --text")
        out = Path(args.out)
        if out.exists() and any(out.iterdir()) and not args.force:
            raise OptionError(f"{out} exists and is not empty (--force replaces it)")
        result = _ranges(args)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "ranges.json", result)
        (out / "ranges.md").write_text(result["table"] + "\n")
        print(result["table"])
        return 0

    from qcompiler.analysis import AnalyzeConfig, MeasureConfig, analyze

    try:
        mcfg = MeasureConfig(args.samples, args.seq_len, args.rows, args.block_windows, args.block_seq_len,
                             args.threads, propagation=args.propagation, sensitivity=args.sensitivity)
    except ValueError as e:
        from qcompiler.errors import QCError

        raise QCError(str(e).replace("_", "-")) from None
    cfg = AnalyzeConfig(calib=args.calib, measure=mcfg, reference=args.reference, budget=args.budget,
                        e2e_top=args.e2e_top, pareto_e2e=not args.no_pareto_e2e, e2e_windows=args.e2e_windows,
                        e2e_seq_len=args.e2e_seq_len, sym=args.sym, clip=args.clip,
                        seed=args.seed, max_memory=args.max_memory)
    for name in ("candidates", "options", "pareto_budgets"):
        if getattr(args, name) is not None:
            cfg = replace(cfg, **{name: getattr(args, name)})
    from qcompiler.distributed import make_executor

    with make_executor(args.ray) as executor:
        report = analyze(args.model_dir, args.out, cfg, force=args.force, executor=executor)
    if args.text is not None:
        result = _ranges(args)
        write_json(Path(args.out) / "ranges.json", result)
        (Path(args.out) / "ranges.md").write_text(result["table"] + "\n")
        print(result["table"])
    brief = {
        "out": args.out,
        "llm_int8_dims": [d["dim"] for d in report["outliers"]["llm_int8"]["dims"]],
        "massive_dims": report["outliers"]["massive"]["dims"],
        "super_weights": [[s["layer"], s["row"], s["col"]] for s in report["outliers"]["super_weights"]],
        "most_sensitive": report["ranking"][:5],
        "mixed": {k: report["mixed"][k] for k in ("budget", "avg_bits", "size_mb")},
        "seconds": report["timing"].get("total_s"),
    }
    print(json.dumps(brief, indent=2))
    return 0

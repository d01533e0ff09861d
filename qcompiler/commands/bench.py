"""qc bench MODEL_DIR --text PATH [--calib PATH] [--recipes NAMES] [--out DIR]"""

from __future__ import annotations

import argparse

from qcompiler.commands.quantize import add_quant_options

#: Calibration windows per row unless --calib-samples says otherwise (the bench must fit in minutes).
BENCH_CALIB_SAMPLES = 16
#: Average weight bits for budgeted recipes (``mixed``) unless --budget or --max-size is given.
BENCH_BUDGET = 4.5


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark recipes against ONNX Runtime's quantizers: accuracy, size, speed, compile cost",
        description=(
            "Runs the float reference, the chosen qcompiler recipes and ONNX Runtime anchors (ort-rtn, ort-hqq, "
            "ort-dynamic, ort-static), each in its own process, and writes bench.md, bench.json and bench.png. "
            "A row that fails is reported as 'failed: <reason>'; the others stand. Defaults differ from qc quantize "
            f"in two places: --calib-samples {BENCH_CALIB_SAMPLES} and --budget {BENCH_BUDGET} (for budgeted recipes)."
        ),
    )
    p.add_argument("model_dir", help="float model folder (from qc export)")
    p.add_argument("--text", required=True, help="evaluation text: .txt, .jsonl or folder of .txt")
    p.add_argument(
        "--recipes",
        default="all",
        help="comma-separated recipes and anchors (ort-rtn, ort-hqq, ort-dynamic, ort-static), "
        "or all | recipes | anchors (default: all); dir:PATH adds a model folder built elsewhere (e.g. by "
        "qc export --keep-gguf-quant), evaluated and timed like the others",
    )
    p.add_argument("--out", default=None, help="report folder (default: bench-<model folder name>)")
    p.add_argument("--force", action="store_true", help="replace the report folder if it exists")
    p.add_argument("--eval-tokens", type=int, default=2048, help="tokens of --text to score (default 2048)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="evaluation window length (default 512)")
    p.add_argument("--prefill-tokens", type=int, default=512, help="prompt length timed for prefill (default 512)")
    p.add_argument("--decode-tokens", type=int, default=128, help="greedy tokens timed for decode (default 128)")
    p.add_argument("--decode-contexts", default="512,4096",
                   help="decode tok/s with this many tokens already cached, comma-separated (default 512,4096)")
    p.add_argument("--context-decode-tokens", type=int, default=16,
                   help="decode steps timed at each --decode-contexts length (default 16; 0 skips)")
    p.add_argument("--prefill-repeats", type=int, default=2, help="timed prefills, median reported (default 2)")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads for every row (default: all cores)")
    p.add_argument("--spin", action="store_true", help="let ORT threads spin (faster on an idle machine)")
    p.add_argument("--no-speed", dest="speed", action="store_false", help="skip the prefill/decode timing")
    p.add_argument("--row-timeout", type=float, default=3600.0, help="seconds before a row is failed (default 3600)")
    p.add_argument("--keep-models", action="store_true", help="keep every row's model folder under OUT/models/")
    add_quant_options(p)
    from qcompiler.distributed import add_ray_argument

    add_ray_argument(p, "the rows after the float reference")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qcompiler.bench import BenchConfig, resolve_rows, run_bench
    from qcompiler.commands.quantize import options_and_explicit, options_from_args
    from qcompiler.option_use import check_bench_options

    calib = args.calib
    explicit = options_and_explicit(args)[1]  # before the bench's own defaults below
    if args.calib_samples is None:
        args.calib_samples = BENCH_CALIB_SAMPLES
    if args.budget is None and args.max_size_mb is None:
        args.budget = BENCH_BUDGET
    options = options_from_args(args)
    rows = resolve_rows(args.recipes)
    check_bench_options([n for n, kind in rows if kind == "recipe"], options, explicit,
                        anchors=any(kind == "anchor" for _, kind in rows))
    config = BenchConfig(
        prefill_repeats=args.prefill_repeats,
        eval_tokens=args.eval_tokens,
        seq_len=args.eval_seq_len,
        prefill_tokens=args.prefill_tokens,
        decode_tokens=args.decode_tokens,
        decode_contexts=tuple(int(c) for c in str(args.decode_contexts).split(",") if c.strip()),
        context_decode_tokens=args.context_decode_tokens,
        threads=args.threads,
        spin=args.spin,
        speed=args.speed,
        row_timeout_s=args.row_timeout,
        keep_models=args.keep_models,
    )
    out = Path(args.out) if args.out else Path(f"bench-{Path(args.model_dir).resolve().name}")
    from qcompiler.distributed import make_executor

    with make_executor(args.ray) as executor:
        result = run_bench(
            args.model_dir, args.text, calib=calib, recipes=args.recipes, out_dir=out, config=config,
            options=options, force=args.force, executor=executor,
        )
    print(result.to_markdown())
    print(f"wrote {out}/bench.md, bench.json, bench.png")
    return 0

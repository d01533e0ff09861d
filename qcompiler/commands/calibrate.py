"""qc calibrate MODEL_DIR --calib PATH --out STATS_DIR [--observers ...] [--values ...] [--max-memory 4GB]"""

from __future__ import annotations

import argparse
import json

DEFAULT_OBSERVERS = "minmax,absmax_channel,mean_abs_channel,absmax_token,histogram,hessian,outliers"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="activation statistics of a model on calibration text (cached, resumable)",
        description=(
            "Run the float model with ONNX Runtime over seeded calibration windows and save statistics "
            "(.npz + stats.json) of the chosen values.  Rerunning with the same model, data and settings "
            "loads them; an interrupted run resumes from its last finished sweep."
        ),
    )
    p.add_argument("model_dir", help="model folder (from qc export)")
    p.add_argument("--calib", required=True, help="calibration text: .txt, .jsonl or folder of .txt")
    p.add_argument("--out", required=True, help="statistics folder to write")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--seed", type=int, default=0, help="window sampling seed (default 0)")
    p.add_argument("--max-memory", default=None, help="memory bound, e.g. 4GB: calibrate in sweeps over groups of layers "
                   "(default: 1.5 × the weights + the statistics, at most 80%% of free memory)")
    p.add_argument("--observers", default=DEFAULT_OBSERVERS,
                   help=f"comma-separated observers (default {DEFAULT_OBSERVERS}; also: sample)")
    p.add_argument("--values", default="linears",
                   help="linears (inputs of decoder linears, default) | linears+lm_head | all (every float "
                        "activation) | comma-separated value names")
    p.add_argument("--skip-nonfinite", action="store_true", help="drop batches with NaN/Inf activations instead of failing")
    p.add_argument("--histogram-bins", type=int, default=4096, help="bins of each histogram (power of two)")
    p.add_argument("--sample-rows", type=int, default=4096, help="rows kept by the 'sample' observer")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--force", action="store_true", help="replace STATS_DIR if it holds other statistics")
    p.add_argument("--shard-windows", type=int, default=8,
                   help="windows per shard: the unit of --ray tasks and of float-sum merging (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    from qcompiler.distributed import add_ray_argument

    add_ray_argument(p, "calibration shards")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qcompiler.artifact import open_model_dir
    from qcompiler.calibrate import (
        CalibConfig,
        Calibrator,
        ObserverConfig,
        StatRequest,
        linear_requests,
        parse_memory,
    )
    from qcompiler.calibrate.requests import float_activations
    from qcompiler.errors import QCError
    from qcompiler.irutil import load_model
    from qcompiler.memory import peak_rss_mb
    from qcompiler.spec import DECODER_ROLES, Role

    src = open_model_dir(args.model_dir)
    observers = tuple(o.strip() for o in args.observers.split(",") if o.strip())
    try:
        obs_cfg = ObserverConfig(histogram_bins=args.histogram_bins, sample_rows=args.sample_rows, seed=args.seed,
                                 shard_windows=args.shard_windows)
    except ValueError as e:
        raise QCError(str(e)) from None
    config = CalibConfig(
        calib=args.calib, samples=args.calib_samples, seq_len=args.seq_len, seed=args.seed,
        max_memory=parse_memory(args.max_memory), skip_nonfinite=args.skip_nonfinite, threads=args.threads,
        progress=not args.no_progress, observer=obs_cfg,
    )
    model = load_model(src.model_path)
    if args.values in ("linears", "linears+lm_head"):
        roles = DECODER_ROLES + ((Role.LM_HEAD,) if args.values.endswith("lm_head") else ())
        requests = linear_requests(model, observers, roles)
        if not requests:
            raise QCError(f"no linear layers recognized in {src.path}; pass --values all or value names")
    elif args.values == "all":
        requests = [StatRequest(v, observers) for v in float_activations(model)]
    else:
        requests = [StatRequest(v.strip(), observers) for v in args.values.split(",") if v.strip()]
    from qcompiler.distributed import make_executor

    with make_executor(args.ray) as executor:
        calibrator = Calibrator(src.path, config, executor)
        stats = calibrator.calibrate_into(model, requests, args.out, force=args.force)
    info = calibrator.last_run
    summary = {
        "stats": str(stats.path),
        "model_hash": stats.model_hash[:16],
        "data_hash": stats.data_hash[:16],
        "values": len(stats.values()),
        "observers": list(observers),
        "windows": calibrator.windows.count,
        "seq_len": calibrator.windows.seq_len,
        "sweeps_computed": info.groups_computed if info else 0,
        "sweeps_reused": info.groups_reused if info else 0,
        "skipped_batches": info.skipped_windows if info else [],
        "wall_seconds": round(info.seconds, 2) if info else 0.0,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    stats.close()
    print(json.dumps(summary, indent=2))
    return 0

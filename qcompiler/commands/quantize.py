"""qc quantize IN_DIR OUT_DIR --recipe NAME | --passes PIPELINE [options]"""

from __future__ import annotations

import argparse
import json


def add_quant_options(p: argparse.ArgumentParser) -> None:
    """Options shared by commands that build a recipe (quantize, bench)."""
    p.add_argument("--bits", type=int, default=None, help="weight bits (recipe default)")
    p.add_argument("--group-size", type=int, default=None, help="32|64|128|..., 0 = per-channel (default 128)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None, help="symmetric weights")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric weights (default)")
    p.add_argument("--clip", choices=["minmax", "mse"], default=None, help="weight range: exact min/max or MSE search")
    p.add_argument("--target", default=None, help="cpu (default) | cuda | npu")
    p.add_argument("--accuracy-level", type=int, default=None, help="MatMulNBits accuracy_level (0..4)")
    p.add_argument("--lm-head", action="store_true", default=None, help="also quantize an untied lm_head")
    p.add_argument("--quantize-embeddings", action="store_true", default=None, help="quantize embeddings/lm_head too")
    p.add_argument("--calib", default=None, help="calibration text: .txt, .jsonl or folder of .txt")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=None, help="calibration window length (default 512)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default 0)")
    p.add_argument("--max-memory", default=None, help="memory bound, e.g. 8G: checked before any pass (error if the "
                   "estimated peak exceeds it); calibration plans its sweeps within it")
    p.add_argument("--alpha", type=float, default=None, help="smoothing strength (recipes that smooth)")
    p.add_argument("--budget", type=float, default=None, help="average weight bits (mixed precision)")
    p.add_argument("--max-size", dest="max_size_mb", type=float, default=None, help="size budget in MB (mixed)")
    p.add_argument("--round-iters", type=int, default=None,
                   help="learned rounding: signed-gradient steps per decoder layer (w4a16-round*, default 50)")
    p.add_argument("--round-lr", type=float, default=None,
                   help="learned rounding: initial step, linearly decayed (default 1/iters)")
    p.add_argument("--round-samples", type=int, default=None,
                   help="learned rounding: calibration windows used (default 32)")
    p.add_argument("--sensitivity", choices=["kl", "output-error", "blend", "logit-skip"], default=None,
                   help="mixed: what ranks the linears (default kl: KL of the final logits; docs/analysis.md)")
    p.add_argument("--cpu-isa", choices=["any", "vnni"], default=None,
                   help="CPUs the integer GEMMs must be exact on: any (default; uint8 weights, u8×u8) | vnni "
                   "(int8 weights, u8×s8: faster, but wrong on x86 CPUs without VNNI)")
    p.add_argument("--static-shapes", type=int, default=None, metavar="SEQ_LEN", help="npu: fix sequence length")
    p.add_argument("--no-fuse", dest="fuse", action="store_false", default=None,
                   help="cpu/cuda: skip the fusion passes (RMSNorm, rotary, attention, packed linears)")
    p.add_argument("--rotary-in-attention", action="store_true", default=None,
                   help="cpu: GroupQueryAttention applies the rotary itself (onnxruntime-genai's form): faster decode; "
                   "exact for unpadded and left-padded batches, not for right-padded ones decoding after their "
                   "padding (docs/fusion.md)")
    p.add_argument("--rotate", action="store_true", default=None,
                   help="rotate the residual stream (randomized Hadamard, norms folded: exact in float) before the "
                   "recipe's passes; for recipes that do not rotate already (docs/rotation.md)")
    p.add_argument("--allow-partial", action="store_true", default=None,
                   help="write the model even if some decoder linears match no known pattern (they stay float, "
                        "listed in quantization.json kept_float); without it that is an error (exit 5)")
    p.add_argument("--kv-cache", choices=["float", "int8", "int4"], default=None,
                   help="KV cache type (cpu/cuda, fused attention): int8 or int4 (two per byte) with scales "
                   "calibrated on --calib; default float")
    p.add_argument("--kv-granularity", choices=["channel", "tensor"], default=None,
                   help="KV-cache scales per channel (kv head × dim, default) or one per tensor")
    p.add_argument("--kv-clip", choices=["minmax", "mse"], default=None,
                   help="KV-cache scales: calibrated absmax (default) or the MSE-best fraction of it")
    p.add_argument("--config", default=None, help="TOML file with a [quantize] table of these options")


def options_and_explicit(args: argparse.Namespace):
    """``(QuantizeOptions, the option names the user set)`` from the command line and ``--config``."""
    from qcompiler.option_use import explicit_options
    from qcompiler.recipes import QuantizeOptions, load_options_toml

    base: dict[str, object] = {}
    if getattr(args, "config", None):
        base = load_options_toml(args.config)
        for key in ("recipe", "passes"):
            if key in base and not getattr(args, key, None):
                setattr(args, key, base[key])
            base.pop(key, None)
    opts = QuantizeOptions(**base)  # type: ignore[arg-type]
    return opts.with_overrides(**vars(args)), explicit_options(vars(args), base)


def options_from_args(args: argparse.Namespace):
    return options_and_explicit(args)[0]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a model folder with a recipe or a pass pipeline",
        description="Run a recipe (or --passes) and the target's lowering; writes a model folder atomically.",
    )
    p.add_argument("in_dir", help="input model folder (from qc export)")
    p.add_argument("out_dir", help="output model folder")
    p.add_argument("--recipe", default=None, help="named recipe (see 'qc passes')")
    p.add_argument("--passes", default=None, help='textual pipeline, e.g. "quantize-weights{bits=4,group_size=64}"')
    p.add_argument("--dump-ir", default=None, metavar="DIR", help="write the model after every pass into DIR")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--genai", action="store_true", help="also write genai_config.json (onnxruntime-genai folder)")
    add_quant_options(p)
    from qcompiler.distributed import add_ray_argument

    add_ray_argument(p, "calibration shards and independent per-layer work")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qcompiler.artifact import check_not_overlapping
    from qcompiler.option_use import check_options
    from qcompiler.quantize import is_fp16_model, quantize

    options, explicit = options_and_explicit(args)
    check_not_overlapping(args.out_dir, (args.in_dir, options.calib, args.config))
    if args.recipe and not args.passes:  # (both or neither: quantize() says so)
        check_options(args.recipe, options, explicit, fp16=is_fp16_model(args.in_dir))
    elif args.passes and not args.recipe:
        check_options(None, options, explicit)
    from qcompiler.distributed import make_executor

    with make_executor(args.ray) as executor:
        summary = quantize(
            args.in_dir,
            args.out_dir,
            recipe=args.recipe,
            passes=args.passes,
            options=options,
            force=args.force,
            dump_ir=args.dump_ir,
            genai=args.genai,
            executor=executor,
        )
    brief = {k: summary[k] for k in ("recipe", "pipeline", "target", "wall_seconds", "peak_rss_mb")}
    print(json.dumps(brief, indent=2))
    return 0

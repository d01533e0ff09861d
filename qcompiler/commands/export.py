"""qc export MODEL OUT_DIR [--no-kv-cache] [--force] [--dtype fp32|fp16|bf16] [--calib TEXT]"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a Hugging Face causal LM (hub id, folder or .gguf) to an ONNX model folder",
        description="Export with optimum's exporter; weights go to external data (model.onnx_data).",
    )
    p.add_argument("model", help="hub id, local Hugging Face folder, or path to a .gguf file")
    p.add_argument("out_dir", help="output model folder")
    p.add_argument("--no-kv-cache", action="store_true", help="export without past_key_values inputs")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: optimum's)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder/hub")
    p.add_argument("--keep-gguf-quant", action="store_true",
                   help="GGUF input: carry its quantized blocks into MatMulNBits/GatherBlockQuantized exactly "
                   "(no float round-trip); quantization.json lists each tensor")
    p.add_argument("--allow-requant", action="store_true",
                   help="with --keep-gguf-quant: re-quantize (RTN int4 g32) tensor types with no exact form "
                   "instead of failing")
    p.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=0,
                   help="with --keep-gguf-quant: MatMulNBits accuracy_level (4: int8 activations, as llama.cpp "
                   "computes; fast 8-bit kernels, so Q8_0/Q5/Q6_K stay one 8-bit tensor); default 0 (fp32)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="float type of the graph (weights, activations, KV cache, logits); default fp32. "
                   "fp16 runs on ONNX Runtime CPU and CUDA; bf16 is for --target cuda (docs/half.md)")
    p.add_argument("--calib", default=None, metavar="TEXT",
                   help="with --dtype fp16: calibration text; ops whose activations pass half of fp16's range "
                   "are kept in float32 (keep-fp32, docs/half.md)")
    p.add_argument("--calib-samples", type=int, default=32, help="with --calib: windows observed (default 32)")
    p.add_argument("--stream", action="store_true",
                   help="Llama/Mistral/Qwen2 safetensors folder: write the graph directly and copy the weights "
                   "tensor by tensor (memory independent of the model's size; docs/scaling.md)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget, e.g. 8G: sizes --stream's copy blocks; fails early if it cannot be met")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qcompiler.calibrate.plan import parse_memory
    from qcompiler.errors import OptionError
    from qcompiler.export import export

    if args.calib is not None and args.dtype != "fp16":
        raise OptionError(f"--calib keeps the ops that overflow fp16 in float32: it needs --dtype fp16, not {args.dtype}")
    if args.calib is not None:
        from qcompiler.data import read_text

        read_text(args.calib)  # a missing or empty text fails before the export
    out = export(
        args.model,
        args.out_dir,
        kv_cache=not args.no_kv_cache,
        force=args.force,
        trust_remote_code=args.trust_remote_code,
        opset=args.opset,
        keep_gguf_quant=args.keep_gguf_quant or args.allow_requant,
        allow_requant=args.allow_requant,
        accuracy_level=args.accuracy_level,
        dtype=args.dtype,
        stream=args.stream,
        max_memory=parse_memory(args.max_memory),
    )
    if args.calib is not None:
        from qcompiler.quantize import keep_fp32_in_place

        report = keep_fp32_in_place(out, args.calib, samples=args.calib_samples)
        kept = sum(len(i["nodes"]) for i in report.get("islands", []))
        print(f"keep-fp32: {kept} op(s) kept in float32 (max |x| {report.get('max_abs', 0):.4g}, "
              f"limit {report.get('limit', 0):.0f})", file=sys.stderr)
    print(out)
    return 0

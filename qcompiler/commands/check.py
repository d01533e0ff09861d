"""qc check MODEL_DIR --target cpu|cuda|npu [--table] [--json] [--strict]

Lists every node that would not run on the target's execution provider: from ONNX
Runtime's own node assignment when the provider is installed, else from an op-support
table (the report says which).  For npu it also runs onnx.checker with full checking.
For cpu and npu (whose QDQ graphs ONNX Runtime fuses into integer GEMMs on a CPU) it reports
this CPU's ISA, flags integer GEMMs that saturate on x86 CPUs without VNNI and probes each
integer GEMM form of the model on this CPU against an int64 reference
(``qcompiler.cpuprobe``).
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="partition check: list the nodes that would not run on a target's execution provider",
        description="With the target's provider installed, ONNX Runtime's node placement is reported; "
        "without it, an op-support table is used and the report says so.",
    )
    p.add_argument("model_dir", help="model folder (from qc export / qc quantize)")
    p.add_argument("--target", required=True, help="cpu | cuda | npu")
    p.add_argument("--table", action="store_true", help="use the op-support table even if the provider is installed")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 if any node is not on the target's provider")
    p.add_argument("--no-probe", action="store_true", help="cpu/npu: skip the integer-GEMM numerics probe")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qcompiler.partition import check_partition, onnx_full_check

    report = check_partition(args.model_dir, args.target, use_table=args.table)
    if args.target == "npu":
        report.model_issues += onnx_full_check(args.model_dir)
    if args.target in ("cpu", "npu") and not args.no_probe:
        notes, issues = _integer_gemms(args.model_dir)
        report.notes += notes
        report.model_issues += issues
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return 1 if args.strict and not report.ok else 0


def _integer_gemms(model_dir: str) -> tuple[list[str], list[str]]:
    from qcompiler.artifact import open_model_dir
    from qcompiler.cpuprobe import integer_gemm_check
    from qcompiler.irutil import load_model

    md = open_model_dir(model_dir)
    try:
        cpu_isa = ((md.quantization or {}).get("options") or {}).get("cpu_isa")
    except (json.JSONDecodeError, AttributeError):  # an unreadable record declares nothing
        cpu_isa = None
    return integer_gemm_check(load_model(md.model_path), cpu_isa)

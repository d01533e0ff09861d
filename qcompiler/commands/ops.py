"""qc ops build [--cuda | --no-cuda] [--out DIR] [--nvcc PATH] [--arch 80,90] [--force]

Compiles qcompiler's custom-op library (domain ``qcompiler``) with the machine's g++ and,
when nvcc is found (or ``--cuda`` asks for it), the CUDA kernels for sm_80 and sm_90.
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ops", help="build or inspect qcompiler's custom-op library (CPU + CUDA kernels)")
    ops_sub = p.add_subparsers(dest="ops_command", metavar="ACTION")
    ops_sub.required = True
    b = ops_sub.add_parser("build", help="compile the op library with g++ (and nvcc for the CUDA kernels)")
    cuda = b.add_mutually_exclusive_group()
    cuda.add_argument("--cuda", dest="cuda", action="store_true", default=None,
                      help="also build the CUDA kernels; fail (after building the CPU ops) if nvcc is missing")
    cuda.add_argument("--no-cuda", dest="cuda", action="store_false", help="build the CPU ops only")
    b.add_argument("--out", default=None, metavar="DIR", help="output folder (default: the package's _build)")
    b.add_argument("--nvcc", default=None, help="path of nvcc (default: $QC_NVCC, $CUDA_HOME, /usr/local/cuda)")
    b.add_argument("--arch", default="80,90", help="CUDA architectures, comma-separated (default 80,90)")
    b.add_argument("--force", action="store_true", help="rebuild even if the library is up to date")
    b.set_defaults(func=run_build)
    s = ops_sub.add_parser("path", help="print the path of the built library (error if not built)")
    s.add_argument("--cuda", action="store_true", help="the CUDA variant")
    s.set_defaults(func=run_path)


def run_build(args: argparse.Namespace) -> int:
    from qcompiler.ops import build_library

    archs = tuple(a.strip() for a in args.arch.split(",") if a.strip())
    result = build_library(args.out, cuda=args.cuda, nvcc=args.nvcc, archs=archs, force=args.force)
    print(json.dumps(result.to_dict(), indent=2))
    return 0


def run_path(args: argparse.Namespace) -> int:
    from qcompiler.ops import library_path

    print(library_path(cuda=args.cuda))
    return 0

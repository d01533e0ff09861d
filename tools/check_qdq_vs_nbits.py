#!/usr/bin/env python3
"""The two forms of one weight-only quantization give the same logits through ONNX Runtime CPU.

    python tools/check_qdq_vs_nbits.py MODEL_DIR [--passes "canonicalize,awq{gptq=true}"] \\
        [--calib TEXT --calib-samples 8] [--text EVAL.txt] [--windows 2] [--out DIR]

Runs the quantizing passes once, then writes the model twice: the portable form (opset 21
``DequantizeLinear`` with int4/uint4 block weights + ``MatMul``/``Gather``: what NPUs and any
ONNX runtime read) and the ONNX Runtime form (``lower-embeddings`` + ``lower-matmulnbits``:
``MatMulNBits``, ``GatherBlockQuantized``).  Prints the largest logit difference relative
to the largest logit over a few windows of text, and each form's size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from qcompiler.artifact import copy_side_files, open_model_dir
    from qcompiler.data import make_windows, read_text, tokenize
    from qcompiler.irutil import load_model, save_model
    from qcompiler.pipeline import parse_pipeline, run_passes
    from qcompiler.quantize import make_context
    from qcompiler.recipes import QuantizeOptions
    from qcompiler.runtime import open_runner

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--passes", default="canonicalize,quantize-weights,quantize-embeddings")
    p.add_argument("--calib", default=None)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--text", default=None, help="evaluation text (default: the calibration text)")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--out", default=None, help="keep both models here")
    args = p.parse_args(argv)

    src = open_model_dir(args.model_dir)
    options = QuantizeOptions(calib=args.calib, calib_samples=args.calib_samples)
    passes = parse_pipeline(args.passes, make_context(src.path, options))
    model, _ = run_passes(load_model(src.model_path), passes)
    out = Path(args.out or tempfile.mkdtemp(prefix="qc-qdq-check-"))
    forms = {}
    for name, lowering in (("qdq", ""), ("nbits", "lower-embeddings,lower-matmulnbits")):
        if lowering:
            model, _ = run_passes(model, parse_pipeline(lowering))
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        save_model(model, d / "model.onnx")
        copy_side_files(src.path, d)
        forms[name] = d
    text = args.text or args.calib
    if text is None:
        raise SystemExit("give --text (or --calib) for the evaluation windows")
    ids = make_windows(tokenize(src.path, read_text(text)), args.seq_len, args.seq_len * args.windows).ids
    qdq, nbits = open_runner(forms["qdq"]), open_runner(forms["nbits"])
    worst = 0.0
    for w in ids:
        a, b = qdq.logits(w), nbits.logits(w)
        worst = max(worst, float(np.abs(a - b).max() / np.abs(a).max()))
    result = {
        "passes": args.passes,
        "windows": len(ids),
        "max_rel_logit_diff": worst,
        "size_mb": {k: round(open_model_dir(v).size_bytes() / 1e6, 1) for k, v in forms.items()},
    }
    print(json.dumps(result, indent=2))
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())

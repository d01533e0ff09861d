#!/usr/bin/env python3
"""W8A8 speed of the exact u8×u8 GEMMs (``--cpu-isa any``) against the u8×s8 form (``--cpu-isa vnni``).

    python tools/bench_w8a8_isa.py MODEL_DIR --calib TEXT [--work runs/w8a8_isa] [--threads 2] [--repeats 5]
                                   [--recipes w8a8-dynamic,w8a8-smooth,w8a8-static-smooth,w8a8-int8mix]

For each recipe both models are built (cached under ``--work``), then timed round-robin, ``--repeats``
rounds, best of each kept (prefill 512 tokens, decode 128 greedy tokens with the KV cache), so that
other processes on the machine slow both forms alike; the load average is printed with the table.
The u8×s8 models are only *correct* on CPUs with VNNI, AMX or ARM (``qc check MODEL --target cpu``
says which this one is); their speed is what qcompiler wrote before it made every GEMM exact.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--work", default="runs/w8a8_isa")
    ap.add_argument("--recipes", default="w8a8-dynamic,w8a8-smooth,w8a8-static-smooth,w8a8-int8mix")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from qcompiler.bench import measure_speed
    from qcompiler.cpuprobe import cpu_info
    from qcompiler.quantize import quantize
    from qcompiler.recipes import QuantizeOptions
    from qcompiler.runtime import open_runner

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, Path]] = []
    for recipe in filter(None, args.recipes.split(",")):
        for isa in ("any", "vnni"):
            out = work / f"{recipe}-{isa}"
            if not (out / "model.onnx").is_file():
                opts = QuantizeOptions(calib=args.calib, calib_samples=args.calib_samples, cpu_isa=isa)
                quantize(args.model_dir, out, recipe=recipe, options=opts)
            rows.append((recipe, isa, out))
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 20000, args.prefill)
    runners = {(r, i): open_runner(p, threads=args.threads, spin=False) for r, i, p in rows}
    best: dict[tuple[str, str], list[float]] = {k: [0.0, 0.0] for k in runners}
    for _ in range(args.repeats):
        for key, runner in runners.items():
            s = measure_speed(runner, prompt, args.decode, repeats=1)
            best[key][0] = max(best[key][0], s.prefill_tok_s)
            best[key][1] = max(best[key][1], s.decode_tok_s or 0.0)
    load = os.getloadavg()[0]
    w = sys.stdout.write
    w(f"CPU: {cpu_info().describe()}\n{args.threads} thread(s), best of {args.repeats} round-robin rounds, "
      f"load average {load:.2f}\n\n")
    w("| recipe | prefill tok/s u8×u8 (any) | u8×s8 (vnni) | ratio | decode tok/s u8×u8 | u8×s8 | ratio |\n")
    w("|---|---|---|---|---|---|---|\n")
    for recipe in dict.fromkeys(r for r, _, _ in rows):
        a, v = best[(recipe, "any")], best[(recipe, "vnni")]
        w(f"| {recipe} | {a[0]:.1f} | {v[0]:.1f} | {a[0] / v[0]:.2f} | {a[1]:.2f} | {v[1]:.2f} | {a[1] / v[1]:.2f} |\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

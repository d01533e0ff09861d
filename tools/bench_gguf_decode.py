#!/usr/bin/env python3
"""Decode and prefill speed of model folders, measured round-robin (best of ``--repeats``) on a shared machine.

    python tools/bench_gguf_decode.py runs/native-fused runs/w4-rtn-g32 ... [--threads 2] [--repeats 5]

Each repeat runs every folder once (prefill ``--prompt`` tokens, then ``--decode`` greedy steps
with the KV cache, ``qcompiler.bench.measure_speed``); the best of the repeats is kept, which damps
the noise of other processes on the machine (the load average is printed with the table).
Used for the closing numbers of ``qc export --keep-gguf-quant`` (docs/gguf.md).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from qcompiler.bench import measure_speed
from qcompiler.runtime import open_runner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    args = ap.parse_args()
    runners = {Path(f).name: open_runner(Path(f), threads=args.threads, spin=False) for f in args.folders}
    prompt = (np.arange(args.prompt) * 37 + 11) % 20000
    best: dict[str, list[float]] = {k: [0.0, 0.0] for k in runners}
    load0 = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, r in runners.items():
            sp = measure_speed(r, prompt, args.decode, repeats=1)
            best[name][0] = max(best[name][0], sp.prefill_tok_s)
            best[name][1] = max(best[name][1], sp.decode_tok_s or 0.0)
    print(f"| model | prefill {args.prompt} tok/s | decode tok/s |")
    print("|---|---|---|")
    for name, (p, d) in best.items():
        print(f"| {name} | {p:.1f} | {d:.2f} |")
    print(f"best of {args.repeats} round-robin repeats, {args.threads} threads; load average {load0:.2f} → "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()

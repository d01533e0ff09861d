#!/usr/bin/env python3
"""Prefill cost of one 512-token window per model: CPU-seconds of the process (1 thread, no spinning), min of 5.

    python tools/prefill_cost.py MODEL_DIR [MODEL_DIR ...]

The models are run interleaved in one process (each repetition visits every model), so that a
loaded machine slows them alike; CPU-seconds, not wall time, are the number to compare there.
Prints one JSON line per model (CPU s, wall s, size MB).
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from qcompiler.runtime import open_runner

dirs = [Path(d) for d in sys.argv[1:]]
reps = 5
ids = np.random.default_rng(0).integers(100, 40000, 512)
runners = {d: open_runner(d, threads=1, spin=False) for d in dirs}
for r in runners.values():
    r.logits(ids)
best = {d: (np.inf, np.inf) for d in dirs}
for _ in range(reps):
    for d, r in runners.items():
        c0, w0 = time.process_time(), time.perf_counter()
        r.logits(ids)
        c, w = time.process_time() - c0, time.perf_counter() - w0
        best[d] = (min(best[d][0], c), min(best[d][1], w))
for d in dirs:
    size = sum(f.stat().st_size for f in d.glob("model.onnx*")) / 1e6
    print(json.dumps({"model": str(d), "prefill_cpu_s": round(best[d][0], 3), "prefill_wall_s": round(best[d][1], 3),
                      "size_mb": round(size, 1)}))

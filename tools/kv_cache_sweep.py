#!/usr/bin/env python3
"""Perplexity of one model folder with each KV-cache configuration (the granularity / clipping table).

    python tools/kv_cache_sweep.py MODEL_DIR --calib GPL-3 --text notes.txt --out runs/sweep \\
        [--samples 32] [--max-tokens 4096] 4:channel:minmax 4:channel:mse 8:tensor:minmax ...

``MODEL_DIR`` is a quantized folder with a float cache (e.g. ``qc quantize ... --recipe w4a16-rtn``);
each ``BITS:GRANULARITY:CLIP`` applies ``quantize-kv-cache`` to it (statistics calibrated once, cached)
and scores the result with the plain ``qc eval`` (a prefill sees the same rounded cache as decoding
through it), one line each: config, perplexity, change against the float cache.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from qcompiler.passes.quantize_kv_cache import KVCacheConfig, QuantizeKVCache

from qcompiler.calibrate import CalibConfig, Calibrator
from qcompiler.eval import evaluate
from qcompiler.irutil import load_model, save_model
from qcompiler.pipeline import PassContext, run_passes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("configs", nargs="+", help="BITS:GRANULARITY:CLIP, e.g. 4:channel:mse")
    p.add_argument("--calib", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    base = Path(a.model)
    ctx = PassContext(calibrate=Calibrator(base, CalibConfig(calib=a.calib, samples=a.samples, progress=False)))
    ref = evaluate(base, a.text, max_tokens=a.max_tokens, threads=a.threads, progress=False).perplexity
    print(f"float {ref:.3f}", flush=True)
    for spec in a.configs:
        bits, gran, clip = spec.split(":")
        out = Path(a.out) / spec.replace(":", "-")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for f in base.iterdir():
            if f.is_file() and f.name not in ("model.onnx", "model.onnx_data"):
                shutil.copy(f, out / f.name)
        cfg = KVCacheConfig(bits=int(bits), k_granularity=gran, v_granularity=gran, clip=clip)
        model, _ = run_passes(load_model(base / "model.onnx"), [QuantizeKVCache(cfg, ctx)])
        save_model(model, out / "model.onnx")
        ppl = evaluate(out, a.text, max_tokens=a.max_tokens, threads=a.threads, progress=False).perplexity
        print(f"{spec} {ppl:.3f} {100 * (ppl / ref - 1):+.2f}%", flush=True)


if __name__ == "__main__":
    main()

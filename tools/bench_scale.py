#!/usr/bin/env python3
"""Scale benchmark: a synthetic Llama past 2 GB, quantized and evaluated on a bounded memory budget.

    python tools/bench_scale.py [--workdir DIR] [--layers 13] [--hidden 2048] [--intermediate 5632]
                                [--vocab 8192] [--recipes w4a16-rtn,w8a8-dynamic] [--max-tokens 256]
                                [--json OUT.json] [--keep]

Steps, each in its own child process so that its peak RSS (``VmHWM`` of that process,
``qcompiler.memory.peak_rss_mb``) is its own:

1. ``build``   — ``models.streaming.build_model_dir_streaming``: weights streamed to
   ``model.onnx_data`` layer by layer (float32, external data; default ≈ 2.5 GB);
2. ``load``    — ``irutil.load_model`` + ``canonicalize`` + reading every weight once
   (checksum), each released after use;
3. ``quantize <recipe>`` — ``qc quantize IN OUT --recipe R`` through ``qcompiler.cli.main``,
   with the cpu target's full lowering (``default``) and with ``--no-fuse`` (``no-fuse``:
   without the decoder fusions, to show what they cost); ``w8a8-dynamic`` falls back to
   ``--passes insert-qdq{act=per-token}`` (the same per-token W8A8 form) where that recipe
   is not registered;
4. ``eval <recipe>`` — ``qc eval OUT --text T`` (perplexity on ``--max-tokens`` tokens).

The target is a peak RSS below half the float model's size for every step after the
build; the table says which steps meet it.  Evaluating the *float* model is optional
(``--eval-float``): ONNX Runtime holds all its weights, so it cannot meet that target.
Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

W8A8_FALLBACK = "insert-qdq{act=per-token}"
WORDS = ("the", "model", "quantizes", "weights", "and", "activations", "with", "outlier", "channels", "per",
         "token", "scale", "group", "error", "calibration", "layer", "norm", "attention", "kernel", "graph")


# ----------------------------------------------------------------------------- child steps


def _config(args: argparse.Namespace):
    from qcompiler.models.synthetic import SyntheticConfig

    return SyntheticConfig(
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
        vocab=args.vocab,
        seed=args.seed,
    )


def _step_build(args: argparse.Namespace) -> dict:
    from qcompiler.models.streaming import build_model_dir_streaming

    from qcompiler.artifact import ModelDir

    out, _ = build_model_dir_streaming(args.model, _config(args))
    return {"size_bytes": ModelDir(out).size_bytes()}


def _step_load(args: argparse.Namespace) -> dict:
    import numpy as np
    import onnx_ir as ir

    from qcompiler.irutil import load_model
    from qcompiler.pipeline import PassContext, parse_pipeline, run_passes

    model = load_model(Path(args.model) / "model.onnx")
    model, _ = run_passes(model, parse_pipeline("canonicalize", PassContext()))
    total, checksum = 0, 0.0
    for value in model.graph.initializers.values():
        t = value.const_value
        if t is None:
            continue
        arr = t.numpy()
        if arr.dtype.kind == "f":
            checksum += float(np.sum(arr, dtype=np.float64))
        total += arr.nbytes
        del arr
        if isinstance(t, ir.ExternalTensor):
            t.release()
    return {"weights_read_bytes": total, "checksum": round(checksum, 3)}


def _step_cli(args: argparse.Namespace) -> dict:
    """Run ``qc ARGS...`` in this process; its stdout JSON becomes the result."""
    import contextlib
    import io

    from qcompiler.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["-q", *args.qc_args])
    if rc != 0:
        raise SystemExit(f"qc {' '.join(args.qc_args)} exited {rc}")
    text = buf.getvalue()
    return json.loads(text[text.index("{") :])


def _child(step: str, spec: str) -> None:
    """Run one step in this (child) process and print its result as ``RESULT {json}``."""
    from qcompiler.memory import peak_rss_mb

    args = argparse.Namespace(**json.loads(spec))
    t0 = time.perf_counter()
    result = {"build": _step_build, "load": _step_load, "qc": _step_cli}[step](args)
    result.update(seconds=round(time.perf_counter() - t0, 1), peak_rss_mb=round(peak_rss_mb(), 1))
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- driver


def _run(step: str, **spec: object) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "_child", step, json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"step {step} {spec.get('qc_args', '')} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def _recipe_args(recipe: str) -> tuple[list[str], str]:
    from qcompiler.recipes import available_recipes

    if recipe == "w8a8-dynamic" and recipe not in available_recipes():
        return ["--passes", W8A8_FALLBACK], f"w8a8-dynamic ({W8A8_FALLBACK})"
    return ["--recipe", recipe], recipe


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        _child(argv[1], argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=None, help="where models go (default: a temporary folder, removed)")
    ap.add_argument("--layers", type=int, default=13)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipes", default="w4a16-rtn,w8a8-dynamic")
    ap.add_argument("--variants", default="default,no-fuse",
                    help="per recipe: default (the target's full lowering) and/or no-fuse (qc quantize --no-fuse)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-float", action="store_true", help="also evaluate the float model (needs ~its size)")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--keep", action="store_true", help="keep the models in --workdir")
    args = ap.parse_args(argv)

    from qcompiler.models.streaming import model_bytes

    cfg_args = {k: getattr(args, k) for k in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "seed")}
    cfg = _config(args)
    print(f"model: {cfg.layers} layers, hidden {cfg.hidden}, intermediate {cfg.intermediate}, vocab {cfg.vocab}: "
          f"{model_bytes(cfg) / 1e9:.2f} GB of float32 weights", flush=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qc-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "float"
    text = work / "text.txt"
    rows: list[dict] = []
    try:
        import random

        rnd = random.Random(0)
        text.write_text(" ".join(rnd.choice(WORDS) for _ in range(4 * args.max_tokens)))
        if not (model / "model.onnx").is_file():
            rows.append({"step": "build", **_run("build", model=str(model), **cfg_args)})
        else:
            from qcompiler.artifact import ModelDir

            rows.append({"step": "build (reused)", "size_bytes": ModelDir(model).size_bytes()})
        size = next(r["size_bytes"] for r in rows if "size_bytes" in r)
        rows.append({"step": "load + canonicalize + read all weights", **_run("load", model=str(model))})
        eval_args = ["--max-tokens", str(args.max_tokens), "--seq-len", str(args.seq_len), "--text", str(text)]
        if args.eval_float:
            r = _run("qc", qc_args=["eval", str(model), *eval_args])
            rows.append({"step": "eval float", **r})
        runs = [(r, v) for r in filter(None, args.recipes.split(",")) for v in filter(None, args.variants.split(","))]
        for recipe, variant in runs:
            extra, label = _recipe_args(recipe)
            if variant == "no-fuse":
                extra, label = [*extra, "--no-fuse"], f"{label} --no-fuse"
            out = work / f"{recipe}-{variant}"
            shutil.rmtree(out, ignore_errors=True)
            r = _run("qc", qc_args=["quantize", str(model), str(out), *extra])
            from qcompiler.artifact import ModelDir

            rows.append({"step": f"quantize {label}", "out_size_bytes": ModelDir(out).size_bytes(), **r})
            r = _run("qc", qc_args=["eval", str(out), *eval_args])
            rows.append({"step": f"eval {label}", **r})
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    half = size / 2 / 2**20
    print(f"\nfloat model on disk: {size / 1e9:.3f} GB ({size / 2**30:.3f} GiB); target: peak RSS < {half:.0f} MiB\n")
    print("| step | seconds | peak RSS MiB | RSS / model size | < half? | notes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rss = r.get("peak_rss_mb")
        ratio = f"{rss * 2**20 / size:.2f}" if rss else ""
        ok = "" if rss is None or r["step"].startswith("build") else ("yes" if rss < half else "NO")
        notes = []
        if "out_size_bytes" in r:
            notes.append(f"output {r['out_size_bytes'] / 1e6:.0f} MB")
        if "perplexity" in r:
            notes.append(f"PPL {r['perplexity']:.1f} on {r['tokens_scored']} tokens")
        print(f"| {r['step']} | {r.get('seconds', '')} | {rss or ''} | {ratio} | {ok} | {'; '.join(notes)} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model_bytes": size, "config": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

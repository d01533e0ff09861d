#!/usr/bin/env python3
"""Streaming export → quantize → eval → generate of a large safetensors checkpoint, one process per stage.

    python tools/make_random_checkpoint.py runs/tinyllama --preset tinyllama
    python tools/bench_stream.py runs/tinyllama --work runs/tl [--stages export-fp16,export-fp32,rtn,eval,generate]
    python tools/bench_stream.py runs/tinyllama --work runs/tl --check      # + logits vs transformers / torch RTN

Each stage is ``python -m qcompiler ...`` in its own child process; its wall time and peak RSS
(``ru_maxrss`` of that child, from ``os.wait4``: this harness imports nothing heavy, so the
child's high-water mark is its own) and the output's size are printed as one JSON line per
stage and appended to ``WORK/stages.jsonl``.

``--check`` (loads the checkpoint in transformers, fp32: needs ~4× the checkpoint's bf16 bytes
of RAM, so TinyLlama-sized or a few layers of a large model): the fp16 graph's last-position
logits against transformers (cosine), and the int4 graph against a torch fake-quant RTN
(g128, asymmetric, exact min/max) of the same checkpoint, both against the float logits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def run_stage(name: str, args: list[str], out: Path | None, log: Path, env: dict) -> dict:
    """Run ``python -m qcompiler ARGS`` as a child; wall time, its peak RSS, output size."""
    t0 = time.perf_counter()
    with open(log, "ab") as lf:
        lf.write(f"\n=== {name}: {' '.join(args)}\n".encode())
        lf.flush()
        proc = subprocess.Popen([PY, "-m", "qcompiler", *args], stdout=lf, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    rec = {"stage": name, "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
           "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "out_bytes": _size(out) if out else None,
           "command": "qc " + " ".join(args)}
    print(json.dumps(rec), flush=True)
    return rec


def _fake_quant_rtn(w, group: int = 128):
    """Asymmetric RTN of ``W[out, in]`` along ``in`` in groups (range widened to hold 0), dequantized."""
    import torch

    o, i = w.shape
    wg = w.float().reshape(o, i // group, group)
    lo = torch.clamp(wg.amin(-1, keepdim=True), max=0)
    hi = torch.clamp(wg.amax(-1, keepdim=True), min=0)
    s = (hi - lo) / 15
    s = torch.where(s == 0, torch.ones_like(s), s)
    z = torch.clamp(torch.round(-lo / s), 0, 15)
    q = torch.clamp(torch.round(wg / s) + z, 0, 15)
    return ((q - z) * s).reshape(o, i)


def check(ckpt: Path, fp16: Path | None, int4: Path | None, n_tokens: int = 32) -> dict:
    """Cosines of last-position logits (see module docstring)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from qcompiler.runtime import open_runner

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    ids = np.random.default_rng(1).integers(3, 30000, n_tokens).astype(np.int64)
    res: dict = {"tokens": n_tokens}
    outs = {}
    for tag, folder in (("fp16", fp16), ("int4", int4)):
        if folder is not None and folder.exists():
            outs[tag] = open_runner(folder).logits(ids)[-1]
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids[None])).logits[0, -1].numpy()
        if "fp16" in outs:
            res["fp16_graph_vs_transformers_cos"] = cos(outs["fp16"], ref)
        if "int4" in outs:
            for layer in model.model.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                            layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                    lin.weight.copy_(_fake_quant_rtn(lin.weight))
            fq = model(torch.from_numpy(ids[None])).logits[0, -1].numpy()
            res["torch_fakequant_vs_float_cos"] = cos(fq, ref)
            res["int4_graph_vs_float_cos"] = cos(outs["int4"], ref)
            res["int4_graph_vs_torch_fakequant_cos"] = cos(outs["int4"], fq)
    print(json.dumps(res), flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--work", required=True)
    ap.add_argument("--stages", default="export-fp16,export-fp32,rtn,hqq,eval,generate")
    ap.add_argument("--quantize-from", default="fp32", choices=("fp32", "fp16"), help="export the quantizers read")
    ap.add_argument("--max-memory", default=None, help="passed to export and quantize")
    ap.add_argument("--eval-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=16)
    ap.add_argument("--quantize-args", default="", help="extra qc quantize arguments, e.g. --no-fuse")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    ckpt, work = Path(args.checkpoint), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "stages.log"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), TQDM_DISABLE="1")
    mem = ["--max-memory", args.max_memory] if args.max_memory else []
    qextra = args.quantize_args.split()
    text = work / "eval.txt"
    if not text.exists():  # the word-level tokenizer of make_random_checkpoint: one token per word
        import random

        rnd = random.Random(0)
        text.write_text(" ".join(f"w{rnd.randrange(3, 30000)}" for _ in range(4 * args.eval_tokens)))
    src = work / args.quantize_from
    stages = {
        "export-fp16": (["export", str(ckpt), str(work / "fp16"), "--stream", "--dtype", "fp16", "--force", *mem],
                        work / "fp16"),
        "export-fp32": (["export", str(ckpt), str(work / "fp32"), "--stream", "--force", *mem], work / "fp32"),
        "rtn": (["quantize", str(src), str(work / "rtn"), "--recipe", "w4a16-rtn", "--force", *mem, *qextra], work / "rtn"),
        "hqq": (["quantize", str(src), str(work / "hqq"), "--recipe", "w4a16-hqq", "--force", *mem, *qextra], work / "hqq"),
        "eval": (["eval", str(work / "rtn"), "--text", str(text), "--max-tokens", str(args.eval_tokens),
                  "--seq-len", str(args.eval_tokens)], None),
        "generate": (["generate", str(work / "rtn"), "--prompt", "w1 w17 w33 w4095", "--max-new-tokens", str(args.gen_tokens),
                      "--ignore-eos"], None),
    }
    recs = []
    for name in filter(None, args.stages.split(",")):
        cmd, out = stages[name]
        rec = run_stage(name, cmd, out, log, env)
        recs.append(rec)
        with open(work / "stages.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if rec["rc"] != 0:
            print(f"stage {name} failed (rc {rec['rc']}): see {log}", file=sys.stderr)
            return 1
    if args.check:
        res = check(ckpt, work / "fp16", work / "rtn")
        with open(work / "stages.jsonl", "a") as f:
            f.write(json.dumps({"stage": "check", **res}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

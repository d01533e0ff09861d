#!/usr/bin/env python3
"""Accuracy and speed of model folders in one process, timed round-robin (fp16 vs fp32 vs genai).

    python tools/bench_half.py TEXT REF_DIR ROUNDS DIR... [--no-spin] [--no-eval]

Each folder's perplexity, KL and top-1 against ``REF_DIR`` (2048 tokens of TEXT, windows of
512; the reference logits computed once), then ``ROUNDS`` rounds of
:func:`qcompiler.bench.measure_speed` over all folders in turn (512-token prefill, 64 greedy
decode tokens, 2 threads); the best round of each is printed, one JSON line per folder.
onnxruntime-genai folders (``genai_config.json``) are read through ``tools.compare``.

``--no-spin``: idle ORT threads sleep instead of spinning, and speeds are tokens per CPU-second of
this process (``time.process_time``: the work done, not the waiting — the comparable figure on a
machine shared with other jobs), prefill once per round, 64 greedy decode steps after it.
``--no-eval`` skips the perplexity (speed only).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from qcompiler.bench import _prompt_tokens, measure_speed
from qcompiler.data import make_windows, read_text, tokenize
from qcompiler.eval import evaluate_windows
from qcompiler.runtime import KVSpec, open_runner
from tools.compare import open_eval_runner


class _CachedRef:
    """The reference runner's logits, computed once per window."""

    def __init__(self, runner) -> None:
        self.runner, self.cache = runner, {}

    def logits(self, ids: np.ndarray) -> np.ndarray:
        key = ids.tobytes()
        if key not in self.cache:
            self.cache[key] = self.runner.logits(ids)
        return self.cache[key]


def _open(d: Path, spin: bool = True):
    if not (d / "genai_config.json").is_file():
        return open_runner(d, threads=2, spin=spin)
    r = open_eval_runner(d)
    if "float16" in r.inputs[r.past_names[0]].type:  # genai's fp16 KV cache
        r.kv = KVSpec(r.kv.layers, r.kv.kv_heads, r.kv.head_dim, np.dtype(np.float16))
    return r


def cpu_speed(runner, prompt: np.ndarray, decode_tokens: int) -> tuple[float, float]:
    """Prefill and greedy-decode tokens per CPU-second of this process (one prefill, then ``decode_tokens`` steps)."""
    outputs = ["logits", *runner.present_names]
    c0 = time.process_time()
    outs = runner.session.run(outputs, runner.feeds(prompt))
    prefill = len(prompt) / (time.process_time() - c0)
    past, past_len, nxt = dict(zip(runner.past_names, outs[1:])), len(prompt), int(np.argmax(outs[0][0, -1]))
    c0 = time.process_time()
    for _ in range(decode_tokens):
        outs = runner.session.run(outputs, runner.feeds(np.array([nxt], dtype=np.int64), past, past_len))
        past, past_len, nxt = dict(zip(runner.past_names, outs[1:])), past_len + 1, int(np.argmax(outs[0][0, -1]))
    return prefill, decode_tokens / (time.process_time() - c0)


def main(argv: list[str]) -> int:
    spin, evaluate = "--no-spin" not in argv, "--no-eval" not in argv
    argv = [a for a in argv if a not in ("--no-spin", "--no-eval")]
    text, ref_dir, rounds, dirs = argv[0], Path(argv[1]), int(argv[2]), [Path(d) for d in argv[3:]]
    tokens = tokenize(ref_dir, read_text(text))
    windows = make_windows(tokens, 512, 2048).ids
    ref = _CachedRef(open_runner(ref_dir, threads=2)) if evaluate else None
    rows = {}
    for d in dirs:
        r = _open(d, spin)
        size = sum(f.stat().st_size for f in d.iterdir() if f.is_file() and "onnx" in f.name)
        rows[d] = {"model": str(d), "size_mb": round(size / 1e6, 1), "runner": r, "prefill": [], "decode": []}
        if ref is not None:
            ev = evaluate_windows(r, windows, ref, name=d.name, progress=False)  # type: ignore[arg-type]
            rows[d].update(perplexity=round(ev.perplexity, 3), kl=round(ev.kl, 4), top1=round(ev.top1_agreement, 4))
    prompt = _prompt_tokens(tokens, 512)
    for _ in range(rounds):
        for row in rows.values():
            if not spin:
                row["runner"].session.run(["logits"], row["runner"].feeds(prompt[:8]))  # warm-up
                prefill, decode = cpu_speed(row["runner"], prompt, 64)
                row["prefill"].append(prefill)
                row["decode"].append(decode)
                continue
            sp = measure_speed(row["runner"], prompt, 64, 2)
            row["prefill"].append(sp.prefill_tok_s)
            row["decode"].append(sp.decode_tok_s)
    for row in rows.values():
        out = {k: v for k, v in row.items() if k not in ("runner", "prefill", "decode")}
        if rounds:
            unit = "tok_s" if spin else "tok_cpu_s"
            out.update({f"prefill_{unit}": round(max(row["prefill"]), 1), f"decode_{unit}": round(max(row["decode"]), 2),
                        "decode_all": [round(x, 2) for x in row["decode"]]})
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""Accuracy and speed of model folders in one process, timed round-robin (fp16 vs fp32 vs genai).

    python tools/bench_half.py TEXT REF_DIR ROUNDS DIR...

Each folder's perplexity, KL and top-1 against ``REF_DIR`` (2048 tokens of TEXT, windows of
512; the reference logits computed once), then ``ROUNDS`` rounds of
:func:`qcompiler.bench.measure_speed` over all folders in turn (512-token prefill, 64 greedy
decode tokens, 2 threads); the best round of each is printed, one JSON line per folder.
onnxruntime-genai folders (``genai_config.json``) are read through ``tools.compare``.
"""

from __future__ import annotations

import json
import sys
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


def _open(d: Path):
    if not (d / "genai_config.json").is_file():
        return open_runner(d, threads=2)
    r = open_eval_runner(d)
    if "float16" in r.inputs[r.past_names[0]].type:  # genai's fp16 KV cache
        r.kv = KVSpec(r.kv.layers, r.kv.kv_heads, r.kv.head_dim, np.dtype(np.float16))
    return r


def main(argv: list[str]) -> int:
    text, ref_dir, rounds, dirs = argv[0], Path(argv[1]), int(argv[2]), [Path(d) for d in argv[3:]]
    tokens = tokenize(ref_dir, read_text(text))
    windows = make_windows(tokens, 512, 2048).ids
    ref = _CachedRef(open_runner(ref_dir, threads=2))
    rows = {}
    for d in dirs:
        r = _open(d)
        ev = evaluate_windows(r, windows, ref, name=d.name, progress=False)  # type: ignore[arg-type]
        size = sum(f.stat().st_size for f in d.iterdir() if f.is_file() and "onnx" in f.name)
        rows[d] = {"model": str(d), "perplexity": round(ev.perplexity, 3), "kl": round(ev.kl, 4),
                   "top1": round(ev.top1_agreement, 4), "size_mb": round(size / 1e6, 1), "runner": r,
                   "prefill": [], "decode": []}
    prompt = _prompt_tokens(tokens, 512)
    for _ in range(rounds):
        for row in rows.values():
            sp = measure_speed(row["runner"], prompt, 64, 2)
            row["prefill"].append(sp.prefill_tok_s)
            row["decode"].append(sp.decode_tok_s)
    for row in rows.values():
        out = {k: v for k, v in row.items() if k not in ("runner", "prefill", "decode")}
        if rounds:
            out.update(prefill_tok_s=round(max(row["prefill"]), 1), decode_tok_s=round(max(row["decode"]), 2))
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

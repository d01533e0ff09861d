#!/usr/bin/env python3
"""KV-cache size and decode speed of model folders (float, int8 or int4 caches), one JSON line each.

    python tools/kv_cache_speed.py MODEL_DIR... [--text FILE] [--tokens 256] [--contexts 512,4096]
                                   [--steps 16] [--threads 2]

Per folder: the bytes of the ``present.*`` tensors after a ``--tokens`` prefill of ``--text``
(measured on the arrays ONNX Runtime returns), the bytes the cache grows by per token, and decode
tokens/s with each of ``--contexts`` tokens already cached (``qcompiler.bench.decode_speed_at``:
``--steps`` steps after one warm-up on a cache of random entries of its type), with the 1-minute load
average (timings on a loaded machine are contended).
"""

from __future__ import annotations

import argparse
import json
import os

from qcompiler.bench import decode_speed_at
from qcompiler.data import read_text, tokenize
from qcompiler.runtime import open_runner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--contexts", default="512,4096")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    for m in a.models:
        r = open_runner(m, threads=a.threads)
        ids = tokenize(m, read_text(a.text))[: a.tokens]
        outs = r.session.run(r.present_names, r.feeds(ids))
        row = {"model": m, "cache_dtype": str(r.kv.dtype), f"cache_bytes_{len(ids)}": sum(o.nbytes for o in outs),
               "bytes_per_token": r.kv.bytes_per_token, "loadavg": round(os.getloadavg()[0], 1)}
        for c in (int(x) for x in a.contexts.split(",")):
            row[f"decode_tok_s@{c}"] = round(decode_speed_at(r, c, a.steps) or 0.0, 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

"""qc eval MODEL_DIR --text FILE [--reference FLOAT_DIR] [--max-tokens N]"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity (and KL / top-1 agreement against a reference) on a text, as JSON",
    )
    p.add_argument("model_dir")
    p.add_argument("--text", required=True, help="evaluation text: .txt, .jsonl or folder of .txt")
    p.add_argument("--reference", default=None, help="float model folder to compare against")
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens of the text to use (default 8192)")
    p.add_argument("--seq-len", type=int, default=512, help="window length (default 512)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--no-optimize", dest="optimize", action="store_false",
                   help="run the graph as written (no ORT fusions): a QDQ graph's reference semantics")
    p.add_argument("--through-cache", action="store_true",
                   help="score each window as generation runs it: prefill its first half, then decode the rest "
                   "token by token through the KV cache (shows a quantized cache; slower)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qcompiler.eval import evaluate

    res = evaluate(
        args.model_dir, args.text, args.reference, seq_len=args.seq_len, max_tokens=args.max_tokens,
        threads=args.threads, optimize=args.optimize, through_cache=args.through_cache,
    )
    print(json.dumps(res.to_dict(), indent=2))
    return 0

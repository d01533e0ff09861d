"""qc generate MODEL_DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--chat]

Greedy (default) or sampled generation through ONNX Runtime with the model's KV cache
(``qcompiler.runtime.DecoderRunner.generate``), printing each token as soon as it is
decoded: the tokenizer's incremental decoder (``tokenizers.decoders.DecodeStream``)
turns ids into text only once a character is complete, so multi-byte characters and
byte-level merges print correctly.  A human check that a quantized model still talks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a model folder with ONNX Runtime (streams tokens)",
        description="Greedy or sampled generation with the KV cache; the text streams to stdout, stats to stderr.",
    )
    p.add_argument("model_dir", help="model folder (float or quantized)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.set_defaults(func=run)


def eos_ids(model_dir: Path) -> list[int]:
    """End-of-sequence ids from ``generation_config.json``, else ``config.json``."""
    for name in ("generation_config.json", "config.json"):
        f = model_dir / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            if eos is not None:
                return [int(e) for e in eos] if isinstance(eos, list) else [int(eos)]
    return []


def prompt_ids(model_dir: Path, prompt: str, chat: bool = False) -> list[int]:
    """Token ids of ``prompt``, with the tokenizer's special tokens, or through the chat template."""
    from qcompiler.errors import InputError

    if chat:
        tok_cfg = model_dir / "tokenizer_config.json"
        has_template = (model_dir / "chat_template.jinja").is_file() or (
            tok_cfg.is_file() and bool(json.loads(tok_cfg.read_text()).get("chat_template"))
        )
        if not has_template:
            raise InputError(f"{model_dir} has no chat template; drop --chat")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        return [int(i) for i in ids]
    from qcompiler.data import load_tokenizer

    return list(load_tokenizer(model_dir).encode(prompt, add_special_tokens=True).ids)


def warn_past_context(config: dict, prompt_tokens: int, new_tokens: int) -> bool:
    """Warn when the prompt (or prompt + new tokens) passes ``max_position_embeddings``; True if it did."""
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    if not isinstance(limit, int) or limit <= 0:
        return False
    if prompt_tokens > limit:
        log.warning("the prompt has %d tokens, more than the model's max_position_embeddings %d (config.json): "
                    "positions past %d are outside what it was trained on; expect unreliable output",
                    prompt_tokens, limit, limit)
        return True
    if prompt_tokens + new_tokens > limit:
        log.warning("prompt %d + --max-new-tokens %d tokens pass the model's max_position_embeddings %d "
                    "(config.json); tokens past position %d are unreliable", prompt_tokens, new_tokens, limit, limit)
        return True
    return False


def stream_text(model_dir: Path, ids: Iterator[int]) -> Iterator[tuple[int, str]]:
    """``(id, text piece)`` for each id, the piece empty until a character is complete."""
    from tokenizers.decoders import DecodeStream

    from qcompiler.data import load_tokenizer

    tok = load_tokenizer(model_dir)
    stream = DecodeStream(skip_special_tokens=True)
    for i in ids:
        yield i, stream.step(tok, i) or ""


def run(args: argparse.Namespace) -> int:
    from qcompiler.artifact import open_model_dir
    from qcompiler.errors import InputError
    from qcompiler.runtime import open_runner

    md = open_model_dir(args.model_dir)
    if not md.has_tokenizer():
        raise InputError(f"{md.path} has no tokenizer.json: cannot turn the prompt into tokens")
    if args.max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1")
    ids = prompt_ids(md.path, args.prompt, args.chat)
    warn_past_context(md.config, len(ids), args.max_new_tokens)
    runner = open_runner(md.path, threads=args.threads)
    eos = [] if args.ignore_eos else eos_ids(md.path)
    t0 = time.perf_counter()
    count = 0
    gen = runner.generate(ids, args.max_new_tokens, eos, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    for _, piece in stream_text(md.path, gen):
        count += 1
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    mode = "greedy" if args.temperature <= 0 else f"sampled T={args.temperature:g} top-k={args.top_k} seed={args.seed}"
    cache = "KV cache" if runner.has_kv_cache else "no KV cache"
    print(
        f"[{count} tokens in {dt:.2f} s ({count / dt:.1f} tok/s), prompt {len(ids)} tokens, {mode}, {cache}]",
        file=sys.stderr,
    )
    return 0

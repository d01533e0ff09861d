#!/usr/bin/env python3
"""Export a randomly initialized Llama past 2 GB end to end (the protobuf limit case).

    python tools/bench_export_large.py [--work DIR] [--layers 10] [--hidden 2048]

Builds a Hugging Face folder (random weights, seeded, saved as safetensors), runs
``qc export`` on it in a child process (so its peak RSS is its own), checks that the
result is a model folder with external data bigger than 2 GiB that loads lazily, and
that ONNX Runtime's logits equal transformers' on a short input.  Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_hf(folder: Path, layers: int, hidden: int, inter: int, vocab: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 512), vocab_size=vocab, tie_word_embeddings=False,
        max_position_embeddings=2048,
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(folder)
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=None)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="qc-large-"))
    hf, out = work / "hf", work / "onnx"
    params = build_hf(hf, args.layers, args.hidden, args.intermediate, args.vocab)
    t0 = time.perf_counter()
    code = (
        "import json,sys\nfrom qcompiler.export import export\nfrom qcompiler.memory import peak_rss_mb\n"
        f"export({str(hf)!r}, {str(out)!r}, kv_cache=False, force=True)\n"
        "print(json.dumps({'peak_rss_mb': peak_rss_mb()}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    export_s = time.perf_counter() - t0
    rss = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    data = out / "model.onnx_data"

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from qcompiler.irutil import load_model
    from qcompiler.runtime import open_runner

    model = load_model(out / "model.onnx")  # lazy: weights stay memory-mapped
    n_init = len(model.graph.initializers)
    del model
    ids = np.arange(1, 17, dtype=np.int64)
    ort_logits = open_runner(out).logits(ids)
    hf_model = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(ids[None])).logits[0].numpy()
    print(json.dumps({
        "params": params,
        "onnx_data_gib": round(data.stat().st_size / 2**30, 3),
        "model_onnx_mib": round((out / "model.onnx").stat().st_size / 2**20, 2),
        "initializers": n_init,
        "export_seconds": round(export_s, 1),
        "export_peak_rss_mb": round(rss, 1),
        "max_abs_logit_diff_vs_transformers": float(np.abs(ort_logits - ref).max()),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Write a random-weight Llama checkpoint of any size as sharded bf16 safetensors, tensor by tensor.

    python tools/make_random_checkpoint.py runs/tinyllama --preset tinyllama
    python tools/make_random_checkpoint.py runs/llama3-8b --preset llama3-8b --shard-gb 5

Presets: ``tinyllama`` (TinyLlama-1.1B's shape: hidden 2048, intermediate 5632, 22 layers,
32/4 heads, vocab 32000, 2.2 GB) and ``llama3-8b`` (hidden 4096, intermediate 14336,
32 layers, 32/8 heads, vocab 128256, 16.1 GB).  Weights are N(0, 0.02²) as transformers
initialises them (norms 1), drawn in row blocks of ≤ 16 M values from a seeded generator and
written straight to the shard, so memory stays ~100 MB whatever the size; the folder holds
``config.json``, ``model.safetensors.index.json`` and a word-level tokenizer (``w0`` …
``w{vocab-1}``, so any id is a token).  transformers loads it like a downloaded model.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np

PRESETS = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=2048),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
}
BLOCK = 16 << 20  # values drawn at a time


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF names and shapes of a LlamaForCausalLM, in safetensors (storage) order."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.self_attn.q_proj.weight", (h, h)),
                (f"{p}.self_attn.k_proj.weight", (kv, h)), (f"{p}.self_attn.v_proj.weight", (kv, h)),
                (f"{p}.self_attn.o_proj.weight", (h, h)), (f"{p}.post_attention_layernorm.weight", (h,)),
                (f"{p}.mlp.gate_proj.weight", (inter, h)), (f"{p}.mlp.up_proj.weight", (inter, h)),
                (f"{p}.mlp.down_proj.weight", (h, inter))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def _bf16(x: np.ndarray) -> bytes:
    u = x.astype(np.float32).view(np.uint32)
    return ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16).tobytes()


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], rng: np.random.Generator, std: float) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _name, shape in tensors:
            if len(shape) == 1:
                f.write(_bf16(np.ones(shape, np.float32)))
                continue
            rows_per = max(1, BLOCK // shape[1])
            for r0 in range(0, shape[0], rows_per):
                r = min(rows_per, shape[0] - r0)
                f.write(_bf16(rng.standard_normal((r, shape[1]), dtype=np.float32) * np.float32(std)))


def write_tokenizer(folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "w0", "bos_token": "w1", "eos_token": "w2",
         "model_max_length": 8192}, indent=2))


def build(folder: Path, cfg: dict, shard_bytes: int, seed: int = 0, std: float = 0.02) -> int:
    """Write the checkpoint; returns its bytes of weights."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = tensor_shapes(cfg)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        n = int(np.prod(shape)) * 2
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(folder / fname, tensors, rng, std)
        for name, shape in tensors:
            weight_map[name] = fname
            total += int(np.prod(shape)) * 2
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
              "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False,
              "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "use_cache": True, **cfg}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(folder, cfg["vocab_size"])
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tinyllama")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    t0 = time.perf_counter()
    total = build(Path(args.folder), cfg, int(args.shard_gb * 1e9), args.seed)
    print(json.dumps({"folder": args.folder, "bytes": total, "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

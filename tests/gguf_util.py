"""Tiny Llama GGUF files written with gguf-py (random weights, a byte-level BPE tokenizer of 256 bytes, two merges, bos/eos).

Weights of the types gguf-py can quantize (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) come from its own
quantizers; the K-quants, which gguf-py only dequantizes, are random blocks with finite fp16
super-block scales (every bit pattern of the rest is a valid block).  Rows are written with
llama.cpp's rotary permutation of q/k, as convert_hf_to_gguf.py does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, quants

T = GGMLQuantizationType
HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2
#: offsets of the fp16 fields in each K-quant block (kept finite and small)
_K_F16 = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py ``LlamaModel.permute``)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantize_tensor(w: np.ndarray, qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """``w [N, K]`` as raw GGUF blocks of ``qtype`` (random K-quant blocks of the same shape)."""
    if qtype in _K_F16:
        block, size = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (w.size // block, size), dtype=np.uint8)
        for off in _K_F16[qtype]:
            d = rng.uniform(0.0005, 0.004, raw.shape[0]).astype(np.float16)
            raw[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
        return raw.reshape(w.shape[0], -1)
    return quants.quantize(w.astype(np.float32), qtype)


def write_tiny_llama(path: Path, qtype: GGMLQuantizationType, embed_type: GGMLQuantizationType | None = None,
                     tied: bool = True, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 256, GQA 4/2 heads) whose linears are ``qtype``, embedding ``embed_type``."""
    rng = np.random.default_rng(seed)
    tokens = [*_bytes_to_unicode(), "Ġt", "Ġa", "<|bos|>", "<|eos|>"]
    vocab = len(tokens)
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 258 + [3, 3])
    w.add_token_merges(["Ġ t", "Ġ a"])  # two: transformers reads a one-element list as a scalar
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)

    def add(name: str, a: np.ndarray, t: GGMLQuantizationType) -> None:
        if t == T.F32:
            w.add_tensor(name, a.astype(np.float32))
        else:
            w.add_tensor(name, quantize_tensor(a, t, rng), raw_dtype=t)

    def lin(n: int, k: int) -> np.ndarray:
        return (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)

    kv = HIDDEN // HEADS * KV_HEADS
    add("token_embd.weight", rng.standard_normal((vocab, HIDDEN)).astype(np.float32) * 0.5, embed_type or qtype)
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", 1 + 0.1 * rng.standard_normal(HIDDEN), T.F32)
        add(f"blk.{i}.attn_q.weight", _permute(lin(HIDDEN, HIDDEN), HEADS), qtype)
        add(f"blk.{i}.attn_k.weight", _permute(lin(kv, HIDDEN), KV_HEADS), qtype)
        add(f"blk.{i}.attn_v.weight", lin(kv, HIDDEN), qtype)
        add(f"blk.{i}.attn_output.weight", lin(HIDDEN, HIDDEN), qtype)
        add(f"blk.{i}.ffn_norm.weight", 1 + 0.1 * rng.standard_normal(HIDDEN), T.F32)
        add(f"blk.{i}.ffn_gate.weight", lin(FFN, HIDDEN), qtype)
        add(f"blk.{i}.ffn_up.weight", lin(FFN, HIDDEN), qtype)
        add(f"blk.{i}.ffn_down.weight", lin(HIDDEN, FFN), qtype)
    add("output_norm.weight", np.ones(HIDDEN), T.F32)
    if not tied:
        add("output.weight", lin(vocab, HIDDEN), qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

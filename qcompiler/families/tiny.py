"""Tiny random configs of every supported family, for tests and the coverage table.

Each entry is the ``AutoConfig.for_model`` keyword arguments that make a 2-layer,
hidden-64, 4-head (2 KV heads where the family has GQA) model with a small vocabulary.
Nothing is downloaded: :func:`build_tiny` saves a randomly initialised model (seeded)
and a tokenizer-free folder that ``qc export`` reads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

VOCAB = 512
_COMMON: dict[str, Any] = {"vocab_size": VOCAB, "max_position_embeddings": 256}
_LLAMA_LIKE: dict[str, Any] = {
    **_COMMON, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2,
}

#: model_type → AutoConfig.for_model kwargs
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(_LLAMA_LIKE),
    "mistral": dict(_LLAMA_LIKE, sliding_window=None),
    "qwen2": dict(_LLAMA_LIKE),
    "qwen3": dict(_LLAMA_LIKE, head_dim=16),
    "granite": dict(_LLAMA_LIKE),
    "olmo2": dict(_LLAMA_LIKE),
    "stablelm": dict(_LLAMA_LIKE),
    "gemma": dict(_LLAMA_LIKE, head_dim=16),
    "gemma2": dict(_LLAMA_LIKE, head_dim=16, sliding_window=128),
    "gemma3_text": dict(_LLAMA_LIKE, head_dim=16, sliding_window=128),
    "phi3": dict(_LLAMA_LIKE, pad_token_id=0),
    "cohere": dict(_LLAMA_LIKE),
    "opt": {**_COMMON, "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "word_embed_proj_dim": 64},
    "gpt_neox": {**_COMMON, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 4},
    "falcon": {**_COMMON, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    "gpt2": {"vocab_size": VOCAB, "n_positions": 256, "n_embd": 64, "n_layer": 2, "n_head": 4},
    "phi": {**_COMMON, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4},
    "qwen3_moe": dict(_LLAMA_LIKE, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
}


def build_tiny(model_type: str, folder: str | os.PathLike, seed: int = 0) -> Path:
    """Save a seeded random ``model_type`` model with :data:`TINY_CONFIGS` into ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    model.eval()
    out = Path(folder)
    model.save_pretrained(out, safe_serialization=True)
    _save_byte_tokenizer(out)
    return out


def _save_byte_tokenizer(out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    from qcompiler.models.synthetic import byte_tokenizer_json

    (out / "tokenizer.json").write_text(byte_tokenizer_json(VOCAB))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), eos_token="\n")
    tok.save_pretrained(out)

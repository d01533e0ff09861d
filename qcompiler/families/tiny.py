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


#: variant name → (model_type, kwargs over its :data:`TINY_CONFIGS` entry): a family feature the
#: default tiny config leaves inert.  ``gemma2-softcap``: attention and logit soft-caps small and
#: scores large (``query_pre_attn_scalar`` 0.05 → scale √20) so that both caps change the logits,
#: and a sliding window (4, layer 0) shorter than the test windows.
TINY_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma2-softcap": ("gemma2", {"attn_logit_softcapping": 1.0, "final_logit_softcapping": 2.0,
                                  "query_pre_attn_scalar": 0.05, "sliding_window": 4}),
}


def tiny_config(name: str) -> tuple[str, dict[str, Any]]:
    """(model_type, ``AutoConfig.for_model`` kwargs) of a family in :data:`TINY_CONFIGS` or a :data:`TINY_VARIANTS` name."""
    if name in TINY_VARIANTS:
        model_type, over = TINY_VARIANTS[name]
        return model_type, {**TINY_CONFIGS[model_type], **over}
    return name, TINY_CONFIGS[name]


def build_tiny(model_type: str, folder: str | os.PathLike, seed: int = 0) -> Path:
    """Save a seeded random ``model_type`` model (a family or a :data:`TINY_VARIANTS` name) into ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model_type, kwargs = tiny_config(model_type)
    cfg = AutoConfig.for_model(model_type, **kwargs)
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

"""Deployable model folders: Hugging Face Optimum and onnxruntime-genai.

A qcompiler model folder is already what ``optimum.onnxruntime.ORTModelForCausalLM.
from_pretrained(folder)`` loads: ``model.onnx`` (the name it looks for first) with its
external data beside it, ``config.json`` (``model_type`` picks the KV-cache shape),
optionally ``generation_config.json``, the tokenizer files, and a graph whose I/O are
optimum's — ``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.{i}.key/value`` → ``logits``, ``present.{i}.key/value``.  Contrib ops
of ``com.microsoft`` (``MatMulNBits``, ``DynamicQuantizeMatMul``…) load in any
onnxruntime; ops of qcompiler's own domain need its op library registered, which
optimum cannot do, so :func:`optimum_problems` reports them.

onnxruntime-genai reads ``genai_config.json`` (its documented schema: ``model`` with
``type``, token ids, ``context_length``, ``vocab_size`` and a ``decoder`` section with
the graph's file name, head counts and the I/O name patterns; ``search`` with the
generation defaults), the model and ``tokenizer.json`` + ``tokenizer_config.json``.
:func:`write_genai` adds ``genai_config.json`` to a folder, built from ``config.json``,
``generation_config.json`` and the graph's actual inputs, so one folder serves both.

Tokenizers converted from GGUF by transformers get a SentencePiece-style decoder
(``ByteFallback → Fuse → Replace('▁', ' ') → ByteLevel``) on top of a byte-level BPE.
transformers decodes it fine, but genai's tokenizer then mis-encodes every word after
the first.  When the vocabulary has no ``▁`` and no ``<0x..>`` byte tokens those extra
steps are no-ops, so :func:`normalize_tokenizer_decoder` replaces the decoder by plain
``ByteLevel`` — after checking that every token decodes to the same text both ways.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from qcompiler.artifact import open_model_dir, write_json
from qcompiler.errors import InputError, QCError

log = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")


# ----------------------------------------------------------------------------- graph I/O


def graph_io(model_dir: str | os.PathLike) -> tuple[list[str], list[str], set[str]]:
    """(input names, output names, opset domains) of ``model.onnx``, read without the weights."""
    from qcompiler.irutil import load_proto_header

    proto = load_proto_header(open_model_dir(model_dir).model_path)
    inits = {t.name for t in proto.graph.initializer}
    inputs = [i.name for i in proto.graph.input if i.name not in inits]
    outputs = [o.name for o in proto.graph.output]
    return inputs, outputs, {o.domain for o in proto.opset_import}


def _past_elem_type(model_dir: Path) -> str:
    """The element type of the first ``past_key_values.*`` input (``float``, ``int8``, ``uint8``, ...)."""
    import onnx

    from qcompiler.irutil import load_proto_header

    proto = load_proto_header(open_model_dir(model_dir).model_path)
    for i in proto.graph.input:
        if _PAST.match(i.name):
            return onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name.replace("float32", "float")
    return ""


def optimum_problems(model_dir: str | os.PathLike) -> list[str]:
    """What would stop ``ORTModelForCausalLM.from_pretrained(model_dir)`` from loading and generating."""
    md = open_model_dir(model_dir)
    problems: list[str] = []
    config = md.config
    if not config:
        problems.append("no config.json (optimum needs it for model_type and the KV-cache shape)")
    elif "model_type" not in config:
        problems.append("config.json has no model_type")
    inputs, outputs, domains = graph_io(md.path)
    if "input_ids" not in inputs:
        problems.append("the graph has no input_ids input")
    if "logits" not in outputs:
        problems.append("the graph has no logits output")
    past = sorted(n for n in inputs if _PAST.match(n))
    present = sorted(n for n in outputs if _PRESENT.match(n))
    if [n.replace("past_key_values", "present") for n in past] != present:
        problems.append("past_key_values.* inputs and present.* outputs do not pair up")
    if past and config and config.get("num_hidden_layers") not in (None, len(past) // 2):
        problems.append(f"config.json says {config.get('num_hidden_layers')} layers, the graph has {len(past) // 2} caches")
    if "qcompiler" in domains:
        problems.append("the graph uses qcompiler's own ops, which optimum cannot register (lower for --target cpu)")
    if past and _past_elem_type(md.path) == "uint8":
        # measured: ORTModelForCausalLM feeds an empty [B, KV, 0, head_size] cache, the graph wants head_size / 2
        problems.append("the KV cache is int4 (uint8, two values per byte), whose empty cache optimum allocates "
                        "with head_size entries instead of head_size / 2; use --kv-cache int8 for optimum, or "
                        "run it with qc generate / ONNX Runtime (docs/kv_cache.md)")
    if not md.has_tokenizer():
        problems.append("no tokenizer.json / tokenizer.model")
    return problems


def ensure_generation_config(model_dir: str | os.PathLike) -> bool:
    """Write ``generation_config.json`` from ``config.json``'s token ids if missing; True if written."""
    md = open_model_dir(model_dir)
    path = md.path / "generation_config.json"
    if path.is_file() or not md.config:
        return False
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    write_json(path, {k: md.config[k] for k in keys if md.config.get(k) is not None})
    return True


# ----------------------------------------------------------------------------- genai


def _generation(md_path: Path) -> dict[str, Any]:
    f = md_path / "generation_config.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def genai_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """``genai_config.json`` content for a model folder (see module docstring)."""
    md = open_model_dir(model_dir)
    cfg, gen = md.config, _generation(md.path)
    if not cfg:
        raise InputError(f"{md.path} has no config.json: cannot describe the model to onnxruntime-genai")
    problems = [p for p in optimum_problems(md.path) if "tokenizer" not in p]
    if problems:
        raise QCError(f"{md.path} is not a decoder folder onnxruntime-genai can run: {problems[0]}")
    inputs, _, _ = graph_io(md.path)
    past = [n for n in inputs if _PAST.match(n)]
    if not past:
        raise QCError(f"{md.path} has no KV cache (past_key_values.* inputs); onnxruntime-genai needs one")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_size = int(cfg.get("head_dim") or hidden // heads)
    context = int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048)
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    pad = gen.get("pad_token_id", cfg.get("pad_token_id"))
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    io_in: dict[str, str] = {"input_ids": "input_ids"}
    for name in ("attention_mask", "position_ids"):
        if name in inputs:
            io_in[name] = name
    io_in.update(past_key_names="past_key_values.%d.key", past_value_names="past_key_values.%d.value")
    do_sample = bool(gen.get("do_sample", False))
    return {
        "model": {
            "bos_token_id": gen.get("bos_token_id", cfg.get("bos_token_id")),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": md.model_path.name,
                "head_size": head_size,
                "hidden_size": hidden,
                "inputs": io_in,
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": heads,
                "num_hidden_layers": int(cfg["num_hidden_layers"]),
                "num_key_value_heads": int(cfg.get("num_key_value_heads") or heads),
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": str(cfg["model_type"]),
            "vocab_size": int(cfg["vocab_size"]),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": do_sample,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # the graph takes a growing cache (optimum's layout), not a preallocated shared buffer
            "past_present_share_buffer": False,
            "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
            "temperature": float(gen.get("temperature", 1.0)),
            "top_k": int(gen.get("top_k", 50)),
            "top_p": float(gen.get("top_p", 1.0)),
        },
    }


#: The documented shape of genai_config.json: section → {key: type(s)} that must be present.
GENAI_REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "model": {
        "type": str,
        "vocab_size": int,
        "context_length": int,
        "bos_token_id": int,
        "eos_token_id": (int, list),
        "pad_token_id": int,
        "decoder": dict,
    },
    "model.decoder": {
        "filename": str,
        "session_options": dict,
        "head_size": int,
        "hidden_size": int,
        "num_attention_heads": int,
        "num_hidden_layers": int,
        "num_key_value_heads": int,
        "inputs": dict,
        "outputs": dict,
    },
    "model.decoder.inputs": {"input_ids": str, "past_key_names": str, "past_value_names": str},
    "model.decoder.outputs": {"logits": str, "present_key_names": str, "present_value_names": str},
    "search": {
        "do_sample": bool,
        "max_length": int,
        "min_length": int,
        "num_beams": int,
        "num_return_sequences": int,
        "past_present_share_buffer": bool,
        "temperature": (int, float),
        "top_k": int,
        "top_p": (int, float),
    },
}


def validate_genai_config(config: dict[str, Any], model_dir: str | os.PathLike | None = None) -> list[str]:
    """Problems of a genai config against the documented schema (and the graph, given ``model_dir``)."""
    problems: list[str] = []
    for section, keys in GENAI_REQUIRED.items():
        node: Any = config
        for part in section.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            problems.append(f"missing section '{section}'")
            continue
        for key, typ in keys.items():
            allowed = typ if isinstance(typ, tuple) else (typ,)
            value = node.get(key)
            if key not in node:
                problems.append(f"missing '{section}.{key}'")
            elif not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                want = " or ".join(t.__name__ for t in allowed)
                problems.append(f"'{section}.{key}' should be {want}, got {type(value).__name__}")
    if problems or model_dir is None:
        return problems
    dec = config["model"]["decoder"]
    md = open_model_dir(model_dir)
    if not (md.path / dec["filename"]).is_file():
        problems.append(f"decoder file {dec['filename']} is not in {md.path}")
    inputs, outputs, _ = graph_io(md.path)
    layers = dec["num_hidden_layers"]
    for key, name in dec["inputs"].items():
        names = [name % i for i in range(layers)] if "%d" in name else [name]
        problems += [f"decoder input '{n}' ({key}) is not a graph input" for n in names if n not in inputs]
    for key, name in dec["outputs"].items():
        names = [name % i for i in range(layers)] if "%d" in name else [name]
        problems += [f"decoder output '{n}' ({key}) is not a graph output" for n in names if n not in outputs]
    return problems


def normalize_tokenizer_decoder(model_dir: str | os.PathLike) -> bool:
    """Replace a GGUF-style hybrid decoder by plain ByteLevel when provably equivalent; True if changed."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return False
    data = json.loads(path.read_text())
    dec = data.get("decoder") or {}
    pre = data.get("pre_tokenizer") or {}
    steps = dec.get("decoders", []) if dec.get("type") == "Sequence" else []
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if pre.get("type") != "ByteLevel" or not byte_level or len(steps) < 2:
        return False
    vocab = data.get("model", {}).get("vocab", {})
    if any("▁" in t or re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t) for t in vocab):
        return False
    from tokenizers import Tokenizer

    old = Tokenizer.from_str(json.dumps(data))
    data["decoder"] = byte_level[0]
    new = Tokenizer.from_str(json.dumps(data))
    ids = list(range(old.get_vocab_size()))
    if any(old.decode([i]) != new.decode([i]) for i in ids) or old.decode(ids[:4096]) != new.decode(ids[:4096]):
        log.info("tokenizer decoder left as is: plain ByteLevel would decode differently")
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
    os.replace(tmp, path)
    log.info("tokenizer.json: decoder %s → ByteLevel (same text for every token)", [s.get("type") for s in steps])
    return True


def write_genai(model_dir: str | os.PathLike) -> Path:
    """Make ``model_dir`` an onnxruntime-genai folder too: genai_config.json (+ tokenizer decoder fix)."""
    md = open_model_dir(model_dir)
    if not md.has_tokenizer():
        raise InputError(f"{md.path} has no tokenizer.json: onnxruntime-genai needs the tokenizer beside the model")
    config = genai_config(md.path)
    problems = validate_genai_config(config, md.path)
    if problems:
        raise QCError(f"internal error: the genai config for {md.path} is invalid: {problems[0]}")
    ensure_generation_config(md.path)
    normalize_tokenizer_decoder(md.path)
    write_json(md.path / GENAI_CONFIG, config)
    return md.path / GENAI_CONFIG


# ----------------------------------------------------------------------------- live checks


def optimum_generate(model_dir: str | os.PathLike, prompt: str, max_new_tokens: int = 16) -> str:
    """Load the folder with optimum's ORTModelForCausalLM, generate greedily, return the new text."""
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    path = str(open_model_dir(model_dir).path)
    model = ORTModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    inputs = tok(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def genai_available() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def genai_generate(model_dir: str | os.PathLike, prompt: str, max_new_tokens: int = 16) -> tuple[list[int], str]:
    """Generate greedily with onnxruntime-genai from a folder with genai_config.json: (new ids, text)."""
    import onnxruntime_genai as og

    path = open_model_dir(model_dir).path
    if not (path / GENAI_CONFIG).is_file():
        raise InputError(f"{path} has no {GENAI_CONFIG}; write it with 'qc deploy {path} --genai'")
    model = og.Model(str(path))
    tok = og.Tokenizer(model)
    prompt_ids = tok.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt_ids)
    new: list[int] = []
    while not gen.is_done() and len(new) < max_new_tokens:
        gen.generate_next_token()
        new.append(int(gen.get_next_tokens()[0]))
    return new, tok.decode(new)

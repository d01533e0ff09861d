"""Export a Hugging Face causal LM (hub id, local folder or .gguf file) to a model folder.

The exporter is optimum's (``onnx_export_from_model``); qcompiler only resolves the
input, loads it with transformers in the requested float type (``dtype``: ``fp32``, ``fp16``
or ``bf16``; a bf16/fp16 safetensors checkpoint is converted tensor by tensor as it loads, never
through an fp32 copy; GGUF files are dequantized to float32 by transformers, then converted),
traces it in that type, and re-saves the graph with all weights in one external-data file
(``model.onnx_data``) so that models past 2 GB work and every later stage can map
weights lazily.  Tokenizer, config and generation config are written beside it.
The folder appears only when everything succeeded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcompiler.artifact import MODEL_FILE, atomic_output_dir, check_output_dir, write_json
from qcompiler.errors import InputError, OptionError, QCError
from qcompiler.floattype import DTYPE_NAMES
from qcompiler.gguf_check import check_gguf
from qcompiler.irutil import constants_to_initializers, load_model, save_model
from qcompiler.shapes import record_shapes

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"

#: config fields that only transformers' *eager* attention applies: its SDPA path (the default
#: trace at fp32) ignores them, so a model whose config sets one is exported with eager attention
#: at every dtype.  ``attn_logit_softcapping`` (Gemma 2, and Gemma 3 / VaultGemma configs where set)
#: is ``scores ← c·tanh(scores/c)`` before the mask, which SDPA has no argument for.
EAGER_ONLY_CONFIG_FIELDS: tuple[str, ...] = ("attn_logit_softcapping",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: ``kind`` is ``folder``, ``gguf`` or ``hub``."""

    kind: str
    path: str  # folder / hub id
    gguf_file: str | None = None


def resolve_source(ref: str) -> ModelSource:
    """Classify ``ref`` and check it is usable, with a one-line error otherwise."""
    p = Path(ref).expanduser()
    if p.exists():
        if p.is_file():
            with open(p, "rb") as f:
                magic = f.read(4)
            if magic != GGUF_MAGIC:
                if p.suffix == ".gguf":
                    raise InputError(f"{p} is not a GGUF file (bad magic bytes {magic!r})")
                raise InputError(f"{p} is neither a model folder nor a .gguf file")
            check_gguf(p)  # a truncated file is reported as such, not as a reshape error deep in the reader
            return ModelSource("gguf", str(p.parent), p.name)
        if (p / "config.json").is_file():
            return ModelSource("folder", str(p))
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return resolve_source(str(ggufs[0]))
        if len(ggufs) > 1:
            raise InputError(f"{p} holds several .gguf files; pass one of them: {', '.join(g.name for g in ggufs)}")
        raise InputError(f"{p} is not a Hugging Face model folder (no config.json) and holds no .gguf file")
    if ref.endswith(".gguf") or ref.startswith((".", "/", "~")) or not _HUB_ID.match(ref):
        raise InputError(f"no such file or folder: {ref}")
    return ModelSource("hub", ref)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


#: Checkpoint formats that are Python pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickle_checkpoints(folder: Path) -> None:
    """Refuse a model folder whose weights exist only as pickles (never unpickle model files)."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in folder.iterdir() if f.is_file() and f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise InputError(
            f"{folder} holds weights only as pickle files ({', '.join(pickles[:3])}); qcompiler never "
            "unpickles model files: convert them to .safetensors first"
        )


def refuse_remote_code(folder: Path) -> None:
    """Refuse a folder whose config.json maps its classes to code shipped with it (``auto_map``).

    transformers would either ask for ``trust_remote_code`` or, when ``model_type`` names a
    built-in architecture, silently load the built-in class instead of the model's own code:
    the export would then be of a different model than the one shipped.
    """
    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{cfg_path} is not readable JSON: {e}") from None
    auto_map = cfg.get("auto_map") if isinstance(cfg, dict) else None
    if auto_map:
        classes = ", ".join(sorted(auto_map)) if isinstance(auto_map, dict) else str(auto_map)
        raise InputError(
            f"{folder} ships its own model code (config.json auto_map: {classes}, model_type "
            f"'{cfg.get('model_type')}'); qcompiler neither runs it nor substitutes a built-in class for it: "
            "pass --trust-remote-code to run that code (trust_remote_code), or remove auto_map to use the built-in class"
        )


#: ``--dtype`` spellings and the torch float type each one loads and traces in.
DTYPES = tuple(DTYPE_NAMES)  # the --dtype spellings (qcompiler.floattype)


def torch_dtype(dtype: str):
    """The torch float type of a ``--dtype`` spelling (``fp32``, ``fp16``, ``bf16``)."""
    check_dtype(dtype)
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def check_dtype(dtype: str) -> None:
    """Refuse a ``--dtype`` spelling other than ``fp32``, ``fp16``, ``bf16`` (without importing torch)."""
    if dtype not in DTYPE_NAMES:
        raise OptionError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")


def load_hf_model(src: ModelSource, trust_remote_code: bool = False, dtype: str = "fp32"):
    """Load (model, tokenizer) in ``dtype`` with transformers (safetensors or GGUF weights only).

    transformers converts each checkpoint tensor to ``torch_dtype`` as it loads it, so a bf16
    checkpoint exported as fp16 never exists in fp32; a GGUF file is dequantized to float32 by
    transformers and converted after loading.
    """
    if src.kind == "folder":
        refuse_pickle_checkpoints(Path(src.path))
        if not trust_remote_code:
            refuse_remote_code(Path(src.path))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, object] = {"trust_remote_code": trust_remote_code}
    want = torch_dtype(dtype)
    model_kwargs: dict[str, object] = {"torch_dtype": want}
    if want != torch.float32:
        # torch's ONNX form of SDPA turns a boolean mask into a float32 additive one, which
        # promotes softmax, P·V and o_proj (and the residual stream after it) to float32 in a
        # half graph; transformers' eager attention keeps them in the model's type
        model_kwargs["attn_implementation"] = "eager"
    if src.kind == "gguf":
        kwargs["gguf_file"] = src.gguf_file
    else:  # GGUF is not a pickle; for everything else only safetensors weights are read
        model_kwargs["use_safetensors"] = True
    if src.kind == "hub":
        try:
            tok = AutoTokenizer.from_pretrained(src.path, local_files_only=True, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(src.path, local_files_only=True, **model_kwargs, **kwargs)
            return _eager_if_needed(_to_dtype(model, want)), tok
        except OSError:
            if not _hub_reachable():
                raise InputError(
                    f"'{src.path}' is not in the local Hugging Face cache and the Hub cannot be reached; "
                    "pass a local model folder or a .gguf file instead"
                ) from None
    try:
        tok = AutoTokenizer.from_pretrained(src.path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(src.path, **model_kwargs, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        what = Path(src.path) / src.gguf_file if src.gguf_file else src.path
        raise InputError(f"transformers cannot load {what}: {' '.join(str(e).split())}") from None  # one line
    model.eval()
    return _eager_if_needed(_to_dtype(model, want)), tok


def needs_eager_attention(config: object) -> list[str]:
    """The fields of :data:`EAGER_ONLY_CONFIG_FIELDS` that ``config`` (its text config) sets."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [f for f in EAGER_ONLY_CONFIG_FIELDS if getattr(text, f, None) is not None]


def _eager_if_needed(model: Any) -> Any:
    """``model`` switched to eager attention when its config sets a field SDPA would drop."""
    fields = needs_eager_attention(model.config)
    if fields and getattr(model.config, "_attn_implementation", "eager") != "eager":
        log.info("exporting with eager attention: the config sets %s, which SDPA attention ignores",
                 ", ".join(fields))
        model.set_attn_implementation("eager")
    return model


def _to_dtype(model, want):
    """``model`` with every floating parameter and buffer in ``want`` (a no-op when loaded so)."""
    if any(p.is_floating_point() and p.dtype != want for p in model.parameters()):
        log.info("converting the loaded model to %s", want)
        model = model.to(want)
    return model


def export(
    model_ref: str,
    out_dir: str | os.PathLike,
    kv_cache: bool = True,
    force: bool = False,
    trust_remote_code: bool = False,
    opset: int | None = None,
    keep_gguf_quant: bool = False,
    allow_requant: bool = False,
    accuracy_level: int = 0,
    dtype: str = "fp32",
    stream: bool = False,
    max_memory: int | None = None,
) -> Path:
    """Export ``model_ref`` to ``out_dir`` (see module docstring); returns the folder.

    With ``keep_gguf_quant`` (a .gguf source only) the quantized GGUF tensors are carried into the
    graph as they are (``qcompiler.gguf_transcode``) and ``quantization.json`` lists each one;
    ``accuracy_level`` is their MatMulNBits' (4: int8 activations, as llama.cpp computes).
    ``dtype`` (``fp32``, ``fp16``, ``bf16``) is the float type of the graph: weights, activations,
    KV cache and logits.
    """
    check_dtype(dtype)  # a bad spelling fails before anything is loaded (torch is not imported: --stream)
    out = Path(out_dir)
    local = Path(model_ref).expanduser()
    inputs = (local,) if local.exists() else ()
    check_output_dir(out, force, inputs)
    src = resolve_source(model_ref)
    if (keep_gguf_quant or allow_requant) and src.kind != "gguf":
        raise InputError("--keep-gguf-quant / --allow-requant need a .gguf file as the model")
    if stream:
        return _export_streaming(model_ref, src, out, inputs, kv_cache, force, trust_remote_code, dtype, max_memory)
    if max_memory is not None:
        _check_optimum_memory(src, max_memory)
    t0 = time.perf_counter()
    log.info("loading %s (%s)", model_ref, src.kind)
    model, tok = load_hf_model(src, trust_remote_code, dtype)
    if not getattr(model.config, "is_decoder", True) and not hasattr(model, "generate"):
        raise QCError(f"{model_ref} is not a causal language model")
    task = "text-generation-with-past" if kv_cache else "text-generation"
    from optimum.exporters.onnx import onnx_export_from_model

    with atomic_output_dir(out, force, inputs) as tmp:
        raw = tmp / "_raw"
        log.info("exporting with optimum (%s)", task)
        try:
            with _no_ort_axis_fix(dtype == "bf16"):
                onnx_export_from_model(model, raw, task=task, opset=opset, do_validation=False)
        except (ValueError, KeyError, NotImplementedError) as e:
            raise QCError(f"optimum cannot export {model_ref}: {e}") from None
        model_config = model.config
        del model
        graph = load_model(raw / MODEL_FILE)
        if dtype != "fp32":
            drop_roundtrip_casts(graph)
        gguf_report = None
        if keep_gguf_quant:
            from qcompiler.gguf_transcode import transcode

            gguf_report = transcode(graph, Path(src.path) / str(src.gguf_file), allow_requant=allow_requant,
                                    accuracy_level=accuracy_level)
        if getattr(model_config, "tie_word_embeddings", False):
            retie_lm_head(graph)  # after transcoding: a GGUF head already shares the embedding's blocks
        constants_to_initializers(graph.graph)  # a third of the nodes: none to load, match or run
        record_shapes(graph)  # saved as value_info: the passes that read shapes need no inference
        save_model(graph, tmp / MODEL_FILE)
        del graph
        for f in raw.iterdir():
            if f.suffix not in (".onnx", ".onnx_data", ".data") and f.is_file():
                f.rename(tmp / f.name)
        tok.save_pretrained(tmp)
        _drop_gguf_copy(tmp)
        for f in list(raw.iterdir()):
            f.unlink()
        raw.rmdir()
        write_json(
            tmp / "qcompiler_export.json",
            {"source": model_ref, "source_kind": src.kind, "kv_cache": kv_cache, "task": task,
             "keep_gguf_quant": keep_gguf_quant, "dtype": dtype},
        )
        if gguf_report is not None:
            write_json(tmp / "quantization.json", {"source": model_ref, **gguf_report,
                                                   "wall_seconds": round(time.perf_counter() - t0, 2)})
    log.info("exported %s to %s in %.1fs", model_ref, out, time.perf_counter() - t0)
    return out


@contextlib.contextmanager
def _no_ort_axis_fix(active: bool):
    """Skip optimum's ``fix_dynamic_axes`` (it renames output dims after running the graph in ONNX
    Runtime CPU, which has no bf16 kernels): a bf16 graph keeps torch's dim names on its outputs."""
    if not active:
        yield
        return
    from optimum.exporters.onnx.base import OnnxConfig

    orig = OnnxConfig.fix_dynamic_axes
    OnnxConfig.fix_dynamic_axes = lambda *a, **k: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        OnnxConfig.fix_dynamic_axes = orig  # type: ignore[method-assign]


def drop_roundtrip_casts(model) -> int:
    """Remove exact round trips ``Cast_h(Cast_f32(x_h))`` → ``x_h`` (h = fp16/bf16).

    Widening a half value to float32 is exact and narrowing it back returns the same bits, so
    the pair is the identity; torch's export of a half model writes one after every softmax
    computed ``dtype=float32`` (eager attention), where it hides ``Softmax → MatMul`` from the
    attention fusion.  Returns how many pairs it removed.
    """
    import onnx_ir as ir
    from onnx_ir.passes.common import ShapeInferencePass

    ShapeInferencePass(strict_mode=False)(model)  # value types (weights are not read)
    half = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    wide = (ir.DataType.FLOAT.value, ir.DataType.DOUBLE.value)
    graph = model.graph
    removed = 0
    for node in list(graph):
        if node.op_type != "Cast" or node.domain != "" or node.graph is not graph:
            continue
        first = node.inputs[0].producer() if node.inputs[0] is not None else None
        if first is None or first.op_type != "Cast" or first.domain != "" or first.inputs[0] is None:
            continue
        x = first.inputs[0]
        if x.dtype not in half or first.attributes.get_int("to", -1) not in wide:
            continue
        if node.attributes.get_int("to", -1) != x.dtype.value:  # type: ignore[union-attr]
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        out.replace_all_uses_with(x)
        graph.remove(node, safe=True)
        if not first.outputs[0].uses() and not first.outputs[0].is_graph_output():
            graph.remove(first, safe=True)
        removed += 1
    if removed:
        log.info("export: %d exact round-trip Cast pair(s) (half → float32 → half) removed", removed)
    return removed
def _export_streaming(model_ref: str, src: ModelSource, out: Path, inputs: tuple, kv_cache: bool, force: bool,
                      trust_remote_code: bool, dtype: str, max_memory: int | None) -> Path:
    """``export(stream=True)``: see ``qcompiler.export_stream`` (a local safetensors folder only)."""
    from qcompiler.export_stream import export_streaming

    if src.kind != "folder":
        raise InputError(f"--stream reads a local safetensors model folder, not a "
                         f"{src.kind} source ({model_ref}); use the normal export")
    if trust_remote_code:
        raise QCError("--stream writes the graph itself and never runs model code: drop --trust-remote-code")
    refuse_pickle_checkpoints(Path(src.path))
    t0 = time.perf_counter()
    with atomic_output_dir(out, force, inputs) as tmp:
        info = export_streaming(src.path, tmp, dtype=dtype, kv_cache=kv_cache, max_memory=max_memory)
        task = "text-generation-with-past" if kv_cache else "text-generation"
        write_json(tmp / "qcompiler_export.json", {"source": model_ref, "source_kind": src.kind, "kv_cache": kv_cache,
                                                   "task": task, "keep_gguf_quant": False, **info})
    log.info("exported %s to %s in %.1fs (streaming)", model_ref, out, time.perf_counter() - t0)
    return out


def _check_optimum_memory(src: ModelSource, max_memory: int) -> None:
    """``--max-memory`` without ``--stream``: torch's fp32 copy plus the exporter's, measured 2.2× the fp32 model."""
    if src.kind != "folder" or not any(Path(src.path).glob("*.safetensors")):
        raise QCError("--max-memory bounds the streaming export (--stream, a local safetensors folder); "
                      "the normal export holds the whole model in torch")
    from qcompiler.export_stream import read_safetensors_index

    values = sum(math.prod(t.shape) for t in read_safetensors_index(src.path).values())
    need = int(2.2 * 4 * values)
    if need > max_memory:
        raise QCError(f"--max-memory {max_memory / 2**30:.1f} GiB: the normal export of {src.path} needs about "
                      f"{need / 2**30:.1f} GiB (torch's fp32 model and the exporter's copy); pass --stream "
                      "(Llama/Mistral/Qwen2) to export within the bound")


def retie_lm_head(model) -> bool:
    """Make a tied lm_head read the embedding through a ``Transpose`` view, not a second copy.

    Exporters may constant-fold ``Eᵀ`` into a new ``[hidden, vocab]`` initializer (for Gemma 3
    270M, 671 MB on top of the 671 MB embedding).  ``MatMul(x, W)`` with ``W == Eᵀ`` exactly, for
    ``E`` the table of an embedding ``Gather``, becomes ``MatMul(x, Transpose(E))`` and ``W`` is
    dropped.  Returns whether it rewired anything.
    """
    import numpy as np
    import onnx_ir as ir

    from qcompiler.irutil import is_weight

    graph = model.graph
    tables = [n.inputs[0] for n in graph if n.op_type == "Gather" and is_weight(n.inputs[0])]
    changed = False
    for node in list(graph):
        if node.op_type != "MatMul" or not is_weight(node.inputs[1]):
            continue
        w = node.inputs[1]
        for e in tables:
            if list(e.shape) != list(reversed(list(w.shape))) or e.dtype != w.dtype:  # type: ignore[arg-type]
                continue
            if not np.array_equal(w.const_value.numpy(), e.const_value.numpy().T):  # type: ignore[union-attr]
                continue
            t = ir.node("Transpose", [e], {"perm": [1, 0]}, name=f"{node.name}_tied_Transpose")
            graph.insert_before(node, t)
            node.replace_input_with(1, t.outputs[0])
            if not w.uses() and w.name in graph.initializers:
                del graph.initializers[w.name]
            log.info("export: lm_head %s reads the embedding %s through Transpose (tied; copy dropped)", node.name, e.name)
            changed = True
            break
    return changed


def _drop_gguf_copy(folder: Path) -> None:
    """Remove a ``tokenizer.model`` that is really the source GGUF file.

    A tokenizer loaded from a GGUF file names that file as its vocabulary, and
    ``save_pretrained`` copies it (the whole model, ~100 MB for SmolLM2-135M) as
    ``tokenizer.model``.  ``tokenizer.json`` holds the complete fast tokenizer.
    """
    f = folder / "tokenizer.model"
    if f.is_file() and (folder / "tokenizer.json").is_file():
        with open(f, "rb") as fh:
            if fh.read(4) == b"GGUF":
                f.unlink()
                log.info("dropped tokenizer.model (a copy of the source GGUF file; tokenizer.json is complete)")

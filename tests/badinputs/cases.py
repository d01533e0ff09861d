"""The bad-input corpus: one row per broken input, with the exit code and message it must give.

Every input is made in the test's temporary folder from the seeded synthetic model
(``synthetic_dir``), so the corpus is a table of *recipes for* bad files rather than
binary blobs.  ``argv(work, model)`` builds the input under ``work`` (``model`` is the
read-only synthetic folder) and returns the ``qc`` arguments; the output, when there is
one, is always ``work / "out"``.  A non-zero case must print one line
``qc: error: <... message ...>`` and leave no output and no partial folder; a zero case
(inputs qcompiler accepts but must handle with care) checks its result in ``after``.

Exit codes (``qcompiler.errors.EXIT_CODES``): 2 bad option, 3 bad input, 4 output may not or
cannot be written, 5 unsupported model.  ``CORPUS`` groups the cases by fault class.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = "out"
SOFTCAP = 5.0


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Path, Path], list[str]]
    exit_code: int
    message: str = ""
    after: Callable[[Path], None] | None = None
    patch: Callable[..., None] | None = None  # (monkeypatch, work): inject a fault (disk full, ...)
    keeps_out: bool = False  # the output path existed before (a user's folder) and must still be there


# ----------------------------------------------------------------------------- input makers


def copy_model(model: Path, work: Path, name: str = "m") -> Path:
    dst = work / name
    shutil.copytree(model, dst)
    return dst


def edit_proto(folder: Path, fn: Callable[[onnx.ModelProto], None]) -> Path:
    """Apply ``fn`` to model.onnx's proto (external data left where it is)."""
    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    fn(m)
    onnx.save(m, str(folder / "model.onnx"))
    return folder


def _external(m: onnx.ModelProto) -> list[TensorProto]:
    return [t for t in m.graph.initializer if t.data_location == TensorProto.EXTERNAL]


def set_external_field(key: str, value: str | None, every: bool = False) -> Callable[[onnx.ModelProto], None]:
    """Set (or with ``None`` remove) an external-data field of the first (or every) external tensor."""

    def fn(m: onnx.ModelProto) -> None:
        for t in _external(m)[: None if every else 1]:
            kept = [e for e in t.external_data if e.key != key]
            del t.external_data[:]
            t.external_data.extend(kept)
            if value is not None:
                t.external_data.add(key=key, value=value)

    return fn


def poison_weight(folder: Path, name_part: str, index: tuple[int, int], value: float) -> str:
    """Write ``value`` into one element of an external weight, in place; returns the tensor name."""
    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    t = next(t for t in _external(m) if name_part in t.name)
    info = {e.key: e.value for e in t.external_data}
    flat = index[0] * t.dims[1] + index[1]
    with open(folder / info["location"], "r+b") as f:
        f.seek(int(info.get("offset", 0)) + 4 * flat)
        f.write(np.float32(value).tobytes())
    return t.name


def _hard_link(folder: Path, name: str) -> Path:
    """A second hard link to ``folder / name`` (beside the folder): onnx_ir refuses such external data."""
    os.link(folder / name, folder.parent / f"{folder.name}-{name}.link")
    return folder


def quantize(model: Path, work: Path, *extra: str) -> list[str]:
    return ["quantize", str(model), str(work / OUT), *extra] if extra else [
        "quantize", str(model), str(work / OUT), "--recipe", "w4a16-rtn"]


def text_file(work: Path, content: bytes, name: str = "text.txt") -> Path:
    p = work / name
    p.write_bytes(content)
    return p


def eval_with_text(content: bytes, name: str = "text.txt") -> Callable[[Path, Path], list[str]]:
    return lambda w, m: ["eval", str(m), "--text", str(text_file(w, content, name))]


def tiny_model(work: Path, nodes: list[onnx.NodeProto], inputs: list, outputs: list,
               inits: list[TensorProto]) -> Path:
    """A model folder holding a small non-LLM graph."""
    folder = work / "tiny"
    folder.mkdir()
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    return folder


def with_softcap(model: Path, work: Path) -> Path:
    """The synthetic model with ``logits = SoftCap(x)``, an op of domain ``custom.ops``
    that qcompiler does not know, defined by a model-local function (so ORT can run it)."""
    folder = copy_model(model, work)

    def fn(m: onnx.ModelProto) -> None:
        lm = next(n for n in m.graph.node if "logits" in n.output)
        lm.output[list(lm.output).index("logits")] = "logits_raw"
        m.graph.node.append(helper.make_node("SoftCap", ["logits_raw"], ["logits"], domain="custom.ops", name="/softcap"))
        m.functions.append(helper.make_function(
            "custom.ops", "SoftCap", ["x"], ["y"],
            [helper.make_node("Constant", [], ["cap"], value_float=SOFTCAP),
             helper.make_node("Div", ["x", "cap"], ["t"]),
             helper.make_node("Tanh", ["t"], ["u"]),
             helper.make_node("Mul", ["u", "cap"], ["y"])],
            [helper.make_opsetid("", 18)]))
        m.opset_import.append(helper.make_opsetid("custom.ops", 1))

    return edit_proto(folder, fn)


SHARED_FROM, SHARED_TO = "layers.0/self_attn/q_proj.weight", "layers.1/self_attn/q_proj"


def with_shared_weight(model: Path, work: Path) -> Path:
    """Layer 1's q_proj reads layer 0's q_proj weight (one initializer, two MatMuls)."""
    folder = copy_model(model, work)

    def fn(m: onnx.ModelProto) -> None:
        src = next(t.name for t in m.graph.initializer if t.name.endswith(SHARED_FROM))
        node = next(n for n in m.graph.node if SHARED_TO in n.name and n.op_type == "MatMul")
        old, node.input[1] = node.input[1], src
        keep = [t for t in m.graph.initializer if t.name != old]
        del m.graph.initializer[:]
        m.graph.initializer.extend(keep)

    return edit_proto(folder, fn)


def remote_code_folder(work: Path) -> Path:
    """A Hugging Face folder whose config asks for code shipped beside it (which would drop a marker)."""
    folder = work / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qcevil",
        "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                     "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
    }))
    for mod in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (folder / f"{mod}.py").write_text(f"open({str(work / 'PWNED')!r}, 'w').write('{mod}')\n")
    return folder


# ----------------------------------------------------------------------------- checks of accepted inputs


def _summary(work: Path) -> dict:
    return json.loads((work / OUT / "quantization.json").read_text())


def _ops(work: Path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(work / OUT / "model.onnx"), load_external_data=False).graph.node)


def check_nonfinite_skipped(work: Path) -> None:
    s = _summary(work)
    assert list(s["report"]["nonfinite_weights"]) == ["layers.1.up_proj"]
    assert "layers.1.up_proj" not in s["report"]["weights"] and len(s["report"]["weights"]) == 13
    # the NaN stays in the one float weight left alone; no scale or packed weight holds one
    m = onnx.load(str(work / OUT / "model.onnx"))
    bad = [t for t in m.graph.initializer if not np.isfinite(numpy_helper.to_array(t).astype(np.float64)).all()]
    assert len(bad) == 1 and bad[0].data_type == TensorProto.FLOAT and np.prod(bad[0].dims) >= 64 * 160


def check_unknown_op_kept(work: Path) -> None:
    from qcompiler.runtime import open_runner

    assert _summary(work)["unknown_ops"] == {"custom.ops.SoftCap": 1}
    assert [n.op_type for n in _ops(work) if n.domain == "custom.ops"] == ["SoftCap"]
    logits = open_runner(work / OUT).logits(np.arange(24) % 256)  # the function travels with the model
    assert np.isfinite(logits).all() and np.abs(logits).max() <= SOFTCAP


def check_shared_reported(work: Path) -> None:
    shared = _summary(work)["report"]["shared_weights"]
    assert len(shared) == 1 and sorted(next(iter(shared.values()))) == ["layers.0.q_proj", "layers.1.q_proj"]


def check_no_marker(work: Path) -> None:
    assert not (work / "PWNED").exists(), "code shipped with the model was executed"


# ----------------------------------------------------------------------------- the table


def _trunc(folder: Path, name: str, size: int | None = None, frac: float | None = None) -> Path:
    p = folder / name
    os.truncate(p, size if size is not None else int(p.stat().st_size * (frac or 0.5)))
    return folder


def _garble(folder: Path) -> Path:
    (folder / "model.onnx").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    return folder


def _symlink_outside(w: Path, m: Path) -> Path:
    folder = copy_model(m, w)
    outside = w / "outside.bin"
    shutil.move(folder / "model.onnx_data", outside)
    (folder / "model.onnx_data").symlink_to(os.path.relpath(outside, folder))
    return folder


def _opset(version: int) -> Callable[[onnx.ModelProto], None]:
    def fn(m: onnx.ModelProto) -> None:
        for o in m.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = version

    return fn


def _drop_default_opset(m: onnx.ModelProto) -> None:
    keep = [o for o in m.opset_import if o.domain not in ("", "ai.onnx")]
    del m.opset_import[:]
    m.opset_import.extend(keep)


def _vi(name: str, dtype: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _plain_matmul(w: Path, m: Path) -> Path:
    weight = numpy_helper.from_array(np.ones((8, 4), np.float32), "W")
    return tiny_model(w, [helper.make_node("MatMul", ["x", "W"], ["y"])], [_vi("x", TensorProto.FLOAT, [1, 8])],
                      [_vi("y", TensorProto.FLOAT, [1, 4])], [weight])


def _no_matmul(w: Path, m: Path) -> Path:
    return tiny_model(w, [helper.make_node("Identity", ["x"], ["y"])], [_vi("x", TensorProto.FLOAT, [1, 8])],
                      [_vi("y", TensorProto.FLOAT, [1, 8])], [])


def _not_a_decoder(w: Path, m: Path) -> list[str]:
    folder = _no_matmul(w, m)
    shutil.copy(m / "tokenizer.json", folder / "tokenizer.json")
    return ["eval", str(folder), "--text", str(text_file(w, b"some words to score"))]


MODEL_FILE: list[Case] = [
    Case("onnx-truncated", lambda w, m: quantize(_trunc(copy_model(m, w), "model.onnx", frac=0.3), w),
         3, "is not a valid ONNX model (truncated or garbled protobuf)"),
    Case("onnx-garbled", lambda w, m: quantize(_garble(copy_model(m, w)), w),
         3, "is not a valid ONNX model (truncated or garbled protobuf)"),
    Case("onnx-empty-file", lambda w, m: quantize(_trunc(copy_model(m, w), "model.onnx", size=0), w),
         3, "its graph is empty"),
    Case("onnx-is-a-folder", lambda w, m: quantize((w / "m" / "model.onnx").mkdir(parents=True) or w / "m", w),
         3, "has no model.onnx: not a model folder"),
    Case("input-is-a-gguf-file", lambda w, m: quantize(text_file(w, b"GGUF" + bytes(64), "x.gguf"), w),
         3, "is not a model folder"),
    Case("input-is-another-onnx-file", lambda w, m: quantize(Path(shutil.copy(m / "model.onnx", w / "other.onnx")), w),
         3, "expected the model folder"),
    Case("opset-too-old", lambda w, m: quantize(edit_proto(copy_model(m, w), _opset(9)), w),
         5, "opset 9 of the default ONNX domain is not supported (qcompiler reads opsets 14-23)"),
    Case("opset-too-new", lambda w, m: quantize(edit_proto(copy_model(m, w), _opset(30)), w),
         5, "opset 30 of the default ONNX domain is not supported"),
    Case("opset-missing", lambda w, m: quantize(edit_proto(copy_model(m, w), _drop_default_opset), w),
         5, "imports no opset of the default ONNX domain"),
]

EXTERNAL_DATA: list[Case] = [
    Case("external-data-missing", lambda w, m: quantize(_rm(copy_model(m, w), "model.onnx_data"), w),
         3, "missing external-data file 'model.onnx_data'"),
    Case("external-data-truncated", lambda w, m: quantize(_trunc(copy_model(m, w), "model.onnx_data", frac=0.5), w),
         3, "external-data file 'model.onnx_data' is truncated"),
    Case("external-data-hard-linked", lambda w, m: quantize(_hard_link(copy_model(m, w), "model.onnx_data"), w),
         3, "external-data file 'model.onnx_data' in"),
    Case("external-data-truncated-no-length",
         lambda w, m: quantize(_trunc(edit_proto(copy_model(m, w), set_external_field("length", None, every=True)),
                                      "model.onnx_data", size=1000), w),
         3, "is truncated: initializer 'model.embed_tokens.weight' needs bytes 0..65536 but the file has 1000"),
    Case("external-length-too-small", lambda w, m: quantize(edit_proto(copy_model(m, w), set_external_field("length", "8")), w),
         3, "external-data length 8 is smaller than its shape [256, 64] needs (65536 bytes)"),
    Case("external-offset-garbage", lambda w, m: quantize(edit_proto(copy_model(m, w), set_external_field("offset", "abc")), w),
         3, "external-data offset 'abc' is not a non-negative integer"),
    Case("external-offset-negative", lambda w, m: quantize(edit_proto(copy_model(m, w), set_external_field("offset", "-100")), w),
         3, "external-data offset '-100' is not a non-negative integer"),
    Case("external-location-dotdot",
         lambda w, m: quantize(edit_proto(copy_model(m, w), set_external_field("location", "../m2/model.onnx_data")), w),
         3, "external-data location '../m2/model.onnx_data' escapes the model folder"),
    Case("external-location-absolute",
         lambda w, m: quantize(edit_proto(copy_model(m, w), set_external_field("location", str(m / "model.onnx_data"))), w),
         3, "escapes the model folder"),
    Case("external-location-symlink-outside", lambda w, m: quantize(_symlink_outside(w, m), w),
         3, "resolves outside the model folder"),
    Case("eval-external-location-dotdot",
         lambda w, m: ["eval", str(edit_proto(copy_model(m, w), set_external_field("location", "../x/model.onnx_data"))),
                       "--text", str(text_file(w, b"some text"))],
         3, "escapes the model folder"),
]

WEIGHTS: list[Case] = [
    Case("weight-nan", lambda w, m: quantize(_poisoned(m, w, np.nan), w),
         3, "tensor '/model/layers.1/mlp/up_proj.weight' [64, 160] holds 1 NaN/Inf value(s), the first at [3, 4]"),
    Case("weight-inf", lambda w, m: quantize(_poisoned(m, w, -np.inf), w),
         3, "holds 1 NaN/Inf value(s)"),
    Case("weight-nan-skipped-by-option",
         lambda w, m: quantize(_poisoned(m, w, np.nan), w, "--passes", "quantize-weights{nonfinite=skip}"),
         0, after=check_nonfinite_skipped),
    Case("unknown-custom-op", lambda w, m: quantize(with_softcap(m, w), w), 0, after=check_unknown_op_kept),
    Case("shared-initializer", lambda w, m: quantize(with_shared_weight(m, w), w), 0, after=check_shared_reported),
    Case("no-decoder-structure", lambda w, m: quantize(_plain_matmul(w, m), w),
         5, "no linear layer was recognized"),
    Case("no-matmul-at-all", lambda w, m: quantize(_no_matmul(w, m), w), 5, "the model has no MatMul/Gemm"),
    Case("eval-not-a-decoder", _not_a_decoder, 5, "has no 'input_ids' input"),
]

TEXT: list[Case] = [
    Case("text-empty", eval_with_text(b""), 3, "holds no text (empty or whitespace only)"),
    Case("text-whitespace-only", eval_with_text(b" \n\t\n"), 3, "holds no text"),
    Case("text-not-utf8", eval_with_text(b"caf\xe9 cr\xe8me"), 3, "is not UTF-8 text (invalid byte at offset 3)"),
    Case("text-missing", lambda w, m: ["eval", str(m), "--text", str(w / "nope.txt")], 3, "no such text file or folder"),
    Case("text-jsonl-garbled", eval_with_text(b'{"text": "ok"}\n{"text": \n', "t.jsonl"), 3, "t.jsonl:2: not valid JSON"),
    Case("text-jsonl-no-text-field", eval_with_text(b'{"body": "x"}\n', "t.jsonl"), 3,
         't.jsonl:1: expected an object with a "text" string field'),
    Case("text-folder-without-txt", lambda w, m: ["eval", str(m), "--text", str(_mkdir(w / "texts"))], 3,
         "holds no .txt files"),
    Case("text-one-token", eval_with_text(b"a"), 3, "the text has only 1 token(s); at least 2 are needed"),
    Case("seq-len-one", lambda w, m: [*eval_with_text(b"abc")(w, m), "--seq-len", "1"], 2, "--seq-len must be at least 2"),
    Case("tokenizer-garbled", lambda w, m: ["eval", str(_write(copy_model(m, w), "tokenizer.json", b"{garbage")),
                                            "--text", str(text_file(w, b"abc"))],
         3, "is not a valid tokenizer.json"),
    Case("tokenizer-missing", lambda w, m: ["eval", str(_rm(copy_model(m, w), "tokenizer.json")),
                                            "--text", str(text_file(w, b"abc"))],
         3, "has no tokenizer.json"),
    Case("calib-text-empty",
         lambda w, m: quantize(m, w, "--passes", "insert-qdq{act=static}", "--calib", str(text_file(w, b""))),
         3, "holds no text"),
    Case("calib-text-not-utf8",
         lambda w, m: quantize(m, w, "--passes", "insert-qdq{act=static}", "--calib", str(text_file(w, b"\xff\xfe"))),
         3, "is not UTF-8 text"),
]

OPTIONS: list[Case] = [
    Case("config-toml-garbled", lambda w, m: quantize(m, w, "--config", str(text_file(w, b"[quantize\nbits=", "q.toml"))),
         3, "invalid TOML"),
    Case("config-toml-unknown-option",
         lambda w, m: quantize(m, w, "--config", str(text_file(w, b"[quantize]\nrecipe='w4a16-rtn'\nbitz=4\n", "q.toml"))),
         2, "unknown option(s) bitz"),
    Case("config-missing", lambda w, m: quantize(m, w, "--recipe", "w4a16-rtn", "--config", str(w / "none.toml")),
         3, "no such config file"),
    Case("pass-option-invalid", lambda w, m: quantize(m, w, "--passes", "quantize-weights{bits=5}"),
         2, "bits must be 2, 3, 4 or 8, got 5"),
    Case("pass-unknown", lambda w, m: quantize(m, w, "--passes", "quantize-everything"), 2, "unknown pass 'quantize-everything'"),
    Case("pipeline-unbalanced", lambda w, m: quantize(m, w, "--passes", "quantize-weights{bits=4"), 2, "unbalanced '{'"),
]

OUTPUT: list[Case] = [
    Case("output-under-a-file",
         lambda w, m: ["quantize", str(m), str(text_file(w, b"x", "file") / "sub" / "out"), "--recipe", "w4a16-rtn"],
         4, "cannot create"),
]

EXPORT: list[Case] = [
    Case("export-pickle-only-checkpoint",
         lambda w, m: ["export", str(_pickle_folder(w)), str(w / OUT)], 3,
         "holds weights only as pickle files (pytorch_model.bin); qcompiler never unpickles model files"),
    Case("export-remote-code-without-flag",
         lambda w, m: ["export", str(remote_code_folder(w)), str(w / OUT)], 3,
         "trust_remote_code", after=check_no_marker),]


def _rm(folder: Path, name: str) -> Path:
    (folder / name).unlink()
    return folder


def _write(folder: Path, name: str, data: bytes) -> Path:
    (folder / name).write_bytes(data)
    return folder


def _mkdir(p: Path) -> Path:
    p.mkdir()
    (p / "notes.md").write_text("not a .txt file")
    return p


def _poisoned(model: Path, work: Path, value: float) -> Path:
    folder = copy_model(model, work)
    poison_weight(folder, "layers.1/mlp/up_proj", (3, 4), value)
    return folder


def _pickle_folder(work: Path) -> Path:
    folder = work / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return folder


# ----------------------------------------------------------------------------- issue 19: more faults

#: A process id above Linux's largest pid_max (2^22): never a live process.
DEAD_PID = 4_194_305
CALIB_WORDS = b" ".join([b"the model quantizes weights and activations per token with outlier channels"] * 60)


def calib_file(work: Path) -> Path:
    return text_file(work, CALIB_WORDS, "calib.txt")


def small_calib(work: Path) -> list[str]:
    return ["--calib", str(calib_file(work)), "--calib-samples", "2", "--seq-len", "32"]


def poison_inline(name_part: str, index: int, value: float) -> Callable[[onnx.ModelProto], None]:
    """Write ``value`` at flat ``index`` of the first inline initializer whose name holds ``name_part``."""

    def fn(m: onnx.ModelProto) -> None:
        t = next(t for t in m.graph.initializer if name_part in t.name and t.data_location != TensorProto.EXTERNAL)
        a = numpy_helper.to_array(t).copy()
        a.reshape(-1)[index] = value
        t.CopyFrom(numpy_helper.from_array(a, t.name))

    return fn


def _summary_bits_group(bits: int, group: int) -> Callable[[Path], None]:
    def check(work: Path) -> None:
        s = _summary(work)
        assert s["options"]["bits"] == bits and s["options"]["group_size"] == group, s["options"]
        nbits = [n for n in _ops(work) if n.op_type == "MatMulNBits"]
        assert nbits, "no MatMulNBits in the output"
        for n in nbits:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            assert attrs["bits"] == bits and attrs["block_size"] == group, attrs

    return check


def check_options_applied_only(work: Path) -> None:
    opts = _summary(work)["options"]
    assert opts["bits"] == 8 and "group_size" not in opts and "alpha" not in opts and "budget" not in opts, opts


def _gguf(work: Path, cut: int | None = None, name: str = "tiny.gguf") -> Path:
    """A small valid GGUF file (two float tensors), optionally cut to ``cut`` bytes (negative: from the end)."""
    import gguf

    folder = work / "gg"
    folder.mkdir(exist_ok=True)
    path = folder / name
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((64, 32), np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if cut is not None:
        os.truncate(path, cut if cut >= 0 else path.stat().st_size + cut)
    return path


def remote_code_builtin(work: Path) -> Path:
    """``auto_map`` pointing at shipped code while ``model_type`` names a built-in architecture."""
    folder = remote_code_folder(work)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, num_hidden_layers=1,
               num_attention_heads=4, intermediate_size=128, vocab_size=256)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _external_offset_past_end(w: Path, m: Path) -> Path:
    folder = copy_model(m, w)
    size = (folder / "model.onnx_data").stat().st_size
    return edit_proto(folder, set_external_field("offset", str(size + 4096)))


def _nested_input(w: Path, m: Path) -> Path:
    par = w / "par"
    par.mkdir()
    copy_model(m, par, "in")
    (par / "unrelated.txt").write_text("someone else's file")
    return par


def _user_folder(w: Path) -> Path:
    out = w / OUT
    out.mkdir()
    (out / "notes.txt").write_text("the user's own notes")
    return out


def _stale_partial(w: Path) -> None:
    junk = w / f".{OUT}.partial-{DEAD_PID}-abc123"
    junk.mkdir()
    (junk / "model.onnx_data").write_bytes(bytes(4096))


def _stale_old(w: Path, m: Path) -> list[str]:
    """A run killed after moving the previous output aside, before moving the new one in."""
    old = w / f".{OUT}.old-{DEAD_PID}"
    shutil.copytree(m, old)
    (old / ".qcompiler-output").write_text("previous output\n")
    return quantize(m, w)


def check_old_restored(work: Path) -> None:
    assert (work / OUT / ".qcompiler-output").read_text() == "previous output\n"


def _disk_full_on_tokenizer(monkeypatch, work: Path) -> None:
    import errno

    real = shutil.copy2

    def copy2(src, dst, **kw):
        if Path(src).name == "tokenizer.json":  # shutil names the *source* in this error
            err = OSError(errno.ENOSPC, "No space left on device")
            err.filename, err.filename2 = str(src), str(dst)
            raise err
        return real(src, dst, **kw)

    monkeypatch.setattr(shutil, "copy2", copy2)


def _unwritable_parent(monkeypatch, work: Path) -> None:
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == work.resolve() else real(p, mode, **kw))


def _toml(w: Path, text: str) -> str:
    return str(text_file(w, text.encode(), "q.toml"))


W8A8_NAN = "tensor '/model/layers.1/mlp/up_proj.weight' [64, 160] holds 1 NaN/Inf value(s), the first at [3, 4]"

MODEL_FILE += [
    Case("generate-onnx-truncated",
         lambda w, m: ["generate", str(_trunc(copy_model(m, w), "model.onnx", frac=0.3)), "--prompt", "hi"],
         3, "is not a valid ONNX model (truncated or garbled protobuf)"),
    Case("check-onnx-truncated",
         lambda w, m: ["check", str(_trunc(copy_model(m, w), "model.onnx", frac=0.3)), "--target", "cpu"],
         3, "is not a valid ONNX model (truncated or garbled protobuf)"),
]
EXTERNAL_DATA += [
    Case("external-offset-past-end", lambda w, m: quantize(_external_offset_past_end(w, m), w),
         3, "points past the end of 'model.onnx_data'"),
    Case("generate-external-data-truncated",
         lambda w, m: ["generate", str(_trunc(copy_model(m, w), "model.onnx_data", frac=0.5)), "--prompt", "hi"],
         3, "is truncated: initializer"),
]
WEIGHTS += [
    Case("weight-nan-w8a8-dynamic", lambda w, m: quantize(_poisoned(m, w, np.nan), w, "--recipe", "w8a8-dynamic"),
         3, W8A8_NAN),
    Case("weight-nan-w8a8-smooth",
         lambda w, m: quantize(_poisoned(m, w, np.nan), w, "--recipe", "w8a8-smooth", *small_calib(w)), 3, W8A8_NAN),
    Case("weight-inf-w8a8-static",
         lambda w, m: quantize(_poisoned(m, w, np.inf), w, "--recipe", "w8a8-static", *small_calib(w)), 3, W8A8_NAN),
    Case("weight-inf-w4a16-hqq", lambda w, m: quantize(_poisoned(m, w, -np.inf), w, "--recipe", "w4a16-hqq"),
         3, W8A8_NAN),
    Case("weight-nan-w4a16-gptq",
         lambda w, m: quantize(_poisoned(m, w, np.nan), w, "--recipe", "w4a16-gptq", *small_calib(w)), 3, W8A8_NAN),
    Case("weight-nan-passes-insert-qdq", lambda w, m: quantize(_poisoned(m, w, np.nan), w, "--passes", "insert-qdq"),
         3, W8A8_NAN),
    Case("norm-weight-nan-w8a8-dynamic",
         lambda w, m: quantize(edit_proto(copy_model(m, w), poison_inline("layers.0/input_layernorm", 5, np.nan)), w,
                               "--recipe", "w8a8-dynamic"),
         3, "tensor '/model/layers.0/input_layernorm.weight' [64] holds 1 NaN/Inf value(s), the first at [5]"),
    Case("norm-weight-inf-w4a16-rtn",
         lambda w, m: quantize(edit_proto(copy_model(m, w), poison_inline("model/norm", 0, np.inf), ), w),
         3, "tensor '/model/norm.weight' [64] holds 1 NaN/Inf value(s), the first at [0]"),
    Case("analyze-weight-nan",
         lambda w, m: ["analyze", str(_poisoned(m, w, np.nan)), "--out", str(w / OUT), *small_calib(w)[:2]],
         3, W8A8_NAN),
]
OPTIONS += [
    Case("bits-3-with-w4a16-rtn", lambda w, m: quantize(m, w, "--recipe", "w4a16-rtn", "--bits", "3"),
         2, "--bits 3 is not used by recipe 'w4a16-rtn', which writes 4-bit weights"),
    Case("bits-16-with-w4a16-rtn", lambda w, m: quantize(m, w, "--recipe", "w4a16-rtn", "--bits", "16"),
         2, "--bits 16 is not used by recipe 'w4a16-rtn'"),
    Case("bits-4-group-32-honoured",
         lambda w, m: quantize(m, w, "--recipe", "w4a16-rtn", "--bits", "4", "--group-size", "32"),
         0, after=_summary_bits_group(4, 32)),
    Case("w8a16-group-64-honoured", lambda w, m: quantize(m, w, "--recipe", "w8a16-rtn", "--group-size", "64"),
         0, after=_summary_bits_group(8, 64)),
    Case("bits-with-w8a8", lambda w, m: quantize(m, w, "--recipe", "w8a8-dynamic", "--bits", "4"),
         2, "--bits 4 is not used by recipe 'w8a8-dynamic', which writes 8-bit weights"),
    Case("group-size-with-w8a8", lambda w, m: quantize(m, w, "--recipe", "w8a8-dynamic", "--group-size", "32"),
         2, "--group-size is not used by recipe 'w8a8-dynamic'"),
    Case("w8a8-records-only-applied", lambda w, m: quantize(m, w, "--recipe", "w8a8-dynamic"),
         0, after=check_options_applied_only),
    Case("alpha-with-w4a16-rtn", lambda w, m: quantize(m, w, "--recipe", "w4a16-rtn", "--alpha", "0.5"),
         2, "--alpha is not used by recipe 'w4a16-rtn'"),
    Case("calib-with-w4a16-hqq", lambda w, m: quantize(m, w, "--recipe", "w4a16-hqq", *small_calib(w)[:2]),
         2, "--calib is not used by recipe 'w4a16-hqq'"),
    Case("lm-head-with-w4a16-awq", lambda w, m: quantize(m, w, "--recipe", "w4a16-awq", "--lm-head", *small_calib(w)),
         2, "--lm-head is not used by recipe 'w4a16-awq'"),
    Case("accuracy-level-on-npu",
         lambda w, m: quantize(m, w, "--recipe", "w4a16-rtn", "--target", "npu", "--accuracy-level", "4"),
         2, "--accuracy-level is not used by recipe 'w4a16-rtn' on target 'npu'"),
    Case("static-shapes-on-cpu", lambda w, m: quantize(m, w, "--recipe", "w4a16-rtn", "--static-shapes", "64"),
         2, "--static-shapes is not used by recipe 'w4a16-rtn' on target 'cpu'"),
    Case("bits-with-passes", lambda w, m: quantize(m, w, "--passes", "quantize-weights", "--bits", "3"),
         2, "--bits is not used by a --passes pipeline"),
    Case("budget-with-w8a8-smooth",
         lambda w, m: quantize(m, w, "--recipe", "w8a8-smooth", "--budget", "4.5", *small_calib(w)),
         2, "--budget is not used by recipe 'w8a8-smooth'"),
    Case("config-toml-unused-option",
         lambda w, m: quantize(m, w, "--config", _toml(w, "[quantize]\nrecipe='w8a8-dynamic'\ngroup_size=32\n")),
         2, "--group-size is not used by recipe 'w8a8-dynamic'"),
]
OUTPUT += [
    Case("quantize-out-is-in", lambda w, m: ["quantize", str(copy_model(m, w)), str(w / "m"), "--recipe", "w4a16-rtn",
                                             "--force"],
         4, "is the input"),
    Case("quantize-out-holds-in",
         lambda w, m: ["quantize", str(_nested_input(w, m) / "in"), str(w / "par"), "--recipe", "w4a16-rtn", "--force"],
         4, "contains the input"),
    Case("quantize-out-inside-in",
         lambda w, m: ["quantize", str(copy_model(m, w)), str(w / "m" / "sub"), "--recipe", "w4a16-rtn", "--force"],
         4, "is inside the input"),
    Case("quantize-out-symlink-to-in",
         lambda w, m: ["quantize", str(copy_model(m, w)), str(_symlink(w / "link", w / "m")), "--recipe", "w4a16-rtn",
                       "--force"],
         4, "is the input"),
    Case("quantize-out-holds-calib",
         lambda w, m: quantize(m, w, "--recipe", "w8a8-smooth", "--calib", str(_in_user_out(w)), "--force"),
         4, "contains the input", keeps_out=True),
    Case("quantize-dump-ir-is-in",
         lambda w, m: ["quantize", str(copy_model(m, w)), str(w / OUT), "--recipe", "w4a16-rtn", "--dump-ir",
                       str(w / "m")],
         4, "the --dump-ir folder"),
    Case("export-out-is-src", lambda w, m: ["export", str(copy_model(m, w)), str(w / "m"), "--force"], 4, "is the input"),
    Case("export-out-holds-gguf", lambda w, m: ["export", str(_gguf(w)), str(w / "gg"), "--force"],
         4, "contains the input"),
    Case("calibrate-out-is-model",
         lambda w, m: ["calibrate", str(copy_model(m, w)), "--calib", str(calib_file(w)), "--out", str(w / "m"),
                       "--force"],
         4, "is the input"),
    Case("calibrate-out-is-user-folder",
         lambda w, m: ["calibrate", str(m), "--calib", str(calib_file(w)), "--out", str(_user_folder(w)), "--force"],
         4, "is not a statistics folder", keeps_out=True),
    Case("analyze-out-is-model",
         lambda w, m: ["analyze", str(copy_model(m, w)), "--calib", str(calib_file(w)), "--out", str(w / "m"),
                       "--force"],
         4, "is the input"),
    Case("force-on-a-user-folder",
         lambda w, m: [*quantize(m, w), "--force"] if _user_folder(w) else [],
         4, "was not written by qcompiler", keeps_out=True),
    Case("stale-partial-of-a-killed-run-removed", lambda w, m: _stale_partial(w) or quantize(m, w), 0),
    Case("stale-old-of-a-killed-run-restored", _stale_old, 4, "already exists; pass --force",
         after=check_old_restored, keeps_out=True),
    Case("disk-full-copying-the-tokenizer", lambda w, m: quantize(m, w), 4,
         "/out/tokenizer.json: No space left on device", patch=_disk_full_on_tokenizer),
    Case("output-parent-not-writable", lambda w, m: quantize(m, w), 4, "permission denied", patch=_unwritable_parent),
]
EXPORT += [
    Case("export-gguf-truncated", lambda w, m: ["export", str(_gguf(w, cut=-3000)), str(w / OUT)],
         3, "gg/tiny.gguf is truncated: its header's tensor table needs"),
    Case("export-gguf-header-truncated", lambda w, m: ["export", str(_gguf(w, cut=40)), str(w / OUT)],
         3, "is truncated: the file ends inside its GGUF header"),
    Case("export-gguf-bad-magic", lambda w, m: ["export", str(text_file(w, b"GGUX" + bytes(64), "x.gguf")), str(w / OUT)],
         3, "is not a GGUF file (bad magic bytes"),
    Case("export-remote-code-builtin-type", lambda w, m: ["export", str(remote_code_builtin(w)), str(w / OUT)],
         3, "ships its own model code (config.json auto_map", after=check_no_marker),
]


def _symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def _in_user_out(w: Path) -> Path:
    return Path(shutil.copy(calib_file(w), _user_folder(w) / "calib.txt"))


#: The corpus by fault class: one parametrised test per class (``test_corpus.py``).
CORPUS: dict[str, list[Case]] = {
    "model-file": MODEL_FILE, "external-data": EXTERNAL_DATA, "weights": WEIGHTS, "text": TEXT,
    "options": OPTIONS, "output": OUTPUT, "export": EXPORT,
}
CASES = [c for cases in CORPUS.values() for c in cases]

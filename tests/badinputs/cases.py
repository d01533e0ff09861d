"""The bad-input corpus: one row per broken input, with the exit code and message it must give.

Every input is made in the test's temporary folder from the seeded synthetic model
(``synthetic_dir``), so the corpus is a table of *recipes for* bad files rather than
binary blobs.  ``argv(work, model)`` builds the input under ``work`` (``model`` is the
read-only synthetic folder) and returns the ``qc`` arguments; the output, when there is
one, is always ``work / "out"``.  A non-zero case must print one line
``qc: error: <... message ...>`` and leave no output and no partial folder; a zero case
(inputs qcompiler accepts but must handle with care) checks its result in ``after``.

Exit codes (``qcompiler.errors``): 2 usage/pipeline, 3 bad input file, 4 output cannot
be written, 5 unsupported model structure.
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


CASES: list[Case] = [
    # ---- the model file itself
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
    # ---- external data
    Case("external-data-missing", lambda w, m: quantize(_rm(copy_model(m, w), "model.onnx_data"), w),
         3, "missing external-data file 'model.onnx_data'"),
    Case("external-data-truncated", lambda w, m: quantize(_trunc(copy_model(m, w), "model.onnx_data", frac=0.5), w),
         3, "external-data file 'model.onnx_data' is truncated"),
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
    # ---- weights
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
    # ---- text (evaluation and calibration)
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
    Case("seq-len-one", lambda w, m: [*eval_with_text(b"abc")(w, m), "--seq-len", "1"], 3, "--seq-len must be at least 2"),
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
    # ---- options
    Case("config-toml-garbled", lambda w, m: quantize(m, w, "--config", str(text_file(w, b"[quantize\nbits=", "q.toml"))),
         3, "invalid TOML"),
    Case("config-toml-unknown-option",
         lambda w, m: quantize(m, w, "--config", str(text_file(w, b"[quantize]\nrecipe='w4a16-rtn'\nbitz=4\n", "q.toml"))),
         3, "unknown option(s) bitz"),
    Case("config-missing", lambda w, m: quantize(m, w, "--recipe", "w4a16-rtn", "--config", str(w / "none.toml")),
         3, "no such config file"),
    Case("pass-option-invalid", lambda w, m: quantize(m, w, "--passes", "quantize-weights{bits=5}"),
         2, "bits must be 2, 3, 4 or 8, got 5"),
    Case("pass-unknown", lambda w, m: quantize(m, w, "--passes", "quantize-everything"), 2, "unknown pass 'quantize-everything'"),
    Case("pipeline-unbalanced", lambda w, m: quantize(m, w, "--passes", "quantize-weights{bits=4"), 2, "unbalanced '{'"),
    # ---- output
    Case("output-under-a-file",
         lambda w, m: ["quantize", str(m), str(text_file(w, b"x", "file") / "sub" / "out"), "--recipe", "w4a16-rtn"],
         4, "cannot create"),
    # ---- export: never unpickle, never run code shipped with a model unless asked
    Case("export-pickle-only-checkpoint",
         lambda w, m: ["export", str(_pickle_folder(w)), str(w / OUT)], 3,
         "holds weights only as pickle files (pytorch_model.bin); qcompiler never unpickles model files"),
    Case("export-remote-code-without-flag",
         lambda w, m: ["export", str(remote_code_folder(w)), str(w / OUT)], 3,
         "trust_remote_code", after=check_no_marker),
]


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

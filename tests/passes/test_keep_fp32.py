"""keep-fp32: an fp16 graph whose down_proj overflows gets a float32 island and makes no inf.

The seeded synthetic llama (``models/synthetic.py``, no massive bump) gets a super weight in
layer 0's ``down_proj``: the first token's largest MLP input channel (measured on the float32
model) times a weight that writes 1.5·10⁵ into one residual channel there (and proportionally
on other tokens), past fp16's 65504 (``inf``), as massive activations do in real models.  Without the pass the fp16
graph's residual stream holds ``inf`` and the logits are wrong; with it, they are finite and
within fp16 rounding of the float32 model (through a recipe: of the same recipe on it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from qcompiler.models.half import inject_overflow, to_float_type
from qcompiler.models.synthetic import SyntheticConfig, build_llama, write_model_dir
from qcompiler.passes.keep_fp32 import KeepFp32

from qcompiler.irutil import load_model, save_model
from qcompiler.quantize import quantize
from qcompiler.recipes import QuantizeOptions
from qcompiler.runtime import DecoderRunner
from tests.conftest import CALIB_TEXT
from tests.helpers import WINDOW, run_logits
from tests.passes.calib_helpers import calib_context

CFG = SyntheticConfig(kv_cache=False, massive_dim=None, super_weight=None)
MASSIVE = 1.5e5
COL = 11  # the residual channel the super weight writes


def _values(folder: Path, names: list[str], ids: np.ndarray) -> list[np.ndarray]:
    proto = onnx.load(str(folder / "model.onnx"))
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(names, DecoderRunner(sess, require_logits=False).feeds(ids))


def _output_of(proto: onnx.ModelProto, prefix: str) -> str:
    return next(n.output[0] for n in proto.graph.node if n.name.startswith(prefix))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keep_fp32")
    proto = inject_overflow(build_llama(CFG)[0], MASSIVE, COL)
    return {"fp32": write_model_dir(proto, root / "fp32", CFG),
            "fp16": write_model_dir(to_float_type(proto, ir.DataType.FLOAT16), root / "fp16", CFG),
            "safe": write_model_dir(to_float_type(build_llama(CFG)[0], ir.DataType.FLOAT16), root / "safe", CFG)}


def test_overflow_becomes_island(folders: dict[str, Path], tmp_path: Path) -> None:
    ids = WINDOW[None]
    ref = run_logits(folders["fp32"], ids)
    residual = _output_of(onnx.load(str(folders["fp16"] / "model.onnx"), load_external_data=False),
                          "/model/layers.0/Add_1_")
    (res16,) = _values(folders["fp16"], [residual], ids)
    assert np.isinf(res16).any()  # the fp16 graph overflows on the first token
    before = run_logits(folders["fp16"], ids)
    err_before = float(np.nan_to_num(np.abs(before - ref), nan=np.inf).max())

    model = load_model(folders["fp16"] / "model.onnx")
    p = KeepFp32(context=calib_context(folders["fp16"], CALIB_TEXT, samples=4, seq_len=64))
    assert p(model).modified
    report = p.context.report["keep-fp32"]
    kept = [n for island in report["islands"] for n in island["nodes"]]
    assert any("down_proj" in n for n in kept) and any("/model/layers.1/Add_1_" in n for n in kept)
    assert report["max_abs"] > 65504
    (tmp_path / "m").mkdir()
    save_model(model, tmp_path / "m" / "model.onnx")
    (res,) = _values(tmp_path / "m", [residual], ids)
    assert res.dtype == np.float32 and np.isfinite(res).all() and np.abs(res).max() > 65504
    after = run_logits(tmp_path / "m", ids)
    err_after = float(np.abs(after - ref).max())
    print(f"max |logit - fp32| without keep-fp32: {err_before:.4g}, with: {err_after:.4g}")
    # ORT's CPU provider computes the plain graph's Add/Mul/norm in float32 between inserted Casts, so
    # only the value written out in fp16 is inf here; fp16 kernels (MatMulNBits, SkipSimplifiedLayer-
    # Normalization, CUDA) compute in fp16 and make inf logits (test_recipes_keep_islands)
    assert np.isfinite(after).all()
    assert err_after <= err_before + 1e-3 and err_after < 0.05 * np.abs(ref).max()


def test_fp16_safe_model_gets_no_island(folders: dict[str, Path]) -> None:
    model = load_model(folders["safe"] / "model.onnx")
    p = KeepFp32(context=calib_context(folders["safe"], CALIB_TEXT, samples=4, seq_len=64))
    assert not p(model).modified
    assert p.context.report["keep-fp32"]["islands"] == []


@pytest.mark.parametrize("recipe", ["w4a16-rtn", "w8a8-dynamic"])
def test_recipes_keep_islands(folders: dict[str, Path], tmp_path: Path, recipe: str) -> None:
    """The recipe on the fp16 graph with --calib: islands, finite logits, as close to the float32 model
    as the same recipe on the float32 graph (the super weight turns any rounding difference of its
    input channel into 6·10³ times as much in the residual, so both recipes err by tokens)."""
    ids = WINDOW[None]
    ref = run_logits(folders["fp32"], ids)
    quantize(folders["fp32"], tmp_path / "q32", recipe=recipe, options=QuantizeOptions(group_size=32))
    calib = {"calib": str(CALIB_TEXT), "calib_samples": 4, "seq_len": 64}
    summary = quantize(folders["fp16"], tmp_path / "q16", recipe=recipe, options=QuantizeOptions(group_size=32, **calib))
    assert summary["pipeline"].startswith("canonicalize,keep-fp32")
    assert summary["report"]["keep-fp32"]["islands"]
    assert json.loads((tmp_path / "q16" / "quantization.json").read_text())["report"]["keep-fp32"]["islands"]
    quantize(folders["fp16"], tmp_path / "p16", recipe=recipe, options=QuantizeOptions(group_size=32))
    q32, q16, plain = (run_logits(tmp_path / k, ids) for k in ("q32", "q16", "p16"))
    e32, e16 = float(np.abs(q32 - ref).max()), float(np.abs(q16 - ref).max())
    e_plain = float(np.nan_to_num(np.abs(plain - ref), nan=np.inf).max())
    print(f"{recipe}: max |logit - float32 model|: fp32 graph {e32:.4g}; fp16 graph without keep-fp32 {e_plain:.4g}, "
          f"with {e16:.4g}")
    assert not np.isfinite(plain).all()
    assert np.isfinite(q16).all() and e16 < 1.5 * e32 + 0.05 * np.abs(ref).max()


def test_fp16_export_with_calib_keeps_islands_in_place(folders: dict[str, Path], tmp_path: Path, capsys) -> None:
    """``qc export --dtype fp16 --calib TEXT``'s step on an exported folder: the model rewritten in
    place with its island, the report in qcompiler_export.json; --calib without fp16 is refused."""
    import shutil

    from qcompiler.cli import main
    from qcompiler.quantize import keep_fp32_in_place

    folder = tmp_path / "export"
    shutil.copytree(folders["fp16"], folder)
    (folder / "qcompiler_export.json").write_text(json.dumps({"dtype": "fp16"}))
    files = {p.name for p in folder.iterdir()} | {".qcompiler-output"}  # (the marker of a qcompiler output)
    report = keep_fp32_in_place(folder, str(CALIB_TEXT), samples=4, seq_len=64)
    assert {p.name for p in folder.iterdir()} == files  # the export's other files come along
    assert not list(tmp_path.glob(".export.*"))  # the folder was swapped whole: no partial or old copy left
    info = json.loads((folder / "qcompiler_export.json").read_text())
    assert info["dtype"] == "fp16" and info["keep_fp32"]["islands"] == report["islands"] != []
    residual = _output_of(onnx.load(str(folders["fp16"] / "model.onnx"), load_external_data=False),
                          "/model/layers.0/Add_1_")
    (res,) = _values(folder, [residual], WINDOW[None])
    assert res.dtype == np.float32 and np.isfinite(res).all()
    assert not list(folder.glob(".*tmp*"))
    rc = main(["export", "no-such-model", str(tmp_path / "x"), "--dtype", "fp32", "--calib", str(CALIB_TEXT)])
    assert rc != 0 and "needs --dtype fp16" in capsys.readouterr().err

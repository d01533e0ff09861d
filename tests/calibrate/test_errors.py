"""Bad input: empty or too-short text, NaN/Inf activations, statistics of another model, bad requests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from qcompiler.models.synthetic import SyntheticConfig, build_model_dir

from qcompiler.calibrate import CalibrationStats, StatRequest, linear_inputs, linear_requests, parse_memory
from qcompiler.data import tokenize
from qcompiler.errors import CalibrationError, InputError, OptionError, OutputError, QCError
from qcompiler.irutil import load_model

from .refs import reference_activations
from .test_engine import calibrator


def test_empty_calibration_file(synthetic_nokv_dir, tmp_path: Path) -> None:
    model_dir, _ = synthetic_nokv_dir
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cal = calibrator(model_dir, empty, tmp_path)
    with pytest.raises(InputError, match=r"empty\.txt holds no text"):
        cal(load_model(model_dir / "model.onnx"), [StatRequest("x", ("minmax",))])


def test_text_shorter_than_one_window(synthetic_nokv_dir, tmp_path: Path) -> None:
    model_dir, _ = synthetic_nokv_dir
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "only a few words"}\n')
    cal = calibrator(model_dir, short, tmp_path, seq_len=64)
    with pytest.raises(CalibrationError, match=r"short\.jsonl: the calibration text has 16 tokens, fewer than one window of --seq-len 64"):
        cal.windows  # noqa: B018


def test_bad_requests(synthetic_nokv_dir, synthetic_text: Path, tmp_path: Path) -> None:
    model_dir, _ = synthetic_nokv_dir
    model = load_model(model_dir / "model.onnx")
    cal = calibrator(model_dir, synthetic_text, tmp_path)
    with pytest.raises(OptionError, match="no value named 'nope' in the model"):
        cal(model, [StatRequest("nope", ("minmax",))])
    with pytest.raises(QCError, match="unknown observer 'median'; known: minmax"):
        StatRequest("x", ("median",))
    with pytest.raises(OptionError, match="no statistics were requested"):
        cal(model, [])
    int_value = next(n.outputs[0].name for n in model.graph if n.op_type == "Range")
    with pytest.raises(CalibrationError, match=f"value '{int_value}' is int64, not a floating-point activation"):
        cal(model, [StatRequest(int_value, ("minmax",))])
    with pytest.raises(QCError, match="--max-memory '4XB': expected a size like 4GB"):
        parse_memory("4XB")
    assert parse_memory("1.5GB") == 3 << 29 and parse_memory("512MiB") == 512 << 20


@pytest.fixture()
def poisoned(synthetic_nokv_dir, tmp_path: Path):
    """A model whose embedding row of 'Z' is +Inf, and text where only window 2 contains a 'Z'."""
    model_dir, _ = synthetic_nokv_dir
    chars = list(("calibrate the model on plain words " * 8)[:4 * 32])
    chars[2 * 32 + 5] = "Z"
    text = tmp_path / "poison.txt"
    text.write_text("".join(chars))
    model = load_model(model_dir / "model.onnx")
    emb = model.graph.initializers["model.embed_tokens.weight"]
    table = emb.const_value.numpy().copy()
    table[int(tokenize(model_dir, "Z")[0])] = np.inf
    emb.const_value = ir.tensor(table, name=emb.name)
    return model_dir, model, text


def test_nonfinite_activation_names_value_and_batch(poisoned, tmp_path: Path) -> None:
    model_dir, model, text = poisoned
    first = next(iter(linear_inputs(model)))
    cal = calibrator(model_dir, text, tmp_path, samples=4, seq_len=32)
    with pytest.raises(CalibrationError, match=f"value '{first}' holds NaN or Inf in calibration batch 2 "
                                               r"\(window 3 of 4\); pass --skip-nonfinite"):
        cal(model, linear_requests(model, ("minmax", "hessian")))


def test_skip_nonfinite_drops_the_batch(poisoned, tmp_path: Path) -> None:
    model_dir, model, text = poisoned
    cal = calibrator(model_dir, text, tmp_path, samples=4, seq_len=32, skip_nonfinite=True)
    requests = linear_requests(model, ("minmax", "hessian"))
    stats = cal(model, requests)
    assert cal.last_run.skipped_windows == [2]
    assert stats.meta["groups"][0]["windows_used"] == 3
    name = requests[0].value
    model_dir2 = tmp_path / "saved"
    model_dir2.mkdir()
    from qcompiler.irutil import save_model

    save_model(model, model_dir2 / "model.onnx")
    ref = reference_activations(model_dir2 / "model.onnx", [name], cal.windows.ids[[0, 1, 3]])[name]
    assert stats.get(name, "minmax").max == ref.max()
    assert stats.get(name, "hessian").rows == len(ref)
    assert np.isfinite(stats.get(name, "hessian").xtx).all()


def test_statistics_of_another_model_are_refused(synthetic_nokv_dir, synthetic_text: Path, tmp_path: Path) -> None:
    model_dir, _ = synthetic_nokv_dir
    other_dir, _ = build_model_dir(tmp_path / "other", SyntheticConfig(kv_cache=False, seed=7))
    out = tmp_path / "stats"
    a = load_model(model_dir / "model.onnx")
    cal = calibrator(model_dir, synthetic_text, tmp_path / "c")
    stats = cal.calibrate_into(a, linear_requests(a, ("minmax",)), out)
    b = load_model(other_dir / "model.onnx")
    cal_b = calibrator(other_dir, synthetic_text, tmp_path / "c")
    with pytest.raises(OutputError, match=r"cannot be reused: they were computed for another model: "
                                               r"model hash [0-9a-f]{12} ≠ [0-9a-f]{12} of this run; pass --force"):
        cal_b.calibrate_into(b, linear_requests(b, ("minmax",)), out)
    other_hash = cal_b.key(b).model_hash
    with pytest.raises(CalibrationError, match=f"another model: model hash {stats.model_hash[:12]} ≠ {other_hash[:12]}"):
        CalibrationStats.load(out, model_hash=other_hash)
    replaced = cal_b.calibrate_into(b, linear_requests(b, ("minmax",)), out, force=True)
    assert replaced.model_hash == other_hash
    # the same model, other data: refused naming the data hash
    (tmp_path / "t2.txt").write_text(synthetic_text.read_text()[::-1])
    cal_c = calibrator(other_dir, tmp_path / "t2.txt", tmp_path / "c")
    with pytest.raises(OutputError, match="other calibration data: data hash"):
        cal_c.calibrate_into(b, linear_requests(b, ("minmax",)), out)


def test_missing_statistic_is_a_clear_error(synthetic_nokv_dir, synthetic_text: Path, tmp_path: Path) -> None:
    model_dir, _ = synthetic_nokv_dir
    model = load_model(model_dir / "model.onnx")
    requests = linear_requests(model, ("minmax",))
    stats = calibrator(model_dir, synthetic_text, tmp_path)(model, requests)
    with pytest.raises(CalibrationError, match=f"no 'hessian' statistics for value '{requests[0].value}'.*it has minmax"):
        stats.get(requests[0].value, "hessian")

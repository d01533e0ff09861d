"""The calibration engine on synthetic models, against statistics of all activations held in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from qcompiler.models.llama import match_rmsnorm
from qcompiler.models.synthetic import GroundTruth
from qcompiler.passes.canonicalize import canonical_summary

from qcompiler.calibrate import (
    CalibConfig,
    Calibrator,
    ObserverConfig,
    StatRequest,
    linear_inputs,
    linear_requests,
)
from qcompiler.calibrate.windows import sample_windows
from qcompiler.irutil import load_model, save_model

from .refs import entropy_reference, reference_activations

ALL = ("minmax", "absmax_channel", "mean_abs_channel", "absmax_token", "histogram", "hessian", "outliers", "sample")
SAMPLES, SEQ = 6, 48


def calibrator(model_dir: Path, text: Path, cache: Path, **kw: object) -> Calibrator:
    obs = kw.pop("observer", ObserverConfig(histogram_bins=1024, sample_rows=100))
    cfg = CalibConfig(calib=str(text), samples=int(kw.pop("samples", SAMPLES)), seq_len=int(kw.pop("seq_len", SEQ)),
                      cache_dir=str(cache), progress=False, observer=obs, **kw)  # type: ignore[arg-type]
    return Calibrator(model_dir, cfg)


@pytest.fixture(scope="module")
def full_run(synthetic_dir: tuple[Path, GroundTruth], synthetic_text: Path, tmp_path_factory: pytest.TempPathFactory):
    """All observers on every distinct linear input of the KV-cache model, plus the in-memory reference."""
    model_dir, truth = synthetic_dir
    model = load_model(model_dir / "model.onnx")
    requests = linear_requests(model, ALL)
    cal = calibrator(model_dir, synthetic_text, tmp_path_factory.mktemp("cache"))
    stats = cal(model, requests)
    names = [r.value for r in requests]
    ref = reference_activations(model_dir / "model.onnx", names, cal.windows.ids)
    return cal, model, stats, ref, truth


def test_one_request_per_distinct_linear_input(full_run) -> None:
    _, model, stats, _, _ = full_run
    inputs = linear_inputs(model)
    assert len(inputs) == 4 * 2  # attn in, o in, mlp in, down in × 2 layers
    qkv = next(keys for keys in inputs.values() if "layers.0.q_proj" in keys)
    assert qkv == ["layers.0.q_proj", "layers.0.k_proj", "layers.0.v_proj"]
    assert sorted(stats.values()) == sorted(inputs)


def test_exact_reductions_equal_numpy(full_run) -> None:
    _cal, _, stats, ref, _ = full_run
    for name, x in ref.items():
        mm = stats.get(name, "minmax")
        assert (mm.min, mm.max) == (x.min(), x.max())
        assert np.array_equal(stats.get(name, "absmax_channel"), np.abs(x).max(0).astype(np.float32))
        np.testing.assert_allclose(stats.get(name, "mean_abs_channel"), np.abs(x).mean(0), rtol=1e-6)
        assert np.array_equal(stats.get(name, "absmax_token"), np.abs(x).max(1).reshape(SAMPLES, SEQ).astype(np.float32))
        out = stats.get(name, "outliers")
        assert np.array_equal(out.channel_rows, (np.abs(x) >= 6.0).sum(0))
        ratio = np.abs(x).max(1) / np.median(np.abs(x), axis=1)
        np.testing.assert_allclose(out.row_ratio.ravel(), ratio, rtol=1e-5)


def test_hessians_equal_numpy_xtx(full_run) -> None:
    _, _, stats, ref, _ = full_run
    for name, x in ref.items():
        h = stats.get(name, "hessian")
        xtx = x.T @ x  # float64, all rows in memory
        assert h.rows == len(x)
        assert np.abs(h.xtx - xtx).max() / np.abs(xtx).max() <= 1e-6
        assert np.linalg.norm(h.xtx - xtx) / np.linalg.norm(xtx) <= 1e-6
        assert np.array_equal(h.xtx, h.xtx.T)


def test_percentile_and_entropy_ranges_equal_in_memory_reference(full_run) -> None:
    _, _, stats, ref, _ = full_run
    for name, x in ref.items():
        hist = stats.get(name, "histogram")
        assert hist.total == x.size
        for p in (99.9, 99.99, 99.999):
            exact = np.percentile(np.abs(x), p, method="inverted_cdf")
            assert abs(hist.percentile(p) - exact) <= hist.width, (name, p)
    for name in list(ref)[:4]:  # layer 0's four inputs (the plain reference search is slow)
        x, hist = ref[name], stats.get(name, "histogram")
        edges = np.arange(hist.bins // 2 + 1) * hist.width
        t_ref = entropy_reference(np.abs(x).ravel(), edges, 128)
        assert abs(hist.entropy_range(8)[1] - t_ref) <= hist.width, name


def test_sample_rows_are_real_rows_aligned_across_values(full_run) -> None:
    _, _, stats, ref, _ = full_run
    index = None
    for name, x in ref.items():
        s = stats.get(name, "sample")
        assert s.rows.shape == (100, x.shape[1])  # bounded by sample_rows
        rows = s.index[:, 0] * SEQ + s.index[:, 1]
        assert np.array_equal(s.rows, x[rows].astype(np.float32))
        assert index is None or np.array_equal(index, s.index)  # the same tokens for every value
        index = s.index
    assert len(np.unique(index, axis=0)) == 100


def test_ground_truth_outliers_and_massive_activation(full_run, synthetic_text: Path, tmp_path: Path) -> None:
    cal, model, stats, _, truth = full_run
    summary = canonical_summary(model)
    q_in = summary.linears["layers.0.q_proj"].inputs[0].name
    assert set(truth.outlier_dims) <= set(stats.get(q_in, "outliers").outlier_channels(0.5))
    resid = match_rmsnorm(summary.linears["layers.0.q_proj"].inputs[0]).input.name  # the residual stream
    out = cal(model, [StatRequest(resid, ("outliers",))]).get(resid, "outliers")
    assert (out.row_ratio[:, truth.massive_position] > 100).all()
    assert (np.delete(out.row_ratio, truth.massive_position, axis=1) < 20).all()


def test_second_call_loads_instantly_and_changed_model_recomputes(synthetic_nokv_dir, synthetic_text: Path,
                                                                   tmp_path: Path) -> None:
    model_dir, _ = synthetic_nokv_dir
    model = load_model(model_dir / "model.onnx")
    cal = calibrator(model_dir, synthetic_text, tmp_path / "cache")
    requests = linear_requests(model, ("minmax", "hessian"))
    first = cal(model, requests)
    assert cal.last_run.groups_computed == 1
    again = cal(load_model(model_dir / "model.onnx"), requests)
    assert cal.last_run.groups_computed == 0 and again.path == first.path
    assert cal.last_run.seconds < 1.0
    # extend: a new observer is computed alone, the rest reused
    cal(model, linear_requests(model, ("minmax", "absmax_channel")))
    assert cal.last_run.values_computed == len(requests)
    # a pass changes a weight in memory: new key, statistics of the new model
    gate = canonical_summary(model).linears["layers.0.gate_proj"]
    w = gate.inputs[1]
    w.const_value = ir.tensor(w.const_value.numpy() * 2.0, name=w.name)
    down_in = canonical_summary(model).linears["layers.0.down_proj"].inputs[0].name
    changed = cal(model, requests)
    assert changed.path != first.path and cal.last_run.groups_computed == 1
    (tmp_path / "changed").mkdir()
    save_model(model, tmp_path / "changed" / "model.onnx")
    ref = reference_activations(tmp_path / "changed" / "model.onnx", [down_in], cal.windows.ids)[down_in]
    assert changed.get(down_in, "minmax").max == ref.max() != first.get(down_in, "minmax").max


def test_sweeps_under_memory_bound_equal_one_sweep_bitwise(synthetic_dir, synthetic_text: Path, tmp_path: Path) -> None:
    model_dir, _ = synthetic_dir
    model = load_model(model_dir / "model.onnx")
    requests = linear_requests(model, ("minmax", "absmax_channel", "hessian", "histogram", "sample"))
    one = calibrator(model_dir, synthetic_text, tmp_path / "one")(model, requests)
    cal = calibrator(model_dir, synthetic_text, tmp_path / "many", max_memory=700_000, overhead_bytes=0)
    many = cal(model, requests)
    assert len(many.meta["groups"]) >= 3
    assert sum(g["cut"] > 0 for g in many.meta["groups"]) >= 2  # later sweeps start from hand-offs
    assert not (many.path / "handoff").exists()
    assert_same(one, many, requests)


def assert_same(a, b, requests: list[StatRequest]) -> None:
    for r in requests:
        for o in r.observers:
            x, y = a.get(r.value, o), b.get(r.value, o)
            if o == "hessian":
                assert np.array_equal(x.xtx, y.xtx), r.value
            elif o == "histogram":
                assert np.array_equal(x.counts, y.counts) and x.width == y.width
            elif o == "sample":
                assert np.array_equal(x.rows, y.rows) and np.array_equal(x.index, y.index)
            elif o in ("minmax",):
                assert x == y
            else:
                assert np.array_equal(x, y), (r.value, o)


def test_memory_bound_too_small_names_the_numbers(synthetic_dir, synthetic_text: Path, tmp_path: Path) -> None:
    from qcompiler.errors import OptionError  # a bad --max-memory (exit 2)

    model_dir, _ = synthetic_dir
    model = load_model(model_dir / "model.onnx")
    cal = calibrator(model_dir, synthetic_text, tmp_path, max_memory=50_000, overhead_bytes=0)
    with pytest.raises(OptionError, match=r"--max-memory 48\.8 KiB is too small: .* alone"):
        cal(model, linear_requests(model, ("hessian",)))


def test_capture_is_bounded_and_aligned(synthetic_nokv_dir, synthetic_text: Path, tmp_path: Path) -> None:
    model_dir, _ = synthetic_nokv_dir
    model = load_model(model_dir / "model.onnx")
    names = list(linear_inputs(model))[:3]
    cal = calibrator(model_dir, synthetic_text, tmp_path)
    got = cal.capture(model, names, max_rows=64)
    assert all(s.rows.shape[0] == 64 for s in got.values())
    assert all(np.array_equal(got[names[0]].index, s.index) for s in got.values())
    again = cal.capture(model, names, max_rows=64)
    assert np.array_equal(again[names[1]].rows, got[names[1]].rows)  # seeded: the same rows


def test_window_sampling() -> None:
    tokens = np.arange(1000)
    a = sample_windows(tokens, 5, 100, seed=0)
    assert a.ids.shape == (5, 100) and not a.overlapping
    starts = a.ids[:, 0]
    assert (np.diff(starts) >= 100).all() and (starts % 100 == 0).all()  # distinct disjoint windows, in order
    assert np.array_equal(a.ids, sample_windows(tokens, 5, 100, seed=0).ids)
    assert not np.array_equal(a.ids, sample_windows(tokens, 5, 100, seed=1).ids)
    b = sample_windows(tokens, 20, 100, seed=0)  # more than the 10 disjoint windows: random starts
    assert b.overlapping and b.ids.shape == (20, 100)
    assert all(np.array_equal(w, np.arange(w[0], w[0] + 100)) for w in b.ids)


def test_uncached_statistics_live_as_long_as_the_result(synthetic_nokv_dir, synthetic_text: Path, tmp_path: Path) -> None:
    import gc

    model_dir, _ = synthetic_nokv_dir
    model = load_model(model_dir / "model.onnx")
    cal = calibrator(model_dir, synthetic_text, tmp_path / "cache")
    stats = cal(model, linear_requests(model, ("minmax",)), cache=False)
    path = stats.path
    assert path.is_dir() and path.parent == tmp_path / "cache"
    assert stats.get(stats.values()[0], "minmax").max > 0
    del stats
    gc.collect()
    assert not path.exists()
    assert list((tmp_path / "cache").iterdir()) == []

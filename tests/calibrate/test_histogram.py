"""Streaming histograms equal one histogram of all data; ranges match all-in-memory references."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler.calibrate.histogram import Histogram, StreamingHistogram, entropy_threshold

from .refs import entropy_reference


def _stream(batches: list[np.ndarray], bins: int = 1024) -> Histogram:
    sh = StreamingHistogram(bins)
    for b in batches:
        sh.update(b, float(np.abs(b).max()))
    st = sh.state()
    return Histogram(st["counts"], float(st["width"]))


def _batches(seed: int = 0) -> list[np.ndarray]:
    """Growing ranges (forces several doublings), heavy tails, an outlier channel."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(12):
        x = rng.standard_normal((256, 32)).astype(np.float32) * (1 + i / 3)
        x[:, 5] *= 8
        if i == 7:
            x[3, 9] = 300.0
        out.append(x)
    return out


def test_counts_equal_one_histogram_of_everything() -> None:
    batches = _batches()
    h = _stream(batches)
    allx = np.concatenate([b.ravel() for b in batches]).astype(np.float64)
    ref, _ = np.histogram(allx, bins=h.edges)
    assert h.total == allx.size
    # identical up to values that sit within float32 rounding of a bin edge
    assert np.abs(ref - h.counts).sum() <= 1e-4 * allx.size
    assert h.half_range >= np.abs(allx).max()
    assert h.width <= 4 * np.abs(allx).max() / h.bins  # at most 2× the ideal resolution


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99, 99.999])
def test_percentile_matches_numpy_within_one_bin(p: float) -> None:
    batches = _batches(1)
    h = _stream(batches, bins=4096)
    allx = np.concatenate([b.ravel() for b in batches])
    # the reference is the order statistic itself (no interpolation across empty tail bins)
    ref = np.percentile(np.abs(allx), p, method="inverted_cdf")
    assert abs(h.percentile(p) - ref) <= h.width
    lo, hi = h.percentile_range(p)
    assert abs(lo - np.percentile(allx, 100 - p, method="inverted_cdf")) <= h.width
    assert abs(hi - np.percentile(allx, p, method="inverted_cdf")) <= h.width


@pytest.mark.parametrize("bits", [8, 6])
def test_entropy_range_matches_all_in_memory_reference(bits: int) -> None:
    batches = _batches(2)
    h = _stream(batches, bins=1024)
    absx = np.abs(np.concatenate([b.ravel() for b in batches])).astype(np.float64)
    abs_edges = np.arange(h.bins // 2 + 1) * h.width
    ref = entropy_reference(absx, abs_edges, 2 ** (bits - 1))
    lo, hi = h.entropy_range(bits)
    assert lo == -hi
    assert abs(hi - ref) <= h.width  # same threshold within the histogram's resolution
    assert 0 < hi < np.abs(absx).max()  # KL clips the 300 outlier


def _fake_quant_mse(x: np.ndarray, t: float, bits: int) -> float:
    qmax = 2 ** (bits - 1) - 1
    s = t / qmax
    q = np.clip(np.round(x / s), -qmax, qmax) * s
    return float(np.mean((x - q) ** 2))


@pytest.mark.parametrize("bits", [8, 4])
def test_mse_range_near_brute_force_optimum(bits: int) -> None:
    batches = _batches(3)
    h = _stream(batches, bins=2048)
    x = np.concatenate([b.ravel() for b in batches]).astype(np.float64)
    grid = np.linspace(np.abs(x).max() / 200, np.abs(x).max(), 400)
    best = min(_fake_quant_mse(x, t, bits) for t in grid)
    _, t = h.mse_range(bits)
    assert _fake_quant_mse(x, t, bits) <= 1.03 * best


def test_all_zero_start_and_empty() -> None:
    sh = StreamingHistogram(64)
    sh.update(np.zeros(10, np.float32), 0.0)
    sh.update(np.array([1.0, -1.0], np.float32), 1.0)
    st = sh.state()
    h = Histogram(st["counts"], float(st["width"]))
    assert h.total == 12
    # zeros kept; the width is the smallest power of two with 32·w > 1 (1/16): ±1 fall in bins 32 ± 16
    assert h.width == 1 / 16 and h.counts[32] == 10 and h.counts[48] == 1 and h.counts[16] == 1
    assert h.percentile(50) <= h.width
    empty = Histogram(np.zeros(64, np.int64), 0.0)
    assert empty.percentile(99.9) == 0.0 and empty.entropy_range() == (-0.0, 0.0)
    assert entropy_threshold(np.array([0, 5, 3, 0], float), 0.5, 128) == 1.5


def test_bad_bins() -> None:
    with pytest.raises(ValueError, match="power of two"):
        StreamingHistogram(100)


def _log_hist(x: np.ndarray):
    from qcompiler.calibrate.observers import BatchView, LogHistogramObserver, ObserverConfig

    obs = LogHistogramObserver(ObserverConfig(), x.shape[1])
    for w, part in enumerate(np.array_split(x, 3)):
        obs.update(BatchView(part, w))
        obs.end_shard()
    return LogHistogramObserver.result(obs.state())


def _exact_error(x: np.ndarray, scale: float, zp: int, lo: int, hi: int) -> float:
    x = x.astype(np.float64)
    q = (np.clip(np.rint(x / scale) + zp, lo, hi) - zp) * scale
    return float(((x - q) ** 2).sum() / (x**2).sum())


def test_log_histogram_static_error_matches_the_rows() -> None:
    """The bounded-memory estimate of ``‖x − Q(x)‖²/‖x‖²`` agrees with the error computed on every row:
    a sink token stretching the range (most values round to 0), a clipped range, a plain Gaussian; and it
    ranks inputs as the rows do."""
    from qcompiler.quant.w8a8 import static_qparams

    rng = np.random.default_rng(0)
    cases = []
    for sink, heavy in ((0.0, 1.0), (300.0, 1.0), (3000.0, 1.0), (0.0, 8.0), (800.0, 4.0)):
        x = rng.standard_normal((2048, 96)).astype(np.float32) * np.float32(0.5)
        x[:, 3] *= np.float32(heavy)  # an outlier channel
        if sink:
            x[rng.choice(2048, 4, replace=False), 5] = np.float32(sink)  # massive activations on a few tokens
        cases.append(x)
    est, exact = [], []
    for x in cases:
        h = _log_hist(x)
        assert h.count.sum() == np.count_nonzero(x)
        np.testing.assert_allclose(h.energy, float((x.astype(np.float64) ** 2).sum()), rtol=1e-9)
        for dtype, sym, shrink in (("uint8", False, 1.0), ("int8", True, 1.0), ("uint8", False, 0.25)):
            lo, hi = float(x.min()) * shrink, float(x.max()) * shrink
            scale, zp = static_qparams(lo, hi, dtype, sym)
            qlo, qhi = (0, 255) if dtype == "uint8" else (-128, 127)
            e, r = h.static_error(scale, zp, qlo, qhi), _exact_error(x, scale, zp, qlo, qhi)
            assert abs(e - r) <= 0.02 * r, (dtype, shrink, e, r)
            if dtype == "uint8" and shrink == 1.0:
                est.append(e)
                exact.append(r)
    assert np.argsort(est).tolist() == np.argsort(exact).tolist()

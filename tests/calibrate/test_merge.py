"""The merge algebra of calibration observers (property tests on random shards).

One pass over windows ``0..n-1`` (shards of ``shard_windows`` closed in order, as the
engine does) against: the windows cut into random contiguous shards, each observed by a
fresh observer, merged left to right.  Order-free statistics (min/max, abs-max, counts,
histograms, per-window/per-row lists, the row sample) must agree bit for bit for *any*
split; float sums (``mean_abs_channel``, ``hessian``) bit for bit when the split follows
the shard boundaries (what ``--ray`` does), within float64 / float32 rounding otherwise.
"""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcompiler.calibrate.histogram import Histogram, StreamingHistogram
from qcompiler.calibrate.observers import OBSERVERS, BatchView, Observer, ObserverConfig

ALL = tuple(OBSERVERS)
EXACT = tuple(n for n in ALL if OBSERVERS[n].exact_merge)
SUMS = tuple(n for n in ALL if not OBSERVERS[n].exact_merge)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _windows(seed: int, n: int, rows: int, channels: int, zero_first: int) -> list[np.ndarray]:
    """Windows whose scale grows and jumps (histogram doublings), an outlier channel, leading all-zero windows."""
    rng = np.random.default_rng(seed)
    out = []
    for w in range(n):
        x = rng.standard_normal((rows, channels)).astype(np.float32) * np.float32(2.0 ** rng.integers(-6, 7))
        x[:, 0] *= np.float32(rng.choice([1.0, 40.0]))
        if w < zero_first:
            x[:] = 0.0
        out.append(x)
    return out


def _observe(names: tuple[str, ...], cfg: ObserverConfig, xs: list[np.ndarray], windows: range,
             shard_ends: bool) -> dict[str, Observer]:
    obs = {o: OBSERVERS[o](cfg, xs[0].shape[1]) for o in names}
    for w in windows:
        view = BatchView(xs[w], w)
        for ob in obs.values():
            ob.update(view)
        if shard_ends and (w + 1) % cfg.shard_windows == 0:
            for ob in obs.values():
                ob.end_shard()
    for ob in obs.values():
        ob.end_shard()
    return obs


def _merged(names: tuple[str, ...], cfg: ObserverConfig, xs: list[np.ndarray], cuts: list[int]) -> dict[str, Observer]:
    bounds = [0, *cuts, len(xs)]
    total = {o: OBSERVERS[o](cfg, xs[0].shape[1]) for o in names}
    for a, b in itertools.pairwise(bounds):
        part = _observe(names, cfg, xs, range(a, b), shard_ends=True)
        for o in names:
            total[o].merge(part[o])
    return total


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                        and a[k].tobytes() == b[k].tobytes() for k in a)


shapes = st.tuples(
    st.integers(0, 2**31 - 1),  # data seed
    st.integers(1, 12),  # windows
    st.integers(1, 24),  # rows per window
    st.integers(1, 9),  # channels
    st.integers(0, 3),  # leading all-zero windows
)


@FAST
@given(shapes, st.data())
def test_order_free_statistics_merge_bit_for_bit_for_any_split(shape: tuple[int, ...], data: st.DataObject) -> None:
    seed, n, rows, channels, zeros = shape
    cfg = ObserverConfig(histogram_bins=16, sample_rows=data.draw(st.integers(1, 40)), shard_windows=3)
    xs = _windows(seed, n, rows, channels, zeros)
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else []
    one = _observe(EXACT, cfg, xs, range(n), shard_ends=True)
    many = _merged(EXACT, cfg, xs, cuts)
    for o in EXACT:
        assert _same(one[o].state(), many[o].state()), (o, cuts)


@FAST
@given(shapes, st.integers(1, 5), st.data(), st.sampled_from(["float32", "float64"]))
def test_float_sums_merge_bit_for_bit_on_shard_boundaries(shape: tuple[int, ...], shard: int, data: st.DataObject,
                                                          dtype: str) -> None:
    seed, n, rows, channels, zeros = shape
    cfg = ObserverConfig(histogram_bins=16, shard_windows=shard, hessian_dtype=dtype)
    xs = _windows(seed, n, rows, channels, zeros)
    boundaries = list(range(shard, n, shard))
    cuts = sorted(data.draw(st.sets(st.sampled_from(boundaries), max_size=len(boundaries)))) if boundaries else []
    one = _observe(ALL, cfg, xs, range(n), shard_ends=True)
    many = _merged(ALL, cfg, xs, cuts)
    for o in ALL:
        assert _same(one[o].state(), many[o].state()), (o, cuts)


@FAST
@given(shapes, st.data())
def test_float_sums_merge_within_rounding_for_any_split(shape: tuple[int, ...], data: st.DataObject) -> None:
    """Off the shard boundaries the additions are grouped differently: float64 Σ|x| to 1e-12,
    XᵀX (float32 shard sums) to 1e-5 of its largest entry."""
    seed, n, rows, channels, zeros = shape
    cfg = ObserverConfig(shard_windows=4)
    xs = _windows(seed, n, rows, channels, zeros)
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else []
    one = _observe(SUMS, cfg, xs, range(n), shard_ends=True)
    many = _merged(SUMS, cfg, xs, cuts)
    a, b = one["mean_abs_channel"].state(), many["mean_abs_channel"].state()
    assert a["rows"] == b["rows"]
    np.testing.assert_allclose(b["sum_abs"], a["sum_abs"], rtol=1e-12)
    a, b = one["hessian"].state(), many["hessian"].state()
    assert a["rows"] == b["rows"]
    scale = max(float(np.abs(a["xtx"]).max()), 1e-30)
    assert float(np.abs(b["xtx"] - a["xtx"]).max()) <= 1e-5 * scale
    # and both are XᵀX
    x = np.concatenate(xs).astype(np.float64)
    np.testing.assert_allclose(a["xtx"], x.T @ x, rtol=1e-5, atol=1e-5 * scale)


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(2, 10), st.permutations(range(10)))
def test_histogram_merge_is_commutative_and_equals_one_histogram_of_everything(seed: int, n: int,
                                                                               order: list[int]) -> None:
    rng = np.random.default_rng(seed)
    parts = [rng.standard_normal(int(rng.integers(1, 200))).astype(np.float32) * np.float32(2.0 ** rng.integers(-20, 20))
             for _ in range(n)]
    hists = []
    for p in parts:
        h = StreamingHistogram(64)
        h.update(p, float(np.abs(p).max()))
        hists.append(h)
    merged = StreamingHistogram(64)
    for i in [i for i in order if i < n]:
        merged.merge(hists[i])
    one = StreamingHistogram(64)
    for p in parts:
        one.update(p, float(np.abs(p).max()))
    assert merged.width == one.width
    assert np.array_equal(merged.counts, one.counts)
    # exactly numpy's histogram over the same (exact) edges: no value lost or misplaced
    h = Histogram(one.counts, one.width)
    allx = np.concatenate(parts).astype(np.float64)
    ref, _ = np.histogram(allx, bins=h.edges)
    ref[-1] -= int((allx == h.edges[-1]).sum())  # numpy closes the last bin; |x| < H here anyway
    assert np.array_equal(ref, h.counts)
    assert h.half_range > np.abs(allx).max() and h.width <= 4 * np.abs(allx).max() / h.bins


def test_merge_refuses_other_settings() -> None:
    a = OBSERVERS["histogram"](ObserverConfig(histogram_bins=16), 4)
    b = OBSERVERS["histogram"](ObserverConfig(histogram_bins=32), 4)
    try:
        a.merge(b)
    except ValueError as e:
        assert "cannot merge" in str(e)
    else:
        raise AssertionError("merged observers with different settings")

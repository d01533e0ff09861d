"""tools/bench_decode.py: the paired speed ratio (rows measured round-robin, repeat by repeat)."""

from __future__ import annotations

import pytest

from tools.bench_decode import paired_speedup


def test_paired_speedup_cancels_machine_phases() -> None:
    # the machine is twice as slow in repeats 2 and 3; the row is 1.25× faster than the baseline throughout
    base = [1.0, 2.0, 2.0, 1.0]
    row = [0.8, 1.6, 1.6, 0.8]
    assert paired_speedup(base, row) == pytest.approx((1.25, 1.25, 1.25))
    # best-of times of each row would give the same here, but not when the slow phases fall on one row only
    assert paired_speedup([1.0, 1.0, 3.0], [2.0, 0.5, 1.0]) == pytest.approx((2.0, 0.5, 3.0))


def test_paired_speedup_needs_pairs() -> None:
    with pytest.raises(ValueError, match="as many repeats"):
        paired_speedup([1.0, 2.0], [1.0])


def test_interleaved_steps_give_each_row_its_own_decode(tmp_path) -> None:
    """--interleave: two rows decoded step by step in turn give the tokens each gives alone, and a time each."""
    import numpy as np
    from qcompiler.models.synthetic import SyntheticConfig, build_model_dir

    from tools.bench_decode import Row, measure, measure_interleaved

    cfg = SyntheticConfig(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=96, kv_cache=True)
    a = build_model_dir(tmp_path / "a", cfg)[0]
    b = build_model_dir(tmp_path / "b", SyntheticConfig(**{**cfg.__dict__, "seed": cfg.seed + 1}))[0]
    prompt = np.arange(3, 19)
    alone = [Row("a", a), Row("b", b)]
    for r in alone:
        measure(r, prompt, 6, threads=1)
    for block, pause in ((1, 0.0), (4, 0.002)):  # step by step; in turns of 4 steps (6 = 4 + 2) with a pause
        together = [Row("a", a), Row("b", b)]
        for rep in range(2):  # new sessions each repeat, the first created rotating (main() does so)
            measure_interleaved(together, prompt, 6, threads=1, block=block, pause_s=pause, first_created=rep % 2)
        for r, ref in zip(together, alone):
            assert r.tokens == ref.tokens and len(r.tokens) == 7
            assert len(r.decode_runs) == len(r.prefill_runs) == 2 and min(r.decode_runs) > 0
        assert [r.created for r in together] == [[0, 1], [1, 0]]


def test_paired_geomean_cancels_an_order_bias() -> None:
    """A row 10 % faster when its session is made second, the order alternating: the geometric mean of the paired
    ratios is the bias-free 1.0 (the median of such bimodal ratios need not be)."""
    from tools.bench_decode import paired_geomean

    base = [1.0, 1.1] * 4
    row = [1.1, 1.0] * 4
    assert paired_geomean(base, row) == pytest.approx(1.0)
    assert paired_geomean([2.0, 2.0], [1.0, 1.0]) == pytest.approx(2.0)

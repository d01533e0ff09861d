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

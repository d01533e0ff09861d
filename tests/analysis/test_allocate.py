"""The budgeted assignment is exact (MILP = brute force) and refuses impossible budgets clearly."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler.analysis.allocate import BudgetTooSmall, Item, allocate, brute_force, minimum_cost
from qcompiler.analysis.candidates import parse_candidate, parse_candidates
from qcompiler.errors import QCError
from qcompiler.quant.numerics import quantize_rtn
from qcompiler.quant.packing import matmulnbits_block_size, pack_matmulnbits


def _random_items(rng: np.random.Generator, n: int) -> list[Item]:
    items = []
    for j in range(n):
        k = int(rng.integers(2, 5))
        costs = np.sort(rng.integers(10, 100, size=k)).astype(float)
        # errors mostly decrease with cost but not always (dominated options must be handled)
        errors = np.sort(rng.random(k))[::-1] * rng.uniform(0.1, 10.0)
        errors = errors + rng.normal(0, 0.05, size=k).clip(0)
        items.append(Item(f"l{j}", tuple(f"o{i}" for i in range(k)), tuple(costs), tuple(errors)))
    return items


@pytest.mark.parametrize("seed", range(12))
def test_milp_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    items = _random_items(rng, int(rng.integers(3, 7)))
    lo, hi = minimum_cost(items), sum(max(it.costs) for it in items)
    for budget in np.linspace(lo, hi, 5):
        exact = brute_force(items, budget)
        got = allocate(items, budget)
        assert exact is not None
        assert got.cost <= budget
        assert got.error == pytest.approx(exact.error, rel=1e-9, abs=1e-12)


def test_budget_below_minimum_names_it() -> None:
    items = [Item("a", ("x", "y"), (4.0, 8.0), (1.0, 0.1)), Item("b", ("x", "y"), (4.0, 8.0), (2.0, 0.2))]
    with pytest.raises(BudgetTooSmall) as e:
        allocate(items, 7.5)
    assert e.value.minimum == 8.0
    assert "smallest possible 8" in str(e.value)
    assert allocate(items, 8.0).choice == {"a": "x", "b": "x"}
    assert allocate(items, 12.0).choice == {"a": "x", "b": "y"}  # b gains more from the upgrade


def test_candidate_parsing_and_nominal_bits() -> None:
    c = parse_candidate("W4G128")
    assert c.name == "w4g128" and c.activation is None and c.weight.group_size == 128
    assert c.nominal_bits(576) == pytest.approx(4 + 36 / 128)
    assert parse_candidate("w8c").nominal_bits(576) == pytest.approx(8 + 40 / 576)
    assert parse_candidate("w4g32", sym=True).nominal_bits(576) == pytest.approx(4 + 32 / 32)
    combo = parse_candidate("a8token+w8c")
    assert combo.name == "w8c+a8token" and combo.activation == "token"
    assert [x.name for x in parse_candidates(["w4g128", "w4g128", "a8tensor"])] == ["w4g128", "a8tensor"]
    for bad in ("w5g128", "w4g100", "a4token", "w4g128+w8c", ""):
        with pytest.raises(QCError):
            parse_candidate(bad)


@pytest.mark.parametrize("name,k,n", [("w4g128", 576, 40), ("w4g32", 576, 24), ("w8c", 576, 16),
                                      ("w4c", 96, 8), ("w4g128", 1536, 8), ("w8g64", 200, 8)])
@pytest.mark.parametrize("sym", [False, True])
def test_stored_bytes_equal_the_packed_layout(name: str, k: int, n: int, sym: bool) -> None:
    """The size model is exactly what lower-matmulnbits writes (data + scales + zero points)."""
    cand = parse_candidate(name, sym=sym)
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    qw = quantize_rtn(w, cand.weight)
    block = matmulnbits_block_size(qw.group_size, k)
    packed, scales, zps = pack_matmulnbits(qw.q, qw.scale, qw.zero_point, cand.weight.bits, block, qw.group_size)
    actual = packed.nbytes + scales.nbytes + (zps.nbytes if zps is not None else 0)
    assert cand.stored_bytes(k, n) == actual

"""Choosing one option per linear under a budget: a multiple-choice knapsack, solved exactly.

Linear ``j`` has options ``o`` with cost ``c_jo`` (bits or bytes) and predicted error
``e_jo`` (:mod:`qcompiler.analysis.sensitivity`, additive over linears).  With binary
``x_jo``::

    minimize   Σ_jo e_jo·x_jo
    subject to Σ_o x_jo = 1            for every linear j
               Σ_jo c_jo·x_jo ≤ B

solved as a MILP by HiGHS (``scipy.optimize.milp``, relative gap 0).  Options that cost
at least as much as another and are no more accurate are dropped first (they are never
needed in an optimum).  The cheapest model, ``Σ_j min_o c_jo``, is the smallest budget
that has a solution; below it :class:`BudgetTooSmall` says what it is.
:func:`brute_force` enumerates every assignment (tests check the MILP against it).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qcompiler.errors import QCError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One linear: parallel tuples of option names, costs and predicted errors."""

    key: str
    options: tuple[str, ...]
    costs: tuple[float, ...]
    errors: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.options or not (len(self.options) == len(self.costs) == len(self.errors)):
            raise ValueError(f"{self.key}: options, costs and errors must be non-empty and of equal length")


@dataclass(frozen=True)
class Allocation:
    choice: dict[str, str]  # key → option
    cost: float
    error: float


class BudgetTooSmall(QCError):
    """The budget is below the cheapest possible assignment."""

    def __init__(self, budget: float, minimum: float) -> None:
        super().__init__(f"budget {budget:g} is below the smallest possible {minimum:g}")
        self.budget = budget
        self.minimum = minimum


def minimum_cost(items: Sequence[Item]) -> float:
    return float(sum(min(it.costs) for it in items))


def _undominated(it: Item) -> list[int]:
    """Indices of options not dominated (another is cheaper-or-equal and at-least-as-accurate)."""
    order = sorted(range(len(it.options)), key=lambda i: (it.costs[i], it.errors[i]))
    keep, best = [], np.inf
    for i in order:
        if it.errors[i] < best:
            keep.append(i)
            best = it.errors[i]
    return keep


def _evaluate(items: Sequence[Item], picks: Sequence[int]) -> Allocation:
    return Allocation(
        {it.key: it.options[p] for it, p in zip(items, picks)},
        float(sum(it.costs[p] for it, p in zip(items, picks))),
        float(sum(it.errors[p] for it, p in zip(items, picks))),
    )


def allocate(items: Sequence[Item], budget: float, time_limit: float = 120.0) -> Allocation:
    """The assignment of least total error whose total cost is at most ``budget`` (exact)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    if not items:
        raise QCError("nothing to allocate: no linear layers")
    minimum = minimum_cost(items)
    if budget < minimum * (1 - 1e-12):
        raise BudgetTooSmall(budget, minimum)
    kept = [_undominated(it) for it in items]
    index = [(j, i) for j, ks in enumerate(kept) for i in ks]
    cost_scale = max(abs(minimum), 1e-30)
    err_scale = max((max(it.errors) for it in items), default=1.0) or 1.0
    costs = np.array([items[j].costs[i] for j, i in index]) / cost_scale
    errors = np.array([items[j].errors[i] for j, i in index]) / err_scale
    n = len(index)
    onehot = np.zeros((len(items), n))
    for col, (j, _) in enumerate(index):
        onehot[j, col] = 1.0
    limit = budget / cost_scale
    for _attempt in range(4):
        res = milp(
            errors,
            integrality=np.ones(n),
            bounds=Bounds(0, 1),
            constraints=[LinearConstraint(onehot, 1, 1), LinearConstraint(costs[None, :], -np.inf, limit)],
            options={"mip_rel_gap": 0.0, "time_limit": time_limit, "presolve": True},
        )
        if res.x is None:
            raise QCError(f"the precision assignment found no solution ({res.message})")
        picks = [0] * len(items)
        for col in np.nonzero(res.x > 0.5)[0]:
            j, i = index[col]
            picks[j] = i
        alloc = _evaluate(items, picks)
        if alloc.cost <= budget:
            if not res.success:
                log.warning("assign-precision: solver stopped early (%s); the assignment may not be optimal",
                            res.message)
            return alloc
        # the solver's feasibility tolerance let the budget be exceeded by a hair: tighten and retry
        limit -= (alloc.cost - budget) / cost_scale + 1e-9
    raise QCError("the precision assignment could not meet the budget exactly (numerical trouble)")


def brute_force(items: Sequence[Item], budget: float) -> Allocation | None:
    """Every assignment tried (exponential; for tests and tiny cases)."""
    best: Allocation | None = None
    for picks in itertools.product(*(range(len(it.options)) for it in items)):
        a = _evaluate(items, picks)
        if a.cost <= budget and (best is None or a.error < best.error):
            best = a
    return best

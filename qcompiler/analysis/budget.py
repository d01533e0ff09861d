"""Budgets in average bits or megabytes, and the exact assignment of options under them.

For linears ``j`` with ``P_j`` weights and chosen options ``o_j``:

    average bits = Σ_j nominal_cost(o_j) / Σ_j P_j       (scales and zero points included)
    size         = F + G − Σ_j 4·P_j + Σ_j stored_bytes(o_j)
                   (F: bytes of the float model's weights, G: of its graph without them)

(see :mod:`qcompiler.analysis.candidates` for the two costs; MB = 10⁶ bytes).  A budget
of ``B`` average bits allows ``Σ_j nominal_cost(o_j) ≤ B·Σ_j P_j``; ``M`` MB allows
``Σ_j stored_bytes(o_j) ≤ M·10⁶ − (F − Σ_j 4·P_j)``.  :func:`solve` hands the
multiple-choice knapsack to :func:`qcompiler.analysis.allocate.allocate`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qcompiler.analysis.allocate import Allocation, BudgetTooSmall, Item, allocate
from qcompiler.analysis.candidates import Candidate
from qcompiler.analysis.structure import LinearSite, ModelSites
from qcompiler.errors import QCError

MB = 1_000_000


def float_bits(site: LinearSite) -> int:
    return int(site.node.inputs[1].const_value.dtype.itemsize * 8)


def _float_bytes(site: LinearSite) -> int:
    return site.params * float_bits(site) // 8


def avg_bits(sites: ModelSites, assignment: Mapping[str, Candidate]) -> float:
    s = [sites.linears[k] for k in assignment]
    total = sum(c.nominal_cost(site.k, site.n, float_bits(site)) for site, c in zip(s, assignment.values()))
    return total / max(sum(site.params for site in s), 1)


def size_bytes(sites: ModelSites, assignment: Mapping[str, Candidate]) -> int:
    size = sites.float_bytes + sites.graph_bytes
    for key, c in assignment.items():
        site = sites.linears[key]
        size += c.stored_bytes(site.k, site.n, float_bits(site)) - _float_bytes(site)
    return size


def check_feasible(sites: ModelSites, keys: Sequence[str], options: Sequence[Candidate],
                   budget: float | None = None, max_size_mb: float | None = None) -> None:
    """Fail early (before measuring anything) when no assignment can meet the budget."""
    errors = {k: {o.name: 0.0 for o in options} for k in keys}
    solve(sites, keys, errors, options, budget, max_size_mb, check_only=True)


@dataclass(frozen=True)
class Solution:
    assignment: dict[str, Candidate]
    avg_bits: float
    size_bytes: int
    predicted_error: float
    minimum_avg_bits: float
    minimum_size_bytes: int


def solve(sites: ModelSites, keys: Sequence[str], errors: Mapping[str, Mapping[str, float]],
          options: Sequence[Candidate], budget: float | None = None, max_size_mb: float | None = None,
          check_only: bool = False) -> Solution:
    """Least total predicted error over ``keys`` under ``budget`` (avg bits) and/or ``max_size_mb``."""
    if budget is None and max_size_mb is None:
        raise QCError("mixed precision needs a budget: --budget AVG_BITS or --max-size MB")
    if not keys:
        raise QCError("mixed precision found no linear layer to assign")
    weight_opts = [o for o in options if o.weight is not None]
    if not weight_opts:
        raise QCError("mixed precision needs weight options (e.g. w4g128:w4g32:w8c)")
    site_list = [sites.linears[k] for k in keys]
    params = sum(s.params for s in site_list)
    fixed = sites.float_bytes + sites.graph_bytes - sum(_float_bytes(s) for s in site_list)

    def items(unit: str) -> list[Item]:
        out = []
        for s in site_list:
            fb = float_bits(s)
            costs = tuple(float(o.nominal_cost(s.k, s.n, fb) if unit == "bits" else o.stored_bytes(s.k, s.n, fb))
                          for o in weight_opts)
            out.append(Item(s.key, tuple(o.name for o in weight_opts), costs,
                            tuple(float(errors[s.key][o.name]) for o in weight_opts)))
        return out

    bit_items, byte_items = items("bits"), items("bytes")
    min_bits = sum(min(it.costs) for it in bit_items) / params
    min_size = fixed + int(sum(min(it.costs) for it in byte_items))
    cheapest = min(weight_opts, key=lambda o: o.nominal_bits(4096)).name
    if budget is not None and budget * params < sum(min(it.costs) for it in bit_items):
        raise QCError(f"--budget {budget:g} average bits is below the smallest possible model: "
                      f"{min_bits:.4f} average bits (every linear at its cheapest option, e.g. {cheapest})")
    if max_size_mb is not None and max_size_mb * MB < min_size:
        raise QCError(f"--max-size {max_size_mb:g} MB is below the smallest possible model: {min_size / MB:.3f} MB "
                      f"({fixed / MB:.3f} MB stay in float, every linear at its cheapest option)")
    if check_only:
        return Solution({}, min_bits, min_size, 0.0, min_bits, min_size)
    chosen = _solve_both(bit_items, byte_items, budget * params if budget is not None else None,
                         max_size_mb * MB - fixed if max_size_mb is not None else None)
    by_name = {o.name: o for o in weight_opts}
    assignment = {k: by_name[chosen.choice[k]] for k in keys}
    return Solution(assignment, avg_bits(sites, assignment), size_bytes(sites, assignment), chosen.error,
                    min_bits, min_size)


def _solve_both(bit_items: list[Item], byte_items: list[Item], bit_budget: float | None,
                byte_budget: float | None) -> Allocation:
    try:
        if byte_budget is None:
            return allocate(bit_items, float(bit_budget))  # type: ignore[arg-type]
        if bit_budget is None:
            return allocate(byte_items, byte_budget)
        return _allocate_two(bit_items, byte_items, bit_budget, byte_budget)
    except BudgetTooSmall as e:  # only reachable with both constraints
        raise QCError(f"the budget cannot be met: {e}") from None


def _allocate_two(bit_items: list[Item], byte_items: list[Item], bit_budget: float, byte_budget: float) -> Allocation:
    """Both limits at once: a MILP with two knapsack rows."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    index = [(j, i) for j, it in enumerate(bit_items) for i in range(len(it.options))]
    n = len(index)
    err = np.array([bit_items[j].errors[i] for j, i in index])
    err = err / (err.max() or 1.0)
    onehot = np.zeros((len(bit_items), n))
    for col, (j, _) in enumerate(index):
        onehot[j, col] = 1.0
    cb = np.array([bit_items[j].costs[i] for j, i in index]) / bit_budget
    cy = np.array([byte_items[j].costs[i] for j, i in index]) / byte_budget
    res = milp(err, integrality=np.ones(n), bounds=Bounds(0, 1),
               # a hair of margin for the solver's feasibility tolerance (~1e-7 of each row)
               constraints=[LinearConstraint(onehot, 1, 1), LinearConstraint(np.vstack([cb, cy]), -np.inf, 1 - 1e-6)],
               options={"mip_rel_gap": 0.0, "time_limit": 120.0})
    if res.x is None:
        raise QCError(f"no assignment meets both --budget and --max-size ({res.message})")
    picks = {index[c][0]: index[c][1] for c in np.nonzero(res.x > 0.5)[0]}
    choice = {it.key: it.options[picks[j]] for j, it in enumerate(bit_items)}
    return Allocation(choice, float(sum(bit_items[j].costs[i] for j, i in picks.items())),
                      float(sum(bit_items[j].errors[i] for j, i in picks.items())))

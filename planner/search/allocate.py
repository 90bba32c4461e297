"""Exact allocation: a multiple-choice knapsack (MCKP), solved to proven optimality.

Each group (a layer, or layers sharing one choice) has options ``(cost_bytes, objective)``; pick
exactly one per group, minimising the summed objective with the summed cost (plus fixed bytes)
within the budget. The steps, each exact:

1. options dominated inside their group (another costs no more and scores no worse) are dropped;
   swapping a dominated choice for its dominator never costs bytes nor objective;
2. the LP relaxation (greedy on each group's convex hull) gives a lower bound LB and a multiplier
   λ; a greedy fill gives a feasible incumbent U. An option whose reduced cost exceeds U − LB
   cannot be part of any plan better than U, so it is dropped (reduced-cost fixing);
3. what remains is enumerated as a Pareto list of partial plans (bytes, objective), or, if that
   list grows too large, solved by ``scipy.optimize.milp`` (HiGHS; binary x, one-hot per group,
   one budget row; ``mip_rel_gap=0``). Costs enter the MILP shifted by each group's cheapest
   option and divided by the gcd of all costs (small exact integers: HiGHS' tolerances cannot
   buy bytes); the chosen plan's cost is re-added in Python integers and the solve is tightened
   and repeated if it ever exceeds the budget. Objectives are shifted per group and scaled so
   HiGHS' absolute gap tolerance is ~1e-9 of the largest per-group spread.

Float tolerances are the only approximation: options within ~1e-9 (relative) of the pruning
thresholds are kept, never dropped.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import reduce
from typing import Iterator, Sequence

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from planner.errors import PlannerError

log = logging.getLogger(__name__)
Option = tuple[int, float]  # (cost_bytes, objective)
_OBJ_SCALE = 1e3  # the largest per-group objective spread after scaling
_MAX_TIGHTEN = 4
_PHASE1 = 0.1  # HiGHS phase 1 keeps options within this fraction of the greedy gap
_DP_MAX_STATES = 100_000  # partial plans the exact enumeration may hold before HiGHS takes over


class InfeasibleBudget(PlannerError):
    """Even the cheapest option of every group does not fit the budget."""

    def __init__(self, min_bytes: int, budget_bytes: int | None = None) -> None:
        self.min_bytes = int(min_bytes)
        self.budget_bytes = budget_bytes
        need = f"the smallest plan needs {self.min_bytes} bytes ({_gb(self.min_bytes)})"
        if budget_bytes is None:
            super().__init__(f"budget is infeasible: {need}")
        else:
            super().__init__(f"budget {budget_bytes} bytes ({_gb(budget_bytes)}) is infeasible: {need}")


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB = {n / 2**30:.3f} GiB"


@dataclass(frozen=True)
class Allocation:
    """The solver's answer. ``choice[g]`` indexes group g's original option list; ``total_cost``
    includes the fixed bytes; ``budget_binds`` is False when every group got its best option."""

    choice: tuple[int, ...]
    total_cost: int
    objective: float
    optimal: bool
    mip_gap: float
    budget_binds: bool = True
    seconds: float = 0.0


class Knapsack:
    """Validated, pruned options of every group: prune once, then :meth:`solve` at many budgets
    (Pareto sweeps). ``min_cost``: the cheapest plan's bytes; ``free_cost``: the cheapest plan where
    every group has its best option (the budget stops binding there). Both include the fixed bytes."""

    def __init__(self, groups: Sequence[Sequence[Option]], fixed_bytes: int) -> None:
        self.fixed = _bytes("fixed_bytes", fixed_bytes)
        if len(groups) == 0:
            raise ValueError("no groups to allocate")
        self.index: list[np.ndarray] = []  # kept original option indices, by increasing cost
        self.cost: list[np.ndarray] = []
        self.obj: list[np.ndarray] = []
        for g, options in enumerate(groups):
            idx, cost, obj = _prune(g, options)
            self.index.append(idx)
            self.cost.append(cost)
            self.obj.append(obj)
        self.min_cost = self.fixed + sum(int(c[0]) for c in self.cost)
        self.free_cost = self.fixed + sum(int(c[-1]) for c in self.cost)  # every group at its best
        self.n_kept = sum(len(c) for c in self.cost)

    def solve(self, budget: int, time_limit: float | None = None) -> Allocation:
        """The exact optimum at ``budget`` (see :func:`solve_mckp`)."""
        return _solve(self, budget, time_limit)

    def pick(self, pos: Sequence[int]) -> tuple[tuple[int, ...], int, float]:
        """Positions among kept options -> (original indices, exact total cost, objective)."""
        choice = tuple(int(self.index[g][k]) for g, k in enumerate(pos))
        cost = self.fixed + sum(int(self.cost[g][k]) for g, k in enumerate(pos))
        obj = math.fsum(float(self.obj[g][k]) for g, k in enumerate(pos))
        return choice, cost, obj


def _whole(name: str, value: object) -> int:
    """A whole number (ints, numpy ints, integral floats) as int."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _bytes(name: str, value: object) -> int:
    if _whole(name, value) < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _prune(g: int, options: Sequence[Option]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(options) == 0:
        raise ValueError(f"group {g} has no options")
    rows = []
    for k, option in enumerate(options):
        try:
            cost, obj = option
        except (TypeError, ValueError):
            raise ValueError(f"group {g} option {k} must be (cost_bytes, objective), got {option!r}") from None
        cost = _bytes(f"group {g} option {k}: cost", cost)
        if isinstance(obj, bool) or not isinstance(obj, (int, float, np.number)) or not math.isfinite(obj):
            raise ValueError(f"group {g} option {k}: objective must be a finite number, got {obj!r}")
        rows.append((cost, float(obj), k))
    rows.sort()
    kept = []
    for cost, obj, k in rows:  # increasing cost: keep only strict objective improvements
        if not kept or obj < kept[-1][1]:
            kept.append((cost, obj, k))
    return (np.array([k for _, _, k in kept], dtype=np.int64), np.array([c for c, _, _ in kept], dtype=np.int64),
            np.array([o for _, o, _ in kept], dtype=np.float64))


def solve_mckp(groups: Sequence[Sequence[Option]], budget: int, *, fixed_bytes: int = 0,
               time_limit: float | None = None) -> Allocation:
    """Exact multiple-choice knapsack: one option per group, Σ objective min, Σ cost + fixed ≤ budget.

    ``groups[g]`` is a list of ``(cost_bytes: int, objective: float)``. Raises
    :class:`InfeasibleBudget` (with the minimum bytes) when nothing fits, ``ValueError`` on
    malformed options. ``time_limit`` (seconds, per HiGHS call; at most two calls) may stop the
    search early: the best plan found is returned with ``optimal`` False.
    """
    return Knapsack(groups, fixed_bytes).solve(budget, time_limit)


def _solve(problem: Knapsack, budget: int, time_limit: float | None) -> Allocation:
    start = time.perf_counter()
    budget = _whole("budget", budget)  # a negative budget is merely infeasible
    if problem.min_cost > budget:
        raise InfeasibleBudget(problem.min_cost, budget)
    if problem.free_cost <= budget:
        choice, cost, obj = problem.pick([len(c) - 1 for c in problem.cost])
        return Allocation(choice, cost, obj, True, 0.0, False, time.perf_counter() - start)
    pos, optimal, gap = _exact(problem, budget, time_limit)
    choice, cost, obj = problem.pick(pos)
    log.debug("mckp: %d groups, %d kept options, %.3f s, gap %.2g", len(pos), problem.n_kept,
              time.perf_counter() - start, gap)
    return Allocation(choice, cost, obj, optimal, gap, True, time.perf_counter() - start)


def _lagrangian(problem: Knapsack, budget: int) -> tuple[list[np.ndarray], float, list[int], float, float]:
    """LP bound, reduced costs and a greedy incumbent.

    The LP relaxation of the MCKP is solved greedily on each group's lower convex hull; its
    critical slope λ gives every option the reduced cost r = obj + λ·cost − min_j(obj_j + λ·cost_j) ≥ 0,
    and every feasible plan scores ≥ LB + Σ r over its choices. Returns (r per group, LB, incumbent
    positions, incumbent objective UB, a float tolerance).
    """
    free = budget - problem.min_cost  # bytes above the all-cheapest plan
    steps = []  # (efficiency, group, to_position, d_cost)
    for g, (cost, obj) in enumerate(zip(problem.cost, problem.obj)):
        for a, b in _hull_steps(cost, obj):
            steps.append((float(obj[a] - obj[b]) / int(cost[b] - cost[a]), g, b, int(cost[b] - cost[a])))
    steps.sort(key=lambda s: -s[0])  # stable: within a group hull slopes already decrease
    pos = [0] * len(problem.cost)
    lam = 0.0
    for eff, g, b, d_cost in steps:
        if d_cost > free:
            lam = eff
            break
        free -= d_cost
        pos[g] = b
    pos = _greedy_fill(problem, pos, budget)
    capacity = budget - problem.fixed
    lagr = [o + lam * c.astype(np.float64) for c, o in zip(problem.cost, problem.obj)]
    lb = math.fsum(float(v.min()) for v in lagr) - lam * capacity
    tol = 1e-9 * (math.fsum(float(abs(o).max()) for o in problem.obj) + lam * capacity)
    return [v - v.min() for v in lagr], lb, pos, problem.pick(pos)[2], tol


def _keep(reduced: list[np.ndarray], slack: float, must: Sequence[int]) -> list[np.ndarray]:
    """Options whose reduced cost is within ``slack``, plus the positions in ``must``."""
    return [np.union1d(np.flatnonzero(r <= slack), [k]) for r, k in zip(reduced, must)]


def _hull_steps(cost: np.ndarray, obj: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive (from, to) positions along the lower convex hull of a pruned group."""
    hull = [0]
    for k in range(1, len(cost)):
        while len(hull) >= 2:
            i, j = hull[-2], hull[-1]  # drop j if it lies on or above the chord i -> k
            if (obj[j] - obj[i]) * (cost[k] - cost[i]) >= (obj[k] - obj[i]) * (cost[j] - cost[i]):
                hull.pop()
            else:
                break
        hull.append(k)
    return list(zip(hull[:-1], hull[1:]))


def _greedy_fill(problem: Knapsack, pos: list[int], budget: int) -> list[int]:
    """Spend leftover bytes on the single upgrade with the largest objective drop, repeatedly."""
    pos = list(pos)
    free = budget - problem.pick(pos)[1]
    while True:
        best, move = 0.0, None
        for g, (cost, obj) in enumerate(zip(problem.cost, problem.obj)):
            k = pos[g]
            fits = np.flatnonzero(cost[k + 1:] - cost[k] <= free)
            if len(fits):
                j = k + 1 + int(fits[-1])  # pruned: the dearest option that fits is the best one
                if obj[k] - obj[j] > best:
                    best, move = float(obj[k] - obj[j]), (g, j)
        if move is None:
            return pos
        g, j = move
        free -= int(problem.cost[g][j] - problem.cost[g][pos[g]])
        pos[g] = j


def _exact(problem: Knapsack, budget: int, time_limit: float | None) -> tuple[list[int], bool, float]:
    """Exact optimum (kept positions per group, optimal, gap) of a budget that binds.

    Every plan scoring below U uses only options with reduced cost ≤ U − LB (see
    :func:`_lagrangian`), so with the greedy incumbent's U most options drop out. What remains is
    enumerated exactly by :func:`_pareto_dp`; if that grows too large, HiGHS solves it in at most
    two MILPs: phase 1 over a tighter set (a tenth of the gap) holding the incumbent, whose optimum
    U1 shrinks the gap; if every option with reduced cost ≤ U1 − LB was already in phase 1's set,
    U1 is the global optimum, otherwise phase 2 solves over that (complete) set.
    """
    reduced, lb, incumbent, ub, tol = _lagrangian(problem, budget)
    kept = _keep(reduced, ub - lb + tol, incumbent)
    pos = _pareto_dp(problem, kept, reduced, ub - lb + tol, budget)
    log.debug("mckp: LP bound %.6g, greedy %.6g, %d options within the gap, %s", lb, ub,
              sum(map(len, kept)), "enumerated" if pos is not None else "HiGHS")
    if pos is not None:
        return pos, True, 0.0
    tight = _keep(reduced, _PHASE1 * (ub - lb) + tol, incumbent)
    pos, optimal, gap = _milp_subset(problem, tight, budget, time_limit)
    if not optimal:
        return (incumbent if problem.pick(incumbent)[2] < problem.pick(pos)[2] else pos), False, gap
    full = _keep(reduced, problem.pick(pos)[2] - lb + tol, pos)
    if all(len(np.setdiff1d(f, t)) == 0 for f, t in zip(full, tight)):
        return pos, True, gap
    best, optimal, gap = _milp_subset(problem, full, budget, time_limit)
    if not optimal and problem.pick(pos)[2] < problem.pick(best)[2]:
        return pos, False, gap  # stopped early: keep phase 1's plan when it is better
    return best, optimal, gap


def _pareto_dp(problem: Knapsack, kept: list[np.ndarray], reduced: list[np.ndarray], slack: float,
               budget: int) -> list[int] | None:
    """Exact enumeration over the kept options, group by group, of partial plans that (a) still
    fit with the cheapest kept options of the groups to come, (b) keep their reduced costs within
    ``slack`` and (c) are not dominated (another partial plan costs no more and scores no worse).
    (c) keeps (b) consistent: reduced cost = objective + λ·cost + const. Returns positions, or None
    once more than _DP_MAX_STATES partial plans survive a group."""
    rest = np.cumsum([0] + [int(problem.cost[g][k].min()) for g, k in reversed(list(enumerate(kept)))])[::-1]
    room = budget - problem.fixed
    cost, obj, red = np.zeros(1, np.int64), np.zeros(1), np.zeros(1)
    trail = []  # per group: (parent state, position) of each surviving state
    for g, k in enumerate(kept):
        nc = (cost[:, None] + problem.cost[g][k][None, :]).ravel()
        no = (obj[:, None] + problem.obj[g][k][None, :]).ravel()
        nr = (red[:, None] + reduced[g][k][None, :]).ravel()
        ok = np.flatnonzero((nc + rest[g + 1] <= room) & (nr <= slack))
        ok = ok[np.lexsort((no[ok], nc[ok]))]  # by cost, then objective
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], no[ok][:-1]]))
        sel = ok[no[ok] < best_before]
        if len(sel) > _DP_MAX_STATES:
            return None
        cost, obj, red = nc[sel], no[sel], nr[sel]
        trail.append((sel // len(k), k[sel % len(k)]))
    state, pos = int(np.argmin(obj)), [0] * len(kept)
    for g in range(len(kept) - 1, -1, -1):
        parent, chosen = trail[g]
        pos[g], state = int(chosen[state]), int(parent[state])
    return pos


def _milp_subset(problem: Knapsack, kept: list[np.ndarray], budget: int,
                 time_limit: float | None) -> tuple[list[int], bool, float]:
    """HiGHS over the options ``kept`` (positions per group); groups with one option are fixed."""
    open_groups = [g for g, k in enumerate(kept) if len(k) > 1]
    pos = [int(k[0]) for k in kept]
    if not open_groups:
        return pos, True, 0.0
    cost = [problem.cost[g][kept[g]] for g in open_groups]
    obj = [problem.obj[g][kept[g]] for g in open_groups]
    sizes = [len(c) for c in cost]
    base = sum(int(c[0]) for c in cost)
    fixed = sum(int(problem.cost[g][pos[g]]) for g in range(len(kept)) if len(kept[g]) == 1)
    extra = np.concatenate([c - c[0] for c in cost])  # bytes above each group's cheapest
    unit = reduce(math.gcd, (int(v) for v in extra if v), 0) or 1
    units = extra // unit  # exact int64 units; the float copy feeds HiGHS
    weights = units.astype(np.float64)
    offsets = np.cumsum([0] + sizes[:-1])
    spread = max(float(o[0] - o[-1]) for o in obj) or 1.0
    c = np.concatenate([o - o[-1] for o in obj]) * (_OBJ_SCALE / spread)
    groups = np.repeat(np.arange(len(sizes)), sizes)
    one_hot = sparse.csr_array((np.ones(len(groups)), (groups, np.arange(len(groups)))),
                               shape=(len(sizes), len(groups)))
    capacity = (budget - problem.fixed - fixed - base) // unit
    options = {"disp": False, "mip_rel_gap": 0.0}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    for _ in range(_MAX_TIGHTEN):
        constraints = [LinearConstraint(one_hot, 1, 1),
                       LinearConstraint(sparse.csr_array(weights[None, :]), -np.inf, capacity)]
        with quiet_stdout():
            res = milp(c, constraints=constraints, integrality=np.ones_like(c), bounds=Bounds(0, 1),
                       options=options)
        if res.x is None:
            if res.status != 0 and time_limit is not None:  # out of time before any solution
                return pos, False, math.inf
            raise PlannerError(f"knapsack solver found no solution ({res.message})")
        local = [int(np.argmax(res.x[o:o + size])) for o, size in zip(offsets, sizes)]
        used = sum(int(units[o + k]) for o, k in zip(offsets, local))
        if used <= capacity:
            for g, k in zip(open_groups, local):
                pos[g] = int(kept[g][k])
            return pos, res.status == 0, float(getattr(res, "mip_gap", 0.0) or 0.0)
        log.warning("mckp: rounded solution exceeds the budget by %d units; tightening", used - capacity)
        capacity -= used - capacity
    raise PlannerError("knapsack solver kept returning over-budget solutions")


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence file descriptor 1 for the solve: HiGHS' MIP code prints some lines straight to stdout
    whatever ``disp`` says, which would corrupt ``--json`` output. Python-level stdout is flushed
    first; where fd 1 cannot be duplicated, nothing is redirected."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)

"""Exact multiple-choice knapsack: brute-force optimality, monotone budgets, infeasibility, speed,
and one pruned problem re-solved at many budgets."""
from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from planner.search import allocate
from planner.search.allocate import Allocation, InfeasibleBudget, Knapsack, solve_mckp
from planner.errors import PlannerError

Groups = list[list[tuple[int, float]]]
# SmolLM2-135M: 30 blocks x 7 target Linears (q, k, v, o, gate, up, down)
SMOL_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def brute_force(groups: Groups, budget: int, fixed: int = 0) -> float:
    best = math.inf
    for choice in itertools.product(*[range(len(g)) for g in groups]):
        if fixed + sum(g[k][0] for g, k in zip(groups, choice)) <= budget:
            best = min(best, sum(g[k][1] for g, k in zip(groups, choice)))
    return best


def random_groups(rng: np.random.Generator, n_groups: int, max_options: int, cost_hi: int = 1000) -> Groups:
    groups = []
    for _ in range(n_groups):
        n = int(rng.integers(1, max_options + 1))
        costs = rng.integers(0, cost_hi, n)
        objs = rng.random(n).round(2) if rng.random() < 0.3 else rng.random(n)  # rounded: ties happen
        groups.append([(int(c), float(o)) for c, o in zip(costs, objs)])
    return groups


def smollm2_sized(rng: np.random.Generator) -> Groups:
    """210 groups of 15-66 (bits, rank) options with byte costs and a residual-like objective."""
    groups = []
    for _ in range(30):
        for out, inp in SMOL_SHAPES:
            ranks = np.sort(rng.choice(np.arange(0, 129), size=int(rng.integers(5, 23)), replace=False))
            weight = rng.lognormal(0.0, 1.0)
            options = []
            for bits in (2, 4, 8):
                for r in ranks:
                    cost = out * inp * bits // 8 + out * inp // 64 * 4 + int(r) * (out + inp) * 16
                    obj = weight * (math.exp(-1.3 * bits) * (1 - r / min(out, inp)) ** 1.5
                                    * (1 + 0.05 * rng.standard_normal()) + 0.01 * math.exp(-r / 32))
                    options.append((cost, obj))
            groups.append(options)
    return groups


def bounds_of(groups: Groups) -> tuple[int, int]:
    lo = sum(min(c for c, _ in g) for g in groups)
    hi = sum(max(c for c, _ in g) for g in groups)
    return lo, hi


def check(alloc: Allocation, groups: Groups, budget: int, fixed: int = 0) -> None:
    assert len(alloc.choice) == len(groups)
    cost = fixed + sum(g[k][0] for g, k in zip(groups, alloc.choice))
    assert alloc.total_cost == cost <= budget
    assert alloc.objective == pytest.approx(sum(g[k][1] for g, k in zip(groups, alloc.choice)), rel=1e-12, abs=1e-12)


@pytest.fixture(params=["enumeration", "highs"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the exact enumeration, and again with it disabled so HiGHS solves."""
    if request.param == "highs":
        monkeypatch.setattr(allocate, "_DP_MAX_STATES", 0)
    return request.param


def test_matches_brute_force_on_small_random_instances(engine: str) -> None:
    rng = np.random.default_rng(0)
    solved = 0
    for _ in range(150):
        groups = random_groups(rng, int(rng.integers(1, 7)), 5)
        fixed = int(rng.integers(0, 50))
        lo, hi = bounds_of(groups)
        budget = fixed + int(rng.integers(lo, hi + 2))
        alloc = solve_mckp(groups, budget, fixed_bytes=fixed)
        check(alloc, groups, budget, fixed)
        assert alloc.optimal and alloc.mip_gap <= 1e-9
        assert alloc.objective == pytest.approx(brute_force(groups, budget, fixed), rel=1e-9, abs=1e-12)
        solved += 1
    assert solved == 150


def test_pruning_dominated_options_keeps_the_optimum() -> None:
    rng = np.random.default_rng(1)
    for _ in range(30):
        groups = random_groups(rng, 5, 4)
        lo, hi = bounds_of(groups)
        budget = (lo + hi) // 2
        padded = [g + [(c, o + 0.5) for c, o in g] + [(c + 7, o) for c, o in g] for g in groups]  # dominated
        a, b = solve_mckp(groups, budget), solve_mckp(padded, budget)
        assert a.objective == pytest.approx(b.objective, rel=1e-12)
        assert all(k < len(g) for g, k in zip(groups, b.choice))  # the dominated copies are never picked


def test_never_worse_than_random_feasible_choices(engine: str) -> None:
    rng = np.random.default_rng(2)
    groups = random_groups(rng, 40, 12, cost_hi=10**6)
    choices = [[int(rng.integers(len(g))) for g in groups] for _ in range(3000)]
    costs = [sum(g[k][0] for g, k in zip(groups, c)) for c in choices]
    budget = int(np.median(costs))
    alloc = solve_mckp(groups, budget)
    check(alloc, groups, budget)
    feasible = [c for c, cost in zip(choices, costs) if cost <= budget]
    assert len(feasible) >= 1500
    assert alloc.objective <= min(sum(g[k][1] for g, k in zip(groups, c)) for c in feasible) + 1e-12


def test_tighter_budget_is_never_better(engine: str) -> None:
    rng = np.random.default_rng(3)
    groups = random_groups(rng, 30, 10, cost_hi=10**5)
    lo, hi = bounds_of(groups)
    previous = -math.inf
    for budget in np.linspace(hi, lo, 25).astype(int):
        alloc = solve_mckp(groups, int(budget))
        check(alloc, groups, int(budget))
        assert alloc.objective >= previous - 1e-12
        previous = alloc.objective


def test_infeasible_budget_states_the_minimum() -> None:
    groups = [[(600_000_000, 1.0), (900_000_000, 0.5)], [(400_000_000, 2.0)]]
    with pytest.raises(InfeasibleBudget) as err:
        solve_mckp(groups, 1_200_000_000, fixed_bytes=250_000_000)
    assert isinstance(err.value, PlannerError) and err.value.min_bytes == 1_250_000_000
    message = str(err.value)
    assert "1250000000 bytes (1.250 GB" in message and "budget 1200000000 bytes (1.200 GB" in message
    assert "\n" not in message
    assert solve_mckp(groups, 1_250_000_000, fixed_bytes=250_000_000).choice == (0, 0)


def test_budget_that_does_not_bind() -> None:
    groups = [[(10, 3.0), (20, 1.0), (30, 1.0)], [(5, 2.0), (50, 0.1)]]
    alloc = solve_mckp(groups, 10**9)
    assert alloc.choice == (1, 1) and not alloc.budget_binds and alloc.total_cost == 70
    assert solve_mckp(groups, 69).budget_binds


@pytest.mark.parametrize("groups, message", [
    ([[]], "group 0 has no options"),
    ([[(10, 1.0)], [(-1, 1.0)]], "group 1 option 0: cost must be a non-negative integer, got -1"),
    ([[(10.5, 1.0)]], "cost must be an integer, got 10.5"),
    ([[(10, float("nan"))]], "objective must be a finite number"),
    ([[(10,)]], "must be (cost_bytes, objective)"),
    ([], "no groups"),
])
def test_malformed_options(groups: Groups, message: str) -> None:
    with pytest.raises(ValueError) as err:
        solve_mckp(groups, 100)
    assert message in str(err.value)


def full_milp_objective(groups: Groups, budget: int) -> float:
    """Independent check: the plain MILP over every option, no pruning or reduction; the
    objective of its (exactly feasible) choice."""
    cost = np.array([c for g in groups for c, _ in g], dtype=np.float64)
    obj = np.array([o for g in groups for _, o in g])
    sizes = [len(g) for g in groups]
    rows = np.repeat(np.arange(len(groups)), sizes)
    one_hot = sparse.csr_array((np.ones(len(rows)), (rows, np.arange(len(rows)))))
    scale = 1e3 / max(obj.max() - obj.min(), 1e-12)
    res = milp(obj * scale, integrality=np.ones_like(obj), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one_hot, 1, 1), LinearConstraint(cost[None, :] / 1e6, -np.inf, budget / 1e6)],
               options={"mip_rel_gap": 0.0})
    assert res.status == 0
    offsets = np.cumsum([0] + sizes[:-1])
    choice = [int(np.argmax(res.x[o:o + n])) for o, n in zip(offsets, sizes)]
    assert sum(g[k][0] for g, k in zip(groups, choice)) <= budget
    return sum(g[k][1] for g, k in zip(groups, choice))


def test_matches_plain_milp_on_medium_instances(engine: str) -> None:
    rng = np.random.default_rng(8)
    for _ in range(12):
        groups = random_groups(rng, 40, 15, cost_hi=10**6)
        lo, hi = bounds_of(groups)
        budget = int(lo + rng.random() * (hi - lo))
        alloc = solve_mckp(groups, budget)
        check(alloc, groups, budget)
        assert alloc.objective <= full_milp_objective(groups, budget) + 1e-9


def test_smollm2_sized_instance_is_fast_exact_and_quiet(engine: str, capfd: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(4)
    groups = smollm2_sized(rng)
    assert len(groups) == 210 and min(map(len, groups)) >= 15 and max(map(len, groups)) <= 66
    lo = bounds_of(groups)[0]
    best = sum(min(g, key=lambda o: (o[1], o[0]))[0] for g in groups)
    times = []
    for frac in (0.1, 0.3, 0.5, 0.7, 0.9):
        budget = int(lo + frac * (best - lo))
        capfd.readouterr()
        start = time.perf_counter()
        alloc = solve_mckp(groups, budget)
        times.append(time.perf_counter() - start)
        assert capfd.readouterr().out == "", "the solver must not write to stdout (breaks --json)"
        check(alloc, groups, budget)
        assert alloc.optimal and alloc.budget_binds
        if frac == 0.5:  # the Lagrangian reduction must not lose the optimum
            assert alloc.objective <= full_milp_objective(groups, budget) * (1 + 1e-7)
    with capfd.disabled():
        print(f"\nSmolLM2-sized MCKP (210 groups x 15-66 options, {engine}): solve {max(times):.3f} s worst, "
              f"{sum(times) / len(times):.3f} s mean over 5 budgets")
    assert max(times) < 5.0  # generous: the < 1 s claim is measured in bench/


def test_negative_budget_and_time_limit() -> None:
    groups = smollm2_sized(np.random.default_rng(6))
    with pytest.raises(InfeasibleBudget):
        solve_mckp(groups, -1)
    lo = bounds_of(groups)[0]
    best = sum(min(g, key=lambda o: (o[1], o[0]))[0] for g in groups)
    budget = (lo + best) // 2
    exact = solve_mckp(groups, budget)
    rushed = solve_mckp(groups, budget, time_limit=1e-6)  # may stop before proving optimality
    check(rushed, groups, budget)
    assert rushed.objective >= exact.objective - 1e-12
    assert rushed.optimal or rushed.objective >= exact.objective


def test_one_knapsack_solves_many_budgets_like_fresh_solves(engine: str) -> None:
    rng = np.random.default_rng(9)
    groups = random_groups(rng, 30, 10, cost_hi=10**5)
    knapsack = Knapsack(groups, 77)
    lo, hi = bounds_of(groups)
    assert knapsack.min_cost == lo + 77
    assert knapsack.free_cost == 77 + sum(min(g, key=lambda o: (o[1], o[0]))[0] for g in groups)
    for budget in np.linspace(lo + 77, hi + 77, 9).astype(int):
        again, fresh = knapsack.solve(int(budget)), solve_mckp(groups, int(budget), fixed_bytes=77)
        assert (again.choice, again.total_cost, again.objective) == (fresh.choice, fresh.total_cost, fresh.objective)

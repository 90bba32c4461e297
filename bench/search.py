"""Exact allocation: the hand-written solver against scipy's milp on a phi-2-sized workload, and (with
--smollm2) the guided search against the plain exact plan on SmolLM2's real tables.

    python -m bench.search [--solves 200] [--json] [--out bench/results/search.json]    # ~5 min, no weights
    python -m bench.search --smollm2 [--budget u4r4] [--trials 16] ...                   # + SmolLM2, CPU

phi-2 workload (the shipped config's facts, no weights): 192 target layers (32 blocks x q_proj,
k_proj, v_proj, dense 2560x2560, fc1 10240x2560, fc2 2560x10240), options bits {2,4,8} x ranks
{0,8,16,32,64}, byte costs from planner.memory.layer_bytes for the default run (fine-tune, CUDA,
seq 1024, batch 1). Objective: OptionTable's estimate from a residual model with real magnitudes
(see :func:`synthetic_table`). Two jobs the planner gives the solver: a Pareto sweep (30 budgets,
neutral objective, as ``--pareto``) and Optuna trials (``--solves`` shaped objectives with random
Shapings, as the guided search samples them, at 25/50/75% of the byte range).

Peers, in the same run: ``milp-scaled`` = one scipy.optimize.milp (HiGHS, mip_rel_gap 0) over every
option with costs shifted by each group's cheapest option and counted in gcd units, objectives
shifted and scaled to a spread of 1e3 (what replacing the hand-written solver by milp would leave);
``milp-plain`` = milp on raw byte costs with the objective divided by the worst plan's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import replace
from functools import reduce
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from bench.common import BANK_STORE, QUICK, setup, write_json
from planner.memory import fixed_bytes, layer_bytes
from planner.search.allocate import InfeasibleBudget, Option, quiet_stdout, solve_mckp
from planner.search.objective import OptionTable, Shaping
from planner.search.flow import make_plan
from planner.search.study import SHAPE_RANGE
from planner.settings import LayerChoice, RunSettings
from planner.sources import resolve

Groups = list[list[Option]]
OPTIONS = [(b, r) for b in (2, 4, 8) for r in (0, 8, 16, 32, 64)]
NF_REL_ERROR = {2: 0.53, 4: 0.088, 8: 0.0055}  # ||W - Q|| / ||W|| of NF2/NF4/NF8 on SmolLM2 (README)


def phi2_costs() -> tuple[list[Any], np.ndarray, int]:
    """phi-2's targets, their byte cost per option [192, 15] and the fixed bytes (default run)."""
    source = resolve("phi-2", allow_download=False)
    targets, run = source.targets(), RunSettings()
    costs = np.array([[layer_bytes(t, LayerChoice(bits=b, rank=r, block_size=64), run, source.facts)
                       for b, r in OPTIONS] for t in targets], dtype=np.int64)
    return targets, costs, fixed_bytes(source.facts, targets, run, source.non_target_params(targets))


def synthetic_table(targets: Sequence[Any], seed: int = 0) -> OptionTable:
    """est[l, (b, r)] = w_l * e_b^2 * (1 - share of the residual's energy in its top r singular values).

    e_b: NF2/NF4/NF8 relative errors (+-5% per layer); the residual spectrum sigma_i^2 ~ i^-gamma
    (gamma 0.2-0.8 at 2 bits, where W - Q keeps structure; 0.05-0.3 at 4/8 bits, nearly white);
    w_l lognormal (sigma 1) with the first and last blocks up to 3x more sensitive; scaled so the
    4-bit rank-0 plan's loss rise is ~3e-4 nats, the magnitude the real Fisher estimates have."""
    rng = np.random.default_rng(seed)
    n_blocks = max(t.block for t in targets) + 1
    est = torch.zeros(len(targets), len(OPTIONS), dtype=torch.float64)
    frob = torch.zeros_like(est)
    for i, t in enumerate(targets):
        depth = t.block / max(n_blocks - 1, 1)
        weight = rng.lognormal(0, 1.0) * (1 + 2 * math.exp(-8 * depth) + math.exp(-8 * (1 - depth)))
        sq_norm = t.shape[0] * t.shape[1] * 0.02 ** 2 * rng.uniform(0.5, 2)
        for bits, err in NF_REL_ERROR.items():
            err *= 1 + 0.05 * rng.standard_normal()
            gamma = rng.uniform(0.2, 0.8) if bits == 2 else rng.uniform(0.05, 0.3)
            spectrum = np.arange(1, min(t.shape) + 1) ** -gamma
            captured = np.concatenate([[0.0], np.cumsum(spectrum)]) / spectrum.sum()
            for k, (b, r) in enumerate(OPTIONS):
                if b == bits:
                    est[i, k] = 3e-4 / len(targets) * weight * (err / NF_REL_ERROR[4]) ** 2 * (1 - captured[r])
                    frob[i, k] = sq_norm * err ** 2 * (1 - captured[r])
    return OptionTable(list(targets), list(OPTIONS), est, frob, n_blocks)


def random_shaping(rng: np.random.Generator, types: Sequence[str]) -> Shaping:
    """A Shaping drawn from the guided search's ranges (planner.search.study.sample_shaping)."""
    lo, hi = math.log(SHAPE_RANGE[0]), math.log(SHAPE_RANGE[1])
    return Shaping(type_weights={t: float(math.exp(rng.uniform(lo, hi))) for t in types},
                   depth_slope=float(rng.uniform(-3, 3)), mix=float(rng.uniform()),
                   capacity=float(rng.uniform(0, 2)), rank_floor=int(rng.choice([0, 8, 16, 32, 64])))


def groups_of(shaped: torch.Tensor, costs: np.ndarray) -> Groups:
    """Per layer: (bytes, objective) of every option the shaping keeps (finite objective)."""
    return [[(int(costs[i, k]), float(shaped[i, k])) for k in range(costs.shape[1]) if math.isfinite(float(shaped[i, k]))]
            for i in range(costs.shape[0])]


def _one_hot(sizes: Sequence[int]) -> sparse.csr_array:
    rows = np.repeat(np.arange(len(sizes)), sizes)
    return sparse.csr_array((np.ones(len(rows)), (rows, np.arange(len(rows)))), shape=(len(sizes), len(rows)))


def _decode(groups: Groups, x: np.ndarray, budget: int, fixed: int) -> tuple[float, bool]:
    """(objective, fits in exact integers) of a milp solution vector."""
    offsets = np.cumsum([0] + [len(g) for g in groups[:-1]])
    choice = [int(np.argmax(x[o:o + len(g)])) for o, g in zip(offsets, groups)]
    used = fixed + sum(g[k][0] for g, k in zip(groups, choice))
    return math.fsum(g[k][1] for g, k in zip(groups, choice)), used <= budget


def milp_scaled(groups: Groups, budget: int, fixed: int) -> tuple[float, bool]:
    """One HiGHS MILP over every option; costs shifted per group and in gcd units, objective scaled."""
    cost = [np.array([c for c, _ in g], dtype=np.int64) for g in groups]
    obj = [np.array([o for _, o in g]) for g in groups]
    extra = np.concatenate([c - c.min() for c in cost])
    unit = reduce(math.gcd, (int(v) for v in extra if v), 0) or 1
    spread = max(float(o.max() - o.min()) for o in obj) or 1.0
    c = np.concatenate([o - o.min() for o in obj]) * (1e3 / spread)
    capacity = (budget - fixed - sum(int(v.min()) for v in cost)) // unit
    rows = [LinearConstraint(_one_hot([len(g) for g in groups]), 1, 1),
            LinearConstraint(sparse.csr_array((extra // unit).astype(np.float64)[None, :]), -np.inf, capacity)]
    with quiet_stdout():
        res = milp(c, constraints=rows, integrality=np.ones_like(c), bounds=Bounds(0, 1),
                   options={"mip_rel_gap": 0.0, "disp": False})
    return _decode(groups, res.x, budget, fixed)


def milp_plain(groups: Groups, budget: int, fixed: int) -> tuple[float, bool]:
    """HiGHS on raw byte costs; objective divided by the worst plan's (bench/search.py's old peer)."""
    c = np.array([o for g in groups for _, o in g])
    cost = np.array([b for g in groups for b, _ in g], dtype=np.float64)
    scale = 1.0 / max(math.fsum(max(abs(o) for _, o in g) for g in groups), 1e-30)
    rows = [LinearConstraint(_one_hot([len(g) for g in groups]), 1, 1),
            LinearConstraint(cost[None, :], -np.inf, budget - fixed)]
    with quiet_stdout():
        res = milp(c * scale, constraints=rows, integrality=np.ones_like(c), bounds=Bounds(0, 1),
                   options={"mip_rel_gap": 0.0, "disp": False})
    return _decode(groups, np.round(res.x), budget, fixed)


def compare(instances: list[tuple[Groups, int]], fixed: int) -> dict[str, Any]:
    """Every solver on every binding, feasible instance: seconds and objective vs the exact solver's."""
    peers: dict[str, Callable[[Groups, int, int], tuple[float, bool]]] = {"milp-scaled": milp_scaled,
                                                                          "milp-plain": milp_plain}
    secs: dict[str, list[float]] = {"exact": [], **{p: [] for p in peers}}
    worse: dict[str, list[float]] = {p: [] for p in peers}
    over = {p: 0 for p in peers}
    skipped = 0
    for groups, budget in instances:
        t0 = time.perf_counter()
        try:
            ours = solve_mckp(groups, budget, fixed_bytes=fixed)
        except InfeasibleBudget:  # a rank floor that cannot fit: the guided search prunes that trial
            skipped += 1
            continue
        secs["exact"].append(time.perf_counter() - t0)
        for name, solve in peers.items():
            t0 = time.perf_counter()
            obj, fits = solve(groups, budget, fixed)
            secs[name].append(time.perf_counter() - t0)
            over[name] += not fits
            worse[name].append((obj - ours.objective) / max(abs(ours.objective), 1e-30))
    out: dict[str, Any] = {"solves": len(secs["exact"]), "infeasible_skipped": skipped}
    for name, s in secs.items():
        out[name] = {"total_s": round(sum(s), 3), "median_ms": round(1e3 * statistics.median(s), 1),
                     "max_ms": round(1e3 * max(s), 1)}
        if name in peers:
            rel = np.array(worse[name])
            out[name].update(ratio_total_vs_exact=round(sum(s) / sum(secs["exact"]), 1),
                             plans_worse_than_exact=int((rel > 1e-9).sum()), max_rel_worse=float(rel.max()),
                             plans_better_than_exact=int((rel < -1e-9).sum()), over_budget=over[name])
    return out


def phi2_workload(solves: int, seed: int = 0) -> dict[str, Any]:
    targets, costs, fixed = phi2_costs()
    table = synthetic_table(targets, seed)
    lo, hi = fixed + int(costs.min(1).sum()), fixed + int(costs.max(1).sum())
    neutral = groups_of(table.shaped(Shaping()), costs)
    free = fixed + sum(min(g, key=lambda o: (o[1], o[0]))[0] for g in neutral)  # where the budget stops binding
    sweep = [(neutral, int(b)) for b in np.linspace(lo, free, 30).round().astype(np.int64)]
    rng = np.random.default_rng(seed)
    types = sorted({t.module_type for t in targets})
    trials = [(groups_of(table.shaped(random_shaping(rng, types)), costs), int(lo + (0.25, 0.5, 0.75)[j % 3] * (hi - lo)))
              for j in range(solves)]
    return {"layers": len(targets), "options": len(OPTIONS), "fixed_bytes": fixed, "min_bytes": lo, "max_bytes": hi,
            "pareto_sweep_30": compare(sweep, fixed), "shaped_trials": compare(trials, fixed)}


def smollm2(budget_label: str, trials: int) -> dict[str, Any]:
    """SmolLM2's real tables at one budget: exact vs milp-scaled, and guided vs the exact plan by KL."""
    b = setup(replace(QUICK, trials=trials))
    budget = b.counter.budget_for(budget_label)
    out = make_plan(b.cfg, b.run, budget, bank_store=BANK_STORE)
    problem = out.problem
    keep, options = problem.group_options(problem.neutral)
    solved = compare([(options, problem.budget)] * 5, problem.fixed_bytes)
    exact = problem.solve(problem.neutral)
    opts = problem.table.options
    exact_scored = next((c for c in out.candidates if c.choice == exact.choice and c.proxy is not None), None)
    return {"budget": budget_label, "budget_bits_per_weight": round(b.counter.bits_per_weight(budget), 3),
            "budget_bytes": budget, "layers": len(b.prep.targets), "options": len(opts), "solvers_5_solves": solved,
            "guided_trials": out.plan.search["trials"], "guided_feasible": len(out.candidates),
            "guided_kl": out.chosen.proxy.kl if out.chosen.proxy else None,
            "exact_kl": exact_scored.proxy.kl if exact_scored else None,
            "guided_objective": out.chosen.objective, "exact_objective": exact.objective,
            "guided_same_as_exact": out.chosen.choice == exact.choice,
            # fine-tune mode values trainable capacity the additive objective does not see
            "guided_adapters": sum(opts[k][1] > 0 for k in out.chosen.choice),
            "exact_adapters": sum(opts[k][1] > 0 for k in exact.choice)}


def report(res: dict[str, Any]) -> None:
    print(f"load average {res['load_average']}, torch threads {res['threads']}")
    for job, r in (("phi-2 Pareto sweep (30 budgets)", res["phi2"]["pareto_sweep_30"]),
                   (f"phi-2 shaped trials ({res['phi2']['shaped_trials']['solves']} binding solves)",
                    res["phi2"]["shaped_trials"])):
        e = r["exact"]
        print(f"{job}: exact {e['total_s']:.2f} s (median {e['median_ms']} ms, max {e['max_ms']} ms)")
        for peer in ("milp-scaled", "milp-plain"):
            p = r[peer]
            print(f"  {peer}: {p['total_s']:.2f} s = {p['ratio_total_vs_exact']}x (median {p['median_ms']} ms, "
                  f"max {p['max_ms']} ms); worse plans {p['plans_worse_than_exact']} (max {p['max_rel_worse']:.1e} "
                  f"relative), better {p['plans_better_than_exact']}, over budget {p['over_budget']}")
    if "smollm2" in res:
        s = res["smollm2"]
        print(f"SmolLM2 {s['budget']}: exact {s['solvers_5_solves']['exact']['median_ms']} ms vs milp-scaled "
              f"{s['solvers_5_solves']['milp-scaled']['median_ms']} ms; zero-step KL guided "
              f"({s['guided_trials']} trials, {s['guided_feasible']} feasible) {s['guided_kl']} vs exact {s['exact_kl']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--solves", type=int, default=200, help="shaped-objective solves on the phi-2 workload")
    ap.add_argument("--smollm2", action="store_true", help="also SmolLM2's real tables (loads the model)")
    ap.add_argument("--budget", default="u4r4", help="SmolLM2: u{bits}r{rank} (that uniform plan's bytes) or bits/weight")
    ap.add_argument("--trials", type=int, default=16, help="SmolLM2: guided-search trials")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    res: dict[str, Any] = {"load_average": [round(x, 2) for x in os.getloadavg()], "threads": torch.get_num_threads(),
                           "phi2": phi2_workload(args.solves)}
    if args.smollm2:
        res["smollm2"] = smollm2(args.budget, args.trials)
    res["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        write_json(args.out, res)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        report(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

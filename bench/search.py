"""Search benchmark (SmolLM2, CPU): exact solve time vs plain scipy milp, Optuna-guided vs exact by the
zero-step proxy, and TPE's unseeded gap to the exact optimum in direct mode.

    python -m bench.search [--json] [--budget u4r4] [--trials 16] [--direct-trials 200]

Peer for the solve time: ``scipy.optimize.milp`` (HiGHS) on the same multiple-choice knapsack
(binary x[l, k], one option per group, one budget row, the same costs and neutral objective) with
no presolve of our own. Same run settings as bench.quality (fine-tune, CPU dtypes, seq 128).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from bench.common import QUICK, setup
from planner.search.pipeline import make_plan
from planner.search.study import direct_search


def plain_milp(problem: Any) -> tuple[float, float]:
    """(seconds, objective) of scipy milp on the problem's neutral objective, no reductions."""
    keep, options = problem.group_options(problem.neutral)
    n = sum(len(o) for o in options)
    c = np.concatenate([[obj for _, obj in o] for o in options])
    # HiGHS stops at an absolute gap of 1e-6 whatever mip_rel_gap says, and these objectives are ~1e-4:
    # scale by the worst plan's objective (independent of our answer) so only the relative gap counts
    scale = 1.0 / max(sum(max(obj for _, obj in o) for o in options), 1e-30)
    cost = np.concatenate([[b for b, _ in o] for o in options]).astype(float)
    rows, cols = [], []
    j = 0
    for g, o in enumerate(options):
        rows += [g] * len(o)
        cols += list(range(j, j + len(o)))
        j += len(o)
    one_hot = sparse.csr_array((np.ones(n), (rows, cols)), shape=(len(options), n))
    cons = [LinearConstraint(one_hot, 1, 1), LinearConstraint(cost[None, :], -np.inf, problem.budget - problem.fixed_bytes)]
    t0 = time.perf_counter()
    res = milp(c * scale, constraints=cons, integrality=np.ones(n), bounds=Bounds(0, 1), options={"mip_rel_gap": 0})
    return time.perf_counter() - t0, float(c @ np.round(res.x)) if res.x is not None else math.nan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--budget", default="u4r4", help="u{bits}r{rank} (that uniform plan's bytes) or bits per weight")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--direct-trials", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    s = replace(QUICK, trials=args.trials)
    b = setup(s)
    run, cfg, prep, counter = b.run, b.cfg, b.prep, b.counter
    budget = counter.budget_for(args.budget)
    out = make_plan(cfg, run, budget)
    problem = out.problem
    exact_times = []
    for _ in range(5):
        t0 = time.perf_counter()
        exact = problem.solve(problem.neutral)
        exact_times.append(time.perf_counter() - t0)
    milp_times, milp_obj = zip(*(plain_milp(problem) for _ in range(3)))
    ours = min(exact_times)
    res: dict[str, Any] = {
        "budget": args.budget, "budget_bits_per_weight": round(counter.bits_per_weight(budget), 3),
        "budget_bytes": budget, "n_layers": len(prep.targets),
        "n_options": len(problem.table.options),
        "exact_solve_s": ours, "plain_milp_s": min(milp_times), "speedup_vs_milp": min(milp_times) / ours,
        "exact_objective": exact.objective, "milp_objective": milp_obj[0],
        "objective_agrees": abs(exact.objective - milp_obj[0]) <= 1e-6 * max(abs(exact.objective), abs(milp_obj[0]))}
    opts = problem.table.options
    exact_scored = next((c for c in out.candidates if c.choice == exact.choice and c.proxy is not None), None)
    res.update(guided_trials=out.plan.search["trials"], guided_feasible=len(out.candidates), guided_kl=out.chosen.proxy.kl if out.chosen.proxy else None,
               exact_kl=exact_scored.proxy.kl if exact_scored else None,
               guided_objective=out.chosen.objective, guided_same_as_exact=out.chosen.choice == exact.choice,
               # fine-tune mode values trainable capacity the additive objective does not see
               guided_adapters=sum(opts[k][1] > 0 for k in out.chosen.choice),
               exact_adapters=sum(opts[k][1] > 0 for k in exact.choice))
    db = Path(tempfile.mkdtemp(prefix="bench-search-")) / "s.sqlite3"
    t0 = time.perf_counter()
    study, best = direct_search(problem, trials=args.direct_trials, timeout=None, seed=0,
                                storage=f"sqlite:///{db}", study_name="direct-unseeded", seeds=())
    res.update(direct_trials=args.direct_trials, direct_seconds=time.perf_counter() - t0,
               direct_feasible=best is not None,
               direct_best_objective=best.objective if best else None,
               direct_gap=(best.objective - exact.objective) if best else None,
               direct_rel_gap=((best.objective - exact.objective) / abs(exact.objective)) if best and exact.objective else None)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"exact solve: {ours * 1e3:.1f} ms (target < 1 s); plain scipy milp: {min(milp_times) * 1e3:.1f} ms "
              f"-> ratio milp/ours = {res['speedup_vs_milp']:.1f}x; objectives agree: {res['objective_agrees']}")
        print(f"zero-step KL: guided ({res['guided_trials']} trials, {res['guided_feasible']} feasible) "
              f"{res['guided_kl']} vs plain exact {res['exact_kl']}")
        print(f"direct TPE unseeded, {args.direct_trials} trials: gap to exact {res['direct_gap']} "
              f"(relative {res['direct_rel_gap']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does the short fine-tune proxy rank plans like a longer fine-tune does? (used by bench.quality --correlation)

Plans: the distinct candidates of one guided search at a binding budget (u4r4) plus the baselines at that budget
(uniform 2-bit at several ranks, first-k at two ranks), at least ``min_plans``. For each plan:
zero-step KL (the search's proxy), the fine-tune proxy (``short`` steps, seed 0, loss on the
proxy-validation split) and a longer fine-tune (``long`` steps, seed 1 — another data order — test
split loss). Spearman rho with a percentile bootstrap CI over plans.
"""
from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from bench.quality import RANK_GRID, Setting, first_k, setup, uniform
from planner.scoring.ftproxy import FinetuneSettings, eval_loss, finetune
from planner.search.pipeline import make_plan


def spearman_ci(x: list[float], y: list[float], n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    rho = float(spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    xa, ya, boots = np.asarray(x), np.asarray(y), []
    for _ in range(n_boot):
        idx = rng.integers(0, len(x), len(x))
        if len(set(idx.tolist())) < 3:
            continue
        r = spearmanr(xa[idx], ya[idx]).statistic
        if np.isfinite(r):
            boots.append(r)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"rho": rho, "ci95": [float(lo), float(hi)], "n": len(x)}


def correlation(s: Setting, budget_label: str = "u4r4", short: int = 6, long: int = 40,
                min_plans: int = 10) -> dict[str, Any]:
    run, cfg, prep, counter, model, train, val, test, bank = setup(s)
    names = [t.name for t in prep.targets]
    budget = counter.budget_for(budget_label)
    out = make_plan(cfg, run, budget)
    opts = out.problem.table.options
    plans: dict[tuple, dict[str, Any]] = {}
    for c in out.candidates:
        key = tuple(opts[k] for k in c.choice)
        plans.setdefault(key, {"name": f"trial{c.trial}", "kl": c.proxy.kl if c.proxy else None})
    extra = []
    for r in RANK_GRID:
        u = uniform(counter, 2, budget)
        if u and r <= u[0][1] and r in (0, 8, 16, u[0][1]):
            extra.append((f"uniform2-r{r}", [(2, r)] * len(names)))
    for r in (8, 16):
        fk = first_k(counter, budget, rank=r)
        if fk:
            extra.append((f"first{fk[1]}-r{r}", fk[0]))
    for name, plan in extra:
        plans.setdefault(tuple(plan), {"name": name, "kl": None})
    rows = []
    for plan, info in plans.items():
        t0 = time.perf_counter()
        assignment = dict(zip(names, plan))
        net = bank.build(assignment)
        finetune(net, train, FinetuneSettings(steps=short, seed=0))
        proxy = eval_loss(net, val)
        net = bank.build(assignment)
        finetune(net, train, FinetuneSettings(steps=long, seed=1))
        rows.append({**info, "bytes": counter.total(list(plan)), "proxy_loss": proxy, "long_test_loss": eval_loss(net, test)})
        print(f"{info['name']}: proxy {proxy:.3f} long {rows[-1]['long_test_loss']:.3f} "
              f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    res: dict[str, Any] = {"budget": budget_label, "short_steps": short, "long_steps": long, "plans": rows,
                           "ft_proxy_vs_long": spearman_ci([r["proxy_loss"] for r in rows],
                                                           [r["long_test_loss"] for r in rows])}
    with_kl = [r for r in rows if r["kl"] is not None]
    if len(with_kl) >= 4:  # the search's own candidates only: the close calls the proxy has to rank
        res["ft_proxy_vs_long_search_candidates"] = spearman_ci([r["proxy_loss"] for r in with_kl],
                                                                [r["long_test_loss"] for r in with_kl])
        res["zero_step_kl_vs_long"] = spearman_ci([r["kl"] for r in with_kl], [r["long_test_loss"] for r in with_kl])
    if len(rows) < min_plans:
        res["warning"] = f"only {len(rows)} distinct plans (< {min_plans})"
    return res

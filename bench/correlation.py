"""Does the short fine-tune proxy rank plans like a longer fine-tune does? (SmolLM2, CPU)

    python -m bench.correlation [--budget u4r4] [--short 12] [--long 40] [--out bench/results/correlation.json]

Plans: the distinct candidates of one guided search at a binding budget (u4r4) plus the baselines at that budget
(uniform 2-bit at several ranks, first-k at two ranks), at least ``min_plans``. For each plan:
zero-step KL (the search's proxy), the fine-tune proxy (``short`` steps, seed 0, loss on the
proxy-validation split) and a longer fine-tune (``long`` steps, seed 1 — another data order — test
split loss). Spearman rho with a percentile bootstrap CI over plans.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from bench.common import BANK_STORE, FULL, RANK_GRID, Setting, first_k, setup, uniform, write_json
from planner.scoring.ftproxy import FinetuneSettings, eval_loss, finetune
from planner.search.flow import make_plan


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
    b = setup(s)
    names, counter, bank = b.names, b.counter, b.bank
    budget = counter.budget_for(budget_label)
    out = make_plan(b.cfg, b.run, budget, bank_store=BANK_STORE)
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
        finetune(net, b.train, FinetuneSettings(steps=short, seed=0))
        proxy = eval_loss(net, b.val)
        net = bank.build(assignment)
        finetune(net, b.train, FinetuneSettings(steps=long, seed=1))
        rows.append({**info, "bytes": counter.total(list(plan)), "proxy_loss": proxy, "long_test_loss": eval_loss(net, b.test)})
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="u4r4", help="u{bits}r{rank} (that uniform plan's bytes) or bits per weight")
    ap.add_argument("--short", type=int, default=FULL.proxy_steps, help="fine-tune proxy steps")
    ap.add_argument("--long", type=int, default=FULL.steps, help="steps of the longer fine-tune")
    ap.add_argument("--out", default=None, help="also write the result here (JSON)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    # the full setting's guided search (its candidates are the plans); enough training blocks for --long
    result = correlation(replace(FULL, steps=args.long, budgets=(args.budget,)), budget_label=args.budget,
                         short=args.short, long=args.long)
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

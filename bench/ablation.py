"""The planner at tight budgets, variant by variant (SmolLM2, fine-tune mode, CPU).

    python -m bench.ablation [--budgets 4.0,3.5] [--variants all] [--steps N] [--seeds N] [--proxy-top K]
                             [--proxy-steps N] [--out bench/results/ablation.json]

Every planner variant is the product's own ``make_plan`` (guided search with the QUICK setting's
trials, zero-step KL) with the PlanConfig fields of ``bench.common.VARIANTS``: ``default`` sets
none (the planner a user runs), ``quick`` is ``--quick`` (the first planner), ``default+rot`` /
``default+rot-on`` add rotated widths (``--rotation search`` / ``on``), and issue 15's lever rows
set the bit menu, ``--double-quant``, ``--init`` and ``--rounding`` by hand. ``--proxy-top K`` gives
every variant the fine-tune proxy (K candidates with adapters, ``--proxy-steps`` LoRA steps each).
Baselines get the same levers: the LoftQ paper's first-k rule (4-bit first k blocks, 2-bit after)
plain, double-quantized and with NF3 for the tail, and uniform NF2/NF3 (± DQ) where they fit. The
ceiling ``lora-16bit`` (bf16 backbone, rank 16 everywhere, not held to the budget) runs once.
Evaluation (bench.evaluation): perplexity on the pydoc test split and on the out-of-domain text at
step 0 and after the QUICK fine-tune (12 steps, 3 seeds; a plan without adapters has nothing to
train), KL to the unquantized model at step 0 and to the same seed's fine-tuned lora-16bit after,
each row also as a ratio to the ceiling. Each row is built as ``materialize`` would build it: with
its plan's initialisation and rounding (data-aware factors, exact SVD), rotated widths rotated.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from typing import Any

import torch

from bench.common import (QUICK, VARIANTS, Assignment, Builders, lever_baselines, setup, variant_config,
                          write_json)
from bench.evaluation import Ceiling, describe_texts
from bench.quality import CEILING, measure_row, progress_line, ratios
from planner.scoring.bank import MemoryStore
from planner.scoring.ftproxy import CandidateBuilder
from planner.search.flow import make_plan

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="4.0,3.5", help="bits per target weight, comma list")
    ap.add_argument("--variants", default="all", help=f"comma list of {', '.join(VARIANTS)}, all (default) or none (baselines only)")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--no-ceiling", action="store_true")
    ap.add_argument("--rounding", action="store_true", help="also build each data-aware planner row's plan with "
                    "error-feedback rounding of Q (loftq.rounding)")
    ap.add_argument("--proxy-top", type=int, default=0, help="fine-tune proxy candidates for every planner variant")
    ap.add_argument("--proxy-steps", type=int, default=12, help="LoRA steps per fine-tune proxy candidate")
    ap.add_argument("--out", default=None, help="also write the rows here (JSON), after every row")
    ap.add_argument("--steps", type=int, default=None, help=f"fine-tune steps (default: QUICK's {QUICK.steps})")
    ap.add_argument("--seeds", type=int, default=None, help=f"fine-tune seeds (default: QUICK's {QUICK.seeds})")
    args = ap.parse_args(argv)
    names = list(VARIANTS) if args.variants == "all" else [] if args.variants == "none" else args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    s = replace(QUICK, budgets=tuple(args.budgets.split(",")),
                **{k: v for k, v in (("steps", args.steps), ("seeds", args.seeds)) if v is not None})
    b = setup(s)
    builders = Builders(b)
    ceiling = None if args.no_ceiling else Ceiling(b.bank, b.names, b.train, s.steps, s.lr)
    stores: dict[tuple, MemoryStore] = {}  # one zero-step bank per (init, rounding, menu): shared by the budgets
    rows: list[dict[str, Any]] = []
    done: dict[tuple, dict[str, Any]] = {}

    def record(label: str, budget: int, method: str, plan: Assignment | None, tag: str,
               builder: CandidateBuilder, extra: dict[str, Any]) -> None:
        row = measure_row(b, s, done, label, budget, method, plan, "default" if method == CEILING else "loftq",
                          extra, tag=tag, builder=builder, ceiling=ceiling)
        rows.append(row)
        if row.get("infeasible"):
            print(f"[{label}] {method}: does not fit", file=sys.stderr)
        else:
            print(f"[{label}] {method}: {progress_line(row)} {row['bits_hist']} {row['rank_hist']}", file=sys.stderr)
        ratios(rows)
        if args.out:
            write_json(args.out, {"setting": s.__dict__, "variants": {n: {k: list(v) if isinstance(v, tuple) else v
                                                                           for k, v in VARIANTS[n].items()} for n in names},
                                  "texts": describe_texts(b.texts), "rows": rows})

    for label in s.budgets:
        budget = b.counter.budget_for(label)
        for name in names:
            cfg = replace(variant_config(b.cfg, name, label), proxy_top=args.proxy_top, proxy_steps=args.proxy_steps)
            init, rounding = cfg.init, cfg.rounding
            t0 = time.perf_counter()
            key = (init, rounding, cfg.rotation, tuple(cfg.bits), cfg.double_quant)
            outcome = make_plan(cfg, b.run, budget, bank_store=stores.setdefault(key, MemoryStore()))
            opts = outcome.problem.table.options
            plan = [opts[k] for k in outcome.chosen.choice]
            timings = {k: round(v, 1) for k, v in outcome.plan.search.timings.items()}
            tag = "loftq-data-feedback" if rounding == "feedback" else init
            record(label, budget, f"planner[{name}]", plan, tag, builders.get(init, outcome.plan.init, rounding),
                   {"variant": name, "kl": outcome.chosen.proxy.kl if outcome.chosen.proxy else None,
                    "planning_seconds": round(time.perf_counter() - t0, 1), "timings": timings})
            if args.rounding and init == "loftq-data" and rounding == "nearest":  # the same plan, Q by error feedback
                record(label, budget, f"planner[{name}] +feedback", plan, "loftq-data-feedback",
                       builders.get(init, outcome.plan.init, "feedback"), {"variant": name, "rounding": "feedback"})
        if not args.no_baselines:
            for method, plan in lever_baselines(b.counter, budget).items():
                record(label, budget, method, plan, "loftq", b.bank, {})
    if not args.no_ceiling:
        record("-", 0, CEILING, [(16, 16)] * len(b.names), "default", b.bank, {"ceiling": True})
    keys = ("budget", "method", "bits_per_weight", "ppl_before", "ppl_after", "ppl_after_std", "ppl_after_vs_lora16",
            "ppl_before_ood", "ppl_after_ood", "ppl_after_ood_std", "ppl_after_ood_vs_lora16")
    kls = ("kld_before", "kld_before_ood", "kld_lora16_after", "kld_lora16_after_ood")
    print(json.dumps([{**{k: r.get(k) for k in keys},
                       **{k: {x: r[k][x] for x in ("mean", "p99")} for k in kls if k in r}} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

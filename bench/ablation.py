"""Issue 15's ablation: what NF3, double quantization and the data-aware initialisation each buy at
tight budgets (SmolLM2, fine-tune mode, CPU).

    python -m bench.ablation [--budgets 4.0,3.5] [--variants all] [--steps N] [--seeds N] [--out bench/results/ablation.json]

Every planner variant is the product's own ``make_plan`` (guided search, zero-step KL, the QUICK
setting's trials) with one PlanConfig changed: the bit menu (2,4,8 or 2,3,4,8), ``--double-quant``
(off or search: the planner chooses per layer) and ``--init`` (loftq or loftq-data); the 8 variants
are the full factorial, and ``nf3+dq+data+fb`` plans all three with ``--rounding feedback`` (its
tables, Fisher errors and candidates score error-feedback Q, and its row is built with it). Baselines get the same levers: the LoftQ paper's first-k rule (4-bit first k
blocks, 2-bit after) plain, double-quantized and with NF3 for the tail, and uniform NF2/NF3 (± DQ)
where they fit. The ceiling ``lora-16bit`` (bf16 backbone, rank 16 everywhere, not held to the
budget) runs once. Evaluation as in bench.quality (bench.evaluation): perplexity on the pydoc test
split and the out-of-domain text, each with the KL divergence (mean, p99) to the unquantized model,
at step 0, after the QUICK fine-tune (12 steps, 3 seeds; a plan without adapters has nothing to
train) the perplexities and the KL to the lora-16bit model of the same seed (not with --no-ceiling),
and each row's perplexity as a ratio to the ceiling's. A data-aware plan is evaluated with the
data-aware factors (exact SVD), a plain one with plain LoftQ's, so each row is what ``materialize``
would build for it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from typing import Any

import torch

from bench.common import (QUICK, VARIANTS, Assignment, BenchSetup, lever_baselines, setup, variant_config,
                          write_json)
from bench.evaluation import Ceiling, describe_texts
from bench.quality import CEILING, measure_row, progress_line, ratios
from planner.scoring.bank import MemoryStore, WeightBank
from planner.scoring.ftproxy import CandidateBuilder
from planner.search.pipeline import make_plan
from search_spaces.choices import menu

class Builders:
    """One CandidateBuilder per initialisation over the same fp32 model (exact-SVD factors)."""

    def __init__(self, b: BenchSetup) -> None:
        self.b, self._data = b, {}

    def get(self, init: str, plan_init: Any = None, rounding: str = "nearest") -> CandidateBuilder:
        """``rounding`` "feedback": Q by error feedback under the moments (loftq.rounding)."""
        if init == "loftq":
            return self.b.bank
        if rounding not in self._data:
            from planner.scoring.bank import ModelWeights
            from planner.scoring.moments import plan_moments

            moments, _ = plan_moments(self.b.prep.source, self.b.names, plan_init, cache_dir=self.b.cfg.cache_path)
            bank = WeightBank(ModelWeights(self.b.model, self.b.names), menu((2, 3, 4, 8), "search"), 64, "nf",
                              self.b.cfg.block_size, svd="exact", moments=moments, rounding=rounding)
            self._data[rounding] = CandidateBuilder(self.b.model, "nf", self.b.cfg.block_size, bank=bank)
        return self._data[rounding]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="4.0,3.5", help="bits per target weight, comma list")
    ap.add_argument("--variants", default="all", help=f"comma list of {', '.join(VARIANTS)}, all (default) or none (baselines only)")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--no-ceiling", action="store_true")
    ap.add_argument("--rounding", action="store_true", help="also build each data-aware planner row's plan with "
                    "error-feedback rounding of Q (loftq.rounding)")
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
    stores = {(init, rounding): MemoryStore() for init in ("loftq", "loftq-data") for rounding in ("nearest", "feedback")}
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
            write_json(args.out, {"setting": s.__dict__, "variants": {n: VARIANTS[n] for n in names},
                                  "texts": describe_texts(b.texts), "rows": rows})

    for label in s.budgets:
        budget = b.counter.budget_for(label)
        for name in names:
            _, _, init, rounding = VARIANTS[name]
            cfg = variant_config(b.cfg, name, label)
            t0 = time.perf_counter()
            outcome = make_plan(cfg, b.run, budget, bank_store=stores[init, rounding])
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

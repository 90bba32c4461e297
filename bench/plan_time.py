"""What the stronger default costs to plan: the default plan against the first planner's quick plan
(``--quick``) on SmolLM2, per stage, each from a cold cache, in one run; then a warm re-plan of the
default at another budget; and each plan against its floor.

    python -m bench.plan_time [--budget 4.0] [--other 3.5] [--search guided|exact] [--rotation] [--previous]
                              [--out bench/results/plan_time.json]

``--rotation`` adds a cold plan of the default with ``--rotation search`` (the rotated widths'
cost, measured in the same run); ``--previous`` one of the default before 8 December
(``--double-quant search``: double quantization chosen per layer).

The floor of a plan is what it cannot do without: one streamed forward + backward over the
calibration tokens (the Fisher pass with nothing to compute per layer) plus one encoding of every
(layer, width) of its menu (round to nearest for --quick; error feedback under the layers' input
moments for the default, a layer's widths in one column loop as the weight bank does, whose
moments pass is counted too). Run it alone (``uptime`` is printed
before and after: a load above the core count makes the times noise, not a result).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.common import Counter, bench_run, write_json
from planner import progress
from planner.search.config import PlanConfig
from planner.search.flow import make_plan
from planner.search.prepare import prepare, table_settings
from planner.search.stages import Context, calibration, moments, open_scorer

STAGES = ("moments_s", "bank_s", "tables_s", "fisher_s", "reference_s", "search_s", "finetune_proxy_s", "total_s")


PREVIOUS = "previous default (--double-quant search)"
ROTATION = "default --rotation search"


def uptime() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


def timed_plan(cfg: PlanConfig, budget: int, seq_len: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    plan = make_plan(cfg, bench_run("finetune", seq_len), budget).plan
    wall = time.perf_counter() - t0
    layers = plan.layers
    return {"wall_s": round(wall, 2), "timings": plan.search.timings,
            "plan": {"quant": _hist(l.quant + ("dq" if l.double_quant else "") for l in layers),
                     "ranks": _hist(str(l.rank) for l in layers)}}


def _hist(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def floor(cfg: PlanConfig, seq_len: int) -> dict[str, float]:
    """One forward + backward over the calibration tokens, and one encoding per (layer, width)."""
    from loftq.formats import quantize_many
    from loftq.rounding import inverse_factor
    from planner.artifact.records import DEFAULT_DAMP
    from planner.train.data import CorpusConfig, load_corpus
    from search_spaces.widths import resolve

    prep = prepare(cfg, bench_run("finetune", seq_len))
    corpus = load_corpus(CorpusConfig(source="pydoc", seed=0))
    ctx = Context(prep, corpus, *calibration(prep, corpus))
    out: dict[str, float] = {}
    if cfg.init == "loftq-data":
        t0 = time.perf_counter()
        moments(ctx)
        out["moments_s"] = time.perf_counter() - t0
    scorer = open_scorer(ctx)
    t0 = time.perf_counter()
    scorer.fisher_rows(ctx.train, [], "nf", cfg.block_size)  # the pass, with no width to score
    out["forward_backward_s"] = time.perf_counter() - t0
    widths = [w for w in table_settings(cfg).bits]
    t0 = time.perf_counter()
    for t, w in prep.source.iter_weights(prep.targets):
        moment = ctx.moments[t.name] if ctx.moments is not None else None
        upper = inverse_factor(moment, DEFAULT_DAMP) if cfg.rounding == "feedback" else None
        specs = [resolve(width, tuple(w.shape), "nf", cfg.block_size) for width in widths]
        quantize_many(w, specs, rounding=cfg.rounding, moment=moment, upper=upper, damp=DEFAULT_DAMP)
    out["encode_s"] = time.perf_counter() - t0
    out["total_s"] = sum(out.values())
    return {k: round(v, 2) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default="4.0", help="bits per target weight (or u4r16, as bench.quality)")
    ap.add_argument("--other", default="3.5", help="the warm re-plan's budget")
    ap.add_argument("--search", default=None, help="guided or exact (default: the planner's)")
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rotation", action="store_true", help="also the default with --rotation search, cold")
    ap.add_argument("--previous", action="store_true", help="also the previous default (--double-quant search), cold")
    ap.add_argument("--out", default="bench/results/plan_time.json")
    args = ap.parse_args()
    progress.set_enabled(False)
    before = uptime()
    extra = {k: v for k, v in (("search", args.search), ("trials", args.trials)) if v is not None}
    configs = {"quick (the first planner's default)": PlanConfig(quick=True, **extra)}
    if args.previous:
        configs[PREVIOUS] = PlanConfig(double_quant="search", **extra)
    configs["default"] = PlanConfig(**extra)
    if args.rotation:
        configs[ROTATION] = PlanConfig(rotation="search", **extra)
    counter = Counter(prepare(configs["default"], bench_run("finetune", args.seq_len)))
    budget, other = counter.budget_for(args.budget), counter.budget_for(args.other)
    rows: dict[str, Any] = {}
    for label, cfg in configs.items():
        cache = tempfile.mkdtemp(prefix="plan-time-")
        cfg = replace(cfg, cache_dir=cache)
        row = timed_plan(cfg, budget, args.seq_len)
        if label == "default":
            row["warm_replan"] = timed_plan(replace(cfg, study_name=None), other, args.seq_len)
        row["floor"] = floor(replace(cfg, cache_dir=tempfile.mkdtemp(prefix="plan-floor-")), args.seq_len)
        rows[label] = row
    quick, default = rows["quick (the first planner's default)"], rows["default"]
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
             if v is not None and v is not False and k != "out"]
    doc = {"command": "python -m bench.plan_time " + " ".join(flags),
           "budget": args.budget, "budget_bytes": budget, "other": args.other, "threads": torch.get_num_threads(),
           "cpus": os.cpu_count(), "loadavg_before": before, "loadavg_after": uptime(), "rows": rows,
           "ratios": {"default / quick (cold)": round(default["wall_s"] / quick["wall_s"], 3),
                      "warm re-plan / cold (default)": round(default["warm_replan"]["wall_s"] / default["wall_s"], 3),
                      "quick / its floor": round(quick["wall_s"] / quick["floor"]["total_s"], 3),
                      "default / its floor": round(default["wall_s"] / default["floor"]["total_s"], 3)}}
    for label, name in ((PREVIOUS, "previous default"), (ROTATION, "rotation search")):
        row = rows.get(label)
        if row is not None:
            doc["ratios"].update({f"{name} / default (cold)": round(row["wall_s"] / default["wall_s"], 3),
                                  f"{name} / quick (cold)": round(row["wall_s"] / quick["wall_s"], 3),
                                  f"{name} / its floor": round(row["wall_s"] / row["floor"]["total_s"], 3)})
    write_json(args.out, doc)
    print(f"load average before {before}, after {doc['loadavg_after']}; {doc['threads']} threads")
    print(f"{'stage':20}" + "".join(f"{label.split(' (')[0]:>28}" for label in rows))
    for stage in STAGES:
        cells = [row["timings"].get(stage) for row in rows.values()]
        print(f"{stage:20}" + "".join(f"{c if c is not None else '-':>28}" for c in cells))
    print(json.dumps(doc["ratios"], indent=1))


if __name__ == "__main__":
    main()

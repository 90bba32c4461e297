"""MiniLM-L6 (real fp32 weights): embedding fidelity of planned vs uniform models at equal memory.

    python -m bench.embedding [--json] [--budgets u4r16,u4r0,3.5] [--trials 12] [--out FILE]

Serving (inference mode, CPU dtypes, no reserve): every method is counted by the planner's own byte
function, budgets are bits per target weight of the bytes that depend on the layers' choices (as in
bench.common). Metric: cosine between the fp32 model's and the quantized model's (deq(Q) + BA,
LoftQ iters = 1) mean-pooled sentence embeddings on blocks of the corpus's TEST split (never used for
a choice: the planner calibrates on train and scores on val). Methods: planner (guided search,
zero-step 1 - cos proxy), loftq-uniform-4bit / -2bit (largest rank of RANK_GRID that fits),
loftq-first-k (4-bit first k blocks, 2-bit rest, rank 16). A win or loss is claimed only beyond
2 sigma of the paired per-block difference of the mean cosine distance.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from bench.common import Counter, bench_run, describe, fresh_config, first_k, uniform, write_json
from planner.config import PlanConfig
from planner.scoring.proxy import ZeroStepProxy
from planner.scoring.bank import ModelWeights, WeightBank
from planner.search.pipeline import make_plan, prepare
from planner.settings import RunSettings
from planner.train.data import CorpusConfig, load_corpus, token_blocks

SEQ_LEN = 128


@dataclass
class EmbeddingSetup:
    """MiniLM-L6 prepared for serving; ``proxy`` scores cosine distances on ``test_blocks`` test blocks."""

    run: RunSettings
    cfg: PlanConfig
    counter: Counter
    proxy: ZeroStepProxy
    names: list[str]


def setup(trials: int, test_blocks: int) -> EmbeddingSetup:
    run = bench_run("inference", SEQ_LEN)
    cfg = fresh_config("minilm-l6", trials, "bench-embedding-", calib_seq_len=SEQ_LEN)
    prep = prepare(cfg, run)
    model = prep.source.load_model(torch.float32)
    corpus = load_corpus(CorpusConfig(source="pydoc", seed=0))
    test = token_blocks(prep.source.tokenizer(), corpus.test, SEQ_LEN, max_tokens=SEQ_LEN * test_blocks)
    names = [t.name for t in prep.targets]
    bank = WeightBank(ModelWeights(model, names), (2, 4, 8), max(cfg.ranks))
    return EmbeddingSetup(run, cfg, Counter(prep), ZeroStepProxy(model, bank, test), names)


def run_bench(budgets: list[str], trials: int, test_blocks: int) -> list[dict[str, Any]]:
    e = setup(trials, test_blocks)
    run, cfg, counter, proxy, names = e.run, e.cfg, e.counter, e.proxy, e.names
    print(f"test blocks {len(proxy.blocks)} x {SEQ_LEN} tokens", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for label in budgets:
        budget = counter.budget_for(label)
        t0 = time.perf_counter()
        outcome = make_plan(cfg, run, budget)
        opts = outcome.problem.table.options
        fk = first_k(counter, budget)
        plans = {"planner": [opts[k] for k in outcome.chosen.choice],
                 "loftq-uniform-4bit": uniform(counter, 4, budget),
                 "loftq-first-k": fk[0] if fk else None,
                 "loftq-uniform-2bit": uniform(counter, 2, budget)}
        print(f"[{label}] planning {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        dists: dict[str, torch.Tensor] = {}
        for method, plan in plans.items():
            row: dict[str, Any] = {"method": method, "budget": label, "budget_bytes": budget}
            if plan is None:
                rows.append({**row, "infeasible": True})
                continue
            d = proxy.cosine_distances(dict(zip(names, plan))).double()
            dists[method] = d
            used = counter.total(plan)
            row.update(bytes=used, bits_per_weight=round(counter.bits_per_weight(used), 3), **describe(plan),
                       cosine=float(1 - d.mean()), cosine_min=float(1 - d.max()))
            rows.append(row)
            print(f"[{label}] {method}: cos {row['cosine']:.5f} (min {row['cosine_min']:.5f})", file=sys.stderr)
        for row in rows:
            if row["budget"] == label and row["method"] != "planner" and row["method"] in dists:
                diff = dists[row["method"]] - dists["planner"]  # > 0: the planner is closer to fp32
                two_sigma = 2 * float(diff.std()) / math.sqrt(len(diff))
                row["vs_planner"] = {"mean_distance_diff": float(diff.mean()), "two_sigma": two_sigma,
                                     "verdict": "planner wins" if float(diff.mean()) > two_sigma else
                                     "planner loses" if -float(diff.mean()) > two_sigma else "no significant difference"}
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="u4r16,u4r0,3.5",
                    help="u{bits}r{rank} (that uniform plan's bytes) or bits per target weight, comma list")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--test-blocks", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = run_bench(args.budgets.split(","), args.trials, args.test_blocks)
    if args.out:
        write_json(args.out, rows)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'budget':>7} {'method':<20} {'b/w':>6} {'cosine':>9} {'min':>9}  vs planner")
    for r in rows:
        if r.get("infeasible"):
            print(f"{r['budget']:>7} {r['method']:<20} does not fit")
            continue
        v = r.get("vs_planner")
        verdict = f"{v['verdict']} (diff {v['mean_distance_diff']:+.2e}, 2σ {v['two_sigma']:.1e})" if v else ""
        print(f"{r['budget']:>7} {r['method']:<20} {r['bits_per_weight']:>6.2f} {r['cosine']:>9.5f} "
              f"{r['cosine_min']:>9.5f}  {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

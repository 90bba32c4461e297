"""MiniLM-L6 (real fp32 weights): embedding fidelity of planned vs uniform models at equal memory.

    python -m bench.embedding [--json] [--budgets u4r16,u4r0,3.5] [--trials 12] [--out FILE]
    python -m bench.embedding --budgets 3.5 --variants plain,nf3+dq,nf3+dq+data   # issue 15's levers

Serving (inference mode, CPU dtypes, no reserve): every method is counted by the planner's own byte
function, budgets are bits per target weight of the bytes that depend on the layers' choices (as in
bench.common). Metric: cosine between the fp32 model's and the quantized model's (deq(Q) + BA,
LoftQ iters = 1) mean-pooled sentence embeddings on blocks of two texts (bench.evaluation): the
corpus's TEST split (never used for a choice: the planner calibrates on train and scores on val),
fields ``cosine`` / ``cosine_min`` / ``vs_planner``, and as many blocks of the out-of-domain text of
bench/texts/ spread over all of it (never calibrated on), fields ``cosine_ood`` / ``cosine_min_ood``
/ ``vs_planner_ood``. An encoder has no next-token distribution: no perplexity or KL here. Methods: planner (guided search,
zero-step 1 - cos proxy), loftq-uniform-4bit / -2bit (largest rank of RANK_GRID that fits),
loftq-first-k (4-bit first k blocks, 2-bit rest, rank 16). ``--variants`` (bench.common.VARIANTS)
adds a planner row per variant (bit menu with NF3, double quantization, data-aware initialisation)
and the baselines given the same levers (bench.common.lever_baselines); the verdicts then compare
every row with the first variant's planner. A win or loss is claimed only beyond
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

from bench.common import (BANK_MENU, VARIANTS, Counter, bench_run, describe, first_k, fresh_config, lever_baselines,
                          uniform, variant_config, write_json)
from bench.evaluation import SUFFIX, ood_text, spread
from planner.search.config import PlanConfig
from planner.scoring.proxy import ZeroStepProxy
from planner.scoring.bank import ModelWeights, WeightBank
from planner.search.prepare import prepare
from planner.search.flow import make_plan
from planner.settings import RunSettings
from planner.train.data import CorpusConfig, load_corpus, token_blocks

SEQ_LEN = 128
Proxies = dict[str, ZeroStepProxy]  # text (bench.evaluation.SUFFIX) -> the proxy over its blocks, one bank


@dataclass
class EmbeddingSetup:
    """MiniLM-L6 prepared for serving; ``proxy`` scores cosine distances on ``test_blocks`` blocks of
    each text."""

    run: RunSettings
    cfg: PlanConfig
    counter: Counter
    proxy: Proxies
    names: list[str]
    model: torch.nn.Module
    texts: dict[str, torch.Tensor]
    prep: object

    def data_proxy(self, init: object, rounding: str = "nearest") -> Proxies:
        """The proxies over the data-aware factors of a plan whose InitRecord is ``init`` (``rounding``
        "feedback": Q by error feedback under the same moments, loftq.rounding)."""
        from planner.scoring.moments import plan_moments

        moments, _ = plan_moments(self.prep.source, self.names, init, cache_dir=self.cfg.cache_path)
        bank = WeightBank(ModelWeights(self.model, self.names), BANK_MENU, max(self.cfg.ranks),
                          moments=moments, rounding=rounding)
        return {t: ZeroStepProxy(self.model, bank, blocks) for t, blocks in self.texts.items()}


def setup(trials: int, test_blocks: int) -> EmbeddingSetup:
    run = bench_run("inference", SEQ_LEN)
    cfg = fresh_config("minilm-l6", trials, "bench-embedding-", calib_seq_len=SEQ_LEN)
    prep = prepare(cfg, run)
    model = prep.source.load_model(torch.float32)
    corpus = load_corpus(CorpusConfig(source="pydoc", seed=0))
    tok = prep.source.tokenizer()
    test = token_blocks(tok, corpus.test, SEQ_LEN, max_tokens=SEQ_LEN * test_blocks)
    texts = {"test": test, "ood": spread(token_blocks(tok, ood_text(), SEQ_LEN), test.shape[0])}
    names = [t.name for t in prep.targets]
    bank = WeightBank(ModelWeights(model, names), BANK_MENU, max(cfg.ranks))
    proxies = {t: ZeroStepProxy(model, bank, blocks) for t, blocks in texts.items()}
    return EmbeddingSetup(run, cfg, Counter(prep), proxies, names, model, texts, prep)


def versus(dists: dict[str, torch.Tensor], ref: str, method: str) -> dict[str, Any]:
    """``method`` vs the planner row ``ref`` on per-block cosine distances: a win or loss only beyond
    2 sigma of the paired per-block difference."""
    diff = dists[method] - dists[ref]  # > 0: the planner is closer to fp32
    two_sigma = 2 * float(diff.std()) / math.sqrt(len(diff))
    return {"mean_distance_diff": float(diff.mean()), "two_sigma": two_sigma,
            "verdict": "planner wins" if float(diff.mean()) > two_sigma else
            "planner loses" if -float(diff.mean()) > two_sigma else "no significant difference"}


def run_bench(budgets: list[str], trials: int, test_blocks: int, variants: list[str] | None = None,
              rounding: bool = False) -> list[dict[str, Any]]:
    e = setup(trials, test_blocks)
    run, cfg, counter, proxy, names = e.run, e.cfg, e.counter, e.proxy, e.names
    print(", ".join(f"{t} blocks {len(p.blocks)} x {SEQ_LEN} tokens" for t, p in proxy.items()), file=sys.stderr)
    rows: list[dict[str, Any]] = []
    data_proxy = fb_proxy = None
    for label in budgets:
        budget = counter.budget_for(label)
        t0 = time.perf_counter()
        plans: dict[str, Any] = {}
        proxies: dict[str, Proxies] = {}
        for v in variants or [None]:
            vcfg = cfg if v is None else variant_config(cfg, v, label)
            outcome = make_plan(vcfg, run, budget)
            opts = outcome.problem.table.options
            method = "planner" if v is None else f"planner[{v}]"
            plans[method] = [opts[k] for k in outcome.chosen.choice]
            if vcfg.init == "loftq-data" and vcfg.rounding == "feedback":  # planned for feedback Q: built so
                fb_proxy = fb_proxy or e.data_proxy(outcome.plan.init, "feedback")
                proxies[method] = fb_proxy
            elif vcfg.init == "loftq-data":
                data_proxy = data_proxy or e.data_proxy(outcome.plan.init)
                proxies[method] = data_proxy
                if rounding:  # the same plan built with error-feedback rounding of Q
                    fb_proxy = fb_proxy or e.data_proxy(outcome.plan.init, "feedback")
                    plans[f"{method} +feedback"] = plans[method]
                    proxies[f"{method} +feedback"] = fb_proxy
        fk = first_k(counter, budget)
        if variants:
            plans.update(lever_baselines(counter, budget))
        else:
            plans.update({"loftq-uniform-4bit": uniform(counter, 4, budget), "loftq-first-k": fk[0] if fk else None,
                          "loftq-uniform-2bit": uniform(counter, 2, budget)})
        print(f"[{label}] planning {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        dists: dict[str, dict[str, torch.Tensor]] = {t: {} for t in SUFFIX}  # text -> method -> [n_blocks]
        for method, plan in plans.items():
            row: dict[str, Any] = {"method": method, "budget": label, "budget_bytes": budget}
            if plan is None:
                rows.append({**row, "infeasible": True})
                continue
            used = counter.total(plan)
            row.update(bytes=used, bits_per_weight=round(counter.bits_per_weight(used), 3), **describe(plan))
            for text, p in proxies.get(method, proxy).items():
                d = p.cosine_distances(dict(zip(names, plan))).double()
                dists[text][method] = d
                row.update({f"cosine{SUFFIX[text]}": float(1 - d.mean()), f"cosine_min{SUFFIX[text]}": float(1 - d.max())})
            rows.append(row)
            print(f"[{label}] {method}: cos {row['cosine']:.5f} (min {row['cosine_min']:.5f}), ood cos "
                  f"{row['cosine_ood']:.5f} (min {row['cosine_min_ood']:.5f})", file=sys.stderr)
        ref = next(iter(dists["test"]))  # the (first) planner row
        for row in rows:
            if row["budget"] == label and row["method"] != ref and row["method"] in dists["test"]:
                for text, sfx in SUFFIX.items():
                    row[f"vs_planner{sfx}"] = versus(dists[text], ref, row["method"])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="u4r16,u4r0,3.5",
                    help="u{bits}r{rank} (that uniform plan's bytes) or bits per target weight, comma list")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--test-blocks", type=int, default=32)
    ap.add_argument("--variants", default=None, help=f"planner variants, comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--rounding", action="store_true", help="also build each data-aware planner row's plan with "
                    "error-feedback rounding of Q (loftq.rounding)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    variants = args.variants.split(",") if args.variants else None
    if variants and any(v not in VARIANTS for v in variants):
        print(f"unknown variant in {args.variants}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    rows = run_bench(args.budgets.split(","), args.trials, args.test_blocks, variants, args.rounding)
    if args.out:
        write_json(args.out, rows)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'budget':>7} {'method':<26} {'b/w':>6} {'cosine':>9} {'min':>9} {'cos_ood':>9} {'min_ood':>9}  "
          "vs planner (test; ood)")
    for r in rows:
        if r.get("infeasible"):
            print(f"{r['budget']:>7} {r['method']:<26} does not fit")
            continue
        verdict = "; ".join(f"{v['verdict']} (diff {v['mean_distance_diff']:+.2e}, 2σ {v['two_sigma']:.1e})"
                            for v in (r.get("vs_planner"), r.get("vs_planner_ood")) if v)
        print(f"{r['budget']:>7} {r['method']:<26} {r['bits_per_weight']:>6.2f} {r['cosine']:>9.5f} "
              f"{r['cosine_min']:>9.5f} {r['cosine_ood']:>9.5f} {r['cosine_min_ood']:>9.5f}  {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does a planned mixed model fine-tune better than uniform choices at the same memory? (SmolLM2, CPU)

    python -m bench.quality --quick [--json] [--out bench/results/quality_quick.json]
    python -m bench.quality                      # three budgets, more steps and test tokens
    python -m bench.quality --plot-from bench/results/quality.json   # table, verdicts and plot of a saved run

Byte counting, budget names and baselines: bench.common (fine-tune mode, the run's seq_len / batch,
CPU dtypes: fp32 adapters with fp32 grads and AdamW states; no reserve).
Methods: planner (make_plan with the product's defaults: guided search, zero-step KL, the strongest
levers; built as materialize builds it, data-aware factors and error-feedback Q), planner-exact (the
exact optimum of the neutral additive objective, i.e. no Optuna layer), planner+ft (the same
candidates re-scored by planner.scoring.ftproxy), planner-quick (``--quick``: the first planner's
2/4/8 menu, plain LoftQ, round to nearest), loftq-uniform-4bit, qlora-uniform-4bit (NF4 + PEFT default init: A random,
B = 0), loftq-first-k (4-bit first k blocks, 2-bit rest: k as large as fits, then the largest rank),
loftq-uniform-2bit, and the ceiling every LoftQ table has, lora-16bit (the bf16 backbone with rank-16
adapters on every target layer, PEFT's default init, same steps, lr, sequence length and seeds; not
held to the budget: each row also gives its perplexity as a ratio to this one's after fine-tuning).
Evaluation (bench.evaluation): perplexity on the pydoc test split (never used for a choice) and
on the out-of-domain text of bench/texts/ (never calibrated on), each with the per-token KL
divergence (mean, p99) to the unquantized model at step 0, and after fine-tuning the KL to the
lora-16bit model of the same seed; after fine-tuning, mean and std over seeds (seed = data order +
random init). SmolLM2's packaged weights were Q4_1 before dequantisation: the fp32 "reference" is a
dequantised Q4_1 model, not pristine fp16.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from bench.common import (BANK_STORE, FULL, QUICK, Assignment, BenchSetup, Builders, Setting, describe, first_k, setup,
                          uniform, write_json)
from bench.evaluation import RESULT_FIELDS, Ceiling, describe_texts, row_fields, score_texts
from planner.files.atomic import atomic_write
from planner.scoring.ftproxy import FinetuneSettings, finetune
from planner.search.flow import make_plan

# method -> (plan, init, extra fields, builder: None for the plain LoftQ bank, else the plan's own)
Plans = dict[str, tuple[Assignment | None, str, dict[str, Any], Any]]
CEILING = "lora-16bit"


def run_method(b: BenchSetup, plan: Assignment, init: str, s: Setting, ceiling: Ceiling | None = None,
               is_ceiling: bool = False) -> dict[str, Any]:
    """Perplexity and KL (bench.evaluation's fields) of ``plan`` (``init``: "loftq" or PEFT's
    "default") on both texts at step 0 and after ``s.steps`` fine-tune steps, mean and std over
    ``s.seeds`` seeds; KL to ``ceiling``'s model of the same seed when given. ``is_ceiling``: this
    row is the ceiling itself (its fine-tuned models are ``ceiling``'s)."""
    assignment = dict(zip(b.names, plan))
    texts = b.texts
    torch.manual_seed(0)
    net = b.bank.build(assignment, init=init)
    before = score_texts(net, texts, {"fp32": b.model})
    trained = any(r for _, r in plan)  # no adapter: fine-tuning trains nothing, every seed ends where it began
    after: dict[str, list[Any]] = {t: [] for t in texts}
    secs = []
    for seed in range(s.seeds):
        if is_ceiling and ceiling is not None:
            net = ceiling.model(seed)
            secs.append(ceiling.seconds[seed])
        elif trained:
            torch.manual_seed(seed)
            net = b.bank.build(assignment, init=init)
            t0 = time.perf_counter()
            finetune(net, b.train, FinetuneSettings(steps=s.steps, lr=s.lr, seed=seed))
            secs.append(time.perf_counter() - t0)
        refs = {"lora16": ceiling.model(seed)} if ceiling is not None and not is_ceiling else {}
        for t, score in (score_texts(net, texts, refs) if trained or refs else before).items():
            after[t].append(score)
        del refs
    fields = row_fields(before, after)
    fields["ft_seconds"] = statistics.mean(secs) if secs else 0.0
    if not trained:
        fields["trained"] = False
    return fields


def plans_at(b: BenchSetup, budget: int, s: Setting, builders: Builders) -> Plans:
    """Every method's plan at ``budget`` (None where it does not fit). The planner's rows are built
    as materialize builds them: with the plan's initialisation and rounding (the defaults:
    data-aware factors, error-feedback Q)."""
    out: Plans = {}
    outcome = make_plan(b.cfg, b.run, budget, bank_store=BANK_STORE)
    opts, prob = outcome.problem.table.options, outcome.problem
    own = builders.get(b.cfg.init, outcome.plan.init, b.cfg.rounding)
    levers = {"init": b.cfg.init, "rounding": b.cfg.rounding}
    out["planner"] = ([opts[k] for k in outcome.chosen.choice], "loftq", {"kl": outcome.chosen.proxy.kl
                                                                           if outcome.chosen.proxy else None,
                                                                           **levers}, own)
    # the exact optimum of the neutral additive objective: what the planner would pick without the
    # Optuna layer (does the layer earn its keep after fine-tuning?)
    out["planner-exact"] = ([opts[k] for k in outcome.exact.choice], "loftq",
                            {"kl": outcome.exact.proxy.kl if outcome.exact.proxy else None, **levers}, own)
    if s.proxy_top:
        from planner.scoring.ftproxy import rescore_with_finetune
        chosen, records = rescore_with_finetune(prob, outcome.candidates, b.model, b.train, b.val,
                                                top_k=s.proxy_top,
                                                steps=s.proxy_steps, seed=0, builder=own)
        out["planner+ft"] = ([opts[k] for k in chosen.choice], "loftq", {"proxy_records": records, **levers}, own)
    quick = make_plan(replace(b.cfg, bits=None, double_quant=None, init=None, rounding=None, rotation=None, quick=True,
                              study_name=f"{b.cfg.study_name or 'bench'}-quick-{budget}"), b.run, budget)
    out["planner-quick"] = ([quick.problem.table.options[k] for k in quick.chosen.choice], "loftq",
                            {"kl": quick.chosen.proxy.kl if quick.chosen.proxy else None}, None)
    out["loftq-uniform-4bit"] = (uniform(b.counter, 4, budget), "loftq", {}, None)
    out["qlora-uniform-4bit"] = (uniform(b.counter, 4, budget), "default", {}, None)
    fk = first_k(b.counter, budget)
    out["loftq-first-k"] = (fk[0] if fk else None, "loftq", {"k": fk[1] if fk else None,
                                                               "rank": fk[0][0][1] if fk else None}, None)
    out["loftq-uniform-2bit"] = (uniform(b.counter, 2, budget), "loftq", {}, None)
    out[CEILING] = ([(16, 16)] * len(b.names), "default", {"ceiling": True}, None)  # over budget: the reference
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None, help="also write the rows here (JSON)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--budgets", default=None, help="comma list: u4r16 and/or bits per weight")
    ap.add_argument("--proxy-top", type=int, default=None)
    ap.add_argument("--proxy-steps", type=int, default=None, help="LoRA steps per fine-tune proxy candidate")
    ap.add_argument("--methods", default=None, help="comma list of methods to run (default: all)")
    ap.add_argument("--plot-from", default=None, help="only draw the plot (next to it, .png), the table and the verdicts of a saved --out JSON")
    args = ap.parse_args(argv)
    if args.plot_from:
        saved = json.loads(Path(args.plot_from).read_text())["rows"]
        plot(saved, Path(args.plot_from).with_suffix(".png"))
        print_table(saved)
        return 0
    torch.set_num_threads(2)
    s = QUICK if args.quick else FULL
    s = replace(s, **{k: v for k, v in (("steps", args.steps), ("seeds", args.seeds), ("proxy_top", args.proxy_top),
                                        ("proxy_steps", args.proxy_steps)) if v is not None})
    if args.budgets:
        s = replace(s, budgets=tuple(args.budgets.split(",")))

    texts: dict[str, Any] = {}

    def save(rows: list[dict[str, Any]]) -> None:
        if args.out:
            write_json(args.out, {"setting": s.__dict__, "texts": texts, "rows": rows})

    rows = run_quality(s, args.methods.split(",") if args.methods else None, on_row=save, texts_info=texts)
    save(rows)
    if args.out:
        plot(rows, Path(args.out).with_suffix(".png"))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows)
    return 0


def measure_row(b: BenchSetup, s: Setting, done: dict[tuple, dict[str, Any]], label: str, budget: int,
                method: str, plan: Assignment | None, init: str, extra: dict[str, Any], *, tag: str | None = None,
                builder: Any = None, ceiling: Ceiling | None = None) -> dict[str, Any]:
    """One results row: ``plan``'s bytes and histograms, and its perplexities and KL (:func:`run_method`
    with ``init``, over ``builder`` if given, else ``b.bank``; KL to ``ceiling``'s models too), or
    ``infeasible`` when ``plan`` is None. A plan measured before under the same ``tag`` (default:
    ``init``) reuses that row's numbers (``done`` holds them)."""
    row: dict[str, Any] = {"method": method, "budget": label, "budget_bytes": budget,
                           "budget_bits_per_weight": round(b.counter.bits_per_weight(budget), 3)}
    if plan is None:
        return {**row, "bytes": None, "infeasible": True}
    used = b.counter.total(plan)
    row.update(bytes=used, bits_per_weight=round(b.counter.bits_per_weight(used), 3), **describe(plan), **extra)
    key = (tuple(plan), tag or init)
    t0 = time.perf_counter()
    if key in done:
        row.update({k: v for k, v in done[key].items() if k in RESULT_FIELDS}, same_plan_as=done[key]["method"])
    else:
        row.update(run_method(b if builder is None else replace(b, bank=builder), plan, init, s, ceiling,
                              is_ceiling=method == CEILING))
        done[key] = row
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def run_quality(s: Setting, methods: list[str] | None = None,
                on_row: Callable[[list[dict[str, Any]]], None] | None = None,
                texts_info: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows for every budget x method; ``on_row(rows)`` after each (the bench saves as it goes). A
    method whose plan and init equal an earlier method's at the same budget reuses its numbers
    (e.g. first-k with k = all blocks is the uniform 4-bit plan). The lora-16bit models every row's
    KL is measured against are trained at the first fine-tuned row, also when ``methods`` leaves the
    ceiling's own row out. ``texts_info`` is filled with the texts' description."""
    b = setup(s)
    builders = Builders(b)
    ceiling = Ceiling(b.bank, b.names, b.train, s.steps, s.lr)
    if texts_info is not None:
        texts_info.update(describe_texts(b.texts))
    print(f"test tokens {b.test.numel()}, ood tokens {b.ood.numel()}, train tokens/run {s.steps * s.seq_len}, "
          f"seeds {s.seeds}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    done: dict[tuple, dict[str, Any]] = {}  # across budgets: the ceiling runs once
    for label in s.budgets:
        budget = b.counter.budget_for(label)
        t0 = time.perf_counter()
        plans = plans_at(b, budget, s, builders)
        print(f"[{label}] planning {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        for method, (plan, init, extra, builder) in plans.items():
            if methods and method not in methods:
                continue
            tag = f"{init}/{extra['init']}/{extra['rounding']}" if builder is not None else None
            row = measure_row(b, s, done, label, budget, method, plan, init, extra, tag=tag, builder=builder,
                              ceiling=ceiling)
            rows.append(row)
            if row.get("infeasible"):
                print(f"[{label}] {method}: does not fit", file=sys.stderr)
                continue
            ratios(rows)
            if on_row:
                on_row(rows)
            print(f"[{label}] {method}: {progress_line(row)}", file=sys.stderr)
    return rows


def progress_line(row: dict[str, Any]) -> str:
    """PPL step 0 -> fine-tuned on both texts, KL to fp32 at step 0, KL to lora-16bit after."""
    def kld(key: str) -> str:
        return f"{row[key]['mean']:.4f}/{row[key]['p99']:.3f}" if key in row else "-"

    return (f"test {row['ppl_before']:.2f} -> {row['ppl_after']:.2f} ± {row['ppl_after_std']:.2f}, "
            f"ood {row['ppl_before_ood']:.2f} -> {row['ppl_after_ood']:.2f} ± {row['ppl_after_ood_std']:.2f}; "
            f"KL0 fp32 mean/p99 test {kld('kld_before')} ood {kld('kld_before_ood')}; "
            f"KL ft lora16 test {kld('kld_lora16_after')} ood {kld('kld_lora16_after_ood')} ({row['seconds']}s)")


def ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's perplexity (step 0 and fine-tuned) over the lora-16bit row's fine-tuned one (on the
    OOD text too, where the rows have it)."""
    ceiling = next((r for r in rows if r["method"] == CEILING and not r.get("infeasible")), None)
    for r in rows:
        for sfx in ("", "_ood"):
            if ceiling is not None and f"ppl_after{sfx}" in r and f"ppl_after{sfx}" in ceiling:
                r[f"ppl_before{sfx}_vs_lora16"] = round(r[f"ppl_before{sfx}"] / ceiling[f"ppl_after{sfx}"], 3)
                r[f"ppl_after{sfx}_vs_lora16"] = round(r[f"ppl_after{sfx}"] / ceiling[f"ppl_after{sfx}"], 3)


def print_table(rows: list[dict[str, Any]]) -> None:
    ratios(rows)
    print(f"{'budget':>7} {'method':<24} {'b/w':>6} {'bytes':>12} {'ppl0':>12} {'ppl_ft':>12} {'std':>8} "
          f"{'ft/16bit':>9} {'ood_ft':>9} {'kl0':>8} {'kl0_ood':>8} {'kl16':>8} {'kl16_ood':>8}")
    for r in rows:
        if r.get("infeasible"):
            print(f"{r['budget']:>7} {r['method']:<24} {'':>6} {'does not fit':>12}")
            continue
        flag = " (invalid)" if r.get("invalid") else " (superseded)" if r.get("superseded") else ""
        print(f"{r['budget']:>7} {r['method']:<24} {r['bits_per_weight']:>6.2f} {r['bytes']:>12} "
              f"{r['ppl_before']:>12.4g} {r['ppl_after']:>12.4g} {r['ppl_after_std']:>8.2g} "
              f"{r.get('ppl_after_vs_lora16', float('nan')):>8.2f}x {r.get('ppl_after_ood', float('nan')):>9.4g} "
              f"{_kl(r, 'kld_before')} {_kl(r, 'kld_before_ood')} {_kl(r, 'kld_lora16_after')} "
              f"{_kl(r, 'kld_lora16_after_ood')}{flag}")
    verdicts(rows)


def _kl(row: dict[str, Any], key: str) -> str:
    """A KL field's mean for the table (blank in result files written before the field existed)."""
    return f"{row[key]['mean']:>8.3g}" if key in row else f"{'':>8}"


def plot(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Bars of test perplexity after fine-tuning (log scale, ±1σ over seeds) per budget and method,
    with the step-0 perplexity as a hollow marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("infeasible") and not r.get("invalid") and not r.get("superseded")]
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in ok))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.5, 2.2 + 2.2 * len(budgets)), 4))
    for j, m in enumerate(methods):
        for i, b in enumerate(budgets):
            r = next((r for r in ok if r["method"] == m and r["budget"] == b), None)
            if r is None:
                continue
            x = i + (j - (len(methods) - 1) / 2) * width
            ax.bar(x, r["ppl_after"], width, yerr=r["ppl_after_std"], color=f"C{j}", capsize=2,
                   label=m if i == 0 or not any(rr["method"] == m and rr["budget"] == budgets[0] for rr in ok) else None)
            ax.plot(x, r["ppl_before"], marker="o", mfc="none", color="k", ms=4)
    ax.set_yscale("log")
    ax.set_xticks(range(len(budgets)))
    ax.set_xticklabels([f"{b}\n({next((r['budget_bits_per_weight'] for r in rows if r['budget'] == b), '?')} b/w)"
                        for b in budgets])
    ax.set_ylabel("test perplexity after fine-tuning (log)")
    ax.set_title("SmolLM2-135M at equal memory (bars: after fine-tune ±1σ; o: step 0)", fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="upper left")
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)


def verdicts(rows: list[dict[str, Any]]) -> None:
    """Planner vs each baseline per budget: a win or loss only beyond 2 sigma of seed noise."""
    by = {(r["budget"], r["method"]): r for r in rows  # the ceiling is not held to the budget: no verdict
          if not r.get("infeasible") and not r.get("invalid") and not r.get("superseded") and r["method"] != CEILING}
    def chosen(m: str) -> bool:  # the tool's choices (planner-exact is the no-Optuna ablation)
        return m.startswith("planner") and m != "planner-exact"

    for (budget, method), r in by.items():
        if not chosen(method):
            continue
        for (b2, m2), o in by.items():
            if b2 != budget or m2 == method or (chosen(m2) and m2 < method):  # each pair of choices once
                continue
            diff = o["ppl_after"] - r["ppl_after"]
            sigma = math.sqrt(r["ppl_after_std"] ** 2 + o["ppl_after_std"] ** 2)
            word = "WIN" if diff > 2 * sigma else "LOSS" if -diff > 2 * sigma else "no significant difference"
            print(f"  [{budget}] {method} vs {m2}: {r['ppl_after']:.2f} vs {o['ppl_after']:.2f} "
                  f"(diff {diff:+.2f}, 2σ={2 * sigma:.2f}) -> {word}")


if __name__ == "__main__":
    raise SystemExit(main())

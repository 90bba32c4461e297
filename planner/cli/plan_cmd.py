"""The ``plan`` command (default), ``models`` and ``show``: options from PlanConfig + RunSettings."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from planner.budget import format_bytes, parse_budget
from planner.cli.app import COMMANDS, Command, add_dataclass_options, dry_run, run_settings_from
from planner.config import PlanConfig, config_fields
from planner.errors import PlannerError
from planner.progress import stdout_console
from planner.settings import RunSettings, run_fields

_PLAN_ONLY = {"model", "budget"}  # added by hand: positional-like and documented first


def plan_arguments(parser: argparse.ArgumentParser) -> None:
    d = PlanConfig()
    parser.add_argument("--model", default=d.model, help=f"{_help('model')} (default: {d.model})")
    parser.add_argument("--budget", default=None, help=_help("budget"))
    parser.add_argument("--dry-run", action="store_true", help="read no weights: print the memory breakdown of the "
                        "smallest and the largest plan of the search space")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of tables")
    others = [f for f in config_fields() if f.name not in _PLAN_ONLY]
    add_dataclass_options(parser.add_argument_group("planning"), others, d)
    add_dataclass_options(parser.add_argument_group("run settings (memory model)"), run_fields())


def _help(name: str) -> str:
    return next(f.metadata["help"] for f in config_fields() if f.name == name)


def config_from(args: argparse.Namespace) -> PlanConfig:
    values = {}
    for f in fields(PlanConfig):
        if not hasattr(args, f.name):
            continue
        values[f.name] = getattr(args, f.name)
    values["budget"] = args.budget or ""
    return PlanConfig(**values)


def plan_command(args: argparse.Namespace) -> int:
    if args.dry_run:
        cfg = config_from(args)  # the same validation as a real run, though a dry run reads no weights
        if cfg.data and not cfg.data.startswith("hf:"):  # a local corpus is checked by the real run's loader
            from planner.train.data import CorpusConfig, load_corpus

            load_corpus(CorpusConfig(source=cfg.data, seed=0))
        args.target_modules = args.target_modules or None
        args.keep16 = 16 in args.bits
        args.bits = tuple(b for b in args.bits if b < 16) or (4,)
        return dry_run(args)
    from planner.artifact.plan import save_plan
    from planner.search.pipeline import make_plan

    cfg = config_from(args)
    run = run_settings_from(args)
    if not args.budget:
        raise PlannerError("--budget is required (e.g. --budget 11GB); add --dry-run to see the plan sizes")
    budget = parse_budget(args.budget)
    if cfg.pareto:
        Path(cfg.pareto).parent.mkdir(parents=True, exist_ok=True)
    outcome = make_plan(cfg, run, budget)
    path = save_plan(outcome.plan, cfg.out)
    if cfg.pareto:
        write_pareto(outcome, cfg.pareto)
    if args.json:
        summary = {"plan": str(path), "budget_bytes": budget, "total_bytes": outcome.plan.total_bytes,
                   "budget_binds": outcome.budget_binds, "layers": len(outcome.plan.layers),
                   "search": {k: outcome.plan.search[k] for k in ("mode", "trials", "exact_optimum", "gap")}}
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        report(outcome, path, budget)
    return 0


def report(outcome: Any, path: Path, budget: int, console: Console | None = None, written: bool = True) -> None:
    """Per-block table of bits/ranks, the memory breakdown against the budget, and notes."""
    from planner.artifact.plan import summary_by_block

    console = console or stdout_console()
    plan = outcome.plan
    summary = summary_by_block(plan)
    table = Table(title=f"{plan.model['id']}: bits/rank per layer, by block", show_lines=False)
    table.add_column("block", justify="right")
    for c in summary.columns:
        table.add_column(c, justify="center", no_wrap=True, min_width=len(c))
    table.add_column("bits/w", justify="right")
    for row in summary:
        cells = [f"{row.cells[c][0]}/{row.cells[c][1]}" if c in row.cells else "" for c in summary.columns]
        table.add_row("-" if row.block is None else str(row.block), *cells, f"{row.bits_per_weight:.2f}")
    console.print(table)
    est = plan.estimate
    mem = Table(title="memory (estimate)")
    mem.add_column("term")
    mem.add_column("bytes", justify="right")
    for k, v in est["breakdown"].items():
        mem.add_row(k, format_bytes(v))
    mem.add_row("reserve (context, slack)", format_bytes(est.get("reserve_bytes", 0)))
    mem.add_row("[bold]total[/bold]", f"[bold]{format_bytes(est['total_bytes'])}[/bold]")
    mem.add_row("budget", format_bytes(budget))
    console.print(mem)
    s = plan.search
    if not outcome.budget_binds:
        console.print(f"note: the budget does not bind: every layer got its best choice "
                      f"({format_bytes(est['total_bytes'])} of {format_bytes(budget)}).")
    if plan.mode == "finetune" and not any(layer.rank for layer in plan.layers):
        console.print("[yellow]note: no layer has an adapter, so there is nothing to fine-tune. Either no adapter "
                      "fits, or every plan with adapters scored worse by more than --adapter-margin (see the "
                      "warnings). To make room: raise the budget, lower --seq-len, or use --gradient-checkpointing.")
    proxy = s.get("proxy", {})
    chosen = next((c for c in proxy.get("candidates", []) if c.get("chosen")), None)
    def num(key: str) -> str:
        v = s.get(key)
        return f"{v:.4g}" if isinstance(v, (int, float)) else "?"

    line = f"search {s.get('mode', '?')}: {s.get('trials', '?')} trials; objective {num('chosen_objective')} " \
           f"(exact optimum {num('exact_optimum')})"
    if chosen and "kl" in chosen:
        kind = proxy.get("zero_step_kind", proxy.get("kind", ""))
        line += f"; zero-step KL {chosen['kl']:.4g} nats/token" if "KL" in kind else \
            f"; zero-step 1 - cos {chosen['kl']:.4g}"
    if chosen and "steps" in proxy and "loss" in chosen:
        steps = chosen.get("steps", proxy["steps"])
        line += f"; fine-tune proxy loss {chosen['loss']:.4f} " + \
            (f"after {steps} steps" if steps else "untrained (no adapter; it beat every fine-tuned candidate)")
    console.print(line)
    console.print(f"plan written to {path}" if written else f"plan: {path}")


def write_pareto(outcome: Any, stem: str) -> None:
    """Exact front of the additive objective (JSON + PNG), with the chosen plan marked."""
    from planner.search.allocate import pareto_front, plot_pareto, save_pareto

    problem = outcome.problem
    keep, options = problem.group_options(problem.neutral)
    points = pareto_front(options, n=30, fixed_bytes=problem.fixed_bytes)
    extra = {"chosen": (outcome.chosen.bytes, outcome.chosen.objective)}
    save_pareto(points, f"{stem}.json", extra)
    plot_pareto(points, f"{stem}.png", extra, title="exact memory / objective front",
                ylabel="estimated loss rise (nats)")


def models_command(args: argparse.Namespace) -> int:
    from planner.sources import known_models

    rows = known_models()
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
        return 0
    table = Table(title="known models (ids and aliases)")
    for col in ("name", "hub_id", "architecture", "offline"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r.get("name")), str(r.get("hub_id") or "-"), str(r.get("architecture")),
                      "yes" if r.get("offline") else "facts only (weights need a download)")
    stdout_console().print(table)
    return 0


def show_command(args: argparse.Namespace) -> int:
    from types import SimpleNamespace

    from planner.artifact.plan import load_plan

    plan = load_plan(args.plan)
    if args.json:
        sys.stdout.write(json.dumps(plan.to_dict(), indent=1) + "\n")
        return 0
    outcome = SimpleNamespace(plan=plan, budget_binds=plan.search.get("budget_binds", True))
    report(outcome, Path(args.plan), plan.budget_bytes, written=False)
    from planner.fit import fit_lines, fit_plan_file  # longest context / largest batch within the plan's budget

    fits = fit_plan_file(plan)
    if fits:
        stdout_console().print("\n".join(fit_lines(fits, RunSettings.from_dict(plan.run), plan.budget_bytes)))
    return 0


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true")


def _show_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", help="a plan.json")
    p.add_argument("--json", action="store_true")


COMMANDS["plan"] = Command("plan per-layer bits and ranks under a memory budget (default command)",
                           plan_arguments, plan_command)
COMMANDS["models"] = Command("list known model ids and aliases, and which work offline", _models_args, models_command)
COMMANDS["show"] = Command("print a plan's per-block table and memory breakdown", _show_args, show_command)

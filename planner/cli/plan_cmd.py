"""The ``plan`` command (default), ``models`` and ``show``: options from PlanConfig + RunSettings.

Before any weight is read, :func:`planner.cli.preflight.plan_outputs` checks the plan and Pareto
paths, the study storage and the cache folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from planner.budget import format_bytes, parse_budget
from planner.cli import preflight
from planner.cli.app import COMMANDS, Command
from planner.cli.dryrun import dry_run
from planner.cli.flags import Report, add_options, config_from
from planner.search.config import PlanConfig
from planner.errors import PlannerError
from planner.files.paths import Input, Output, check_outputs
from planner.options import option
from planner.progress import stdout_console
from planner.settings import RunSettings
from search_spaces.widths import width_bits

_FIRST = ("model", "budget")  # documented first in --help


@dataclass(frozen=True)
class PlanCommand:
    """What the ``plan`` command does with the settings: a dry run or a real plan, tables or JSON."""

    dry_run: bool = option(False, "read no weights: print the memory breakdown of the smallest and the largest "
                           "plan of the search space")
    json: bool = option(False, "print a JSON summary instead of tables")


def plan_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, PlanConfig, only=_FIRST)
    add_options(parser, PlanCommand)
    add_options(parser.add_argument_group("planning"), PlanConfig, skip=_FIRST)
    add_options(parser.add_argument_group("run settings (memory model)"), RunSettings)


def plan_command(args: argparse.Namespace) -> int:
    cfg, run, cmd = config_from(PlanConfig, args), config_from(RunSettings, args), config_from(PlanCommand, args)
    if cmd.dry_run:
        return dry_run(cfg, run, as_json=cmd.json)
    if not cfg.budget:
        raise PlannerError("--budget is required (e.g. --budget 11GB); add --dry-run to see the plan sizes")
    budget = parse_budget(cfg.budget)
    preflight.plan_outputs(cfg)
    from planner.artifact.plan import save_plan
    from planner.search.flow import make_plan

    outcome = make_plan(cfg, run, budget)
    path = save_plan(outcome.plan, cfg.out)
    if cfg.pareto:
        write_pareto(outcome, cfg.pareto)
    if cmd.json:
        summary = {"plan": str(path), "budget_bytes": budget, "total_bytes": outcome.plan.total_bytes,
                   "budget_binds": outcome.budget_binds, "layers": len(outcome.plan.layers),
                   "search": {k: getattr(outcome.plan.search, k) for k in ("mode", "trials", "exact_optimum", "gap")}}
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        report(outcome, path, budget)
    return 0


def report(outcome: Any, path: Path, budget: int, console: Console | None = None, written: bool = True) -> None:
    """Per-block table of bits/ranks, the memory breakdown against the budget, and notes."""
    from planner.artifact.summary import summary_by_block

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
    for k, v in est.breakdown.items():
        mem.add_row(k, format_bytes(v))
    mem.add_row("reserve (context, slack)", format_bytes(est.reserve_bytes))
    mem.add_row("[bold]total[/bold]", f"[bold]{format_bytes(est.total_bytes)}[/bold]")
    mem.add_row("budget", format_bytes(budget))
    console.print(mem)
    s = plan.search
    if not outcome.budget_binds:
        console.print(f"note: the budget does not bind: every layer got its best choice "
                      f"({format_bytes(est.total_bytes)} of {format_bytes(budget)}).")
    if plan.mode == "finetune" and not any(layer.rank for layer in plan.layers):
        console.print("[yellow]note: no layer has an adapter, so there is nothing to fine-tune. Either no adapter "
                      "fits, or every plan with adapters scored worse by more than --adapter-margin (see the "
                      "warnings). To make room: raise the budget, lower --seq-len, or use --gradient-checkpointing.")
    low_bit_note(outcome, console)
    rotated_note(plan, console)
    console.print(_search_line(s))
    console.print(f"plan written to {path}" if written else f"plan: {path}")


def rotated_note(plan: Any, console: Console) -> None:
    """Say which layers are rotated (a width such as ``3r``), if any."""
    from loftq.formats import menu_key
    from search_spaces.widths import is_rotated

    rotated = [layer.name for layer in plan.layers if layer.spec is not None and is_rotated(menu_key(layer.spec, layer.shape))]
    if rotated:
        console.print(f"note: r = rotated: {len(rotated)} of {len(plan.layers)} layers store their codes in a randomized "
                      f"Hadamard basis (e.g. {rotated[0]}); planner.load, finetune and verify run them, GGUF and "
                      "hf-bnb exports cannot (plan with --rotation off for those).")


def low_bit_note(outcome: Any, console: Console) -> None:
    """A plan with 2-bit layers from a menu without 3 bits: say what the wider menu bought (README).
    Only after a search (``show`` of a saved plan has no menu to look at)."""
    problem = getattr(outcome, "problem", None)
    if problem is None:
        return
    offered = {width_bits(w) for w, _ in problem.table.options}
    n2 = sum(1 for layer in outcome.plan.layers if layer.bits == 2)
    if n2 and 3 not in offered:
        console.print(f"[yellow]note: {n2} layers are at 2 bits. At budgets this tight a menu with 3-bit widths "
                      "(--bits 2,3,4,8) usually does much better (SmolLM2 at 4.0 bits/weight: perplexity 88.6 -> "
                      "34.8; README \"Tight budgets\").")


def _search_line(s: Any) -> str:
    """One line on the search (a planner.artifact.records.SearchRecord) and the chosen candidate."""
    proxy = s.proxy
    chosen = proxy.chosen() if proxy is not None else None

    def num(v: float | None) -> str:
        return f"{v:.4g}" if isinstance(v, (int, float)) else "?"

    line = f"search {s.mode}: {s.trials} trials; objective {num(s.chosen_objective)} " \
           f"(exact optimum {num(s.exact_optimum)})"
    if chosen and "kl" in chosen:
        kind = proxy.zero_step_kind or proxy.kind
        line += f"; zero-step KL {chosen['kl']:.4g} nats/token" if "KL" in kind else \
            f"; zero-step 1 - cos {chosen['kl']:.4g}"
    if chosen and proxy.steps is not None and "loss" in chosen:
        steps = chosen.get("steps", proxy.steps)
        line += f"; fine-tune proxy loss {chosen['loss']:.4f} " + \
            (f"after {steps} steps" if steps else "untrained (no adapter; it beat every fine-tuned candidate)")
    return line


def write_pareto(outcome: Any, stem: str) -> None:
    """Exact front of the additive objective (JSON + PNG), with the chosen plan marked."""
    from planner.search.pareto import pareto_front, plot_pareto, save_pareto

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
    if config_from(Report, args).json:
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
    if config_from(Report, args).json:
        sys.stdout.write(json.dumps(plan.to_dict(), indent=1) + "\n")
        return 0
    binds = plan.search.budget_binds
    outcome = SimpleNamespace(plan=plan, budget_binds=True if binds is None else binds)
    report(outcome, Path(args.plan), plan.budget_bytes, written=False)
    from planner.cli.fit import fit_lines, fit_plan_file  # longest context / largest batch within the plan's budget

    fits = fit_plan_file(plan)
    if fits:
        stdout_console().print("\n".join(fit_lines(fits, plan.run, plan.budget_bytes)))
    return 0


@dataclass(frozen=True)
class CollectCommand:
    """Options of ``python -m planner collect``: the shared study to read and where the plan goes."""

    storage: str = option(MISSING, "the workers' Optuna storage URL")
    study_name: str = option(MISSING, "the workers' study name")
    out: str = option(PlanConfig().out, "where to write the plan")
    cache_dir: str | None = option(None, "cache folder (default: $LOFTQ_PLANNER_CACHE or ~/.cache/loftq-planner)")


def collect_command(args: argparse.Namespace) -> int:
    from planner.artifact.plan import save_plan
    from planner.search.flow import collect

    cfg = config_from(CollectCommand, args)
    preflight.output_file(cfg.out)
    db = preflight.sqlite_path(cfg.storage)
    check_outputs([Output(Path(cfg.out), "--out")], [Input(db, "study database (--storage)")] if db else [])
    preflight.storage(cfg.storage)
    outcome = collect(cfg.storage, cfg.study_name, cfg.cache_dir)
    report(outcome, save_plan(outcome.plan, cfg.out), outcome.plan.budget_bytes)
    return 0


def _collect_args(p: argparse.ArgumentParser) -> None:
    add_options(p, CollectCommand)


def _models_args(p: argparse.ArgumentParser) -> None:
    add_options(p, Report)


def _show_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", help="a plan.json")
    add_options(p, Report)


COMMANDS["plan"] = Command("plan per-layer bits and ranks under a memory budget (default command)",
                           plan_arguments, plan_command)
COMMANDS["models"] = Command("list known model ids and aliases, and which work offline", _models_args, models_command)
COMMANDS["collect"] = Command("write the plan of a shared study (workers on one --storage) from the storage alone",
                              _collect_args, collect_command)
COMMANDS["show"] = Command("print a plan's per-block table and memory breakdown", _show_args, show_command)

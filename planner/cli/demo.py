"""``make demo``: the tool's main job on the offline default model (SmolLM2-135M), via the real CLI.

1. dry run: the memory range of the search space for a LoRA fine-tune (seq 1024, batch 1);
2. plan at a budget that binds (between the smallest and the largest plan), Optuna-guided;
3. show the plan, and plan the same model for serving at a budget where the widths must mix; 4. materialize it (LoftQ backbone + adapters); 5. verify its memory; 6. fine-tune it
briefly.
Outputs go to ./demo-out/. Every step is one `python -m planner ...` command a user can copy.
"""
from __future__ import annotations

import shlex
from collections import Counter
import shutil
import sys
from pathlib import Path

from rich.console import Console

from loftq.formats import menu_key
from search_spaces.widths import is_double_quant, width_bits

from planner.cli.app import _register, main
from planner.artifact.plan import Plan, load_plan
from planner.progress import stdout_console

BUDGET = "2.2GB"  # binds (the space spans 1.89-2.26 GB) and leaves room for adapters
SERVE_BUDGET = "0.79GB"  # serving: the space spans 0.73-0.86 GB, so the weights mix 4 and 8 bits
OUT = Path("demo-out")


def step(console: Console, title: str, argv: list[str]) -> None:
    console.rule(f"[bold]{title}")
    console.print(f"$ python -m planner {shlex.join(argv)}", style="cyan")
    rc = main(argv)
    if rc != 0:
        console.print(f"[red]step failed with exit status {rc}")
        sys.exit(rc)


def _width_label(layer) -> str:
    """``8-bit``, ``4-bit+dq``, or a type's own name (``q4_k``)."""
    key = menu_key(layer.spec) if layer.spec is not None else layer.bits
    if str(key).isdigit():
        return f"{key}-bit"
    return f"{width_bits(key)}-bit+dq" if is_double_quant(key) else str(key)


def why(plan: Plan) -> str:
    """One line on what the planner decided and why, read off the plan."""
    widths = Counter(_width_label(layer) for layer in plan.layers)
    ranks = Counter(layer.rank for layer in plan.layers if layer.rank)
    mix = ", ".join(f"{n} at {w}" for w, n in sorted(widths.items(), key=lambda kv: -kv[1]))
    n = sum(ranks.values())
    span = f"rank {min(ranks)}" if ranks and min(ranks) == max(ranks) else f"rank {min(ranks, default=0)}-{max(ranks, default=0)}"
    adapters = f"{n} adapter{'s' if n != 1 else ''} ({span})" if ranks else "no adapter"
    binds = plan.search.budget_binds
    if binds is None:  # a hand-made plan: no search to explain
        reason = ""
    elif not binds:
        reason = "; the budget does not bind: every layer could take the best option"
    elif len(widths) == 1:
        reason = (f"; the budget binds, but not on the widths: every layer fits at {next(iter(widths))}, and the "
                  "bytes left went to adapters where the search found they lower the loss")
    else:
        reason = ("; the budget binds: the widest widths go to the layers whose Fisher-weighted LoftQ error is "
                  "highest, and bytes go to adapters where the search found they lower the loss")
    return f"why this plan: {len(plan.layers)} layers, {mix}; {adapters}{reason}"


def run() -> None:
    console = stdout_console()
    _register()
    OUT.mkdir(exist_ok=True)
    plan = str(OUT / "plan.json")
    step(console, "1. memory range of the search space (no weights read)", ["--budget", BUDGET, "--dry-run"])
    step(console, "2. plan SmolLM2-135M for a LoRA fine-tune under the budget (Optuna-guided, zero-step KL, "
         "then the 2 most diverse good candidates re-scored by 10 LoRA steps each)",
         ["--budget", BUDGET, "--trials", "8", "--proxy-top", "2", "--proxy-steps", "10", "--out", plan,
          "--pareto", str(OUT / "pareto")])
    step(console, "3. the plan file", ["show", plan])
    console.print(why(load_plan(plan)), style="bold")
    serve = str(OUT / "serve-plan.json")
    step(console, f"3b. the same model served (inference) within {SERVE_BUDGET}: here the weights themselves must "
         "shrink, so the widths mix (the tables and sensitivities above are reused from the cache)",
         ["--budget", SERVE_BUDGET, "--mode", "inference", "--trials", "8", "--out", serve])
    console.print(why(load_plan(serve)), style="bold")
    model_dir = OUT / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    step(console, "4. build it: LoftQ backbone + adapters", ["materialize", plan, "--out", str(model_dir), "--force"])
    if not any(layer.rank for layer in load_plan(plan).layers):  # the planner may judge adapters not worth it
        console.print("[yellow]the chosen plan has no adapter (the planner found no plan with adapters "
                      "within --adapter-margin of it): nothing to verify a training step or fine-tune with")
        return
    step(console, "5. verify memory against the plan (one training step, seq 1024)",
         ["verify", str(model_dir), "--steps", "1"])
    step(console, "6. a short LoRA fine-tune with held-out loss (pydoc train/val splits)",
         ["finetune", str(model_dir), "--steps", "10", "--seq-len", "256", "--eval-seqs", "4", "--force"])
    console.rule("[bold]done")
    console.print(f"outputs in {OUT}/: plan.json, serve-plan.json, pareto.json/.png, model/ (backbone, adapter, "
                  "finetuned-adapter); load it with planner.load('demo-out/model')")


if __name__ == "__main__":
    run()

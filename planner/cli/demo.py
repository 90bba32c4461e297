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

# The budgets are placed inside the search space this machine's run has (its dry run: a GPU's run
# counts bf16 activations and a CUDA context, a CPU run fp32 and none), where the planner must choose:
FINETUNE_AT = 0.18  # fine-tune: this far from the smallest plan towards the largest (adapters of mixed ranks)
SERVE_AT = 0.3  # serving: the weights get this far from all-2-bit towards all-8-bit (the widths mix)
OUT = Path("demo-out")


def space(*argv: str) -> dict:
    """The dry run's JSON report (smallest and largest plan) of the default model for these settings."""
    import contextlib
    import io
    import json

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["--budget", "1GB", "--dry-run", "--json", *argv])
    if rc != 0:
        sys.exit(rc)
    return json.loads(buf.getvalue())


def budgets() -> tuple[str, str]:
    """(fine-tune budget, serving budget) in GB, two decimals, inside this machine's search space."""
    ft = space()
    serve = space("--mode", "inference")
    lo, hi = ft["min_bytes"], ft["max_bytes"]
    finetune = lo + FINETUNE_AT * (hi - lo)
    weights = (serve["max"]["breakdown"]["backbone"] - serve["min"]["breakdown"]["backbone"])
    serving = serve["min_bytes"] + SERVE_AT * weights
    return f"{finetune / 1e9:.2f}GB", f"{serving / 1e9:.3f}GB"


def step(console: Console, title: str, argv: list[str]) -> None:
    console.rule(f"[bold]{title}")
    console.print(f"$ python -m planner {shlex.join(argv)}", style="cyan")
    rc = main(argv)
    if rc != 0:
        console.print(f"[red]step failed with exit status {rc}")
        sys.exit(rc)


def _width_label(layer) -> str:
    """``8-bit``, ``4-bit+dq``, or a type's own name (``q4_k``)."""
    key = menu_key(layer.spec, layer.shape) if layer.spec is not None else layer.bits
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
    budget, serve_budget = budgets()
    step(console, "1. memory range of the search space (no weights read)", ["--budget", budget, "--dry-run"])
    step(console, "2. plan SmolLM2-135M for a LoRA fine-tune under the budget (Optuna-guided, zero-step KL, "
         "then the 2 most diverse good candidates re-scored by 10 LoRA steps each)",
         ["--budget", budget, "--trials", "8", "--proxy-top", "2", "--proxy-steps", "10", "--out", plan,
          "--pareto", str(OUT / "pareto")])
    step(console, "3. the plan file", ["show", plan])
    console.print(why(load_plan(plan)), style="bold")
    serve = str(OUT / "serve-plan.json")
    step(console, f"3b. the same model served (inference) within {serve_budget}: here the weights themselves must "
         "shrink, so the widths mix (the tables and sensitivities above are reused from the cache)",
         ["--budget", serve_budget, "--mode", "inference", "--trials", "8", "--out", serve])
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

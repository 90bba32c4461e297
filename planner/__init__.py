"""loftq-planner: per-layer bits and LoRA ranks under a memory budget, then the LoftQ model.

The Python API mirrors the CLI, with the same config dataclasses (defaults and help defined once)::

    import planner
    plan = planner.plan(planner.PlanConfig(model="smollm2-135m", budget="2GB"), out="plan.json")
    planner.materialize("plan.json", "out-dir")                 # MaterializeConfig() by default
    model = planner.load("out-dir")                             # a trainable PeftModel

Packages (each ``__init__`` says what it owns and may import), from the bottom up::

    files/     the atomic writer, the input/output path rule, safe reads, the cache, fingerprints
    errors, options, progress, devices, budget          (top-level modules: the bottom utilities)
    settings, overheads, memory  the run's settings and the one byte-counting function
    artifact/  the plan schema and the packed folder's format
    sources/   model sources (packaged, local folder, hub, GGUF), imatrix files
    runtime/   QuantLinear, LoRA surgery, the one builder, load(DIR)
    train/     the one training loop + optimizer + eval, corpus and splits, KL divergence
    scoring/   residual tables, sensitivity, weight bank, zero-step and fine-tune proxies
    search/    plan settings, exact allocation, objective, Optuna layer, Pareto, the planning flow
    build/     materialize, the hf-bnb and GGUF exports, finetune's adapter folder, hand-made plans
    verify/    measured memory against the plan (and the trainers' peak oracle)
    cli/       entry point, subcommands, preflight checks, dry run, rendering, demo
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import logging as _logging

# bitsandbytes logs on import, on every CPU with AVX512-BF16, that an optional kernel package could not
# be fetched from its hub: nothing here needs it, and offline the user can do nothing about it
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

from planner.search.config import PlanConfig  # noqa: E402
from planner.errors import PlannerError  # noqa: E402
from planner.settings import RunSettings  # noqa: E402

if TYPE_CHECKING:  # imported lazily below: torch/transformers are slow to import
    from planner.build.materialize import Materialized, MaterializeConfig
    from planner.artifact.plan import Plan

__all__ = ["PlanConfig", "RunSettings", "PlannerError", "plan", "materialize", "load", "load_plan", "MaterializeConfig"]


def plan(config: PlanConfig, run: RunSettings | None = None, *, out: str | Path | None = None) -> "Plan":
    """Search a plan for ``config.model`` under ``config.budget``; write it to ``out`` when given.

    ``run`` describes the run the plan must fit (default: :class:`RunSettings` defaults). Bad input
    raises :class:`PlannerError` with one line."""
    from planner.cli import preflight
    from planner.artifact.plan import save_plan
    from planner.budget import parse_budget
    from planner.search.flow import make_plan

    if not config.budget:
        raise PlannerError("a budget is required (e.g. PlanConfig(budget='11GB'))")
    budget = parse_budget(config.budget)
    # every path and the storage checked before the heavy work, as the CLI does
    if out is not None:
        preflight.plan_outputs(dataclasses.replace(config, pareto=None), out)
    else:
        if config.storage:
            preflight.storage(config.storage)
        preflight.cache_dir(config)
    outcome = make_plan(config, run or RunSettings(), budget)
    if out is not None:
        save_plan(outcome.plan, out)
    return outcome.plan


def materialize(plan_path: str | Path, out: str | Path, config: "MaterializeConfig | None" = None,
                **kwargs: Any) -> "Materialized":
    """Build DIR from a plan file: packed backbone + LoftQ adapters (see :mod:`planner.build.materialize`);
    a data-aware plan's input moments come from :func:`planner.scoring.moments.plan_moments`."""
    from planner.build.materialize import MaterializeConfig, materialize as _materialize
    from planner.scoring.moments import plan_moments

    kwargs.setdefault("moments", plan_moments)
    return _materialize(plan_path, out, config or MaterializeConfig(), **kwargs)


def load(path: str | Path, device: Any = None, dtype: Any = None, *, adapter: str | Path | None = None) -> Any:
    """A materialized folder as a trainable PeftModel (see :func:`planner.runtime.load.load`)."""
    from planner.runtime.load import load as _load

    return _load(path, device, dtype, adapter=adapter)


def load_plan(path: str | Path) -> "Plan":
    """Read and validate a plan file (any schema version this planner knows)."""
    from planner.artifact.plan import load_plan as _load_plan

    return _load_plan(path)


def __getattr__(name: str) -> Any:
    if name == "MaterializeConfig":
        from planner.build.materialize import MaterializeConfig

        return MaterializeConfig
    raise AttributeError(f"module 'planner' has no attribute {name!r}")

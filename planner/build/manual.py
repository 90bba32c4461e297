"""Plans with hand-picked per-layer choices: uniform baselines, tests and benches.

:func:`plan_from_choices` skips the search: each target named in ``choices`` gets that
:class:`~planner.settings.LayerChoice` (alpha = rank), and the plan's estimate comes from the same
memory model a searched plan's does, so a hand-made plan and a planned one compare at equal bytes.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, TYPE_CHECKING

from planner.artifact.plan import SCHEMA_VERSION, LayerPlan, Plan, SearchRecord, created_with
from planner.memory import estimate, layer_bytes
from planner.settings import LayerChoice, RunSettings

if TYPE_CHECKING:  # annotations only
    from planner.sources import ModelSource


def plan_from_choices(source: ModelSource, choices: Mapping[str, LayerChoice], run: RunSettings, *,
                      budget_bytes: int | None = None, iters: int = 1, model: Mapping[str, Any] | None = None) -> Plan:
    """A plan for ``source``'s targets named in ``choices`` (the head too when named), each with its
    choice and alpha = rank; the budget defaults to the estimate's total. ``model``: the plan's model
    entry (default: ``source``'s, fingerprints included, which reads its weights once)."""
    from planner.sources import model_record

    targets = source.targets([re.escape(n) for n in choices], include_head=True)
    missing = sorted(set(choices) - {t.name for t in targets})
    if missing:
        raise ValueError(f"not target layers of {source.reference}: {', '.join(missing[:5])}")
    facts, non_target = source.facts, source.non_target_params(targets)
    est = estimate(facts, targets, choices, run, non_target)
    layers = tuple(LayerPlan(
        name=t.name, shape=tuple(t.shape), bits=c.bits, quant=c.quant, block_size=c.block_size, rank=c.rank,
        alpha=float(c.rank), iters=iters, residual=None, bytes=layer_bytes(t, c, run, facts),
        double_quant=c.double_quant) for t in targets for c in [choices[t.name]])
    model = dict(model) if model is not None else model_record(source, source.reference)
    return Plan(SCHEMA_VERSION, model, budget_bytes or est.total_bytes, run.mode, run, est, layers,
                SearchRecord("manual"), created_with())

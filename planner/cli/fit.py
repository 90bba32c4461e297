"""What fits a budget: the longest context and the largest batch for a plan, or for the uniform plans
of a search space (every layer at one bits width with the space's largest rank).

The memory model grows with the sequence length and the batch (every activation term does, eager
attention quadratically), so both are found by bisection on :func:`planner.memory.estimate`'s total.
The context is capped at the model's ``max_positions`` when it has one (a longer one needs rope
scaling, which the model does not do by itself); the report says when that cap is what binds.
"""
from __future__ import annotations

from collections import Counter

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from search_spaces.facts import ModelFacts, TargetLayer

from planner.budget import format_bytes
from planner.memory import estimate
from planner.settings import LayerChoice, RunSettings

MAX_BATCH = 1 << 16
MAX_SEQ_WITHOUT_LIMIT = 1 << 22


@dataclass(frozen=True)
class Fit:
    """For one plan: ``longest_seq`` at the run's batch and ``largest_batch`` at the run's seq_len
    (0: not even 1 fits); ``seq_capped``: the model's max_positions bound it, not the budget."""

    label: str
    longest_seq: int
    largest_batch: int
    seq_capped: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _largest(fits: Callable[[int], bool], cap: int) -> int:
    """The largest n in [1, cap] with ``fits(n)`` for a monotone predicate; 0 if none."""
    if not fits(1):
        return 0
    lo, hi = 1, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def fit_choices(budget: int, facts: ModelFacts, targets: Sequence[TargetLayer], choices: Mapping[str, LayerChoice],
                run: RunSettings, non_target: Any = None, label: str = "plan") -> Fit:
    """Longest context and largest batch whose estimated total fits ``budget`` bytes."""
    def total(**change: int) -> int:
        return estimate(facts, targets, choices, dataclasses.replace(run, **change), non_target).total_bytes

    cap = facts.max_positions if facts.max_positions and facts.max_positions > 0 else MAX_SEQ_WITHOUT_LIMIT
    seq = _largest(lambda n: total(seq_len=n) <= budget, cap)
    batch = _largest(lambda n: total(batch_size=n) <= budget, MAX_BATCH)
    return Fit(label, seq, batch, seq == cap and cap != MAX_SEQ_WITHOUT_LIMIT)


def uniform_plans(targets: Sequence[TargetLayer], space: Any, method: str = "nf") -> dict[str, dict[str, LayerChoice]]:
    """Per width that every target may take (``4``, ``4dq``, ...): all layers at it with the largest rank
    they all allow."""
    shared = set(space.choices_for(targets[0])) if targets else set()
    for t in targets[1:]:
        shared &= set(space.choices_for(t))
    plans: dict[str, dict[str, LayerChoice]] = {}
    for w in sorted({b for b, _ in shared}):
        rank = max(r for b, r in shared if b == w)
        label = f"uniform {w}" + ("-bit" if str(w)[0].isdigit() else "")  # 4-bit, 4dq-bit, q4_k
        choices = {t.name: LayerChoice.of(w, rank, method, space.block_size, shape=tuple(t.shape)) for t in targets}
        stored = Counter(c.quant for c in choices.values())
        if len(stored) > 1:  # a width some rows cannot hold: say what each layer really stores
            label += " (" + ", ".join(f"{n} on {k}" for n, k in stored.most_common()) + " layers)"
        plans[f"{label} r{rank}"] = choices
    return plans


def fit_space(budget: int, facts: ModelFacts, targets: Sequence[TargetLayer], space: Any, run: RunSettings,
              non_target: Any = None, method: str = "nf") -> list[Fit]:
    """:func:`fit_choices` for each of the space's :func:`uniform_plans`."""
    return [fit_choices(budget, facts, targets, choices, run, non_target, label)
            for label, choices in uniform_plans(targets, space, method).items()]


def fit_lines(fits: Sequence[Fit], run: RunSettings, budget: int) -> list[str]:
    """Human lines: one per plan, saying the longest context at the batch and the largest batch at the context."""
    if run.llamacpp:
        how = f"served by llama.cpp: f16 KV cache, ubatch {run.ubatch}, flash attention off"
    elif not run.finetune:
        how = f"served by torch, {run.attn_implementation}"
    else:
        how = (f"trainer {run.trainer}, {'checkpointing' if run.gradient_checkpointing else 'no checkpointing'}, "
               f"{run.attn_implementation}")
    lines = [f"fits {format_bytes(budget)} ({how}):"]
    for f in fits:
        if f.longest_seq == 0:
            lines.append(f"  {f.label}: nothing fits, not even 1 token x batch {run.batch_size}")
            continue
        cap = " (the model's max positions)" if f.seq_capped else ""
        batch = (f"largest batch {f.largest_batch} at seq {run.seq_len}" if f.largest_batch
                 else f"no batch fits at seq {run.seq_len}")
        lines.append(f"  {f.label}: longest context {f.longest_seq}{cap} at batch {run.batch_size}; {batch}")
    return lines


def fit_plan_file(plan: Any) -> list[Fit] | None:
    """The fit of a saved plan against its own budget, from its model's shapes (no weights, no download);
    None when the model cannot be resolved offline."""
    from planner.errors import PlannerError
    from planner.sources import resolve

    run = plan.run
    try:
        source = resolve(plan.model["id"], allow_download=False)
    except (PlannerError, OSError, ValueError, KeyError):
        return None
    import re

    choices = {layer.name: LayerChoice.from_spec(layer.spec, layer.rank, layer.block_size) for layer in plan.layers}
    targets = source.targets([re.escape(n) for n in choices], include_head=True)
    return [fit_choices(plan.budget_bytes, source.facts, targets, choices, run, source.non_target_params(targets))]


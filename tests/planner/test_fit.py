"""The fit report: the longest context and the largest batch are the exact edges of the budget."""
from __future__ import annotations

import dataclasses

import pytest

from planner.cli.fit import fit_choices, fit_lines, fit_space, uniform_plans
from planner.memory import estimate
from planner.settings import LayerChoice, RunSettings
from search_spaces.choices import SearchSpace
from search_spaces.discovery import facts_from_config, find_targets
from tests.tiny_models import build_tiny


@pytest.fixture(scope="module")
def tiny():
    model = build_tiny("llama")
    return facts_from_config(model.config), find_targets(model)


@pytest.mark.parametrize("run", [RunSettings(device="cuda", batch_size=2), RunSettings(device="cuda", attn_implementation="eager", trainer="trl"),
                                 RunSettings(device="cuda", gradient_checkpointing=True, trainer="other")], ids=["sdpa", "eager-trl",
                                                                                                   "ckpt-other"])
def test_longest_context_and_largest_batch_are_the_budget_edges(tiny, run: RunSettings) -> None:
    facts, targets = dataclasses.replace(tiny[0], max_positions=1 << 20), tiny[1]
    choices = {t.name: LayerChoice(4, 8) for t in targets}
    total = lambda **kw: estimate(facts, targets, choices, dataclasses.replace(run, **kw)).total_bytes  # noqa: E731
    budget = total(seq_len=3000) + 12345  # a budget between two lengths
    fit = fit_choices(budget, facts, targets, choices, run)
    assert fit.longest_seq >= 3000 and not fit.seq_capped
    assert total(seq_len=fit.longest_seq) <= budget < total(seq_len=fit.longest_seq + 1)
    assert total(batch_size=fit.largest_batch) <= budget < total(batch_size=fit.largest_batch + 1)


def test_context_capped_by_max_positions_and_nothing_fits(tiny) -> None:
    facts, targets = tiny  # max_position_embeddings 256
    choices = {t.name: LayerChoice(4, 8) for t in targets}
    fit = fit_choices(10**12, facts, targets, choices, RunSettings(device="cuda"))
    assert (fit.longest_seq, fit.seq_capped) == (256, True)
    assert fit_choices(10**6, facts, targets, choices, RunSettings(device="cuda")).longest_seq == 0  # below the CUDA context
    lines = fit_lines([fit], RunSettings(device="cuda"), 10**12)
    assert "longest context 256 (the model's max positions) at batch 1" in lines[1]


def test_uniform_plans_of_a_space(tiny) -> None:
    facts, targets = tiny
    plans = uniform_plans(targets, SearchSpace(bits=(2, 4), ranks=(0, 16)))
    assert list(plans) == ["uniform 2-bit r16", "uniform 4-bit r16"]
    assert {(c.bits, c.rank) for c in plans["uniform 4-bit r16"].values()} == {(4, 16)}
    fits = fit_space(2 * 10**9, facts, targets, SearchSpace(bits=(2, 4), ranks=(0, 16)), RunSettings(device="cuda", batch_size=4))
    assert [f.label for f in fits] == list(plans) and all(f.largest_batch >= 1 for f in fits)

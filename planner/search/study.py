"""Search: the exact allocation under a shaped objective, and Optuna over what it cannot see.

guided (default): each trial samples a :class:`Shaping` (per-module-type and per-depth weights,
Fisher vs plain-residual mix, adapter-capacity value, rank floor); the exact knapsack turns it
into a per-layer plan within budget; the zero-step proxy (KL to the full model on held-out text)
scores that plan. (No per-layer "direct" mode: Optuna choosing every layer's option under the
neutral objective can at best tie the exact solver on that same objective, and unseeded it found
no feasible plan in 200 trials on SmolLM2.)
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import optuna
import torch

from planner.search.allocate import InfeasibleBudget, solve_mckp
from planner.search.objective import OptionTable, Shaping
from planner.scoring.proxy import ProxyScore, ZeroStepProxy

log = logging.getLogger(__name__)
SHAPE_RANGE = (0.25, 4.0)


@dataclass
class Candidate:
    """One per-layer assignment: option index per layer, its bytes and scores."""

    choice: list[int]
    bytes: int
    objective: float  # neutral additive objective (estimated loss rise)
    shaped: float = math.nan
    shaping: Shaping | None = None
    proxy: ProxyScore | None = None
    trial: int | None = None
    budget_binds: bool = True


@dataclass
class SearchProblem:
    """Options per layer, their byte costs, layer groups (granularity) and the budget."""

    table: OptionTable
    costs: torch.Tensor  # [n_layers, n_options] int64 bytes that depend on the layer's choice
    fixed_bytes: int  # everything else (non-target weights, activations, logits, ...)
    groups: list[list[int]]  # layer indices sharing one choice
    group_names: list[str]
    budget: int
    neutral: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.neutral = self.table.shaped(Shaping())

    def bytes_of(self, choice: Sequence[int]) -> int:
        return self.fixed_bytes + int(sum(int(self.costs[i, k]) for i, k in enumerate(choice)))

    def objective_of(self, choice: Sequence[int]) -> float:
        return float(sum(float(self.neutral[i, k]) for i, k in enumerate(choice)))

    def expand(self, group_choice: Sequence[int]) -> list[int]:
        choice = [0] * self.costs.shape[0]
        for g, k in zip(self.groups, group_choice):
            for i in g:
                choice[i] = k
        return choice

    def group_options(self, shaped: torch.Tensor) -> tuple[list[list[int]], list[list[tuple[int, float]]]]:
        """Per group: the option indices kept (finite shaped objective) and their (bytes, objective)."""
        keep, options = [], []
        for g in self.groups:
            cost, obj = self.costs[g].sum(0), shaped[g].sum(0)
            ks = [k for k in range(len(self.table.options)) if math.isfinite(float(obj[k]))]
            keep.append(ks)
            options.append([(int(cost[k]), float(obj[k])) for k in ks])
        return keep, options

    def solve(self, shaped: torch.Tensor) -> Candidate:
        """Exact optimum of the shaped objective under the budget (raises InfeasibleBudget)."""
        keep, options = self.group_options(shaped)
        alloc = solve_mckp(options, self.budget, fixed_bytes=self.fixed_bytes)
        choice = self.expand([ks[j] for ks, j in zip(keep, alloc.choice)])
        cand = Candidate(choice, self.bytes_of(choice), self.objective_of(choice), alloc.objective)
        cand.budget_binds = alloc.budget_binds
        return cand


def sample_shaping(trial: optuna.Trial, module_types: Sequence[str], ranks: Sequence[int]) -> Shaping:
    weights = {t: trial.suggest_float(f"type.{t}", *SHAPE_RANGE, log=True) for t in module_types}
    return Shaping(
        type_weights=weights,
        depth_slope=trial.suggest_float("depth.slope", -3.0, 3.0),
        mix=trial.suggest_float("mix.residual", 0.0, 1.0),
        capacity=trial.suggest_float("capacity", 0.0, 2.0),
        rank_floor=trial.suggest_categorical("rank_floor", sorted(set(ranks))),
    )


def neutral_params(module_types: Sequence[str], rank_floor: int = 0, capacity: float = 0.0) -> dict:
    return {**{f"type.{t}": 1.0 for t in module_types}, "depth.slope": 0.0, "mix.residual": 0.0,
            "capacity": capacity, "rank_floor": rank_floor}


def guided_search(problem: SearchProblem, proxy: ZeroStepProxy | None, *, trials: int, timeout: float | None,
                  seed: int, storage: str | None, study_name: str,
                  on_trial: Callable[[Candidate | None], None] | None = None) -> tuple[optuna.Study, list[Candidate]]:
    """Optuna over shapings; returns the study and every candidate evaluated in this run."""
    types = sorted({t.module_type for t in problem.table.targets})
    ranks = sorted({r for _, r in problem.table.options})
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=study_name, sampler=sampler,
                                direction="minimize", load_if_exists=True)
    if not study.trials:  # seeds: the plain Fisher knapsack, and with an adapter on every layer
        study.enqueue_trial(neutral_params(types))
        floors = sorted({next((r for r in ranks if r > 0), ranks[-1]), next((r for r in ranks if r >= 16), ranks[-1])})
        for floor in floors:
            if floor > 0:
                study.enqueue_trial(neutral_params(types, rank_floor=floor))
    seen: list[Candidate] = []

    def objective(trial: optuna.Trial) -> float:
        shaping = sample_shaping(trial, types, ranks)
        try:
            cand = problem.solve(problem.table.shaped(shaping))
        except InfeasibleBudget:  # e.g. a rank floor that cannot fit: not a plan, prune it
            trial.set_user_attr("infeasible", True)
            if on_trial:
                on_trial(None)
            raise optuna.TrialPruned() from None
        cand.shaping, cand.trial = shaping, trial.number
        trial.set_constraint("bytes_over_budget", float(cand.bytes - problem.budget))
        trial.set_user_attr("bytes", cand.bytes)
        trial.set_user_attr("objective", cand.objective)
        trial.set_user_attr("choice", cand.choice)
        value = cand.objective
        if proxy is not None:
            cand.proxy = proxy.score(assignment(problem, cand.choice))
            trial.set_user_attr("loss", cand.proxy.loss)
            value = cand.proxy.kl
        seen.append(cand)
        if on_trial:
            on_trial(cand)
        return value

    study.optimize(objective, n_trials=trials, timeout=timeout)
    return study, seen + _earlier_candidates(problem, proxy, study, {c.trial for c in seen})


def _earlier_candidates(problem: SearchProblem, proxy: ZeroStepProxy | None, study: optuna.Study,
                        skip: set[int | None]) -> list[Candidate]:
    """Completed trials of earlier runs of a resumed study, rebuilt from their stored choice and
    scores, so that resuming never loses a better plan found before (the seeded ones included)."""
    out = []
    n, n_opts = len(problem.table.targets), len(problem.table.options)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        choice = t.user_attrs.get("choice")
        if t.number in skip or t.value is None or not math.isfinite(t.value) or not isinstance(choice, list) \
                or len(choice) != n or not all(isinstance(k, int) and 0 <= k < n_opts for k in choice):
            continue
        used = problem.bytes_of(choice)
        if used > problem.budget:
            continue
        cand = Candidate(choice, used, problem.objective_of(choice), trial=t.number)
        if proxy is not None:
            cand.proxy = ProxyScore(float(t.value), float(t.user_attrs.get("loss", t.value)), proxy.ref_loss)
        out.append(cand)
    return out


def has_adapter(candidate: Candidate, options: Sequence[tuple[int, int]]) -> bool:
    return any(options[k][1] > 0 for k in candidate.choice)


def assignment(problem: SearchProblem, choice: Sequence[int]) -> dict[str, tuple[int, int]]:
    return {t.name: problem.table.options[k] for t, k in zip(problem.table.targets, choice)}

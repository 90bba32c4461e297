"""Who computes which unit of a stage (:mod:`planner.search.stages`): one machine, or many sharing a study.

:class:`LocalDriver` computes every unit itself and keeps each result in the cache as it is done,
so a stopped stage resumes at the units not yet done. :class:`SharedDriver` is the same command on
N processes or machines with one ``--storage`` URL and study name: they cooperate through Optuna's
RDB storage alone (no shared filesystem). Three studies share the name: ``NAME`` (the guided
search's trials), ``NAME:work`` (the precomputation, one enqueued trial per unit) and
``NAME:proxy`` (one enqueued trial per fine-tune proxy candidate). A WAITING trial is claimed
atomically by whichever worker pops it first; its result, a few KB of JSON, goes in its user attrs,
and every worker assembles the same tables from them. Heartbeats fail the trial of a killed worker
after the grace period and queue a retry with the same attrs, so ``kill -9`` loses at most the unit
in hand. Weight-sized state (moments, the weight bank) stays local to each worker.

Both drivers call the same stage functions with the same units; a unit's result is the same bits
whoever computed it. The fine-tune proxy's candidates go through one mechanism on both (the local
driver's proxy study lives in memory), pruned by :class:`AheadMedianPruner`.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import optuna
import torch
from optuna.trial import TrialState

from planner import progress
from planner.search.stages import Unit, UnitCache, unit_key
from planner.search.study import fail_stale, open_storage, open_study

log = logging.getLogger(__name__)
POLL_S = 0.5
CONFIG = "planner.config"  # the run's full PlanConfig + RunSettings + budget, for `collect`
REF_LOSS = "planner.ref_loss"
ALIVE = "alive_at"  # a proxy candidate's last step at which it was evaluated and not pruned
Results = dict[str, dict[str, torch.Tensor]]
Compute = Callable[[list[Unit]], Results]


# ---------------------------------------------------------------- results as JSON (a study's user attrs)
def to_json(result: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Exact: float32 and float64 values survive Python floats and back."""
    return {k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": t.flatten().tolist()}
            for k, t in result.items()}


def from_json(result: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v["data"], dtype=getattr(torch, v["dtype"])).view(v["shape"]) for k, v in result.items()}


# ---------------------------------------------------------------- the drivers
class LocalDriver:
    """Every unit on this machine, each result cached as it is done."""

    shared = False

    def run(self, label: str, units: Sequence[Unit], compute: Compute, cache: UnitCache | None,
            together: bool = False) -> Results:
        """Results of ``units`` (cached ones read back); ``together``: the units not cached in one
        call of ``compute`` (one pass over them), else one call per unit."""
        results: Results = {}
        todo = []
        for u in units:
            got = cache.get(u) if cache is not None else None
            if got is not None:
                results[unit_key(u)] = got
            else:
                todo.append(u)
        if todo and len(todo) < len(units):
            log.info("%s: %d of %d units from the cache", label, len(units) - len(todo), len(units))
        batches = [todo] if together and todo else [[u] for u in todo]
        with progress.task(f"{label} ({len(units) - len(todo)} cached)", len(todo)) as advance:
            for batch in batches:
                done = compute(batch)
                for u in batch:
                    if cache is not None:
                        cache.put(u, done[unit_key(u)])
                    results[unit_key(u)] = done[unit_key(u)]
                advance(len(batch))
        return results

    def proxy_study(self) -> optuna.Study:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.create_study(direction="minimize")

    def claim(self, study: optuna.Study, specs: Sequence[Unit], compute: Callable[[Unit, optuna.Trial], Any],
              on_done: Callable[[], None] | None = None) -> dict[str, Any]:
        return share_work(study, specs, compute, "local", on_done)


@dataclass
class Team:
    """This worker's view of the shared studies."""

    storage: optuna.storages.RDBStorage
    name: str
    ident: str  # host:pid:random, recorded on every unit and candidate this worker computes
    index: int  # order of arrival among the workers that ever joined: 0 for the first

    def study(self, suffix: str = "", seed: int = 0) -> optuna.Study:
        return open_study(self.storage, self.name + suffix, seed)


def join(url: str, name: str, fingerprint: dict[str, Any], config: dict[str, Any]) -> Team:
    """Open the storage, check the fingerprint of study ``name`` (one line if it differs) and
    register this worker; its arrival index seeds its sampler, so workers do not sample alike."""
    storage = open_storage(url)
    main = open_study(storage, name, 0, fingerprint)
    if CONFIG not in main.user_attrs:
        main.set_user_attr(CONFIG, config)
    ident = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    work = open_study(storage, name + ":work", 0)
    work.add_trial(optuna.create_trial(state=TrialState.COMPLETE, value=0.0,
                                       user_attrs={"kind": "worker", "worker": ident}))
    workers = [t for t in work.get_trials(deepcopy=False) if t.user_attrs.get("kind") == "worker"]
    mine = next(t.number for t in workers if t.user_attrs["worker"] == ident)
    return Team(storage, name, ident, sum(t.number < mine for t in workers))


class SharedDriver:
    """Units claimed through the team's ``:work`` study; results exchanged as JSON through it."""

    shared = True

    def __init__(self, team: Team) -> None:
        self.team = team

    def run(self, label: str, units: Sequence[Unit], compute: Compute, cache: UnitCache | None,
            together: bool = False) -> Results:
        def one(spec: Unit, trial: optuna.Trial) -> dict[str, Any]:
            return to_json(compute([spec])[unit_key(spec)])

        with progress.task(f"{label} (shared, worker {self.team.index})", len(units)) as advance:
            raw = share_work(self.team.study(":work"), units, one, self.team.ident, on_done=lambda: advance(1))
        return {k: from_json(v) for k, v in raw.items()}

    def proxy_study(self) -> optuna.Study:
        return self.team.study(":proxy")

    def claim(self, study: optuna.Study, specs: Sequence[Unit], compute: Callable[[Unit, optuna.Trial], Any],
              on_done: Callable[[], None] | None = None) -> dict[str, Any]:
        return share_work(study, specs, compute, self.team.ident, on_done)


def share_work(study: optuna.Study, specs: Sequence[Unit], compute: Callable[[Unit, optuna.Trial], Any], ident: str,
               on_done: Callable[[], None] | None = None) -> dict[str, Any]:
    """Results of every spec ({"kind", "shard", ...}), computing those this worker claims
    (``compute(spec, trial)``: ``trial`` is the claimed one, for progress others may read).

    Specs missing from the study are enqueued (a late joiner finds them all there); a worker claims
    one WAITING spec at a time and, once none is left, waits for the ones other workers run. A spec
    whose worker died is failed by the heartbeat check and re-queued. Returns {key: result}."""
    want = {unit_key(s): s for s in specs}
    present = {unit_key(t.user_attrs) for t in study.get_trials(deepcopy=False)}
    for k, spec in want.items():
        if k not in present:
            study.enqueue_trial({}, user_attrs=dict(spec))
    reported: set[str] = set()

    def run(trial: optuna.Trial) -> float:
        k = unit_key(trial.user_attrs)
        # Workers that arrive together enqueue the same spec twice: the copy yields to one that is
        # done or that an earlier-numbered trial is running (a dead one's retry comes back queued).
        taken = any(unit_key(t.user_attrs) == k and t.number != trial.number and (
            (t.state == TrialState.COMPLETE and "result" in t.user_attrs)
            or (t.state == TrialState.RUNNING and t.number < trial.number)) for t in study.get_trials(deepcopy=False))
        if k not in want or taken:  # a duplicate, or a fresh trial made when the queue just ran dry
            raise optuna.TrialPruned()
        t0 = time.perf_counter()
        result = compute(want[k], trial)
        trial.set_user_attr("worker", ident)
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 3))
        trial.set_user_attr("result", result)
        return 0.0

    while True:
        fail_stale(study)
        trials = study.get_trials(deepcopy=False)
        results = {unit_key(t.user_attrs): t.user_attrs["result"] for t in trials
                   if t.state == TrialState.COMPLETE and "result" in t.user_attrs and unit_key(t.user_attrs) in want}
        if on_done is not None:
            for _ in set(results) - reported:
                on_done()
            reported |= set(results)
        if len(results) == len(want):
            return results
        if any(t.state == TrialState.WAITING and unit_key(t.user_attrs) in want for t in trials):
            study.optimize(run, n_trials=1)
            continue
        live = {unit_key(t.user_attrs) for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)}
        for k in set(want) - set(results) - live:  # its copies all yielded or failed for good: queue it again
            study.enqueue_trial({}, user_attrs=dict(want[k]))
        time.sleep(POLL_S)


# ---------------------------------------------------------------- pruning the fine-tune proxy
class AheadMedianPruner(optuna.pruners.BasePruner):
    """Median pruning of a fine-tune proxy candidate against the candidates ranked ahead of it
    (better zero-step score) that are still alive at the same step: prune at step >= ``warmup``
    when this candidate's best loss so far is above the median of theirs up to that step.

    A candidate ahead that another worker is training is waited for until it has passed that
    step's own decision, so the decision is the one a single worker, training the candidates in
    rank order, makes: two workers do the same work as one, split. Each evaluation and each "still
    alive" step is published on ``shared`` (the claimed trial of the proxy study) for the workers
    behind. Keeps the curve it saw, to store with the result."""

    def __init__(self, study: optuna.Study, rank: int, warmup: int, shared: optuna.Trial, poll_s: float = POLL_S) -> None:
        self.study, self.rank, self.warmup, self.shared, self.poll_s = study, rank, warmup, shared, poll_s
        self.curve: dict[int, float] = {}
        self.waited_s = 0.0

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        self.curve = dict(trial.intermediate_values)
        step = trial.last_step
        if step is None:
            return False
        self.shared.report(self.curve[step], step)
        prune = False
        if step >= self.warmup:
            best = min(v for s, v in self.curve.items() if s <= step)
            others = sorted(self._ahead(step))
            if others:
                mid = len(others) // 2
                median = others[mid] if len(others) % 2 else (others[mid - 1] + others[mid]) / 2
                prune = best > median
        if not prune:
            self.shared.set_user_attr(ALIVE, step)
        return prune

    def _ahead(self, step: int) -> list[float]:
        """Best loss up to ``step`` of each candidate ranked ahead that is alive at ``step``; waits
        while one is being trained and has not yet decided that step (a dead worker's is failed by
        the heartbeat check and then skipped)."""
        t0 = time.perf_counter()
        while True:
            values, pending = [], False
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE)):
                if t.user_attrs.get("kind") != "proxy" or t.user_attrs.get("zero_step_rank", math.inf) >= self.rank:
                    continue
                if t.state == TrialState.COMPLETE:
                    res = t.user_attrs.get("result")
                    if res is None or not res["steps"] or (res["pruned"] and res["steps"] <= step):
                        continue
                    curve = {int(k): float(v) for k, v in res["curve"].items()}
                elif t.user_attrs.get(ALIVE, -1) >= step:
                    curve = dict(t.intermediate_values)
                else:
                    pending = True
                    continue
                best = min((v for s, v in curve.items() if s <= step), default=math.inf)
                if math.isfinite(best):
                    values.append(best)
            if not pending:
                self.waited_s += time.perf_counter() - t0
                return values
            fail_stale(self.study)
            time.sleep(self.poll_s)

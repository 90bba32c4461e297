"""Search: the exact allocation under a shaped objective, and Optuna over what it cannot see.

guided (default): each trial samples a :class:`Shaping` (per-module-type and per-depth weights,
Fisher vs plain-residual mix, adapter-capacity value, rank floor); the exact knapsack turns it
into a per-layer plan within budget; the zero-step proxy (KL to the full model on held-out text)
scores that plan. (No per-layer "direct" mode: Optuna choosing every layer's option under the
neutral objective can at best tie the exact solver on that same objective, and unseeded it found
no feasible plan in 200 trials on SmolLM2.)
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import optuna
import torch
from optuna.trial import TrialState

from search_spaces.widths import sort_key

from planner.errors import PlannerError
from planner.search.allocate import InfeasibleBudget, solve_mckp
from planner.search.objective import OptionTable, Shaping
from planner.scoring.proxy import ProxyScore, ZeroStepProxy

log = logging.getLogger(__name__)
SHAPE_RANGE = (0.25, 4.0)
HEARTBEAT_S = (10, 60)  # (interval, grace period): a killed worker's trial is failed and retried a minute later
FINGERPRINT = "planner.fingerprint"
DONE = (TrialState.COMPLETE, TrialState.PRUNED)


# ---------------------------------------------------------------- storage, fingerprint, trial budget
def heartbeat_setting() -> tuple[int, int]:
    """(interval, grace) seconds; ``LOFTQ_PLANNER_HEARTBEAT=interval,grace`` overrides (tests use 1,3)."""
    env = os.environ.get("LOFTQ_PLANNER_HEARTBEAT")
    if not env:
        return HEARTBEAT_S
    try:
        interval, grace = (int(x) for x in env.split(","))
    except ValueError:
        raise PlannerError(f"LOFTQ_PLANNER_HEARTBEAT={env!r}: expected two integers 'interval,grace'") from None
    if not 0 < interval < grace:
        raise PlannerError(f"LOFTQ_PLANNER_HEARTBEAT={env!r}: need 0 < interval < grace")
    return interval, grace


def redact(url: str) -> str:
    """Storage URL without a password."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def _retrying(what: str, url: str, make: Callable[[], Any], tries: int = 8) -> Any:
    """``make()``, retried when processes race to create the same schema or study: a new database
    is created by whichever process comes first, the others see 'table exists' (OperationalError)
    or a duplicate version row (IntegrityError) once and succeed on the next try."""
    import sqlalchemy.exc

    for attempt in range(tries):
        try:
            return make()
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError,
                sqlalchemy.exc.ProgrammingError) as err:
            racing = isinstance(err, sqlalchemy.exc.IntegrityError) or any(
                w in str(err).lower() for w in ("already exists", "database is locked"))
            if not racing or attempt == tries - 1:
                first = str(err.orig if getattr(err, "orig", None) is not None else err).splitlines()[0]
                raise PlannerError(f"{describe_storage(url)}: cannot {what}: {first}{_hint(url, first)}") from None
            time.sleep(0.05 * 2 ** attempt * (0.5 + random.random()))


DEFAULT_DB = "studies.sqlite3"  # the study database in the cache folder when no --storage is given


def describe_storage(url: str) -> str:
    """How a message names a storage: ``--storage URL`` (password hidden), or for the default
    SQLite file in the cache folder, that file (the user gave no --storage)."""
    text = str(getattr(url, "url", url))
    if text.startswith("sqlite:///") and text.endswith("/" + DEFAULT_DB):
        return f"the default study database {text[len('sqlite:///'):]}"
    return f"--storage {redact(text)}"


def _hint(url: str, message: str) -> str:
    """What to do about a SQLite file that is not a database (a corrupt or foreign file)."""
    if "not a database" in message and str(getattr(url, "url", url)).startswith("sqlite:///"):
        return " (a corrupt or foreign file: delete it to start the studies afresh, or pass another --storage)"
    return ""


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats: trials of a killed process are failed after the grace period
    and retried (as a copy with the same parameters) by whichever process is still running."""
    import warnings

    import sqlalchemy.exc

    interval, grace = heartbeat_setting()

    def make() -> optuna.storages.RDBStorage:
        with warnings.catch_warnings():  # heartbeats have been 'experimental' since Optuna 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=interval, grace_period=grace,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
    try:
        return _retrying("open the study database", url, make)
    except (sqlalchemy.exc.ArgumentError, ValueError) as err:
        raise PlannerError(f"{describe_storage(url)}: not a database URL ({str(err).splitlines()[0]})") from None
    except ModuleNotFoundError as err:
        raise PlannerError(f"{describe_storage(url)}: its driver {err.name!r} is not installed "
                           "(pip install 'loftq-planner[distributed]' for PostgreSQL)") from None
    except sqlalchemy.exc.SQLAlchemyError as err:
        first = str(err).splitlines()[0]
        raise PlannerError(f"{describe_storage(url)}: {first}{_hint(url, first)}") from None


def open_study(storage: str | optuna.storages.BaseStorage | None, name: str, sampler_seed: int,
               fingerprint: dict[str, Any] | None = None, multivariate: bool = True) -> optuna.Study:
    """Create or load study ``name``; refuses (one line) a study recorded with another fingerprint."""
    sampler = optuna.samplers.TPESampler(seed=sampler_seed, multivariate=multivariate)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if isinstance(storage, str):
        storage = open_storage(storage)
    url = getattr(storage, "url", "memory") or "memory"
    study = _retrying(f"create study {name!r}", url, lambda: optuna.create_study(
        storage=storage, study_name=name, sampler=sampler, direction="minimize", load_if_exists=True))
    if fingerprint is not None:
        check_fingerprint(study, fingerprint)
    return study


def normalized(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """What the storage gives back (tuples become lists), so fingerprints compare equal."""
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))


def check_fingerprint(study: optuna.Study, fingerprint: dict[str, Any]) -> None:
    """Record the model/settings/budget fingerprint on a new study; refuse a study made with others,
    naming what differs, before any trial of it is read."""
    want = normalized(fingerprint)
    stored = study.user_attrs.get(FINGERPRINT)
    if stored is None:
        if any(t.state in DONE for t in study.get_trials(deepcopy=False)):
            raise PlannerError(f"study {study.study_name!r} has trials but no planner fingerprint (made by another "
                               "program or an older planner): use another --study-name")
        study.set_user_attr(FINGERPRINT, want)
        stored = study.user_attrs.get(FINGERPRINT)  # two processes created it at once: the last write stands
    if stored != want:
        keys = sorted(k for k in set(stored) | set(want) if stored.get(k) != want.get(k))
        raise PlannerError(f"study {study.study_name!r} was created with another {', '.join(keys)} than this run: "
                           "use another --study-name, or the study's own settings")


def run_trials(study: optuna.Study, objective: Callable[[optuna.Trial], float], total: int,
               timeout: float | None, poll_s: float = 0.5) -> None:
    """Run trials until the study holds ``total`` of them done or running, counted over every process
    that shares the storage (a resumed study runs only the remainder), then wait until none is
    running, so that every process then reads the same finished study. A trial left RUNNING by a
    killed process is failed by the heartbeat check once its grace period is over, and its retry
    (WAITING, same parameters) is run by whoever gets here."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        fail_stale(study)
        states = Counter(t.state for t in study.get_trials(deepcopy=False))
        claimed = sum(states[s] for s in (*DONE, TrialState.RUNNING))
        if claimed < total and (deadline is None or time.monotonic() < deadline):
            study.optimize(objective, n_trials=1)
            continue
        if not states[TrialState.RUNNING]:
            return
        time.sleep(poll_s)


def fail_stale(study: optuna.Study) -> None:
    """Fail (and queue a retry of) the study's trials whose process stopped sending heartbeats, and
    those whose process died before its first heartbeat (see :func:`_fail_silent`)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
        _fail_silent(study)


# storage -> {trial_id: monotonic time this process first saw it RUNNING with no heartbeat}
_SILENT_SINCE: "weakref.WeakKeyDictionary[Any, dict[int, float]]" = weakref.WeakKeyDictionary()


def _fail_silent(study: optuna.Study) -> None:
    """Optuna only fails a RUNNING trial whose last heartbeat is old: a process killed between
    creating its trial and its heartbeat thread's first beat leaves one with no heartbeat at all,
    RUNNING for ever, and every other worker waiting on it. Such a trial that this process has seen
    silent for longer than the grace period is failed and retried like a stale one. The time is this
    process's own clock, so workers on machines with skewed clocks agree."""
    storage = study._storage
    rdb = getattr(storage, "_backend", storage)  # Optuna wraps an RDBStorage in a cache
    if not isinstance(rdb, optuna.storages.RDBStorage) or rdb.heartbeat_interval is None:
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy import orm

    with _create_scoped_session(rdb.scoped_session) as session:
        running = (session.query(models.TrialModel).options(orm.selectinload(models.TrialModel.heartbeats))
                   .filter(models.TrialModel.state == TrialState.RUNNING)
                   .filter(models.TrialModel.study_id == study._study_id).all())
        silent = {t.trial_id for t in running if not t.heartbeats}
    grace = rdb.grace_period if rdb.grace_period is not None else 2 * rdb.heartbeat_interval
    now = time.monotonic()
    seen = _SILENT_SINCE.setdefault(rdb, {})
    for trial_id in list(seen):
        if trial_id not in silent:  # it beat, finished or was failed by someone else
            del seen[trial_id]
    retry = storage.get_heartbeat_stale_trial_callback()
    for trial_id in sorted(silent):
        if now - seen.setdefault(trial_id, now) <= grace:
            continue
        del seen[trial_id]
        try:
            failed = storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it first
            continue
        log.warning("trial %d never sent a heartbeat in %d s (its process died as it started): failed, retried",
                    storage.get_trial_number_from_id(trial_id), grace)
        if failed and retry is not None:
            retry(study, copy.deepcopy(storage.get_trial(trial_id)))


def dashboard_attrs(options: Sequence[tuple[int, int]], choice: Sequence[int]) -> dict[str, Any]:
    """Per-trial columns for optuna-dashboard: bits and rank histograms, and a hash of the plan."""
    bits = Counter(options[k][0] for k in choice)  # widths: 4, 4dq, ...
    ranks = Counter(str(options[k][1]) for k in choice)
    digest = hashlib.sha256(json.dumps(list(choice)).encode()).hexdigest()[:12]
    return {"bits_hist": {str(w): n for w, n in sorted(bits.items(), key=lambda kv: sort_key(kv[0]))},
            "rank_hist": dict(sorted(ranks.items(), key=lambda kv: int(kv[0]))), "plan_hash": digest}


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


def sample_shaping(trial: optuna.Trial, module_types: Sequence[str], ranks: Sequence[int],
                   rotation: bool = False) -> Shaping:
    """``rotation``: the menu offers widths plain and rotated, and the trial also draws whether
    rotated widths may be chosen at all."""
    weights = {t: trial.suggest_float(f"type.{t}", *SHAPE_RANGE, log=True) for t in module_types}
    return Shaping(
        type_weights=weights,
        depth_slope=trial.suggest_float("depth.slope", -3.0, 3.0),
        mix=trial.suggest_float("mix.residual", 0.0, 1.0),
        capacity=trial.suggest_float("capacity", 0.0, 2.0),
        rank_floor=trial.suggest_categorical("rank_floor", sorted(set(ranks))),
        rotated=trial.suggest_categorical("rotated", [True, False]) if rotation else True,
    )


def neutral_params(module_types: Sequence[str], rank_floor: int = 0, capacity: float = 0.0,
                   rotated: bool | None = None) -> dict:
    """The neutral shaping's parameters (``rotated``: given where the menu has the rotation choice)."""
    return {**{f"type.{t}": 1.0 for t in module_types}, "depth.slope": 0.0, "mix.residual": 0.0,
            "capacity": capacity, "rank_floor": rank_floor, **({} if rotated is None else {"rotated": rotated})}


def guided_search(problem: SearchProblem, proxy: ZeroStepProxy | None, *, trials: int, timeout: float | None,
                  seed: int, storage: str | optuna.storages.BaseStorage | None, study_name: str,
                  on_trial: Callable[[Candidate | None], None] | None = None,
                  fingerprint: dict[str, Any] | None = None,
                  sampler_seed: int | None = None, worker: str | None = None) -> tuple[optuna.Study, list[Candidate]]:
    """Optuna over shapings until the study holds ``trials`` trials (all processes sharing the
    storage together); returns the study and every completed candidate recorded in it, rebuilt from
    the storage in trial order, so every process that shares the study sees the same list."""
    types = sorted({t.module_type for t in problem.table.targets})
    ranks = sorted({r for _, r in problem.table.options})
    study = open_study(storage, study_name, seed if sampler_seed is None else sampler_seed, fingerprint)
    rotation = problem.table.rotation_choice
    rot = True if rotation else None
    if not study.trials:  # seeds: the plain Fisher knapsack, and with an adapter on every layer
        study.enqueue_trial(neutral_params(types, rotated=rot), skip_if_exists=True)
        if rotation:  # and the knapsack without rotated widths: the proxy compares the two plans
            study.enqueue_trial(neutral_params(types, rotated=False), skip_if_exists=True)
        floors = sorted({next((r for r in ranks if r > 0), ranks[-1]), next((r for r in ranks if r >= 16), ranks[-1])})
        for floor in floors:
            if floor > 0:
                study.enqueue_trial(neutral_params(types, rank_floor=floor, rotated=rot), skip_if_exists=True)

    def objective(trial: optuna.Trial) -> float:
        if worker is not None:
            trial.set_user_attr("worker", worker)
        shaping = sample_shaping(trial, types, ranks, rotation)
        try:
            cand = problem.solve(problem.table.shaped(shaping))
        except InfeasibleBudget:  # e.g. a rank floor that cannot fit: not a plan, prune it
            trial.set_user_attr("infeasible", True)
            if on_trial:
                on_trial(None)
            raise optuna.TrialPruned() from None
        cand.shaping, cand.trial = shaping, trial.number
        trial.set_constraint("bytes_over_budget", float(cand.bytes - problem.budget))
        for key, value in {"bytes": cand.bytes, "objective": cand.objective, "choice": cand.choice,
                           **dashboard_attrs(problem.table.options, cand.choice)}.items():
            trial.set_user_attr(key, value)
        value = cand.objective
        if proxy is not None:
            cand.proxy = proxy.score(assignment(problem, cand.choice))
            trial.set_user_attr("loss", cand.proxy.loss)
            trial.set_user_attr("kl", cand.proxy.kl)
            value = cand.proxy.kl
        if on_trial:
            on_trial(cand)
        return value

    run_trials(study, objective, trials, timeout)
    return study, stored_candidates(problem, study, proxy.ref_loss if proxy is not None else None)


def shaping_of(params: dict[str, Any]) -> Shaping | None:
    """The :class:`Shaping` a guided trial sampled, from its stored parameters."""
    try:
        return Shaping(type_weights={k[5:]: float(v) for k, v in params.items() if k.startswith("type.")},
                       depth_slope=float(params["depth.slope"]), mix=float(params["mix.residual"]),
                       capacity=float(params["capacity"]), rank_floor=int(params["rank_floor"]),
                       rotated=bool(params.get("rotated", True)))
    except (KeyError, TypeError, ValueError):
        return None


def stored_candidates(problem: SearchProblem, study: optuna.Study, ref_loss: float | None) -> list[Candidate]:
    """Completed trials of the study (this process's, other processes', earlier runs'), rebuilt from
    their stored choice and scores, in trial order; trials whose choice is malformed or over the
    budget are skipped."""
    out = []
    n, n_opts = len(problem.table.targets), len(problem.table.options)
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        choice = t.user_attrs.get("choice")
        if t.value is None or not math.isfinite(t.value) or not isinstance(choice, list) \
                or len(choice) != n or not all(isinstance(k, int) and 0 <= k < n_opts for k in choice):
            continue
        used = problem.bytes_of(choice)
        if used > problem.budget:
            continue
        cand = Candidate(choice, used, problem.objective_of(choice), trial=t.number, shaping=shaping_of(t.params))
        if ref_loss is not None:
            cand.proxy = ProxyScore(float(t.value), float(t.user_attrs.get("loss", t.value)), ref_loss)
        out.append(cand)
    return out


def assignment(problem: SearchProblem, choice: Sequence[int]) -> dict[str, tuple[int, int]]:
    return {t.name: problem.table.options[k] for t, k in zip(problem.table.targets, choice)}

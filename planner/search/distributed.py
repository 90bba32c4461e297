"""Many workers, one study: the same plan command on N processes or machines with one ``--storage``
URL and study name cooperates through Optuna's RDB storage alone (no shared filesystem).

Three studies share the name: ``NAME`` (the guided search's trials), ``NAME:work`` (the
precomputation, one enqueued trial per shard) and ``NAME:proxy`` (one enqueued trial per fine-tune
proxy candidate). A WAITING trial is claimed atomically by whichever worker pops it first
(``study.optimize`` pops the oldest); its result, a few KB of JSON, goes in its user attrs, and
every worker assembles the same tables from them. Shards: residual tables by contiguous layer
range; the Fisher sensitivity by calibration sequence, since
``fisher_err[l, b] = 1/2 sum F (W - Q_b)^2`` with F the mean of per-sequence squared gradients is a
sum over sequences. Heartbeats fail the trial of a killed worker after the grace period and queue a
retry with the same attrs, so ``kill -9`` loses at most the shard or trial in hand. Weight-sized
state (the quantized weight bank) stays local to each worker.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import optuna
import torch
from optuna.trial import TrialState

from search_spaces.choices import has_adapter

from planner.search.config import PlanConfig
from planner.errors import PlannerError
from planner.files.paths import one_line
from planner.search.objective import OptionTable
from planner.search.pipeline import (METHOD, PlanOutcome, Prepared, _diverged, _prefer_adapters, build_plan,
                                     check_budget, problem_budget, table_settings)
from planner.search.study import (FINGERPRINT, Candidate, SearchProblem, fail_stale, open_storage,
                                  open_study, redact, stored_candidates)
from planner.scoring.tables import ResidualTables, TableSettings, compute_tables

log = logging.getLogger(__name__)
TABLE_SHARDS = 16  # layer ranges: enough to keep 2-8 workers busy, few enough to keep the batching
POLL_S = 0.5
CONFIG = "planner.search.config"  # the run's full PlanConfig + RunSettings + budget, for `collect`
REF_LOSS = "planner.ref_loss"
ALIVE = "alive_at"  # a proxy candidate's last step at which it was evaluated and not pruned


@dataclass
class Team:
    """This worker's view of the shared studies."""

    storage: optuna.storages.RDBStorage
    name: str
    ident: str  # host:pid:random, recorded on every shard and candidate this worker computes
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


def share_work(study: optuna.Study, specs: Sequence[dict[str, Any]],
               compute: Callable[[dict[str, Any], optuna.Trial], Any], ident: str,
               on_done: Callable[[], None] | None = None) -> dict[str, Any]:
    """Results of every spec ({"kind", "shard", ...}), computing those this worker claims
    (``compute(spec, trial)``: ``trial`` is the claimed one, for progress others may read).

    Specs missing from the study are enqueued (a late joiner finds them all there); a worker claims
    one WAITING spec at a time and, once none is left, waits for the ones other workers run. A spec
    whose worker died is failed by the heartbeat check and re-queued. Returns {key: result}."""
    def key(attrs: dict[str, Any]) -> str:
        return f"{attrs.get('kind')}/{attrs.get('shard')}"

    want = {key(s): s for s in specs}
    present = {key(t.user_attrs) for t in study.get_trials(deepcopy=False)}
    for k, spec in want.items():
        if k not in present:
            study.enqueue_trial({}, user_attrs=dict(spec))
    reported: set[str] = set()

    def run(trial: optuna.Trial) -> float:
        k = key(trial.user_attrs)
        # Workers that arrive together enqueue the same spec twice: the copy yields to one that is
        # done or that an earlier-numbered trial is running (a dead one's retry comes back queued).
        taken = any(key(t.user_attrs) == k and t.number != trial.number and (
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
        results = {key(t.user_attrs): t.user_attrs["result"] for t in trials
                   if t.state == TrialState.COMPLETE and "result" in t.user_attrs and key(t.user_attrs) in want}
        if on_done is not None:
            for k in set(results) - reported:
                on_done()
            reported |= set(results)
        if len(results) == len(want):
            return results
        if any(t.state == TrialState.WAITING and key(t.user_attrs) in want for t in trials):
            study.optimize(run, n_trials=1)
            continue
        live = {key(t.user_attrs) for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)}
        for k in set(want) - set(results) - live:  # its copies all yielded or failed for good: queue it again
            study.enqueue_trial({}, user_attrs=dict(want[k]))
        time.sleep(POLL_S)


# ---------------------------------------------------------------- precomputation shards
def table_specs(n_layers: int) -> list[dict[str, Any]]:
    n = min(n_layers, TABLE_SHARDS)
    bounds = [round(i * n_layers / n) for i in range(n + 1)]
    return [{"kind": "tables", "shard": i, "layers": [bounds[i], bounds[i + 1]]} for i in range(n)]


def fisher_specs(n_seqs: int) -> list[dict[str, Any]]:
    return [{"kind": "fisher", "shard": s} for s in range(n_seqs)]


def table_shard(prep: Prepared, settings: TableSettings, device: torch.device, spec: dict[str, Any]) -> dict[str, Any]:
    """Residual tables of one layer range: {"table": [n, bits, ranks], "sq_norm": [n]} as lists."""
    lo, hi = spec["layers"]
    targets = prep.targets[lo:hi]
    res = compute_tables(prep.source.iter_weights(targets), len(targets), settings, device)
    order = [res.names.index(t.name) for t in targets]
    return {"table": res.table[order].tolist(), "sq_norm": res.sq_norm[order].tolist()}


def fisher_shard(scorer: Any, bank: Any, blocks: torch.Tensor, bits: Sequence[int], block_size: int,
                 spec: dict[str, Any]) -> list[list[float]]:
    """One sequence's share of fisher_err [n_layers, len(bits)]: 1/2 sum g^2 (W - Q_b)^2 / n_seqs,
    with Q_b from this worker's weight bank (the zero-step proxy's, built anyway); an encoder's
    probe seed is the sequence's index, as on one worker."""
    s = spec["shard"]
    errs = scorer.fisher_errors(blocks[s:s + 1], bits, METHOD, block_size, bank=bank, seed_offset=s)
    return (errs / len(blocks)).tolist()


def assemble(prep: Prepared, settings: TableSettings, results: dict[str, Any]) -> tuple[ResidualTables, torch.Tensor]:
    """Tables and fisher_err [n_layers, len(bits)] from the shards' results (sums in shard order,
    so every worker gets the same numbers bit for bit)."""
    specs = table_specs(len(prep.targets))
    table = torch.cat([torch.tensor(results[f"tables/{s['shard']}"]["table"], dtype=torch.float32) for s in specs])
    sq = torch.cat([torch.tensor(results[f"tables/{s['shard']}"]["sq_norm"], dtype=torch.float64) for s in specs])
    fisher = [torch.tensor(v, dtype=torch.float64) for k, v in sorted(results.items(), key=lambda kv: _order(kv[0]))
              if k.startswith("fisher/")]
    return ResidualTables([t.name for t in prep.targets], settings, table, sq), torch.stack(fisher).sum(0)


def _order(key: str) -> tuple[str, int]:
    kind, shard = key.split("/")
    return kind, int(shard)


def precompute(team: Team, prep: Prepared, scorer: Any, bank: Any, blocks: torch.Tensor,
               device: torch.device) -> tuple[ResidualTables, torch.Tensor]:
    """Tables and Fisher errors, each shard computed by one worker of the team."""
    from planner import progress

    settings = table_settings(prep.cfg)
    names = [t.name for t in prep.targets]
    tspecs, fspecs = table_specs(len(names)), fisher_specs(len(blocks))

    def compute(spec: dict[str, Any], trial: optuna.Trial) -> Any:
        if spec["kind"] == "tables":
            return table_shard(prep, settings, device, spec)
        return fisher_shard(scorer, bank, blocks, settings.bits, settings.block_size, spec)

    with progress.task(f"shared precomputation (worker {team.index})", len(tspecs) + len(fspecs)) as advance:
        results = share_work(team.study(":work"), tspecs + fspecs, compute, team.ident, on_done=lambda: advance(1))
    return assemble(prep, settings, results)


# ---------------------------------------------------------------- fine-tune proxy candidates
class AheadMedianPruner(optuna.pruners.BasePruner):
    """Median pruning of a fine-tune proxy candidate against the candidates ranked ahead of it
    (better zero-step score) that are still alive at the same step: prune at step >= ``warmup``
    when this candidate's best loss so far is above the median of theirs up to that step.

    A candidate ahead that another worker is training is waited for until it has passed that
    step's own decision, so the decision is the one a single worker, training the candidates in
    rank order, makes: two workers do the same work as one, split (the earlier rule, against
    finished candidates only, let two workers' first candidates train to the end side by side).
    Each evaluation and each "still alive" step is published on ``shared`` (the claimed trial of
    the proxy study) for the workers behind. Keeps the curve it saw, to store with the result."""

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


def pick_candidates(problem: SearchProblem, candidates: Sequence[Candidate], top_k: int) -> list[Candidate]:
    """The fine-tune proxy's candidates, by the rule of ``rescore_with_finetune``: ``top_k`` diverse
    ones with adapters (best zero-step first), then the best one without any adapter."""
    from planner.scoring.ftproxy import _zero_step_score, select_diverse

    opts = problem.table.options
    train = [c for c in candidates if has_adapter(c, opts)]
    picked = [train[j] for j in select_diverse([c.choice for c in train], [_zero_step_score(c) for c in train], top_k)]
    frozen = [c for c in candidates if not has_adapter(c, opts)]
    if frozen:
        picked.append(min(frozen, key=lambda c: (_zero_step_score(c), c.trial)))
    return picked


def shared_finetune_proxy(team: Team, prep: Prepared, problem: SearchProblem, candidates: list[Candidate],
                          scorer: Any, corpus: Any, weight_bank: Any) -> list[dict[str, Any]]:
    """Records (as ``rescore_with_finetune`` gives them, plus "worker") of the picked candidates,
    each trained by whichever worker claimed it; ``chosen`` is left to :func:`choose`."""
    from planner import progress
    from planner.scoring.ftproxy import rescore_with_finetune
    from planner.train.data import token_blocks

    cfg = prep.cfg
    n = cfg.calib_seq_len
    tok = prep.source.tokenizer()
    train = token_blocks(tok, corpus.train, n, max_tokens=n * max(cfg.calib_seqs, cfg.proxy_steps))
    val = token_blocks(tok, corpus.val, n, max_tokens=n * cfg.proxy_seqs)
    k = min(cfg.proxy_top, len({tuple(c.choice) for c in candidates if has_adapter(c, prep.options)}))
    picked = pick_candidates(problem, candidates, k)
    by_trial = {c.trial: c for c in picked}
    builder = scorer.candidate_builder(weight_bank, METHOD, cfg.block_size, max(cfg.ranks), prep.run)
    model = builder.base
    study = team.study(":proxy")

    def compute(spec: dict[str, Any], trial: optuna.Trial) -> dict[str, Any]:
        pruner = AheadMedianPruner(study, spec["zero_step_rank"], cfg.proxy_steps // 2, trial)
        _, recs = rescore_with_finetune(problem, [by_trial[spec["shard"]]], model, train, val, top_k=1,
                                        steps=cfg.proxy_steps, seed=cfg.seed, lr=cfg.proxy_lr, method=METHOD,
                                        block_size=cfg.block_size, optimizer=prep.run.optimizer,
                                        builder=builder, pruner=pruner)
        rec = recs[0]
        curve = {**pruner.curve, rec["steps"]: rec["loss"]} if rec["steps"] else {}
        return {**rec, "worker": team.ident, "waited_s": round(pruner.waited_s, 3),
                "curve": {str(s): v for s, v in curve.items()}}

    specs = [{"kind": "proxy", "shard": c.trial, "zero_step_rank": i} for i, c in enumerate(picked)]
    with progress.task(f"fine-tune proxy: {len(specs)} candidates x {cfg.proxy_steps} steps (shared)",
                       len(specs)) as advance:
        results = share_work(study, specs, compute, team.ident, on_done=lambda: advance(1))
    return [stored_record(results[f"proxy/{c.trial}"]) for c in picked]


def stored_record(result: dict[str, Any]) -> dict[str, Any]:
    rec = {k: v for k, v in result.items() if k != "curve"}
    rec["chosen"] = False
    return rec


def choose(records: list[dict[str, Any]]) -> int:
    """Index of the chosen record: the lowest loss among feasible, fully trained (or untrained
    frozen) ones, ties to the better zero-step rank; the first when none qualifies."""
    done = [j for j, r in enumerate(records) if r["feasible"] and not r["pruned"] and math.isfinite(r["loss"])]
    return min(done, key=lambda j: (records[j]["loss"], j)) if done else 0


# ---------------------------------------------------------------- one worker's run, and collect
def config_record(cfg: PlanConfig, run: Any, budget: int) -> dict[str, Any]:
    """Everything `collect` needs to rebuild the run (stored on the study, never compared)."""
    from dataclasses import asdict

    plan = {k: v for k, v in asdict(cfg).items() if k not in ("out", "cache_dir", "storage", "study_name", "pareto")}
    return {"plan": plan, "run": run.to_dict(), "budget": int(budget)}


def plan_shared(prep: Prepared, budget: int, corpus: Any, url: str, name: str, fp: dict[str, Any],
                timings: dict[str, float], t0: float) -> PlanOutcome:
    """make_plan for one worker of a team sharing ``url``: precompute its shards, run trials until
    the study holds --trials, train the proxy candidates it claims, then write the plan every
    worker writes (:func:`outcome_from_storage`)."""
    from planner.devices import resolve_device
    from planner.search.pipeline import _calibration, _guided, open_scorer, weight_bank

    cfg = prep.cfg
    allocatable = check_budget(prep, budget)
    team = join(url, name, fp, config_record(cfg, prep.run, budget))
    scorer = open_scorer(prep)
    train, val, _ = _calibration(prep, prep.source.tokenizer(), corpus)
    bank = weight_bank(prep, scorer)
    timings["weight_bank_s"] = time.perf_counter() - t0
    tables, fisher = precompute(team, prep, scorer, bank, train, resolve_device(cfg.score_device))
    timings["precompute_s"] = time.perf_counter() - t0 - timings["weight_bank_s"]
    problem = SearchProblem(OptionTable.build(prep.targets, tables, fisher, prep.options), prep.costs,
                            prep.fixed_bytes, prep.groups, prep.group_names, allocatable)
    main = team.study()
    if REF_LOSS not in main.user_attrs:
        main.set_user_attr(REF_LOSS, scorer.zero_step(bank, val).ref_loss)
    t1 = time.perf_counter()
    _, candidates, _ = _guided(prep, problem, scorer, val, team.storage, name, fp, bank,
                                  sampler_seed=cfg.seed + 7919 * team.index, worker=team.ident)
    timings["search_s"] = time.perf_counter() - t1
    if cfg.proxy_top > 0 and any(has_adapter(c, prep.options) for c in candidates):
        t2 = time.perf_counter()
        shared_finetune_proxy(team, prep, problem, candidates, scorer, corpus, bank)
        timings["finetune_proxy_s"] = time.perf_counter() - t2
    return outcome_from_storage(prep, team.storage, name, budget, timings, (tables, fisher), worker=team.ident)


def outcome_from_storage(prep: Prepared, storage: Any, name: str, budget: int, timings: dict[str, float],
                         pre: tuple[ResidualTables, torch.Tensor] | None = None, worker: str | None = None) -> PlanOutcome:
    """The plan from the finished studies alone, by the rule one worker uses: best zero-step
    candidate (adapters preferred within the margin), re-chosen by the fine-tune proxy's records."""
    from planner.search.pipeline import zero_step_choice

    cfg = prep.cfg
    main, proxy = open_study(storage, name, 0), open_study(storage, name + ":proxy", 0)
    if pre is None:
        settings = table_settings(cfg)
        specs = table_specs(len(prep.targets)) + fisher_specs(cfg.calib_seqs)
        done = {f"{t.user_attrs.get('kind')}/{t.user_attrs.get('shard')}": t.user_attrs["result"]
                for t in open_study(storage, name + ":work", 0).get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if "result" in t.user_attrs}
        if any(f"{s['kind']}/{s['shard']}" not in done for s in specs):
            raise PlannerError(f"study {name!r}: the precomputation is not finished; let a worker finish it")
        pre = assemble(prep, settings, done)
    tables, fisher = pre
    table = OptionTable.build(prep.targets, tables, fisher, prep.options)
    problem = SearchProblem(table, prep.costs, prep.fixed_bytes, prep.groups, prep.group_names,
                            problem_budget(prep, budget))
    exact = problem.solve(problem.neutral)
    candidates = stored_candidates(problem, main, main.user_attrs.get(REF_LOSS, math.nan))
    chosen, scored = zero_step_choice(prep, candidates)
    records = None
    if cfg.proxy_top > 0 and any(has_adapter(c, prep.options) for c in scored):
        k = min(cfg.proxy_top, len({tuple(c.choice) for c in scored if has_adapter(c, prep.options)}))
        picked = pick_candidates(problem, scored, k)
        done = {t.user_attrs["shard"]: t.user_attrs["result"] for t in proxy.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE,)) if "result" in t.user_attrs}
        if any(c.trial not in done for c in picked):
            raise PlannerError(f"study {name!r}: the fine-tune proxy is not finished; let a worker finish it")
        records = [stored_record(done[c.trial]) for c in picked]
        j = choose(records)
        if not _diverged(records, scored):
            chosen = picked[j]
            records[j]["chosen"] = True
        else:
            log.warning("the fine-tune proxy left every trained candidate worse than untrained (is --proxy-lr "
                        "too high?): keeping the zero-step choice")
            for r in records:
                r["chosen"] = r["trial"] == chosen.trial
    info = {"mode": cfg.search, "seed": cfg.seed, "storage": redact(str(getattr(storage, "url", storage))),
            "study_name": name, "trials": sum(t.state == TrialState.COMPLETE for t in main.get_trials(deepcopy=False)),
            "workers": sorted({t.user_attrs.get("worker") for t in open_study(storage, name + ":work", 0).get_trials(
                deepcopy=False) if t.user_attrs.get("kind") == "worker"} - {None})}
    plan = build_plan(prep, tables, table, chosen, exact, scored, budget, info, timings, records)
    return PlanOutcome(plan, exact.budget_binds, scored, chosen, exact, problem)


def collect(url: str, name: str, cache_dir: str | None = None) -> PlanOutcome:
    """The plan of a finished shared study from the storage alone (the model's config and
    tokenizer must resolve here; no weight is loaded beyond the fingerprint's check)."""
    from planner.search.pipeline import prepare
    from planner.settings import RunSettings

    storage = open_storage(url)
    try:
        main = optuna.load_study(storage=storage, study_name=name)
    except KeyError:
        raise PlannerError(f"--storage {redact(url)} has no study {name!r}") from None
    record, fp = main.user_attrs.get(CONFIG), main.user_attrs.get(FINGERPRINT)
    if record is None or fp is None:
        raise PlannerError(f"study {name!r} was not made by a shared planner run (no {CONFIG} attribute)")
    try:
        cfg = PlanConfig(**{**record["plan"], "bits": tuple(record["plan"]["bits"]),
                            "ranks": tuple(record["plan"]["ranks"]), "cache_dir": cache_dir, "storage": url,
                            "study_name": name})
        run, budget = RunSettings.from_dict(record["run"]), int(record["budget"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # a hand-edited or foreign study
        raise PlannerError(f"study {name!r}: its stored configuration ({CONFIG}) is malformed "
                           f"({type(err).__name__}: {one_line(err)})") from None
    prep = prepare(cfg, run)
    if prep.source.weights_sha256() != fp["weights"]:
        raise PlannerError(f"study {name!r} was made with other weights than {cfg.model} here")
    return outcome_from_storage(prep, storage, name, budget, {})

"""One planning run: a short list of stages (:mod:`planner.search.stages`), on one machine or many.

    prepare -> calibration -> moments (data-aware) -> bank -> tables -> Fisher errors
            -> search (exact, or guided trials scored by the zero-step proxy) -> fine-tune proxy -> plan

Without ``--storage`` the one-machine driver runs every unit (the guided trials in a SQLite study in
the cache, so a search resumes); with it, :class:`planner.search.drivers.SharedDriver` splits the
tables, the Fisher errors, the trials and the proxy's candidates among every worker on that storage.
Both run the same stage functions, so every lever (data-aware moments, feedback rounding, double
quantization, any family, every ``--search`` mode) works on both, and a plan's layers are the same
bits however the work was shared (the guided search's sampler seeds follow the workers' arrival).
Heavy results are cached by unit, so re-planning at another budget re-solves the knapsack (and
re-runs the search trials, if any) only.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from search_spaces.choices import has_adapter

from planner.artifact.plan import SCHEMA_VERSION, InitRecord, LayerPlan, Plan, ProxyRecord, SearchRecord, created_with
from planner.errors import PlannerError
from planner.files.cache import non_negative
from planner.overheads import allocatable_bytes
from planner.scoring.ftproxy import FinetuneRecord, FinetuneSettings, pick, score_candidate
from planner.scoring.proxy import zero_step_kind
from planner.scoring.tables import ResidualTables, valid_tables
from planner.search import stages
from planner.search.config import PlanConfig
from planner.search.drivers import CONFIG, REF_LOSS, AheadMedianPruner, LocalDriver, SharedDriver, join
from planner.search.objective import OptionTable
from planner.search.prepare import (METHOD, Prepared, check_budget, default_storage, fingerprint, prepare,
                                    study_name_for)
from planner.search.stages import Context, UnitCache
from planner.search.study import (DONE, Candidate, SearchProblem, guided_search, open_storage, open_study, redact,
                                  stored_candidates)
from planner.settings import RunSettings

log = logging.getLogger(__name__)


@dataclass
class PlanOutcome:
    plan: Plan
    budget_binds: bool
    candidates: list[Candidate]
    chosen: Candidate
    exact: Candidate
    problem: SearchProblem


@dataclass
class Study:
    """Where the guided search's trials live: the URL, the study's name, and its fingerprint."""

    storage: str
    name: str
    fingerprint: dict[str, Any]


def make_plan(cfg: PlanConfig, run: RunSettings, budget: int, *, bank_store: Any = None) -> PlanOutcome:
    """The whole planning run for one budget (bytes). Raises PlannerError on bad input.

    ``bank_store``: a :class:`planner.scoring.bank.BankStore` for the weight bank, shared by runs over
    the same model and settings (e.g. one per budget in one process); None: on disk in the cache."""
    from planner.train.data import CorpusConfig, load_corpus

    t0 = time.perf_counter()
    prep = prepare(cfg, run)
    cfg = prep.cfg  # as fitted to the model (its ranks)
    allocatable = check_budget(prep, budget)
    corpus = load_corpus(CorpusConfig(source=cfg.data or "pydoc", seed=0))  # bad data fails before heavy work
    study = Study(cfg.storage or default_storage(cfg), cfg.study_name or study_name_for(prep, budget),
                  fingerprint(prep, budget, corpus.fingerprint))
    driver = open_driver(prep, budget, study)  # a bad storage or a mismatched study fails before heavy work
    ctx = Context(prep, corpus, *stages.calibration(prep, corpus))
    if cfg.init == "loftq-data":  # the calibration pass comes first: it sets the tables' norm and the bank's Q
        stages.moments(ctx)
    stages.bank(ctx, bank_store)
    tables, fisher = precompute(ctx, driver)
    problem = search_problem(prep, tables, fisher, allocatable)
    exact = problem.solve(problem.neutral)
    candidates, info = search(ctx, driver, problem, exact, study)
    chosen, records = choose(ctx, driver, problem, candidates)
    ctx.timings["total_s"] = time.perf_counter() - t0
    info["planner_memory"] = measured_peak(open_scorer_device(ctx), budget)
    plan = build_plan(prep, tables, problem.table, chosen, exact, candidates, budget, info, ctx.timings, records,
                      init=ctx.init)
    return PlanOutcome(plan, exact.budget_binds, candidates, chosen, exact, problem)


def open_driver(prep: Prepared, budget: int, study: Study) -> LocalDriver | SharedDriver:
    """The shared driver for an explicit ``--storage`` (its study joined now), else this machine's."""
    cfg = prep.cfg
    if cfg.storage is None:
        if cfg.search != "exact" and cfg.trials > 0:
            open_study(study.storage, study.name, cfg.seed, study.fingerprint)
        return LocalDriver()
    return SharedDriver(join(study.storage, study.name, study.fingerprint, config_record(cfg, prep.run, budget)))


def precompute(ctx: Context, driver: LocalDriver | SharedDriver) -> tuple[ResidualTables, torch.Tensor]:
    """The residual tables (a unit per block) and the Fisher errors (a unit per calibration sequence)."""
    t0 = time.perf_counter()
    cache = ctx.cache
    tkey = stages.tables_key(ctx)
    tables = driver.run("residual tables", stages.table_units(ctx.prep),
                        lambda units: {stages.unit_key(u): stages.table_unit(ctx, u) for u in units},
                        UnitCache(cache / "tables" / tkey, tkey, valid_tables))
    ctx.timed("tables", t0)
    t1 = time.perf_counter()
    fkey = stages.fisher_key(ctx)
    fisher = driver.run("Fisher errors", stages.fisher_units(len(ctx.train)), lambda units: stages.fisher_rows(ctx, units),
                        UnitCache(cache / "fisher" / fkey, fkey, non_negative("rows")), together=True)
    ctx.timed("fisher", t1)
    return stages.assemble_tables(ctx.prep, tables), stages.assemble_fisher(ctx, fisher)


def search_problem(prep: Prepared, tables: ResidualTables, fisher: torch.Tensor, allocatable: int) -> SearchProblem:
    """The one place a :class:`SearchProblem` is built: options, costs, groups, budget, and the
    per-(layer, option) estimated loss rise from the tables and the Fisher errors."""
    table = OptionTable.build(prep.targets, tables, fisher, prep.options)
    return SearchProblem(table, prep.costs, prep.fixed_bytes, prep.groups, prep.group_names, allocatable)


def search(ctx: Context, driver: LocalDriver | SharedDriver, problem: SearchProblem, exact: Candidate,
           study: Study) -> tuple[list[Candidate], dict[str, Any]]:
    """``exact``: the exact optimum alone. ``guided``: Optuna trials (a unit each, claimed by any
    worker of a shared study) scored by the zero-step proxy; every scored candidate."""
    from planner import progress

    cfg = ctx.prep.cfg
    info: dict[str, Any] = {"mode": cfg.search, "seed": cfg.seed, "trials": 0}
    if driver.shared:
        info.update(storage=redact(study.storage), study_name=study.name)
    if cfg.search == "exact" or cfg.trials == 0:
        return [exact], info
    info.update(storage=redact(study.storage), study_name=study.name)
    proxy = stages.zero_step_proxy(ctx)
    t0 = time.perf_counter()
    team = driver.team if driver.shared else None
    if team is not None:
        main = team.study()
        if REF_LOSS not in main.user_attrs:
            main.set_user_attr(REF_LOSS, proxy.ref_loss)
    what = "KL" if proxy.causal else "1 - cos"
    with progress.task(f"search: {cfg.trials} trials (zero-step {what})", cfg.trials) as advance:
        opt, seen = guided_search(problem, proxy, trials=cfg.trials, timeout=cfg.timeout, seed=cfg.seed,
                                  storage=team.storage if team is not None else study.storage, study_name=study.name,
                                  on_trial=lambda c: advance(1), fingerprint=study.fingerprint,
                                  sampler_seed=cfg.seed + 7919 * team.index if team is not None else None,
                                  worker=team.ident if team is not None else None)
    ctx.timed("search", t0)
    info["trials"] = sum(t.state in DONE for t in opt.get_trials(deepcopy=False))
    return scored(seen), info


def scored(seen: Sequence[Candidate]) -> list[Candidate]:
    out = [c for c in seen if c.proxy is not None and math.isfinite(c.proxy.kl)]
    if not out:
        raise PlannerError("the search finished no trial; raise --trials or --timeout")
    return out


# ---------------------------------------------------------------- the choice: zero-step, then the fine-tune proxy
def choose(ctx: Context, driver: LocalDriver | SharedDriver, problem: SearchProblem,
           candidates: list[Candidate]) -> tuple[Candidate, list[FinetuneRecord] | None]:
    """The best zero-step candidate (adapters preferred within ``--adapter-margin``), re-chosen by
    the fine-tune proxy when ``--proxy-top`` asks for it and a candidate has something to train."""
    prep = ctx.prep
    cfg = prep.cfg
    best = zero_step_choice(prep, candidates)
    if cfg.proxy_top <= 0:
        return best, None
    if not any(has_adapter(c, prep.options) for c in candidates):
        if max(cfg.ranks) > 0:
            log.warning("no candidate within the budget has an adapter: the fine-tune proxy has nothing to train, "
                        "keeping the zero-step choice")
        return best, None
    if not prep.source.facts.is_decoder:
        raise PlannerError(f"--proxy-top needs a causal LM to fine-tune; {cfg.model} is an encoder "
                           "(its plans are scored by the zero-step embedding proxy)")
    t0 = time.perf_counter()
    picked = proxy_candidates(prep, problem, candidates)
    records = finetune_proxy(ctx, driver, problem, picked)
    ctx.timed("finetune_proxy", t0)
    return final_choice(best, picked, records, candidates)


def proxy_candidates(prep: Prepared, problem: SearchProblem, candidates: Sequence[Candidate]) -> list[Candidate]:
    k = min(prep.cfg.proxy_top, len({tuple(c.choice) for c in candidates if has_adapter(c, prep.options)}))  # >= 1
    return [candidates[i] for i in pick(problem, candidates, k)]


def finetune_proxy(ctx: Context, driver: LocalDriver | SharedDriver, problem: SearchProblem,
                   picked: Sequence[Candidate]) -> list[FinetuneRecord]:
    """Each picked candidate (a unit) trained ``--proxy-steps`` LoRA steps on the train split and
    scored on the proxy-validation split (the test split is never read), pruned against the
    candidates ranked ahead of it; in the picked order."""
    from planner import progress
    from planner.train.data import token_blocks

    prep, cfg = ctx.prep, ctx.prep.cfg
    n = cfg.calib_seq_len
    tok = prep.source.tokenizer()
    train = token_blocks(tok, ctx.corpus.train, n, max_tokens=n * max(cfg.calib_seqs, cfg.proxy_steps))
    builder = stages.open_scorer(ctx).candidate_builder(ctx.bank, METHOD, cfg.block_size, max(cfg.ranks), prep.run)
    settings = FinetuneSettings(steps=cfg.proxy_steps, lr=cfg.proxy_lr, seed=cfg.seed,
                                eval_every=max(1, cfg.proxy_steps // 4), optimizer=prep.run.optimizer)
    study = driver.proxy_study()

    def compute(spec: dict[str, Any], trial: Any) -> dict[str, Any]:
        pruner = AheadMedianPruner(study, spec["zero_step_rank"], cfg.proxy_steps // 2, trial)
        rec = score_candidate(problem, picked[spec["zero_step_rank"]], builder, train, ctx.val, settings, pruner)
        curve = {**pruner.curve, rec.steps: rec.loss} if rec.steps else {}
        rec.waited_s = round(pruner.waited_s, 3)
        return {**rec.to_dict(), "curve": {str(s): v for s, v in curve.items()}}

    specs = [{"kind": "proxy", "shard": c.trial if c.trial is not None else f"exact{i}", "zero_step_rank": i}
             for i, c in enumerate(picked)]
    with progress.task(f"fine-tune proxy: {len(specs)} candidates x {cfg.proxy_steps} steps", len(specs)) as advance:
        results = driver.claim(study, specs, compute, on_done=lambda: advance(1))
    return [stored_record(results[stages.unit_key(s)]) for s in specs]


def stored_record(result: dict[str, Any]) -> FinetuneRecord:
    return FinetuneRecord.from_dict({**result, "chosen": False})


def final_choice(best: Candidate, picked: Sequence[Candidate], records: list[FinetuneRecord],
                 candidates: Sequence[Candidate]) -> tuple[Candidate, list[FinetuneRecord]]:
    """The proxy's pick (the lowest loss among feasible, fully trained or untrained-frozen records,
    ties to the better zero-step rank) unless training left every candidate worse than untrained:
    then the zero-step choice stands, with a warning."""
    done = [j for j, r in enumerate(records) if r.feasible and not r.pruned and math.isfinite(r.loss)]
    j = min(done, key=lambda j: (records[j].loss, j)) if done else 0
    chosen = picked[j]
    if diverged(records, candidates):
        log.warning("the fine-tune proxy left every trained candidate worse than untrained (is --proxy-lr too "
                    "high?): keeping the zero-step choice")
        chosen = best
    for r in records:
        r.chosen = r.trial == chosen.trial and r.objective == chosen.objective
    return chosen, records


def diverged(records: Sequence[FinetuneRecord], candidates: Sequence[Candidate]) -> bool:
    """True when every candidate the proxy trained ended above its own untrained loss on the same
    held-out blocks (the zero-step proxy's ``loss``): training made things worse, so its verdict
    means nothing."""
    untrained = {c.trial: c.proxy.loss for c in candidates if c.proxy is not None}
    trained = [r for r in records if r.steps > 0 and not r.pruned and r.trial in untrained]
    return bool(trained) and all(not math.isfinite(r.loss) or r.loss > untrained[r.trial] for r in trained)


def zero_step_choice(prep: Prepared, candidates: Sequence[Candidate]) -> Candidate:
    """The best candidate by zero-step proxy (ties: the earlier trial); in fine-tune mode a plan with
    adapters within ``--adapter-margin`` nats of it is preferred (it has something to train). The
    exact search's one candidate has no proxy score: it is the choice."""
    if len(candidates) == 1 and candidates[0].proxy is None:
        return candidates[0]
    best = min(candidates, key=lambda c: (c.proxy.kl, c.trial))
    if prep.run.finetune and prep.source.facts.is_decoder and not has_adapter(best, prep.options):
        best = _prefer_adapters(best, candidates, prep)
    return best


def _prefer_adapters(best: Candidate, scored: Sequence[Candidate], prep: Prepared) -> Candidate:
    with_adapters = [c for c in scored if has_adapter(c, prep.options)]
    if not with_adapters:
        if max(prep.cfg.ranks) > 0:  # with --ranks 0 no adapter was asked for
            log.warning("no candidate within the budget has an adapter: the plan cannot be fine-tuned")
        return best
    alt = min(with_adapters, key=lambda c: c.proxy.kl)
    if alt.proxy.kl <= best.proxy.kl + prep.cfg.adapter_margin:
        return alt
    log.warning("the best plan with adapters scores KL %.3g, %.3g above the best plan (more than --adapter-margin "
                "%.3g): keeping the plan without adapters, so fine-tuning it trains nothing (--proxy-top compares "
                "both after a short fine-tune)", alt.proxy.kl, alt.proxy.kl - best.proxy.kl, prep.cfg.adapter_margin)
    return best


# ---------------------------------------------------------------- the record
def open_scorer_device(ctx: Context) -> torch.device:
    return ctx.scorer.device if ctx.scorer is not None else torch.device("cpu")


def measured_peak(device: torch.device, budget: int) -> dict[str, int]:
    """The planner's own peak so far: resident host memory (VmHWM) and, scoring on CUDA, the
    allocator's peak reservation, which must stay within the budget being planned (README
    "Planning on the hardware it plans for"); a breach is logged, not fatal (the plan is still valid)."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["host_peak_bytes"] = int(line.split()[1]) * 1024
    except OSError:  # not Linux
        pass
    if device.type == "cuda":
        out["gpu_peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
        if out["gpu_peak_reserved_bytes"] > budget:
            log.warning("planning reserved %d B on %s, more than the %d B budget it planned for",
                        out["gpu_peak_reserved_bytes"], device, budget)
    return out


def build_plan(prep: Prepared, tables: ResidualTables, table: OptionTable, chosen: Candidate, exact: Candidate,
               candidates: Sequence[Candidate], budget: int, info: dict[str, Any], timings: dict[str, float],
               records: list[FinetuneRecord] | None = None, init: InitRecord | None = None) -> Plan:
    """The plan of ``chosen``: a layer entry per target, the estimate, how it was found."""
    from planner.sources import model_record

    layers = []
    for i, (t, k) in enumerate(zip(prep.targets, chosen.choice)):
        w, rank = prep.options[k]
        lc = prep.choice_of((w, rank), t)
        residual = tables.cell(t.name, w, rank) if w < 16 else 0.0
        layers.append(LayerPlan(name=t.name, shape=tuple(t.shape), bits=lc.bits, quant=lc.quant,
                                block_size=lc.block_size, rank=rank, alpha=float(rank), iters=1,
                                residual=round(residual, 6), bytes=int(prep.costs[i, k]),
                                sensitivity=float(table.est[i, k]), double_quant=lc.double_quant))
    causal = prep.source.facts.is_decoder
    what = "estimated loss rise, nats" if causal else "estimated squared shift of the pooled embedding"
    rows = [_row(c, chosen) for c in candidates]
    proxy = ProxyRecord(kind=zero_step_kind(causal), ref_loss=chosen.proxy.ref_loss if chosen.proxy else None,
                        adapter_margin=prep.cfg.adapter_margin if prep.run.finetune else None, candidates=rows)
    if records is not None:
        cfg = prep.cfg
        proxy = dataclasses.replace(
            proxy, kind=f"fine-tune: {cfg.proxy_steps} LoRA steps (lr {cfg.proxy_lr}, seed {cfg.seed}) "
                        "on the train split, loss on the proxy-validation split",
            zero_step_kind=zero_step_kind(causal), zero_step_candidates=rows, steps=cfg.proxy_steps,
            candidates=[r.to_dict() for r in records])
    known = {f.name for f in dataclasses.fields(SearchRecord)}  # the rest (e.g. a shared study's workers) is extra
    search = SearchRecord(**{k: v for k, v in info.items() if k in known},
                          extra={k: v for k, v in info.items() if k not in known},
                          objective=f"fisher-weighted LoftQ residual ({what})",
                          exact_optimum=exact.objective, chosen_objective=chosen.objective,
                          gap=chosen.objective - exact.objective, budget_binds=exact.budget_binds,
                          allocatable_bytes=allocatable_bytes(budget, prep.run),
                          timings={k: round(v, 3) for k, v in timings.items()}, proxy=proxy)
    return Plan(schema_version=SCHEMA_VERSION, model=model_record(prep.source, prep.cfg.model), budget_bytes=int(budget),
                mode=prep.run.mode, run=prep.run, estimate=prep.estimate(chosen.choice), layers=tuple(layers),
                search=search, created_with=created_with(), init=init or InitRecord())


def _row(c: Candidate, chosen: Candidate) -> dict[str, Any]:
    out: dict[str, Any] = {"trial": c.trial, "objective": c.objective, "bytes": c.bytes, "chosen": c is chosen}
    if c.proxy is not None:
        out.update(kl=c.proxy.kl, loss=c.proxy.loss)
    if c.shaping is not None:
        out["shaping"] = c.shaping.to_dict()
    return out


# ---------------------------------------------------------------- a shared study's plan from the storage alone
def config_record(cfg: PlanConfig, run: RunSettings, budget: int) -> dict[str, Any]:
    """Everything `collect` needs to rebuild the run (stored on the study, never compared)."""
    plan = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "cache_dir", "storage", "study_name",
                                                                         "pareto")}
    return {"plan": plan, "run": run.to_dict(), "budget": int(budget)}


def collect(url: str, name: str, cache_dir: str | None = None) -> PlanOutcome:
    """The plan of a finished shared study from the storage alone, by the rule one worker uses (the
    model's config and tokenizer must resolve here; no weight is loaded beyond the fingerprint's)."""
    import optuna
    from optuna.trial import TrialState

    from planner.train.data import CorpusConfig, load_corpus

    storage = open_storage(url)
    try:
        main = optuna.load_study(storage=storage, study_name=name)
    except KeyError:
        raise PlannerError(f"--storage {redact(url)} has no study {name!r}") from None
    cfg, run, budget, fp = _stored_config(main, url, name, cache_dir)
    prep = prepare(cfg, run)
    if prep.source.weights_sha256() != fp["weights"]:
        raise PlannerError(f"study {name!r} was made with other weights than {cfg.model} here")
    if prep.imatrix_sha256 != fp.get("space", {}).get("imatrix"):
        raise PlannerError(f"study {name!r} was made with another importance matrix than {cfg.imatrix} here")
    corpus = load_corpus(CorpusConfig(source=cfg.data or "pydoc", seed=0))
    ctx = Context(prep, corpus, *stages.calibration(prep, corpus))
    done = {stages.unit_key(t.user_attrs): t.user_attrs["result"] for t in open_study(storage, name + ":work", 0)
            .get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "result" in t.user_attrs}
    units = stages.table_units(prep) + stages.fisher_units(cfg.calib_seqs)
    if any(stages.unit_key(u) not in done for u in units):
        raise PlannerError(f"study {name!r}: the precomputation is not finished; let a worker finish it")
    from planner.search.drivers import from_json

    results = {k: from_json(v) for k, v in done.items()}
    tables, fisher = stages.assemble_tables(prep, results), stages.assemble_fisher(ctx, results)
    problem = search_problem(prep, tables, fisher, allocatable_bytes(budget, run))
    exact = problem.solve(problem.neutral)
    candidates = [exact]
    if cfg.search != "exact" and cfg.trials > 0:
        candidates = scored(stored_candidates(problem, main, main.user_attrs.get(REF_LOSS, math.nan)))
    best, records = zero_step_choice(prep, candidates), None
    chosen = best
    if cfg.proxy_top > 0 and any(has_adapter(c, prep.options) for c in candidates):
        picked = proxy_candidates(prep, problem, candidates)
        got = {stages.unit_key(t.user_attrs): t.user_attrs["result"] for t in open_study(storage, name + ":proxy", 0)
               .get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "result" in t.user_attrs}
        keys = [f"proxy/{c.trial if c.trial is not None else f'exact{i}'}" for i, c in enumerate(picked)]
        if any(k not in got for k in keys):
            raise PlannerError(f"study {name!r}: the fine-tune proxy is not finished; let a worker finish it")
        chosen, records = final_choice(best, picked, [stored_record(got[k]) for k in keys], candidates)
    info = {"mode": cfg.search, "seed": cfg.seed, "storage": redact(str(getattr(storage, "url", storage))),
            "study_name": name, "trials": sum(t.state == TrialState.COMPLETE for t in main.get_trials(deepcopy=False)),
            "workers": sorted({t.user_attrs.get("worker") for t in open_study(storage, name + ":work", 0).get_trials(
                deepcopy=False) if t.user_attrs.get("kind") == "worker"} - {None})}
    plan = build_plan(prep, tables, problem.table, chosen, exact, candidates, budget, info, {}, records,
                      init=_init_of(cfg, ctx.corpus_sha, prep.imatrix_sha256))
    return PlanOutcome(plan, exact.budget_binds, candidates, chosen, exact, problem)


def _stored_config(main: Any, url: str, name: str, cache_dir: str | None) -> tuple[PlanConfig, RunSettings, int, dict]:
    """The plan configuration, run settings, budget and fingerprint a shared run stored on its study."""
    from planner.files.paths import one_line
    from planner.search.study import FINGERPRINT

    record, fp = main.user_attrs.get(CONFIG), main.user_attrs.get(FINGERPRINT)
    if record is None or fp is None:
        raise PlannerError(f"study {name!r} was not made by a shared planner run (no {CONFIG} attribute)")
    try:
        cfg = PlanConfig(**{**record["plan"], "bits": tuple(record["plan"]["bits"]),
                            "ranks": tuple(record["plan"]["ranks"]), "cache_dir": cache_dir, "storage": url,
                            "study_name": name})
        return cfg, RunSettings.from_dict(record["run"]), int(record["budget"]), fp
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # a hand-edited or foreign study
        raise PlannerError(f"study {name!r}: its stored configuration ({CONFIG}) is malformed "
                           f"({type(err).__name__}: {one_line(err)})") from None


def _init_of(cfg: PlanConfig, corpus_sha: str, imatrix_sha256: str | None = None) -> InitRecord:
    """The InitRecord a worker records for ``cfg`` (collect does not compute the moments)."""
    from planner.artifact.records import DEFAULT_DAMP

    if cfg.init != "loftq-data":
        return InitRecord()
    return InitRecord("loftq-data", data=cfg.data, seqs=cfg.calib_seqs, seq_len=cfg.calib_seq_len, corpus=corpus_sha,
                      damp=DEFAULT_DAMP, rounding=None if cfg.rounding == "nearest" else cfg.rounding,
                      imatrix=cfg.imatrix, imatrix_sha256=imatrix_sha256)

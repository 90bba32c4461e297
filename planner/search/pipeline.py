"""One planning run: model -> tables + sensitivity -> exact allocation (+ Optuna) -> Plan.

Heavy results (residual tables, Fisher errors) are cached, so re-planning at another budget only
re-solves the knapsack (and re-runs the search trials, if any).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from search_spaces.facts import TargetLayer

from search_spaces.choices import has_adapter, menu
from search_spaces.widths import WidthKey

from planner.artifact.records import DEFAULT_DAMP
from planner.search.allocate import InfeasibleBudget
from planner.files.cache import cache_key, default_cache_dir, load_cached, non_negative, save_cached
from planner.search.config import PlanConfig
from planner.errors import PlannerError
from planner.memory import LayerChoice, estimate, fixed_bytes, layer_bytes
from planner.overheads import allocatable_bytes
from planner.search.objective import OptionTable
from planner.search.study import (DEFAULT_DB, DONE, Candidate, SearchProblem, assignment, guided_search,
                                  open_study, redact)
from planner.settings import RunSettings, resolve_engine
from planner.scoring.tables import ResidualTables, TableSettings, residual_tables

log = logging.getLogger(__name__)
METHOD = "nf"  # NF2 / NF4 / NF8; see README "8-bit format" for the measured choice
FISHER_PRODUCER = "fisher-errors/1"  # bump when the Fisher-weighted errors change for the same loftq


@dataclass
class Prepared:
    """What every plan of one model + search space + run shares (independent of the budget)."""

    cfg: PlanConfig
    run: RunSettings
    source: Any
    targets: list[TargetLayer]
    options: list[tuple[int, int]]
    costs: torch.Tensor  # [n_layers, n_options] bytes
    fixed_bytes: int
    groups: list[list[int]]
    group_names: list[str]
    timings: dict[str, float] = field(default_factory=dict)

    def choice_of(self, option: tuple[WidthKey, int], target: TargetLayer) -> LayerChoice:
        """What ``target`` stores for a search option (a width may store another type on rows it
        cannot hold: search_spaces.widths.resolve)."""
        return LayerChoice.of(*option, method=METHOD, block_size=self.cfg.block_size, shape=tuple(target.shape))

    def total_bytes(self, choice: Sequence[int]) -> int:
        return self.fixed_bytes + int(sum(int(self.costs[i, k]) for i, k in enumerate(choice)))

    def estimate(self, choice: Sequence[int]):
        choices = {t.name: self.choice_of(self.options[k], t) for t, k in zip(self.targets, choice)}
        return estimate(self.source.facts, self.targets, choices, self.run, self.source.non_target_params(self.targets))


def options_of(cfg: PlanConfig) -> list[tuple[WidthKey, int]]:
    """(width, rank) pairs, width-major; widths from ``--bits`` under ``--double-quant`` and ``--quant``."""
    return [(w, r) for w in menu(cfg.bits, cfg.double_quant, cfg.quant) for r in sorted(set(cfg.ranks))]


def prepare(cfg: PlanConfig, run: RunSettings) -> Prepared:
    """Resolve the model, its targets and the byte cost of every (layer, option); no weights read."""
    from search_spaces.choices import group_targets

    from planner.sources import resolve

    try:  # engine auto -> llama.cpp for a GGUF inference plan
        run = resolve_engine(run, cfg.quant)
    except ValueError as err:
        raise PlannerError(str(err)) from None
    source = resolve(cfg.model, trust_remote_code=cfg.trust_remote_code, cache_dir=cfg.cache_path,
                     allow_download=False if cfg.offline else None)
    try:
        targets = source.targets(cfg.target_list)
    except ValueError as err:
        raise PlannerError(str(err)) from None
    if not targets:
        raise PlannerError(f"{cfg.model}: no target layers found")
    cfg = cfg.fitted_to(targets)  # a small model: the default ranks lose those no layer can hold
    options = options_of(cfg)
    try:  # the search space's own rule, so the dry run and the plan refuse the same ranks alike
        for t in targets:
            cfg.search_space.choices_for(t)
    except ValueError as err:
        raise PlannerError(str(err)) from None
    prep = Prepared(cfg, run, source, targets, options, torch.empty(0), 0, [], [])
    facts = source.facts
    prep.costs = torch.tensor([[layer_bytes(t, prep.choice_of(o, t), run, facts) for o in options] for t in targets],
                              dtype=torch.int64)
    prep.fixed_bytes = fixed_bytes(facts, targets, run, source.non_target_params(targets))
    grouped = group_targets(targets, cfg.granularity)
    index = {t.name: i for i, t in enumerate(targets)}
    prep.groups = [[index[t.name] for t in members] for members in grouped.values()]
    prep.group_names = list(grouped)
    return prep


def extremes(prep: Prepared) -> tuple[list[int], list[int]]:
    """Option index per layer of the smallest and of the largest plan."""
    return prep.costs.argmin(1).tolist(), prep.costs.argmax(1).tolist()


def check_budget(prep: Prepared, budget: int) -> int:
    """Allocatable bytes for ``budget``; raises InfeasibleBudget naming the minimum total."""
    lo, _ = extremes(prep)
    allocatable = allocatable_bytes(budget, prep.run)
    if prep.total_bytes(lo) > allocatable:
        raise InfeasibleBudget(prep.estimate(lo).total_bytes, budget)
    return allocatable


def table_settings(cfg: PlanConfig) -> TableSettings:
    quantized = tuple(w for w in menu(cfg.bits, cfg.double_quant, cfg.quant) if w < 16)
    return TableSettings(bits=quantized or menu((4,), cfg.double_quant, cfg.quant)[:1],
                         ranks=tuple(sorted(set(cfg.ranks) | {0})), method=METHOD, block_size=cfg.block_size)


def fisher_errors_cached(prep: Prepared, tables: ResidualTables, scorer: Any, blocks: torch.Tensor,
                         corpus_sha: str, bank: Any = None) -> torch.Tensor:
    """[n_layers, len(bits)] Fisher-weighted quantization errors, cached like the tables."""
    names = [t.name for t in prep.targets]
    key = cache_key(FISHER_PRODUCER, {"weights": prep.source.weights_sha256(), "targets": names,
                                      "bits": tables.settings.bits, "block": tables.settings.block_size,
                                      "method": METHOD, "corpus": corpus_sha, "blocks": list(blocks.shape),
                                      "kind": "fisher",
                                      **({"rounding": bank.rounding} if bank is not None and bank.rounding != "nearest"
                                         else {})})
    path = (prep.cfg.cache_path or default_cache_dir()) / "fisher" / f"{key}.safetensors"
    cached = load_cached(path, key, non_negative("fisher_err"))  # a squared error: never below 0
    if cached is not None and tuple(cached["fisher_err"].shape) == (len(names), len(tables.settings.bits)):
        return cached["fisher_err"]
    errs = scorer.fisher_errors(blocks, tables.settings.bits, METHOD, tables.settings.block_size, bank=bank)
    save_cached(path, key, {"fisher_err": errs})
    return errs


def open_scorer(prep: Prepared) -> Any:
    """The :class:`planner.scoring.scorer.Scorer` of this run: block-streamed on the score device."""
    from planner.devices import resolve_device
    from planner.scoring.scorer import Scorer

    cache = prep.cfg.cache_path or default_cache_dir()
    return Scorer(prep.source, prep.targets, prep.source.facts.is_decoder, resolve_device(prep.cfg.score_device),
                  scratch=cache / "scratch")


BANK_PRODUCER = "weight-bank/2"  # bump when a bank entry changes for the same loftq (2: entries by spec, format tensors)


def weight_bank(prep: Prepared, scorer: Any, store: Any = None, moments: Any = None) -> Any:
    """The search's :class:`planner.scoring.bank.WeightBank`, filled. ``store`` None: on disk in the
    cache (what a streamed plan needs: nothing weight-sized in RAM; an interrupted plan keeps it).
    ``moments``: the data-aware initialisation's (its candidates are then what materialize builds)."""
    from planner.scoring.bank import DiskStore, WeightBank

    settings = table_settings(prep.cfg)
    if store is None:
        names = [t.name for t in prep.targets]
        key = cache_key(BANK_PRODUCER, {"weights": prep.source.weights_sha256(), "targets": names,
                                        "bits": settings.bits, "rank": max(prep.cfg.ranks), "method": METHOD,
                                        "block": prep.cfg.block_size, "svd": "randomized", "dtype": "float32",
                                        **({"moments": moments.key, "damp": DEFAULT_DAMP} if moments is not None else {}),
                                        **({"rounding": prep.cfg.rounding} if prep.cfg.rounding != "nearest" else {})})
        store = DiskStore((prep.cfg.cache_path or default_cache_dir()) / "bank" / key, key)
    bank = WeightBank(scorer.weights(), settings.bits, max(prep.cfg.ranks), METHOD, prep.cfg.block_size, store=store,
                      device=scorer.device, moments=moments, damp=DEFAULT_DAMP,
                      rounding=prep.cfg.rounding if moments is not None else "nearest")
    bank.fill()
    return bank


def study_name_for(prep: Prepared, budget: int) -> str:
    """Derived from model + search space + run + budget, so a study never mixes budgets."""
    cfg = prep.cfg
    blob = json.dumps({"model": cfg.model, "weights": prep.source.weights_sha256(), "bits": cfg.bits,
                       "ranks": cfg.ranks, "block": cfg.block_size, "gran": cfg.granularity, "targets": cfg.target_modules,
                       "run": prep.run.to_dict(), "search": cfg.search, "data": cfg.data,
                       "calib": [cfg.calib_seqs, cfg.proxy_seqs, cfg.calib_seq_len], **_dq(cfg)},
                      sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
    return f"{cfg.model.replace('/', '_')}-{cfg.search}-{budget}B-{digest}"


def fingerprint(prep: Prepared, budget: int, corpus_sha: str) -> dict[str, Any]:
    """What a study's trials depend on: weights, search space, run, budget, data and proxy settings
    (not the model's id or path, which differ between machines, nor --trials or --timeout)."""
    cfg = prep.cfg
    return {"weights": prep.source.weights_sha256(), "targets": [t.name for t in prep.targets],
            "space": {"bits": list(cfg.bits), "ranks": list(cfg.ranks), "block": cfg.block_size,
                      "granularity": cfg.granularity, "search": cfg.search, **_dq(cfg)},
            "run": prep.run.to_dict(), "budget": int(budget), "data": corpus_sha,
            "calibration": [cfg.calib_seqs, cfg.proxy_seqs, cfg.calib_seq_len],
            "proxy": {"top": cfg.proxy_top, "steps": cfg.proxy_steps, "lr": cfg.proxy_lr, "seed": cfg.seed,
                      "adapter_margin": cfg.adapter_margin}}


def _dq(cfg: PlanConfig) -> dict[str, str]:
    """``--double-quant`` and ``--init`` for study names and fingerprints, absent at their defaults
    (today's names)."""
    return {**({} if cfg.double_quant == "off" else {"double_quant": cfg.double_quant}),
            **({} if cfg.quant == "nf" else {"quant": cfg.quant}),
            **({} if cfg.rounding == "nearest" else {"rounding": cfg.rounding}),
            **({} if cfg.init == "loftq" else {"init": cfg.init})}


def shared_storage(cfg: PlanConfig) -> bool:
    """An explicit --storage with the guided search: workers sharing it split the precomputation
    and the fine-tune proxy (planner.search.distributed); the default SQLite file is one machine's."""
    return cfg.storage is not None and cfg.search == "guided" and cfg.trials > 0


def default_storage(cfg: PlanConfig) -> str:
    path = (cfg.cache_path or default_cache_dir()) / DEFAULT_DB
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


@dataclass
class PlanOutcome:
    plan: Any  # planner.artifact.plan.Plan
    budget_binds: bool
    candidates: list[Candidate]
    chosen: Candidate
    exact: Candidate
    problem: SearchProblem


def _calibration(prep: Prepared, tokenizer: Any, corpus: Any) -> tuple[torch.Tensor, torch.Tensor, str]:
    from planner.train.data import token_blocks

    cfg = prep.cfg
    n = cfg.calib_seq_len
    train = token_blocks(tokenizer, corpus.train, n, max_tokens=n * cfg.calib_seqs)
    val = token_blocks(tokenizer, corpus.val, n, max_tokens=n * cfg.proxy_seqs)
    return train, val, corpus.fingerprint


def make_plan(cfg: PlanConfig, run: RunSettings, budget: int, *, bank_store: Any = None) -> PlanOutcome:
    """The whole planning run for one budget (bytes). Raises PlannerError on bad input.

    ``bank_store``: a :class:`planner.scoring.bank.BankStore` for the guided search's weight bank,
    shared by runs over the same model and settings (e.g. one per budget) so its entries are
    computed once; None: a fresh in-memory store."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    prep = prepare(cfg, run)
    cfg = prep.cfg  # as fitted to the model (its ranks)
    allocatable = check_budget(prep, budget)
    from planner.train.data import CorpusConfig, load_corpus

    corpus = load_corpus(CorpusConfig(source=cfg.data or "pydoc", seed=0))  # bad data fails before heavy work
    study = None
    if cfg.search != "exact" and cfg.trials > 0:  # a bad storage or a mismatched study fails before heavy work
        study = (cfg.storage or default_storage(cfg), cfg.study_name or study_name_for(prep, budget),
                 fingerprint(prep, budget, corpus.fingerprint))
        if shared_storage(cfg):
            from planner.search.distributed import plan_shared

            if cfg.init != "loftq":
                raise PlannerError(f"--init {cfg.init} is not supported with a shared --storage yet; plan on one "
                                   "machine (no --storage) or use --init loftq")
            return plan_shared(prep, budget, corpus, *study, timings, t0)
        open_study(study[0], study[1], cfg.seed, study[2])
    scorer = open_scorer(prep) if cfg.init != "loftq" else None
    moments, init, calibration = None, None, None
    if cfg.init == "loftq-data":  # the calibration pass comes before the tables, whose norm it sets
        from planner.scoring.moments import data_init

        calibration = train, val, corpus_sha = _calibration(prep, prep.source.tokenizer(), corpus)
        moments, init = data_init(prep.source, [t.name for t in prep.targets], train, corpus_sha, cfg, scorer)
        if cfg.rounding != "nearest":
            init = dataclasses.replace(init, rounding=cfg.rounding)
        timings["moments_s"] = time.perf_counter() - t0
    tables = residual_tables(prep.source, prep.targets, table_settings(cfg), cache_dir=cfg.cache_path,
                             device=cfg.score_device, moments=moments, damp=DEFAULT_DAMP,
                             rounding=cfg.rounding if moments is not None else "nearest")
    timings["tables_s"] = time.perf_counter() - t0 - timings.get("moments_s", 0.0)
    scorer = scorer or open_scorer(prep)  # names a non-finite non-target weight before the tokenizer loads
    train, val, corpus_sha = calibration or _calibration(prep, prep.source.tokenizer(), corpus)
    # the Fisher errors reuse the search's bank's Q; an exact plan fills one (Q only) for feedback rounding
    bank = weight_bank(prep, scorer, bank_store, moments) if study is not None or cfg.rounding != "nearest" else None
    fisher_err = fisher_errors_cached(prep, tables, scorer, train, corpus_sha, bank)
    timings["sensitivity_s"] = time.perf_counter() - t0 - timings["tables_s"] - timings.get("moments_s", 0.0)
    table = OptionTable.build(prep.targets, tables, fisher_err, prep.options)
    problem = SearchProblem(table, prep.costs, prep.fixed_bytes, prep.groups, prep.group_names, allocatable)
    t1 = time.perf_counter()
    exact = problem.solve(problem.neutral)
    timings["exact_solve_s"] = time.perf_counter() - t1
    candidates: list[Candidate] = [exact]
    chosen = exact
    search_info: dict[str, Any] = {"mode": cfg.search, "seed": cfg.seed, "trials": 0}
    if study is not None:
        storage, name, fp = study
        search_info.update(storage=redact(storage), study_name=name)
        chosen, candidates, n_trials = _guided(prep, problem, scorer, val, storage, name, fp, bank)
        search_info["trials"] = n_trials
    ft_records = None
    trainable = any(has_adapter(c, prep.options) for c in candidates)
    if cfg.proxy_top > 0 and not trainable and max(cfg.ranks) > 0:
        log.warning("no candidate within the budget has an adapter: the fine-tune proxy has nothing to train, "
                    "keeping the zero-step choice")
    if cfg.proxy_top > 0 and trainable:
        t2 = time.perf_counter()
        zero_step_choice = chosen
        chosen, ft_records = _finetune_proxy(prep, problem, candidates, scorer, corpus,
                                             bank if bank is not None else weight_bank(prep, scorer, moments=moments))
        timings["finetune_proxy_s"] = time.perf_counter() - t2
        if _diverged(ft_records, candidates):
            log.warning("the fine-tune proxy left every trained candidate worse than untrained (is --proxy-lr "
                        "too high?): keeping the zero-step choice")
            chosen = zero_step_choice
            for r in ft_records:
                r["chosen"] = r["trial"] == chosen.trial
    timings["total_s"] = time.perf_counter() - t0
    search_info["planner_memory"] = measured_peak(scorer.device, budget)
    plan = build_plan(prep, tables, table, chosen, exact, candidates, budget, search_info, timings, ft_records,
                      init=init)
    return PlanOutcome(plan, exact.budget_binds, candidates, chosen, exact, problem)


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


def _diverged(records: list[dict[str, Any]], candidates: list[Candidate]) -> bool:
    """True when every candidate the proxy trained ended above its own untrained loss on the same
    held-out blocks (the zero-step proxy's ``loss``): training made things worse, so its verdict
    means nothing."""
    untrained = {c.trial: c.proxy.loss for c in candidates if c.proxy is not None}
    trained = [r for r in records if r["steps"] > 0 and not r["pruned"] and r["trial"] in untrained]
    return bool(trained) and all(not math.isfinite(r["loss"]) or r["loss"] > untrained[r["trial"]] for r in trained)


def _guided(prep: Prepared, problem: SearchProblem, scorer: Any, val: torch.Tensor, storage: Any,
            name: str, fp: dict[str, Any], bank: Any, sampler_seed: int | None = None,
            worker: str | None = None) -> tuple[Candidate, list[Candidate], int]:
    """Optuna trials scored by the zero-step proxy over ``bank``; (best, scored candidates, trials done)."""
    proxy = scorer.zero_step(bank, val)
    from planner import progress

    what = "KL" if proxy.causal else "1 - cos"
    with progress.task(f"search: {prep.cfg.trials} trials (zero-step {what})", prep.cfg.trials) as advance:
        study, seen = guided_search(problem, proxy, trials=prep.cfg.trials, timeout=prep.cfg.timeout,
                                    seed=prep.cfg.seed, storage=storage, study_name=name,
                                    on_trial=lambda c: advance(1), fingerprint=fp, sampler_seed=sampler_seed,
                                    worker=worker)
    best, scored = zero_step_choice(prep, seen)
    return best, scored, sum(t.state in DONE for t in study.get_trials(deepcopy=False))


def zero_step_choice(prep: Prepared, seen: list[Candidate]) -> tuple[Candidate, list[Candidate]]:
    """The best candidate by zero-step proxy (ties: the earlier trial), and the scored candidates."""
    scored = [c for c in seen if c.proxy is not None and math.isfinite(c.proxy.kl)]
    if not scored:
        raise PlannerError("the search finished no trial; raise --trials or --timeout")
    best = min(scored, key=lambda c: (c.proxy.kl, c.trial))
    if prep.run.finetune and prep.source.facts.is_decoder and not has_adapter(best, prep.options):  # the margin is in nats of KL
        best = _prefer_adapters(best, scored, prep)
    return best, scored


def _prefer_adapters(best: Candidate, scored: list[Candidate], prep: Prepared) -> Candidate:
    """Fine-tune mode: a plan without any adapter has nothing to train, but fine-tuning wins back
    only so much. Take the best plan with adapters when its zero-step proxy is within
    ``cfg.adapter_margin`` of the best plan's; otherwise keep the better plan and say why."""
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


def _finetune_proxy(prep: Prepared, problem: SearchProblem, candidates: list[Candidate], scorer: Any,
                    corpus: Any, bank: Any = None) -> tuple[Candidate, list[dict[str, Any]]]:
    """Re-score ``cfg.proxy_top`` diverse candidates by ``cfg.proxy_steps`` LoRA steps each (train
    split), choosing the lowest loss on the proxy-validation split; the test split is never read."""
    from planner import progress
    from planner.train.data import token_blocks
    from planner.scoring.ftproxy import rescore_with_finetune

    cfg = prep.cfg
    n = cfg.calib_seq_len
    if not prep.source.facts.is_decoder:
        raise PlannerError(f"--proxy-top needs a causal LM to fine-tune; {cfg.model} is an encoder "
                           "(its plans are scored by the zero-step embedding proxy)")
    tok = prep.source.tokenizer()
    train = token_blocks(tok, corpus.train, n, max_tokens=n * max(cfg.calib_seqs, cfg.proxy_steps))
    val = token_blocks(tok, corpus.val, n, max_tokens=n * cfg.proxy_seqs)
    bank = bank if bank is not None else weight_bank(prep, scorer)
    k = min(cfg.proxy_top, len({tuple(c.choice) for c in candidates if has_adapter(c, prep.options)}))  # >= 1
    frozen = any(not has_adapter(c, prep.options) for c in candidates)
    with progress.task(f"fine-tune proxy: {k} candidates x {cfg.proxy_steps} steps", k + frozen) as advance:
        builder = scorer.candidate_builder(bank, METHOD, cfg.block_size, max(cfg.ranks), prep.run)
        chosen, records = rescore_with_finetune(problem, candidates, builder.base, train, val, top_k=k,
                                                steps=cfg.proxy_steps, seed=cfg.seed, lr=cfg.proxy_lr,
                                                method=METHOD, block_size=cfg.block_size, optimizer=prep.run.optimizer,
                                                builder=builder, on_candidate=lambda rec: advance(1))
    return chosen, records


def build_plan(prep: Prepared, tables: ResidualTables, table: OptionTable, chosen: Candidate, exact: Candidate,
               candidates: list[Candidate], budget: int, search_info: dict[str, Any], timings: dict[str, float],
               ft_records: list[dict[str, Any]] | None = None, init: Any = None):
    """``init``: the plan's :class:`planner.artifact.records.InitRecord` (None: plain LoftQ)."""
    from planner.artifact.plan import (SCHEMA_VERSION, InitRecord, LayerPlan, Plan, ProxyRecord, SearchRecord,
                                       created_with)

    layers = []
    for i, (t, k) in enumerate(zip(prep.targets, chosen.choice)):
        w, rank = prep.options[k]
        lc = prep.choice_of((w, rank), t)
        residual = tables.cell(t.name, w, rank) if w < 16 else 0.0
        layers.append(LayerPlan(name=t.name, shape=tuple(t.shape), bits=lc.bits, quant=lc.quant,
                                block_size=lc.block_size, rank=rank, alpha=float(rank), iters=1,
                                residual=round(residual, 6), bytes=int(prep.costs[i, k]),
                                sensitivity=float(table.est[i, k]), double_quant=lc.double_quant))
    est = prep.estimate(chosen.choice)

    def row(c: Candidate) -> dict[str, Any]:
        out: dict[str, Any] = {"trial": c.trial, "objective": c.objective, "bytes": c.bytes, "chosen": c is chosen}
        if c.proxy is not None:
            out.update(kl=c.proxy.kl, loss=c.proxy.loss)
        if c.shaping is not None:
            out["shaping"] = c.shaping.to_dict()
        return out

    from planner.scoring.proxy import zero_step_kind

    causal = prep.source.facts.is_decoder
    what = "estimated loss rise, nats" if causal else "estimated squared shift of the pooled embedding"
    rows = [row(c) for c in candidates]
    proxy = ProxyRecord(kind=zero_step_kind(causal), ref_loss=chosen.proxy.ref_loss if chosen.proxy else None,
                        adapter_margin=prep.cfg.adapter_margin if prep.run.finetune else None, candidates=rows)
    if ft_records is not None:
        cfg = prep.cfg
        proxy = dataclasses.replace(
            proxy, kind=f"fine-tune: {cfg.proxy_steps} LoRA steps (lr {cfg.proxy_lr}, seed {cfg.seed}) "
                        "on the train split, loss on the proxy-validation split",
            zero_step_kind=zero_step_kind(causal), zero_step_candidates=rows, steps=cfg.proxy_steps,
            candidates=ft_records)
    from dataclasses import fields

    known = {f.name for f in fields(SearchRecord)}  # the rest (e.g. a shared study's workers) is extra
    extra = {k: v for k, v in search_info.items() if k not in known}
    search = SearchRecord(**{k: v for k, v in search_info.items() if k in known}, extra=extra,
                          objective=f"fisher-weighted LoftQ residual ({what})",
                          exact_optimum=exact.objective, chosen_objective=chosen.objective,
                          gap=chosen.objective - exact.objective, budget_binds=exact.budget_binds,
                          allocatable_bytes=problem_budget(prep, budget),
                          timings={k: round(v, 3) for k, v in timings.items()}, proxy=proxy)
    from planner.sources import model_record

    model = model_record(prep.source, prep.cfg.model)
    return Plan(schema_version=SCHEMA_VERSION, model=model, budget_bytes=int(budget), mode=prep.run.mode,
                run=prep.run, estimate=est, layers=tuple(layers), search=search, created_with=created_with(),
                init=init or InitRecord())


def problem_budget(prep: Prepared, budget: int) -> int:
    return allocatable_bytes(budget, prep.run)

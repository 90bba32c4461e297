"""What every plan of one model + search space + run shares, before any weight is read: the source,
its targets, the options (width, rank) and the bytes each costs per layer, the groups that share a
choice; and the identity of a run (study name, fingerprint) that caches and studies are keyed by."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from search_spaces.choices import group_targets, menu
from search_spaces.facts import TargetLayer
from search_spaces.widths import WidthKey

from planner.errors import PlannerError
from planner.files.cache import default_cache_dir
from planner.memory import LayerChoice, MemoryEstimate, estimate, fixed_bytes, layer_bytes
from planner.overheads import allocatable_bytes
from planner.scoring.tables import TableSettings
from planner.search.allocate import InfeasibleBudget
from planner.search.config import PlanConfig
from planner.search.study import DEFAULT_DB
from planner.settings import RunSettings, resolve_engine
from planner.sources import ModelSource

METHOD = "nf"  # the codebook method of plain (int) widths: NF2 / NF3 / NF4 / NF8 (README "8-bit format")


@dataclass
class Prepared:
    """What every plan of one model + search space + run shares (independent of the budget)."""

    cfg: PlanConfig
    run: RunSettings
    source: ModelSource
    targets: list[TargetLayer]
    options: list[tuple[WidthKey, int]]
    costs: torch.Tensor = field(repr=False)  # [n_layers, n_options] bytes
    fixed_bytes: int = 0
    groups: list[list[int]] = field(default_factory=list)
    group_names: list[str] = field(default_factory=list)
    imatrix_sha256: str | None = None  # --imatrix's file digest, taken once (runs and studies are keyed by it)

    def choice_of(self, option: tuple[WidthKey, int], target: TargetLayer) -> LayerChoice:
        """What ``target`` stores for a search option (a width may store another type on rows it
        cannot hold: search_spaces.widths.resolve)."""
        return LayerChoice.of(*option, method=METHOD, block_size=self.cfg.block_size, shape=tuple(target.shape))

    def total_bytes(self, choice: Sequence[int]) -> int:
        return self.fixed_bytes + int(sum(int(self.costs[i, k]) for i, k in enumerate(choice)))

    def estimate(self, choice: Sequence[int]) -> MemoryEstimate:
        choices = {t.name: self.choice_of(self.options[k], t) for t, k in zip(self.targets, choice)}
        return estimate(self.source.facts, self.targets, choices, self.run, self.source.non_target_params(self.targets))


def options_of(cfg: PlanConfig) -> list[tuple[WidthKey, int]]:
    """(width, rank) pairs, width-major; widths from ``--bits`` under ``--double-quant``, ``--rotation``
    and ``--quant``."""
    return [(w, r) for w in menu(cfg.bits, cfg.double_quant, cfg.quant, cfg.rotation) for r in sorted(set(cfg.ranks))]


def source_and_targets(cfg: PlanConfig) -> tuple[Any, list[Any]]:
    """``cfg.model`` resolved (no weights read) and its target layers; none found, or a bad
    ``--target-modules``: PlannerError."""
    from planner.sources import resolve

    source = resolve(cfg.model, trust_remote_code=cfg.trust_remote_code, cache_dir=cfg.cache_path,
                     allow_download=False if cfg.offline else None)
    try:
        targets = source.targets(cfg.target_list)
    except ValueError as err:
        raise PlannerError(str(err)) from None
    if not targets:
        raise PlannerError(f"{cfg.model}: no target layers found")
    return source, targets


def prepare(cfg: PlanConfig, run: RunSettings) -> Prepared:
    """Resolve the model, its targets and the byte cost of every (layer, option); no weights read."""
    try:  # engine auto -> llama.cpp for a GGUF inference plan
        run = resolve_engine(run, cfg.quant)
    except ValueError as err:
        raise PlannerError(str(err)) from None
    source, targets = source_and_targets(cfg)
    cfg = cfg.fitted_to(targets)  # a small model: the default ranks lose those no layer can hold
    try:  # the search space's own rule, so the dry run and the plan refuse the same ranks alike
        for t in targets:
            cfg.search_space.choices_for(t)
    except ValueError as err:
        raise PlannerError(str(err)) from None
    prep = Prepared(cfg, run, source, targets, options_of(cfg), torch.empty(0))
    if cfg.imatrix:
        from planner.sources.imatrix import file_sha256

        prep.imatrix_sha256 = file_sha256(cfg.imatrix)
    facts = source.facts
    prep.costs = torch.tensor([[layer_bytes(t, prep.choice_of(o, t), run, facts) for o in prep.options]
                               for t in targets], dtype=torch.int64)
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
    """The widths and ranks of the residual tables (every quantized width of the menu, rank 0 too)."""
    quantized = tuple(w for w in menu(cfg.bits, cfg.double_quant, cfg.quant, cfg.rotation) if w < 16)
    return TableSettings(bits=quantized or menu((4,), cfg.double_quant, cfg.quant)[:1],
                         ranks=tuple(sorted(set(cfg.ranks) | {0})), method=METHOD, block_size=cfg.block_size)


# ---------------------------------------------------------------- a run's identity
def levers(cfg: PlanConfig, imatrix_sha256: str | None = None) -> dict[str, str]:
    """The levers beyond the first planner's (double quantization, family, init, rounding, an imatrix
    by its digest) for names and fingerprints; each absent at that old value, so a plan with none of
    them keeps its old name."""
    return {**({} if imatrix_sha256 is None else {"imatrix": imatrix_sha256}),
            **({} if cfg.double_quant == "off" else {"double_quant": cfg.double_quant}),
            **({} if cfg.quant == "nf" else {"quant": cfg.quant}),
            **({} if cfg.rotation == "off" else {"rotation": cfg.rotation}),
            **({} if cfg.rounding == "nearest" else {"rounding": cfg.rounding}),
            **({} if cfg.init == "loftq" else {"init": cfg.init})}


def study_name_for(prep: Prepared, budget: int) -> str:
    """Derived from model + search space + run + budget, so a study never mixes budgets."""
    cfg = prep.cfg
    blob = json.dumps({"model": cfg.model, "weights": prep.source.weights_sha256(), "bits": cfg.bits,
                       "ranks": cfg.ranks, "block": cfg.block_size, "gran": cfg.granularity, "targets": cfg.target_modules,
                       "run": prep.run.to_dict(), "search": cfg.search, "data": cfg.data,
                       "calib": [cfg.calib_seqs, cfg.proxy_seqs, cfg.calib_seq_len],
                       **levers(cfg, prep.imatrix_sha256)},
                      sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
    return f"{cfg.model.replace('/', '_')}-{cfg.search}-{budget}B-{digest}"


def fingerprint(prep: Prepared, budget: int, corpus_sha: str) -> dict[str, Any]:
    """What a study's trials depend on: weights, search space, run, budget, data and proxy settings
    (not the model's id or path, which differ between machines, nor --trials or --timeout)."""
    cfg = prep.cfg
    return {"weights": prep.source.weights_sha256(), "targets": [t.name for t in prep.targets],
            "space": {"bits": list(cfg.bits), "ranks": list(cfg.ranks), "block": cfg.block_size,
                      "granularity": cfg.granularity, "search": cfg.search,
                      **levers(cfg, prep.imatrix_sha256)},
            "run": prep.run.to_dict(), "budget": int(budget), "data": corpus_sha,
            "calibration": [cfg.calib_seqs, cfg.proxy_seqs, cfg.calib_seq_len],
            "proxy": {"top": cfg.proxy_top, "steps": cfg.proxy_steps, "lr": cfg.proxy_lr, "seed": cfg.seed,
                      "adapter_margin": cfg.adapter_margin}}


def default_storage(cfg: PlanConfig) -> str:
    """One machine's study database: SQLite in the cache folder."""
    path = (cfg.cache_path or default_cache_dir()) / DEFAULT_DB
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"

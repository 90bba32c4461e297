"""The stages of planning, each a function of one unit of work, whichever driver runs it.

| stage | reads | unit | cached as |
|---|---|---|---|
| calibration | corpus, tokenizer | (all) | token blocks, cheap: recomputed |
| moments (data-aware) | calibration, or --imatrix's diagonal | a transformer block | cache/moments/KEY/block-NNNN |
| bank | weights (+ moments) | a (layer, spec) | cache/bank/KEY/LAYER.SPEC |
| tables | weights (+ moments, + bank when Q is not round-to-nearest's) | a transformer block | cache/tables/KEY/UNIT |
| Fisher errors | calibration, bank | a calibration sequence | cache/fisher/KEY/UNIT |
| zero-step reference | validation blocks | (all) | cache/reference/KEY |
| search | tables, Fisher, reference | a trial | the study (SQLite, or --storage) |
| fine-tune proxy | search, bank | a candidate | the proxy study |

Each (layer, width) is quantized once per machine: the bank holds Q, and the Fisher errors, the
candidates and (when Q is rounded by error feedback) the tables read it; round-to-nearest tables
use the fused pass of :func:`loftq.quant.quantization_residuals`, which quantizes without packing
(README "Planning time" counts it). A unit's result does not depend on which driver computed it,
nor with which other units: the tables of a block are computed from that block's layers alone, and
the Fisher errors per sequence, summed in sequence order (:func:`planner.scoring.sensitivity.fisher_total`).
The drivers (:mod:`planner.search.drivers`) decide who computes which unit; these functions do not
know.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TYPE_CHECKING

import torch

from planner.artifact.records import DEFAULT_DAMP, InitRecord
from planner.files.cache import cache_key, default_cache_dir, load_cached, save_cached
from planner.scoring.tables import PRODUCER as TABLES_PRODUCER, ResidualTables, compute_tables, valid_tables
from planner.search.prepare import METHOD, Prepared, table_settings

if TYPE_CHECKING:  # annotations only
    from planner.scoring.scorer import Scorer

FISHER_PRODUCER = "fisher-errors/2"  # 2: per calibration sequence, summed in order
BANK_PRODUCER = "weight-bank/3"  # 2: entries by spec, a format's own tensors; 3: GGUF Q under diag(H)
REFERENCE_PRODUCER = "zero-step-reference/1"
Unit = dict[str, Any]  # {"kind": stage, "shard": index, ...}: JSON, so a study can hold it


def unit_key(unit: Mapping[str, Any]) -> str:
    return f"{unit.get('kind')}/{unit.get('shard')}"


@dataclass
class Context:
    """What the stages of one run read, filled in stage order (a driver only adds who computes)."""

    prep: Prepared
    corpus: Any  # planner.train.data.Corpus
    train: torch.Tensor  # [calib_seqs, seq_len] calibration token blocks
    val: torch.Tensor  # [proxy_seqs, seq_len] held-out proxy blocks
    timings: dict[str, float] = field(default_factory=dict)
    scorer: Scorer | None = None  # opened by the first stage that needs the model
    moments: Any = None  # name -> H (data-aware initialisation): a MomentStore, or DiagonalMoments (--imatrix)
    init: InitRecord | None = None
    bank: Any = None  # planner.scoring.bank.WeightBank

    @property
    def cache(self) -> Path:
        return self.prep.cfg.cache_path or default_cache_dir()

    @property
    def corpus_sha(self) -> str:
        return self.corpus.fingerprint

    @property
    def rounding(self) -> str:
        """How Q is rounded: feedback only with the data-aware moments (the config enforces it)."""
        return self.prep.cfg.rounding if self.moments is not None else "nearest"

    def timed(self, stage: str, t0: float) -> None:
        self.timings[f"{stage}_s"] = self.timings.get(f"{stage}_s", 0.0) + time.perf_counter() - t0


# ---------------------------------------------------------------- calibration, scorer, moments, bank
def calibration(prep: Prepared, corpus: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration blocks (train split: Fisher, moments) and the proxy's held-out blocks (val)."""
    from planner.train.data import token_blocks

    cfg, tok = prep.cfg, prep.source.tokenizer()
    n = cfg.calib_seq_len
    return (token_blocks(tok, corpus.train, n, max_tokens=n * cfg.calib_seqs),
            token_blocks(tok, corpus.val, n, max_tokens=n * cfg.proxy_seqs))


def open_scorer(ctx: Context) -> Any:
    """The :class:`planner.scoring.scorer.Scorer` of this run: block-streamed on the score device."""
    if ctx.scorer is None:
        from planner.devices import resolve_device
        from planner.scoring.scorer import Scorer

        prep = ctx.prep
        ctx.scorer = Scorer(prep.source, prep.targets, prep.source.facts.is_decoder,
                            resolve_device(prep.cfg.score_device), scratch=ctx.cache / "scratch")
    return ctx.scorer


def moments(ctx: Context) -> None:
    """``--init loftq-data``: the layers' input second moments over the calibration blocks (one unit
    per transformer block, each cached as it is done), or with ``--imatrix`` that file's diagonal
    ones (the same mapping: every later stage takes them alike), and the plan's InitRecord."""
    from planner.scoring.moments import data_init

    t0 = time.perf_counter()
    cfg = ctx.prep.cfg
    ctx.moments, init = data_init(ctx.prep.source, ctx.prep.targets, ctx.train, ctx.corpus_sha, cfg,
                                  open_scorer(ctx), ctx.prep.imatrix_sha256)
    ctx.init = InitRecord(**{**asdict(init), "rounding": None if cfg.rounding == "nearest" else cfg.rounding})
    ctx.timed("moments", t0)


def bank(ctx: Context, store: Any = None) -> None:
    """The weight bank, filled with Q at every (layer, width) (factors come on first use). ``store``
    None: on disk in the cache (nothing weight-sized in RAM; an interrupted plan keeps every entry)."""
    from planner.scoring.bank import DiskStore, WeightBank

    t0 = time.perf_counter()
    prep, scorer = ctx.prep, open_scorer(ctx)
    settings = table_settings(prep.cfg)
    if store is None:
        key = cache_key(BANK_PRODUCER, {"weights": prep.source.weights_sha256(),
                                        "targets": [t.name for t in prep.targets], "bits": settings.bits,
                                        "rank": max(prep.cfg.ranks), "method": METHOD, "block": prep.cfg.block_size,
                                        "svd": "randomized", "dtype": "float32", **_data_key(ctx)})
        store = DiskStore(ctx.cache / "bank" / key, key)
    ctx.bank = WeightBank(scorer.weights(), settings.bits, max(prep.cfg.ranks), METHOD, prep.cfg.block_size,
                          store=store, device=scorer.device, moments=ctx.moments, damp=DEFAULT_DAMP,
                          rounding=ctx.rounding)
    ctx.bank.fill()
    ctx.timed("bank", t0)


def _data_key(ctx: Context) -> dict[str, Any]:
    """What data-aware results add to their cache keys (nothing for plain LoftQ: the keys of old); an
    imatrix's diagonal moments have a key of the file's sha256."""
    out: dict[str, Any] = {}
    if ctx.moments is not None:
        out.update(moments=ctx.moments.key, damp=DEFAULT_DAMP)
    if ctx.rounding != "nearest":
        out["rounding"] = ctx.rounding
    return out


# ---------------------------------------------------------------- tables: one unit per block
def table_units(prep: Prepared) -> list[Unit]:
    """One unit per transformer block (a contiguous range of the targets), layers outside the
    blocks (a head) one unit each."""
    from search_spaces.discovery import block_path

    units: list[Unit] = []
    start = 0
    for i in range(1, len(prep.targets) + 1):
        here = block_path(prep.targets[start].name)
        if i == len(prep.targets) or here is None or block_path(prep.targets[i].name) != here:
            units.append({"kind": "tables", "shard": len(units), "layers": [start, i]})
            start = i
    return units


def tables_key(ctx: Context) -> str:
    prep = ctx.prep
    return cache_key(TABLES_PRODUCER, {"weights": prep.source.weights_sha256(),
                                       "targets": [(t.name, t.shape) for t in prep.targets],
                                       "settings": _settings_key(table_settings(prep.cfg)), **_data_key(ctx)})


def _settings_key(settings: Any) -> dict[str, Any]:
    return {**asdict(settings), "bits": [str(w) for w in settings.bits]}


def table_unit(ctx: Context, unit: Unit) -> dict[str, torch.Tensor]:
    """One block's residual tables: {"table": [n, len(bits), len(ranks)], "sq_norm": [n]} in target order.
    Q is the bank's whenever calibration moments exist (feedback rounding, a GGUF type's importance-weighted
    scales: the Q materialize stores), else the fused round-to-nearest pass's."""
    from planner.devices import resolve_device

    prep = ctx.prep
    lo, hi = unit["layers"]
    targets = prep.targets[lo:hi]
    res = compute_tables(prep.source.iter_weights(targets), len(targets), table_settings(prep.cfg),
                         resolve_device(prep.cfg.score_device), ctx.moments, DEFAULT_DAMP, ctx.rounding,
                         bank=ctx.bank if ctx.moments is not None else None)
    order = [res.names.index(t.name) for t in targets]
    return {"table": res.table[order].float(), "sq_norm": res.sq_norm[order].double()}


def assemble_tables(prep: Prepared, results: Mapping[str, Mapping[str, torch.Tensor]]) -> ResidualTables:
    """The whole model's tables from the units' results (in unit order)."""
    units = table_units(prep)
    table = torch.cat([results[unit_key(u)]["table"] for u in units])
    sq = torch.cat([results[unit_key(u)]["sq_norm"] for u in units])
    if valid_tables({"table": table, "sq_norm": sq}) is not None:
        raise ValueError("the residual tables are out of range")
    return ResidualTables([t.name for t in prep.targets], table_settings(prep.cfg), table, sq)


# ---------------------------------------------------------------- Fisher errors: one unit per sequence
def fisher_units(n_seqs: int) -> list[Unit]:
    return [{"kind": "fisher", "shard": s} for s in range(n_seqs)]


def fisher_key(ctx: Context) -> str:
    prep = ctx.prep
    settings = table_settings(prep.cfg)
    return cache_key(FISHER_PRODUCER, {"weights": prep.source.weights_sha256(),
                                       "targets": [t.name for t in prep.targets], "bits": [str(b) for b in settings.bits],
                                       "block": settings.block_size, "method": METHOD, "corpus": ctx.corpus_sha,
                                       "blocks": list(ctx.train.shape), **_data_key(ctx)})


def fisher_rows(ctx: Context, units: Sequence[Unit]) -> dict[str, dict[str, torch.Tensor]]:
    """Per unit (a calibration sequence): {"rows": [n_layers, len(bits)]} float64, 1/2 sum g_s^2 (W - Q)^2
    with Q the bank's. Several units run in one streamed pass; each unit's row is what a pass over it
    alone gives."""
    scorer = open_scorer(ctx)
    settings = table_settings(ctx.prep.cfg)
    out: dict[str, dict[str, torch.Tensor]] = {}
    # contiguous runs of sequences, so a run is one pass (a driver hands out any subset)
    seqs = sorted(int(u["shard"]) for u in units)
    runs: list[list[int]] = []
    for s in seqs:
        if runs and runs[-1][-1] == s - 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    for run in runs:
        rows = scorer.fisher_rows(ctx.train[run[0]:run[-1] + 1], settings.bits, METHOD, settings.block_size,
                                  bank=ctx.bank, seed_offset=run[0])
        for j, s in enumerate(run):
            out[f"fisher/{s}"] = {"rows": rows[j]}
    return out


def assemble_fisher(ctx: Context, results: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """fisher_err [n_layers, len(bits)]: the sequences' rows summed in sequence order over their number."""
    from planner.scoring.sensitivity import fisher_total

    rows = torch.stack([results[unit_key(u)]["rows"] for u in fisher_units(len(ctx.train))])
    if bool((rows < 0).any()) or not bool(torch.isfinite(rows).all()):
        raise ValueError("Fisher errors out of range")
    return fisher_total(rows)


# ---------------------------------------------------------------- the zero-step reference
def zero_step_proxy(ctx: Context) -> Any:
    """The zero-step proxy over the bank, its reference outputs (the unquantized model's on the
    held-out blocks) from the cache when this model, text and settings computed them before."""
    from planner.scoring.proxy import ZeroStepReference

    t0 = time.perf_counter()
    prep = ctx.prep
    key = cache_key(REFERENCE_PRODUCER, {"weights": prep.source.weights_sha256(), "corpus": ctx.corpus_sha,
                                         "val": list(ctx.val.shape), "device": str(open_scorer(ctx).device),
                                         "targets": [t.name for t in prep.targets]})
    path = ctx.cache / "reference" / f"{key}.safetensors"
    cached = load_cached(path, key)
    reference = ZeroStepReference.from_tensors(cached) if cached is not None else None
    proxy = open_scorer(ctx).zero_step(ctx.bank, ctx.val, reference=reference)
    if reference is None:
        save_cached(path, key, proxy.reference().to_tensors())
    ctx.timed("reference", t0)
    return proxy


# ---------------------------------------------------------------- per-unit caching (the one-machine driver)
class UnitCache:
    """Results of one stage's units on disk (cache/STAGE/KEY/SHARD.safetensors): a stopped stage
    resumes at the units not yet done."""

    def __init__(self, folder: Path, key: str, check: Callable[[dict[str, torch.Tensor]], str | None] | None = None):
        self.folder, self.key, self.check = folder, key, check

    def _path(self, unit: Unit) -> Path:
        return self.folder / f"{unit['shard']}.safetensors"

    def get(self, unit: Unit) -> dict[str, torch.Tensor] | None:
        return load_cached(self._path(unit), f"{self.key}/{unit_key(unit)}", self.check)

    def put(self, unit: Unit, result: Mapping[str, torch.Tensor]) -> None:
        save_cached(self._path(unit), f"{self.key}/{unit_key(unit)}", dict(result))

"""What the benches share: settings, the byte counter, the baselines and the set-up (no script here).

Every method a bench compares is counted by the planner's own byte function
(``planner.memory.layer_bytes`` + the prepared fixed bytes). Budgets are named ``u{bits}r{rank}``
(the bytes of that uniform plan) or by bits per target weight: 8 * (bytes that depend on the
layers' choices) / (number of target weights). Baselines take the largest rank of RANK_GRID that
fits. SmolLM2's packaged weights were Q4_1 before dequantisation: its fp32 "reference" is a
dequantised Q4_1 model, not pristine fp16.
"""
from __future__ import annotations

import json
import math
import re
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bench.evaluation import ood_text, spread
from planner.files.atomic import atomic_write_bytes
from planner.search.config import PlanConfig
from planner.memory import LayerChoice, layer_bytes
from planner.scoring.bank import MemoryStore, WeightBank
from planner.scoring.ftproxy import CandidateBuilder
from planner.search.prepare import Prepared, prepare
from planner.settings import RunSettings
from planner.train.data import CorpusConfig, load_corpus, token_blocks
from search_spaces.choices import menu
from search_spaces.widths import Width, WidthKey

RANK_GRID = (0, 4, 8, 12, 16, 24, 32, 48, 64)
Assignment = list[tuple[WidthKey, int]]  # (width, rank) per target layer, in the order of prep.targets


@dataclass(frozen=True)
class Setting:
    """How much a SmolLM2 quality run does: sequence length, fine-tune steps, seeds, test tokens,
    budgets (``u4r16`` or bits per weight as a string), Optuna trials, fine-tune proxy size."""

    seq_len: int
    steps: int
    seeds: int
    test_tokens: int
    budgets: tuple[str, ...]
    trials: int
    lr: float = 3e-4
    proxy_top: int = 0
    proxy_steps: int = 0


QUICK = Setting(seq_len=128, steps=12, seeds=3, test_tokens=2048, budgets=("u4r16",), trials=6)
FULL = Setting(seq_len=128, steps=40, seeds=3, test_tokens=8192, budgets=("u4r16", "u4r4", "4.0"), trials=16,
               proxy_top=4, proxy_steps=12)


class Counter:
    """Bytes of any per-layer assignment with the planner's own memory function."""

    def __init__(self, prep: Prepared) -> None:
        self.prep, self.targets, self.run, self.facts = prep, prep.targets, prep.run, prep.source.facts
        self.n_weights = sum(t.shape[0] * t.shape[1] for t in self.targets)
        self._cache: dict[tuple[int, WidthKey, int], int] = {}

    def layer(self, i: int, bits: WidthKey, rank: int) -> int:
        key = (i, bits, rank)
        if key not in self._cache:
            ch = LayerChoice.of(bits, rank, block_size=self.prep.cfg.block_size)
            self._cache[key] = layer_bytes(self.targets[i], ch, self.run, self.facts)
        return self._cache[key]

    def total(self, assignment: Assignment) -> int:
        return self.prep.fixed_bytes + sum(self.layer(i, b, r) for i, (b, r) in enumerate(assignment))

    def bits_per_weight(self, total: int) -> float:
        return 8 * (total - self.prep.fixed_bytes) / self.n_weights

    def budget_for(self, label: str) -> int:
        """``u{bits}r{rank}``: the bytes of that uniform plan; a number: bits per target weight."""
        m = re.fullmatch(r"u(\d+)r(\d+)", label)
        if m:
            return self.total([(int(m[1]), int(m[2]))] * len(self.targets))
        return self.prep.fixed_bytes + math.floor(float(label) * self.n_weights / 8)


def uniform(counter: Counter, bits: WidthKey, budget: int) -> Assignment | None:
    """``bits`` (a width: 4 or 4dq) everywhere with the largest rank of RANK_GRID that fits; None if none does."""
    n = len(counter.targets)
    fits = [r for r in RANK_GRID if counter.total([(bits, r)] * n) <= budget]
    return [(bits, max(fits))] * n if fits else None


def first_k(counter: Counter, budget: int, rank: int | None = None, hi: WidthKey = 4,
            lo: WidthKey = 2) -> tuple[Assignment, int] | None:
    """The LoftQ paper's mixed-precision rule: 4-bit (``hi``) in the first k blocks, 2-bit (``lo``)
    in the rest, one rank everywhere. With ``rank`` fixed: the largest k that fits. Without: the largest k that fits
    at rank 0, then the largest rank of RANK_GRID that still fits with that k (the blocks are the
    rule's point; the paper's rank 16 alone costs ~8 bits/weight on SmolLM2 in fine-tune mode)."""
    blocks = [t.block for t in counter.targets]
    ranks = (rank,) if rank is not None else (0,)
    for k in range(max(blocks) + 1, -1, -1):
        if any(counter.total([(hi if b < k else lo, r) for b in blocks]) <= budget for r in ranks):
            fits = [r for r in (ranks if rank is not None else RANK_GRID)
                    if counter.total([(hi if b < k else lo, r) for b in blocks]) <= budget]
            return [(hi if b < k else lo, max(fits)) for b in blocks], k
    return None


# the planner's variants in bench.ablation and bench.embedding: name -> the PlanConfig fields it sets
# (every other lever at the product's default). "default" sets nothing: the planner a user runs.
# issue 15's lever rows set all four levers by hand, and --rotation off (the first five are "all on" and each lever
# off; "+fb" plans with --rounding feedback: tables, Fisher and bank all score feedback Q; none of
# them rotates); "quick" is --quick (the first planner); "previous" the default before 8 December
# (--double-quant search: double quantization chosen per layer); "+rot" adds rotated widths
# (--rotation search: chosen per layer).
LEVERS = ("bits", "double_quant", "init", "rounding", "rotation")
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "default+exact": {"search": "exact"},  # the exact solver alone, no Optuna trials (issue 27: the default --search)
    "previous": {"double_quant": "search"},
    "default+rot": {"rotation": "search"},
    "previous+rot": {"double_quant": "search", "rotation": "search"},
    "default+rot-on": {"rotation": "on"},
    "quick": {"quick": True},
    "plain": dict(zip(LEVERS, ((2, 4, 8), "off", "loftq", "nearest", "off"))),
    "nf3+dq+data": dict(zip(LEVERS, ((2, 3, 4, 8), "search", "loftq-data", "nearest", "off"))),
    "nf3+dq": dict(zip(LEVERS, ((2, 3, 4, 8), "search", "loftq", "nearest", "off"))),
    "nf3+data": dict(zip(LEVERS, ((2, 3, 4, 8), "off", "loftq-data", "nearest", "off"))),
    "dq+data": dict(zip(LEVERS, ((2, 4, 8), "search", "loftq-data", "nearest", "off"))),
    "nf3": dict(zip(LEVERS, ((2, 3, 4, 8), "off", "loftq", "nearest", "off"))),
    "dq": dict(zip(LEVERS, ((2, 4, 8), "search", "loftq", "nearest", "off"))),
    "data": dict(zip(LEVERS, ((2, 4, 8), "off", "loftq-data", "nearest", "off"))),
    "nf3+dq+data+fb": dict(zip(LEVERS, ((2, 3, 4, 8), "search", "loftq-data", "feedback", "off"))),
}
# every width any variant can plan: the benches' weight banks hold them (entries are computed lazily)
BANK_MENU = menu((2, 3, 4, 8), "search", rotation="search")


def variant_config(cfg: PlanConfig, name: str, tag: str) -> PlanConfig:
    """``cfg`` with variant ``name``'s fields, planned on one machine (the default SQLite storage) in
    a study of its own (a fresh name, so no earlier run's trials are resumed). The levers ``cfg``
    leaves at None take the product's defaults for the variant (PlanConfig fills them)."""
    levers = dict(bits=None, double_quant=None, init=None, rounding=None, rotation=None, quick=False)
    return replace(cfg, **{**levers, **VARIANTS[name]}, storage=None, study_name=f"bench-{name}-{tag}-{time.time_ns()}")


def lever_baselines(counter: Counter, budget: int) -> dict[str, Assignment | None]:
    """The baselines given issue 15's levers: first-k plain, double-quantized and with NF3 for the
    tail, and uniform NF2/NF3 (± DQ) and NF4+DQ, each None where it does not fit."""
    dq2, dq3, dq4 = Width(2), Width(3), Width(4)
    out: dict[str, Assignment | None] = {}
    for name, hi, lo in (("first-k", 4, 2), ("first-k dq", dq4, dq2), ("first-k nf3 dq", dq4, dq3)):
        fk = first_k(counter, budget, hi=hi, lo=lo)
        out[f"loftq-{name}"] = fk[0] if fk else None
    for w in (2, dq2, 3, dq3, dq4):
        out[f"loftq-uniform-{w}"] = uniform(counter, w, budget)
    return out


def describe(plan: Assignment) -> dict[str, Any]:
    """Histograms of bits and ranks over the layers."""
    bits = [str(b) for b, _ in plan]
    ranks = [r for _, r in plan]
    return {"bits_hist": {b: bits.count(b) for b in sorted(set(bits), key=lambda w: (int(re.match(r"\d+", w)[0]), w))},
            "rank_hist": {str(r): ranks.count(r) for r in sorted(set(ranks))}}


# make_plan's zero-step weight bank depends only on the weights, bits and max rank: one store serves
# every budget of a bench run, so each (layer, bits) entry is computed once (minutes on 2 cores)
BANK_STORE = MemoryStore()


def bench_run(mode: str, seq_len: int) -> RunSettings:
    """The benches' run: CPU dtypes (fp32 adapters, grads and AdamW states), batch 1, no reserve."""
    return RunSettings(mode=mode, device="cpu", seq_len=seq_len, batch_size=1, reserve_context_bytes=0,
                       reserve_fraction=0.0)


def fresh_config(model: str, trials: int, prefix: str, **extra: Any) -> PlanConfig:
    """A guided-search config whose Optuna storage is a new SQLite file: every bench run starts a
    fresh study instead of resuming an earlier run's trials."""
    db = Path(tempfile.mkdtemp(prefix=prefix)) / "studies.sqlite3"
    return PlanConfig(model=model, search="guided", trials=trials, seed=0, storage=f"sqlite:///{db}", **extra)


@dataclass
class BenchSetup:
    """A prepared SmolLM2 fine-tune bench: planner inputs, the fp32 model and token blocks
    (``train``/``val``/``test``: int64 [n_blocks, seq_len], deterministic splits of the pydoc corpus;
    ``test`` is never used for a choice; ``ood``: as many blocks as ``test`` of the out-of-domain
    text, bench.evaluation.ood_text, spread over all of it; never used for anything but reporting)."""

    run: RunSettings
    cfg: PlanConfig
    prep: Prepared
    counter: Counter
    model: torch.nn.Module
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    bank: CandidateBuilder
    ood: torch.Tensor

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.prep.targets]

    @property
    def texts(self) -> dict[str, torch.Tensor]:
        """The evaluation texts' blocks by name (bench.evaluation.SUFFIX)."""
        return {"test": self.test, "ood": self.ood}


def setup(s: Setting) -> BenchSetup:
    """SmolLM2-135M in fine-tune mode at ``s.seq_len``: tables and model loaded, blocks cut."""
    run = bench_run("finetune", s.seq_len)
    cfg = fresh_config("smollm2-135m", s.trials, "bench-quality-")
    prep = prepare(cfg, run)
    model = prep.source.load_model(torch.float32)
    tok = prep.source.tokenizer()
    corpus = load_corpus(CorpusConfig(source="pydoc", seed=0))
    train = token_blocks(tok, corpus.train, s.seq_len, max_tokens=s.seq_len * max(64, s.steps * 2))
    val = token_blocks(tok, corpus.val, s.seq_len, max_tokens=s.seq_len * 8)
    test = token_blocks(tok, corpus.test, s.seq_len, max_tokens=s.test_tokens)
    ood = spread(token_blocks(tok, ood_text(), s.seq_len), test.shape[0])
    bank = CandidateBuilder(model, "nf", cfg.block_size)
    return BenchSetup(run, cfg, prep, Counter(prep), model, train, val, test, bank, ood)


def write_json(path: str | Path, doc: Any) -> None:
    """A bench result, written atomically (parent folders made)."""
    atomic_write_bytes(path, (json.dumps(doc, indent=1) + "\n").encode())


class Builders:
    """One CandidateBuilder per initialisation over the same fp32 model (exact-SVD factors)."""

    def __init__(self, b: BenchSetup) -> None:
        self.b, self._data = b, {}

    def get(self, init: str, plan_init: Any = None, rounding: str = "nearest") -> CandidateBuilder:
        """The builder of a plan with ``init`` (its InitRecord ``plan_init`` names the calibration);
        ``rounding`` "feedback": Q by error feedback under the moments (loftq.rounding)."""
        if init == "loftq":
            return self.b.bank
        if rounding not in self._data:
            from planner.scoring.bank import ModelWeights
            from planner.scoring.moments import plan_moments

            moments, _ = plan_moments(self.b.prep.source, self.b.names, plan_init, cache_dir=self.b.cfg.cache_path)
            bank = WeightBank(ModelWeights(self.b.model, self.b.names), BANK_MENU, 64, "nf",
                              self.b.cfg.block_size, svd="exact", moments=moments, rounding=rounding)
            self._data[rounding] = CandidateBuilder(self.b.model, "nf", self.b.cfg.block_size, bank=bank)
        return self._data[rounding]

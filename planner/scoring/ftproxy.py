"""Fine-tune proxy: re-score a few diverse candidate plans by a short LoRA fine-tune each.

The zero-step proxy (KL of Q + BA to the full model) cannot see what fine-tuning repairs, which is
the point of adapters. So the best candidates by zero-step score are re-scored by N LoRA steps
(LoftQ-initialised adapters, fixed seed and data order, train split) and their loss on the
proxy-validation split; the chosen plan is the feasible, fully trained one with the lowest loss.

- Diversity: candidates of one guided search are often identical or differ in a few layers. We
  keep a pool of the best ``pool_factor * K`` distinct plans by zero-step score and pick K of them
  greedily by max-min Hamming distance over per-layer (bits, rank) choices, starting from the best.
- Pruning: one in-memory Optuna study per call; each candidate is a trial that reports its
  validation loss every ``eval_every`` steps; a MedianPruner (after the first candidate finished,
  after a warm-up of half the steps) stops candidates that are behind the median of those before
  them at the same step. Candidates are run best-zero-step first, so the pruner compares against
  good ones. A pruned candidate's partial loss is recorded but it is never chosen.
- Training: :func:`finetune` is :func:`planner.train.loop.train_lora` with the proxy's settings, so
  a candidate trains exactly as ``python -m planner finetune`` trains the chosen plan (the run's
  optimizer, no weight decay, the same seeded batch order and gradient clipping); the pruner hooks
  in through the loop's ``on_eval``.
- Speed: with LoftQ iters = 1, Q = q(W) does not depend on the rank and B A for every rank is a
  truncation of one SVD of W - deq(Q) (ARCHITECTURE.md). :class:`CandidateBuilder` reads Q and the
  factors from the one :class:`planner.scoring.bank.WeightBank` (computed once per (layer, bits))
  and assembles each candidate with the one builder (:mod:`planner.runtime.build`), as
  :func:`planner.runtime.lora.build_loftq_model` and ``planner.load`` do: the same model, without
  re-running LoftQ for every candidate.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import optuna
import torch
from torch import nn

from loftq import METHODS
from search_spaces.choices import has_adapter, menu

from planner.runtime.build import assemble
from planner.scoring.bank import ModelWeights, WeightBank
from planner.settings import OPTIMIZERS
from planner.train.loop import DEFAULT_GRAD_CLIP, DEFAULT_LR, TrainResult, eval_loss, train_lora

log = logging.getLogger(__name__)
Assignment = Mapping[str, tuple[Any, int]]  # layer name -> (width, rank): 4, 4dq (search_spaces.widths), 16


@dataclass(frozen=True)
class FinetuneSettings:
    """One short LoRA fine-tune of a candidate: :func:`planner.train.loop.train_lora`'s knobs."""

    steps: int = 20
    lr: float = DEFAULT_LR
    batch_size: int = 1
    seed: int = 0
    eval_every: int = 5
    grad_clip: float = DEFAULT_GRAD_CLIP
    eval_batch: int = 4
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr", "grad_clip"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- building candidates
class CandidateBuilder:
    """Candidate models {layer: (bits, rank)} over ``base``, from a :class:`WeightBank`.

    ``build(assignment)`` returns a fresh PeftModel (deep copy of ``base``) equal to
    ``build_loftq_model(base, {n: LayerSpec(bits, rank)})`` when the bank's factors are exact (the
    default bank: exact SVD, computed per (layer, bits) on first use); ``init="default"`` gives PEFT's
    default LoRA init instead (A random from the torch seed, B = 0): QLoRA's recipe. ``bank``: reuse
    a bank over the same weights (e.g. the guided search's, randomized factors) instead.
    """

    def __init__(self, base: nn.Module, method: str = "nf", block_size: int = 64, *, max_rank: int = 64,
                 bank: WeightBank | None = None, compute_dtype: torch.dtype = torch.float32,
                 adapter_dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        if bank is None:
            # every width of the method, plain and double-quantized (entries are computed on first use)
            widths = menu(METHODS.get(method).bits, "search")
            bank = WeightBank(ModelWeights(base), widths, max_rank, method, block_size, svd="exact")
        bs = bank.settings
        if (bs.method, bs.block_size) != (method, block_size) or bs.max_rank < max_rank:
            raise ValueError(f"the bank ({bank.settings}) does not serve method {method!r}, block size "
                             f"{block_size} and ranks up to {max_rank}")
        self.base, self.bank = base, bank
        self.device = torch.device(device) if device is not None else None  # None: the base's
        self.compute_dtype = compute_dtype
        self.adapter_dtype = adapter_dtype or compute_dtype

    def build(self, assignment: Assignment, *, init: str = "loftq") -> nn.Module:
        """A fresh model (a deep copy of ``base``) with every assigned layer built from the bank by the
        one builder (:func:`planner.runtime.build.assemble`)."""
        keep = self.compute_dtype if self.compute_dtype != torch.float32 else torch.bfloat16
        layers = {name: self.bank.layer(name, bits, rank, init=init, keep_dtype=keep)
                  for name, (bits, rank) in assignment.items()}
        return assemble(copy.deepcopy(self.base), layers, compute_dtype=self.compute_dtype,
                        adapter_dtype=self.adapter_dtype, device=self.device)


# ---------------------------------------------------------------- training
def finetune(model: nn.Module, train: torch.Tensor, s: FinetuneSettings, val: torch.Tensor | None = None,
             on_eval: Callable[[int, float], bool] | None = None) -> TrainResult:
    """Train ``model``'s adapters for ``s.steps`` steps on ``train`` [n, seq_len] through the one loop.

    Every ``s.eval_every`` steps and at the end, the loss on ``val`` goes to ``on_eval(step, loss)``,
    which returns True to stop (no evaluation at step 0). A model with nothing to train is not
    trained: its result holds its held-out loss at step 0, if ``val`` is given.
    """
    if not any(p.requires_grad for p in model.parameters()):
        loss = eval_loss(model, val, s.eval_batch) if val is not None else None
        return TrainResult((), ((0, loss),) if loss is not None else (), loss, 0.0)
    return train_lora(model, train, steps=s.steps, lr=s.lr, batch_size=s.batch_size, seed=s.seed, eval_blocks=val,
                      eval_every=s.eval_every, grad_clip=s.grad_clip, optimizer=s.optimizer, show_progress=False,
                      eval_batch_size=s.eval_batch, eval_at_start=False, on_eval=on_eval)


# ---------------------------------------------------------------- diversity
def hamming(a: Sequence[int], b: Sequence[int]) -> int:
    return sum(x != y for x, y in zip(a, b))


def select_diverse(choices: Sequence[Sequence[int]], scores: Sequence[float], k: int,
                   pool_factor: int = 3) -> list[int]:
    """Indices of up to ``k`` distinct choices: the best-scored first, then greedily the one with the
    largest minimum Hamming distance to those picked (ties: better score), from the best
    ``pool_factor * k`` distinct choices. Lower score = better."""
    order = sorted(range(len(choices)), key=lambda i: (scores[i], i))
    distinct: list[int] = []
    seen: set[tuple[int, ...]] = set()
    for i in order:
        key = tuple(choices[i])
        if key not in seen:
            seen.add(key)
            distinct.append(i)
    pool = distinct[:max(k, pool_factor * k)]
    picked = pool[:1]
    while len(picked) < min(k, len(pool)):
        rest = [i for i in pool if i not in picked]
        best = max(rest, key=lambda i: (min(hamming(choices[i], choices[j]) for j in picked), -scores[i], -i))
        picked.append(best)
    return picked


# ---------------------------------------------------------------- re-scoring
@dataclass
class FinetuneRecord:
    """One candidate the fine-tune proxy trained (or, without an adapter, scored at step 0): its
    trial, zero-step score, bytes, held-out loss after ``steps`` steps and whether it was pruned,
    fits the budget, and was chosen. The plan keeps these as ``search.proxy.candidates``."""

    trial: int | None
    objective: float
    bytes: int
    loss: float
    chosen: bool = False
    kl: float | None = None
    pruned: bool = False
    steps: int = 0
    feasible: bool = True
    seconds: float = 0.0
    worker: str | None = None  # who trained it (a shared study's worker)
    waited_s: float | None = None  # how long its pruner waited on candidates ahead trained elsewhere

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("trial", "kl")}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FinetuneRecord":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def _zero_step_score(c: Any) -> float:
    return c.proxy.kl if getattr(c, "proxy", None) is not None else c.objective


def rescore_with_finetune(problem: Any, candidates: Sequence[Any], model: nn.Module, train_blocks: torch.Tensor,
                          val_blocks: torch.Tensor, *, top_k: int, steps: int, seed: int = 0, lr: float = DEFAULT_LR,
                          batch_size: int = 1, eval_every: int | None = None, method: str = "nf",
                          block_size: int = 64, optimizer: str = "adamw", builder: CandidateBuilder | None = None,
                          pruner: optuna.pruners.BasePruner | None = None,
                          on_candidate: Callable[[FinetuneRecord], None] | None = None) -> tuple[Any, list[dict]]:
    """Fine-tune ``top_k`` diverse candidates with adapters for ``steps`` LoRA steps each; pick the
    lowest val loss. The best candidate without any adapter (if there is one) competes too, scored
    by its val loss at step 0: fine-tuning it trains nothing, and a plan with adapters has to beat it.

    ``problem``: planner.search.study.SearchProblem (options, budget); ``candidates``: planner.search.study.Candidate
    (scored by ``proxy.kl`` if set, else by the additive objective); ``model``: the full-precision
    model (not modified); ``optimizer``: the run's (RunSettings.optimizer), as ``finetune`` uses it;
    ``builder``: assembles the candidates (default: exact LoftQ factors of ``model``). Returns
    (chosen candidate, records as dicts in run order).
    """
    if top_k < 1 or steps < 1:
        raise ValueError(f"top_k and steps must be >= 1, got top_k={top_k!r}, steps={steps!r}")
    picked = pick(problem, candidates, top_k)
    settings = FinetuneSettings(steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                                eval_every=eval_every or max(1, steps // 4), optimizer=optimizer)
    builder = builder or CandidateBuilder(model, method, block_size)
    pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=steps // 2)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", pruner=pruner)
    records: list[FinetuneRecord] = []
    for i in picked:
        cand = candidates[i]
        rec = _score_one(problem, cand, builder, train_blocks, val_blocks, settings, study)
        rec.kl = cand.proxy.kl if getattr(cand, "proxy", None) is not None else None
        records.append(rec)
        if on_candidate:
            on_candidate(rec)
    done = [j for j, r in enumerate(records) if r.feasible and not r.pruned and math.isfinite(r.loss)]
    best_j = min(done, key=lambda j: records[j].loss) if done else 0
    records[best_j].chosen = True
    return candidates[picked[best_j]], [r.to_dict() for r in records]


def pick(problem: Any, candidates: Sequence[Any], top_k: int) -> list[int]:
    """Indices of the candidates the proxy trains: ``top_k`` diverse ones with adapters (best zero-step
    first, :func:`select_diverse`), then the best one without any adapter (it competes at step 0)."""
    adapters = [has_adapter(c, problem.table.options) for c in candidates]
    scores = [_zero_step_score(c) for c in candidates]
    train_idx = [i for i, a in enumerate(adapters) if a]
    picked = [train_idx[j] for j in select_diverse([candidates[i].choice for i in train_idx],
                                                    [scores[i] for i in train_idx], top_k)]
    frozen = [i for i, a in enumerate(adapters) if not a]
    if frozen:
        picked.append(min(frozen, key=lambda i: (scores[i], i)))
    return picked


def score_candidate(problem: Any, cand: Any, builder: CandidateBuilder, train: torch.Tensor, val: torch.Tensor,
                    s: FinetuneSettings, pruner: optuna.pruners.BasePruner) -> FinetuneRecord:
    """One candidate through the proxy, alone: its own in-memory study with ``pruner``."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rec = _score_one(problem, cand, builder, train, val, s, optuna.create_study(direction="minimize", pruner=pruner))
    rec.kl = cand.proxy.kl if getattr(cand, "proxy", None) is not None else None
    return rec


def _score_one(problem: Any, cand: Any, builder: CandidateBuilder, train: torch.Tensor, val: torch.Tensor,
               s: FinetuneSettings, study: optuna.Study) -> FinetuneRecord:
    t0 = time.perf_counter()
    options = problem.table.options
    assignment = {t.name: options[k] for t, k in zip(problem.table.targets, cand.choice)}
    torch.manual_seed(s.seed)
    net = builder.build(assignment)
    if not any(p.requires_grad for p in net.parameters()):  # nothing to train: its step-0 loss is its score
        result = finetune(net, train, s, val)
        del net
        return FinetuneRecord(trial=cand.trial, objective=float(cand.objective), bytes=int(cand.bytes),
                           loss=float(result.final_eval_loss), steps=0, feasible=int(cand.bytes) <= int(problem.budget),
                           seconds=time.perf_counter() - t0)
    trial = study.ask()
    last = {"loss": math.nan, "pruned": False}

    def on_eval(step: int, loss: float) -> bool:
        last["loss"] = loss
        trial.report(loss, step)
        if step < s.steps and trial.should_prune():
            last["pruned"] = True
            return True
        return False

    done = len(finetune(net, train, s, val, on_eval).train_losses)
    if last["pruned"]:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, last["loss"])
    del net
    return FinetuneRecord(trial=cand.trial, objective=float(cand.objective), bytes=int(cand.bytes),
                       loss=float(last["loss"]), pruned=bool(last["pruned"]), steps=done,
                       feasible=int(cand.bytes) <= int(problem.budget), seconds=time.perf_counter() - t0)

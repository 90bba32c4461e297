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
- Speed: with LoftQ iters = 1, Q = q(W) does not depend on the rank and B A for every rank is a
  truncation of one SVD of W - deq(Q) (ARCHITECTURE.md). :class:`LoftQBank` computes that once per
  (layer, bits) and assembles each candidate with the same runtime pieces as
  :func:`planner.runtime.lora.build_loftq_model` (swap_linears, add_lora, load_adapter_init): the same
  model, without re-running LoftQ for every candidate.
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
import torch.nn.functional as F
from torch import nn

from loftq import QuantConfig, dequantize, quantize

from planner.runtime.lora import load_adapter_init
from planner.runtime.layers import add_lora, linear_weight, swap_linears
from planner.search.study import has_adapter

log = logging.getLogger(__name__)
Assignment = Mapping[str, tuple[int, int]]  # layer name -> (bits, rank)


@dataclass(frozen=True)
class FinetuneSettings:
    """One short LoRA fine-tune: AdamW on the adapters, batches drawn in a seeded order."""

    steps: int = 20
    lr: float = 3e-4
    batch_size: int = 1
    seed: int = 0
    eval_every: int = 5
    grad_clip: float = 1.0
    eval_batch: int = 4

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- building candidates
class LoftQBank:
    """Per (layer, bits): Q = q(W) and the top ``max_rank`` SVD factors of W - deq(Q) (iters = 1).

    ``build(assignment)`` returns a fresh PeftModel (deep copy of ``base``) equal to
    ``build_loftq_model(base, {n: LayerSpec(bits, rank)})``; ``init="default"`` gives PEFT's default
    LoRA init instead (A random from the torch seed, B = 0): QLoRA's recipe.
    """

    def __init__(self, base: nn.Module, method: str = "nf", block_size: int = 64,
                 compute_dtype: torch.dtype = torch.float32, adapter_dtype: torch.dtype | None = None,
                 max_rank: int = 64, factors: Any = None) -> None:
        """``factors``: a :class:`planner.scoring.sensitivity.WeightBank` built from the same weights, method
        and block size; its top factors of W - deq(Q) (randomized SVD) are reused instead of
        running an exact SVD per (layer, bits) again."""
        self.base, self.method, self.block_size, self.max_rank = base, method, block_size, max_rank
        self.compute_dtype = compute_dtype
        self.adapter_dtype = adapter_dtype or compute_dtype
        self.factors = factors
        self._q: dict[tuple[str, int], Any] = {}
        self._f: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}  # A [r, in], B [out, r]

    def _entry(self, name: str, bits: int, rank: int) -> tuple[Any, tuple[torch.Tensor, torch.Tensor] | None]:
        if rank > self.max_rank:
            raise ValueError(f"rank {rank} exceeds the bank's max_rank {self.max_rank}")
        key = (name, bits)
        if key not in self._q:
            w = linear_weight(self.base.get_submodule(name)).detach().float()
            qt = quantize(w, config=QuantConfig(bits, self.method, self.block_size))
            self._q[key] = qt
            shared = self.factors.entries.get(key) if self.factors is not None else None
            if shared is not None and shared.a.shape[0] >= min(self.max_rank, *w.shape):
                self._f[key] = (shared.a.float(), shared.b.float())
            else:
                u, s, vh = torch.linalg.svd(w - dequantize(qt, torch.float32), full_matrices=False)
                root = s[:self.max_rank].sqrt()  # the same split of S as loftq.solver._low_rank
                self._f[key] = ((root.unsqueeze(1) * vh[:self.max_rank]).contiguous(),
                                (u[:, :self.max_rank] * root).contiguous())
        if not rank:
            return self._q[key], None
        a, b = self._f[key]
        return self._q[key], (a[:rank], b[:, :rank])

    def build(self, assignment: Assignment, *, init: str = "loftq") -> nn.Module:
        if init not in ("loftq", "default"):
            raise ValueError(f"init must be 'loftq' or 'default', got {init!r}")
        model = copy.deepcopy(self.base)
        stored: dict[str, Any] = {}
        adapters: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
        for name, (bits, rank) in assignment.items():
            if bits >= 16:
                w = linear_weight(model.get_submodule(name)).detach()
                keep = self.compute_dtype if self.compute_dtype != torch.float32 else torch.bfloat16
                stored[name], ab = w.to(keep), None
            else:
                stored[name], ab = self._entry(name, bits, rank)
            if rank:
                adapters[name] = ab if init == "loftq" else None
        swap_linears(model, stored, self.compute_dtype)
        ranks = {n: r for n, (_, r) in assignment.items()}
        if not any(ranks.values()):  # nothing to train: the embeddings and norms stay frozen too
            model.requires_grad_(False)
            return model
        alphas = {n: float(r) for n, r in ranks.items() if r}
        model = add_lora(model, ranks, alphas, adapter_dtype=self.adapter_dtype)
        load_adapter_init(model, adapters, ranks, alphas)
        return model


# ---------------------------------------------------------------- training and scoring
@torch.no_grad()
def eval_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy (nats/token) over ``blocks`` [n, seq_len]."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size]
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    model.train(was)
    return total / count


def finetune(model: nn.Module, train: torch.Tensor, s: FinetuneSettings, val: torch.Tensor | None = None,
             on_eval: Callable[[int, float], bool] | None = None) -> tuple[list[float], int]:
    """Train the trainable parameters of ``model`` for ``s.steps`` steps on ``train`` [n, seq_len].

    Every ``s.eval_every`` steps (and at the end) the loss on ``val`` is passed to ``on_eval(step,
    loss)``; it returns True to stop. Returns (train losses, steps done).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr) if params else None
    gen = torch.Generator().manual_seed(s.seed)
    order = torch.cat([torch.randperm(len(train), generator=gen)
                       for _ in range(math.ceil(s.steps * s.batch_size / len(train)))])
    losses: list[float] = []
    model.train()
    for step in range(1, s.steps + 1):
        ids = train[order[(step - 1) * s.batch_size: step * s.batch_size]]
        loss = model(input_ids=ids, labels=ids).loss
        if opt is not None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if val is not None and on_eval is not None and (step % s.eval_every == 0 or step == s.steps):
            if on_eval(step, eval_loss(model, val, s.eval_batch)):
                return losses, step
    model.eval()
    return losses, s.steps


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
class ProxyRecord:
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _zero_step_score(c: Any) -> float:
    return c.proxy.kl if getattr(c, "proxy", None) is not None else c.objective


def rescore_with_finetune(problem: Any, candidates: Sequence[Any], model: nn.Module, train_blocks: torch.Tensor,
                          val_blocks: torch.Tensor, *, top_k: int, steps: int, seed: int = 0, lr: float = 3e-4,
                          batch_size: int = 1, eval_every: int | None = None, method: str = "nf",
                          block_size: int = 64, bank: LoftQBank | None = None,
                          pruner: optuna.pruners.BasePruner | None = None,
                          on_candidate: Callable[[ProxyRecord], None] | None = None) -> tuple[Any, list[dict]]:
    """Fine-tune ``top_k`` diverse candidates with adapters for ``steps`` LoRA steps each; pick the
    lowest val loss. The best candidate without any adapter (if there is one) competes too, scored
    by its val loss at step 0: fine-tuning it trains nothing, and a plan with adapters has to beat it.

    ``problem``: planner.search.study.SearchProblem (options, budget); ``candidates``: planner.search.study.Candidate
    (scored by ``proxy.kl`` if set, else by the additive objective); ``model``: the full-precision
    model (not modified). Returns (chosen candidate, records as dicts in run order).
    """
    if top_k < 1 or steps < 1:
        raise ValueError(f"top_k and steps must be >= 1, got top_k={top_k!r}, steps={steps!r}")
    adapters = [has_adapter(c, problem.table.options) for c in candidates]
    scores = [_zero_step_score(c) for c in candidates]
    train_idx = [i for i, a in enumerate(adapters) if a]
    picked = [train_idx[j] for j in select_diverse([candidates[i].choice for i in train_idx],
                                                    [scores[i] for i in train_idx], top_k)]
    frozen = [i for i, a in enumerate(adapters) if not a]
    if frozen:
        picked.append(min(frozen, key=lambda i: (scores[i], i)))
    settings = FinetuneSettings(steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                                eval_every=eval_every or max(1, steps // 4))
    bank = bank or LoftQBank(model, method, block_size)
    pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=steps // 2)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", pruner=pruner)
    records: list[ProxyRecord] = []
    for i in picked:
        cand = candidates[i]
        rec = _score_one(problem, cand, bank, train_blocks, val_blocks, settings, study)
        rec.kl = cand.proxy.kl if getattr(cand, "proxy", None) is not None else None
        records.append(rec)
        if on_candidate:
            on_candidate(rec)
    done = [j for j, r in enumerate(records) if r.feasible and not r.pruned and math.isfinite(r.loss)]
    best_j = min(done, key=lambda j: records[j].loss) if done else 0
    records[best_j].chosen = True
    return candidates[picked[best_j]], [r.to_dict() for r in records]


def _score_one(problem: Any, cand: Any, bank: LoftQBank, train: torch.Tensor, val: torch.Tensor,
               s: FinetuneSettings, study: optuna.Study) -> ProxyRecord:
    t0 = time.perf_counter()
    options = problem.table.options
    assignment = {t.name: options[k] for t, k in zip(problem.table.targets, cand.choice)}
    torch.manual_seed(s.seed)
    net = bank.build(assignment)
    if not any(p.requires_grad for p in net.parameters()):  # nothing to train: its step-0 loss is its score
        loss = eval_loss(net, val, s.eval_batch)
        del net
        return ProxyRecord(trial=cand.trial, objective=float(cand.objective), bytes=int(cand.bytes), loss=loss,
                           steps=0, feasible=int(cand.bytes) <= int(problem.budget), seconds=time.perf_counter() - t0)
    trial = study.ask()
    last = {"loss": math.nan, "pruned": False}

    def on_eval(step: int, loss: float) -> bool:
        last["loss"] = loss
        trial.report(loss, step)
        if step < s.steps and trial.should_prune():
            last["pruned"] = True
            return True
        return False

    _, done = finetune(net, train, s, val, on_eval)
    if last["pruned"]:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, last["loss"])
    del net
    return ProxyRecord(trial=cand.trial, objective=float(cand.objective), bytes=int(cand.bytes),
                       loss=float(last["loss"]), pruned=bool(last["pruned"]), steps=done,
                       feasible=int(cand.bytes) <= int(problem.budget), seconds=time.perf_counter() - t0)

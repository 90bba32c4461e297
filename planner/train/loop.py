"""The one LoRA training loop: the run's optimizer on the trainable parameters, next-token loss,
held-out loss.

``python -m planner finetune``, the fine-tune proxy (:mod:`planner.scoring.ftproxy`) and the quality
benchmark all train through :func:`train_lora` and measure with :func:`eval_loss`, so a proxy
candidate trains exactly as the user's fine-tune does: same optimizer (no weight decay), same
seeded batch order, same gradient clipping, batches moved to the model's device. The proxy's
pruning hooks in through ``on_eval``. No scheduler, no gradient accumulation, no mixed-precision
tricks: what runs is what the memory model describes (one micro-batch per step, the model's own
compute dtype).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from planner import progress
from planner.errors import PlannerError
from planner.options import option as _opt
from planner.settings import OPTIMIZERS
DEFAULT_LR = 3e-4
DEFAULT_GRAD_CLIP = 1.0


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of ``python -m planner finetune DIR`` (defaults and help defined once)."""

    steps: int = _opt(100, "optimizer steps")
    lr: float = _opt(DEFAULT_LR, "AdamW learning rate (constant, no warm-up)")
    batch_size: int | None = _opt(None, "sequences per step (default: the plan's run batch_size)", type=int)
    seq_len: int | None = _opt(None, "tokens per sequence (default: the plan's run seq_len)", type=int)
    eval_seqs: int = _opt(8, "held-out sequences (val split) for the held-out loss")
    eval_every: int | None = _opt(None, "held-out loss every N steps (default: only before and after)", type=int)
    grad_clip: float = _opt(DEFAULT_GRAD_CLIP, "max global gradient norm")
    seed: int = _opt(0, "seed of the batch order")
    data: str | None = _opt(None, "training text: a .txt or .jsonl file (default: Python's pydoc topics); the "
                            "train split trains, the val split is held out, the test split is never read")
    device: str | None = _opt(None, "where to train (default: cuda if available, else cpu)")

    def __post_init__(self) -> None:
        for name in ("steps", "eval_seqs", "batch_size", "seq_len", "eval_every"):
            value = getattr(self, name)
            if value is None and name in ("batch_size", "seq_len", "eval_every"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len!r}")
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class TrainResult:
    """``train_losses[i]``: mean next-token cross-entropy (nats) of step i+1's batch, before its update.
    ``eval_losses``: (step, held-out loss) pairs, step 0 = before training; ``final_eval_loss``: the
    held-out loss after the last step done (None without eval blocks); ``seconds``: wall time of the
    loop. When ``on_eval`` stopped training early, ``len(train_losses)`` is the number of steps done."""

    train_losses: tuple[float, ...]
    eval_losses: tuple[tuple[int, float], ...]
    final_eval_loss: float | None
    seconds: float

    def to_dict(self) -> dict:
        return {"train_losses": list(self.train_losses), "eval_losses": [list(e) for e in self.eval_losses],
                "final_eval_loss": self.final_eval_loss, "seconds": self.seconds}


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PlannerError("the model has no trainable parameters (a plan with rank 0 everywhere has no adapter)")
    return params


def make_optimizer(params: Iterable[nn.Parameter], name: str = "adamw", lr: float = DEFAULT_LR) -> torch.optim.Optimizer:
    """AdamW (torch), 8-bit / paged 8-bit AdamW (bitsandbytes), or plain SGD; no weight decay (LoRA
    adapters start at LoftQ's factors: decaying them pulls the model back towards the bare Q)."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name in ("adamw8bit", "paged_adamw8bit"):
        try:
            import bitsandbytes as bnb
        except Exception:
            raise PlannerError(f"optimizer {name} needs bitsandbytes: pip install bitsandbytes") from None
        cls = bnb.optim.PagedAdamW8bit if name.startswith("paged") else bnb.optim.AdamW8bit
        return cls(params, lr=lr, weight_decay=0.0)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {name!r}")


def _check_blocks(blocks: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.shape[0] < 1 or blocks.shape[1] < 2:
        shape = tuple(blocks.shape) if isinstance(blocks, torch.Tensor) else type(blocks).__name__
        raise ValueError(f"{what} must be a LongTensor [n_blocks >= 1, seq_len >= 2], got {shape}")
    return blocks.long()


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``ids`` [batch, seq] (labels = inputs, shifted by the model)."""
    out = model(input_ids=ids, labels=ids)
    if getattr(out, "loss", None) is None:
        raise PlannerError("the model returns no language-model loss: fine-tuning needs a causal LM")
    return out.loss


@torch.no_grad()
def eval_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 1) -> float:
    """Mean next-token cross-entropy in nats over every predicted token of ``blocks`` [n, seq_len]
    (each block predicts seq_len - 1 tokens). Runs in eval mode and restores the previous mode."""
    blocks = _check_blocks(blocks, "blocks")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    device, was_training = model_device(model), model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, blocks.shape[0], batch_size):
            ids = blocks[i:i + batch_size].to(device)
            n = ids.shape[0] * (ids.shape[1] - 1)
            total += float(_loss(model, ids).float()) * n
            count += n
    finally:
        model.train(was_training)
    return total / count


def batch_order(n_blocks: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless block indices, ``batch_size`` per step: a seeded permutation of the ``n_blocks``
    blocks, taken in order and redrawn when fewer than a batch remain (the rest is skipped)."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            order = torch.randperm(n_blocks, generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        yield idx


def _check_train_args(train_blocks: torch.Tensor, steps: int, lr: float, batch_size: int,
                      eval_every: int | None) -> torch.Tensor:
    train_blocks = _check_blocks(train_blocks, "train_blocks")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if batch_size < 1 or batch_size > train_blocks.shape[0]:
        raise ValueError(f"batch_size must be in [1, {train_blocks.shape[0]}] (the number of blocks), got {batch_size!r}")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be a positive integer or None, got {eval_every!r}")
    return train_blocks


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, params: list[nn.Parameter], ids: torch.Tensor,
                grad_clip: float | None, step: int) -> float:
    """One update on ``ids`` [batch, seq]; returns the batch's loss before the update."""
    loss = _loss(model, ids)
    value = float(loss.detach().float())
    if not math.isfinite(value):
        raise PlannerError(f"the training loss became {value} at step {step}; lower the learning rate")
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return value


def train_lora(model: nn.Module, train_blocks: torch.Tensor, *, steps: int, lr: float = DEFAULT_LR, batch_size: int = 1,
               seed: int = 0, eval_blocks: torch.Tensor | None = None, eval_every: int | None = None,
               grad_clip: float | None = DEFAULT_GRAD_CLIP, on_step: Callable[[int, float], None] | None = None,
               optimizer: str = "adamw", show_progress: bool = True, eval_batch_size: int | None = None,
               eval_at_start: bool = True, on_eval: Callable[[int, float], bool] | None = None) -> TrainResult:
    """Train the model's trainable parameters (the LoRA adapters) for ``steps`` steps.

    ``train_blocks``: LongTensor [n_blocks, seq_len]; each step takes ``batch_size`` blocks in the
    seeded order of :func:`batch_order`. ``eval_blocks`` [m, seq_len]: held-out loss (batches of
    ``eval_batch_size``, default ``batch_size``) at step 0 (unless ``eval_at_start`` is False), every
    ``eval_every`` steps (None: only at the start and the end) and after the last step.
    ``grad_clip``: max global grad norm (None: no clipping). ``on_step(step, loss)`` after each
    update; ``on_eval(step, held-out loss)`` after each evaluation, returning True to stop training
    there (the fine-tune proxy's pruner). A non-finite loss raises PlannerError naming the step.
    """
    train_blocks = _check_train_args(train_blocks, steps, lr, batch_size, eval_every)
    device, params = model_device(model), trainable_parameters(model)
    opt = make_optimizer(params, optimizer, lr)
    batches = batch_order(train_blocks.shape[0], batch_size, seed)
    losses: list[float] = []
    evals: list[tuple[int, float]] = []

    def evaluate(step: int) -> bool:
        evals.append((step, eval_loss(model, eval_blocks, eval_batch_size or batch_size)))
        return bool(on_eval(step, evals[-1][1])) if on_eval is not None else False

    stop = eval_blocks is not None and eval_at_start and evaluate(0)
    t0 = time.perf_counter()
    model.train()
    with progress.task("fine-tune steps", steps) if show_progress else _no_progress() as advance:
        for step in range(1, steps + 1):
            if stop:
                break
            losses.append(_train_step(model, opt, params, train_blocks[next(batches)].to(device), grad_clip, step))
            if eval_blocks is not None and (step == steps or (eval_every and step % eval_every == 0)):
                stop = evaluate(step)
            if on_step is not None:
                on_step(step, losses[-1])
            advance(1)
    final = evals[-1][1] if evals and evals[-1][0] == len(losses) else None
    return TrainResult(tuple(losses), tuple(evals), final, time.perf_counter() - t0)


@contextlib.contextmanager
def _no_progress() -> Iterator[Callable[[int], None]]:
    yield lambda n=1: None

"""Measured memory of a few training steps of a materialized model against the memory model.

CUDA: peak ``torch.cuda.max_memory_allocated`` from before loading to the end of N steps against
the estimate's allocated bytes, ``max_memory_reserved`` against allocated + allocator slack, and
the device memory in use (context included) against the total; target within ±5%.

CPU (no allocator statistics): each term is measured on its own. Backbone, non-target, adapter,
gradient and optimizer bytes are exact tensor byte counts; activations are what autograd saves
during one forward and loss (``torch.autograd.graph.saved_tensors_hooks``; unique storages that
are not parameters or buffers) against the estimate's activations + logits; the PEAK of live
tensor bytes of one more step, run through the plan's trainer (or ``trainer``), is measured by
:mod:`planner.verify.oracle` against the estimate's allocated bytes (checked, ±5%); the process RSS is
reported for information only.

The estimate is recomputed for the run as it actually happens (device, seq_len, batch): a plan
made for a GPU has bf16 activations, a CPU run fp32 ones. The backbone bytes do not depend on it
and are compared with the plan's own number.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from planner.train.loop import make_optimizer, trainable_parameters
from planner.artifact.layout import Artifact, read_artifact
from planner.devices import default_device
from planner.errors import PlannerError
from planner.files.paths import one_line
from planner.runtime.load import install_module, load, load_backbone
from planner.budget import format_bytes
from planner.memory import estimate, layer_bytes, unread_shared_input_bytes
from planner.artifact.plan import SCHEMA_VERSION, LayerPlan, Plan, SearchRecord, created_with
from planner.runtime.layers import QuantLinear, backbone_nbytes, configure_run
from planner.options import option as _opt
from planner.settings import TRAINERS, LayerChoice, RunSettings

log = logging.getLogger(__name__)
TOLERANCE = 0.05


@dataclass(frozen=True)
class Row:
    """One compared term. ``checked``: counts for the verdict (within ±TOLERANCE, or exact)."""

    term: str
    estimate: int | None
    measured: int | None
    checked: bool = False
    exact: bool = False
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if not self.estimate or self.measured is None:
            return None
        return self.measured / self.estimate

    @property
    def ok(self) -> bool | None:
        if not self.checked or self.measured is None or self.estimate is None:
            return None
        if self.exact:
            return self.measured == self.estimate
        return self.ratio is not None and abs(self.ratio - 1.0) <= TOLERANCE

    def to_dict(self) -> dict[str, Any]:
        return {"term": self.term, "estimate": self.estimate, "measured": self.measured, "ratio": self.ratio,
                "checked": self.checked, "ok": self.ok, "note": self.note}


@dataclass(frozen=True)
class VerifyReport:
    device: str
    steps: int
    run: dict[str, Any]
    rows: tuple[Row, ...]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(r.ok is not False for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "steps": self.steps, "run": self.run, "ok": self.ok,
                "tolerance": TOLERANCE, "rows": [r.to_dict() for r in self.rows], "info": self.info}


# ---------------------------------------------------------------- estimates from a plan
def targets_of(config: Any, names: Sequence[str]) -> list[Any]:
    """TargetLayers for ``names`` from a transformers config (meta skeleton, no weights)."""
    from search_spaces.discovery import find_targets

    from planner.sources import meta_skeleton

    return find_targets(meta_skeleton(config), target_modules=[re.escape(n) for n in names], include_head=True)


def choices_of(plan: Plan) -> dict[str, LayerChoice]:
    return {layer.name: LayerChoice.from_spec(layer.spec, layer.rank, layer.block_size) for layer in plan.layers}


def _facts_targets(art: Artifact) -> tuple[Any, list[Any]]:
    """Shape facts and target layers of the artifact's model, from its config (no weights)."""
    config = _config(art)
    return facts_of(art, config), targets_of(config, [layer.name for layer in art.plan.layers])


def _config(art: Artifact) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(art.backbone))
    except Exception as err:  # an edited or corrupt config.json: one line
        raise PlannerError(f"{art.backbone / 'config.json'}: unreadable ({type(err).__name__}: {one_line(err)})") from None


def facts_of(art: Artifact, config: Any = None) -> Any:
    """The shape facts of a materialized model (its max positions, for one), from its config."""
    from search_spaces.discovery import facts_from_config

    return facts_from_config(config if config is not None else _config(art))


# ---------------------------------------------------------------- measuring
def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def non_target_nbytes(model: nn.Module) -> tuple[int, int]:
    """(bytes, parameter count) outside the target weights and adapters: parameters that are not
    LoRA weights, plus the biases QuantLinear keeps as buffers."""
    params = [p for n, p in model.named_parameters() if "lora_" not in n]
    biases = [m.bias for m in model.modules() if isinstance(m, QuantLinear) and m.bias is not None]
    return _nbytes(params + biases), sum(t.numel() for t in params + biases)


def _saved_activation_bytes(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Loss of one forward, and the bytes / count of the unique non-parameter storages autograd saved."""
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    return loss, sum(seen.values()), count


def _rss() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def verify(path: str | Path, *, steps: int = 3, device: str | torch.device | None = None,
           seq_len: int | None = None, batch_size: int | None = None, seed: int = 0,
           trainer: str | None = None) -> VerifyReport:
    """Load DIR, run ``steps`` training steps on random tokens (memory does not depend on the values)
    with the plan's optimizer and run settings, and compare measured bytes with the estimate. On CPU
    two more steps run through ``trainer`` (default: the plan's; ``other`` runs the planner's loop)
    and the second one's peak is compared with the estimate's allocated bytes."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    art = read_artifact(path)
    dev = torch.device(device) if device is not None else default_device()
    run = dataclasses.replace(art.run, device="cuda" if dev.type == "cuda" else "cpu",
                              seq_len=seq_len or art.run.seq_len, batch_size=batch_size or art.run.batch_size,
                              mode="finetune", trainer=trainer or art.run.trainer)
    facts, targets = _facts_targets(art)
    try:  # a hand-edited seq_len would allocate for a context the model does not have
        run.check_model(facts, str(art.path))
    except ValueError as err:
        raise PlannerError(f"{path}: {err}") from None
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base_alloc = torch.cuda.memory_allocated(dev)
        free0, _ = torch.cuda.mem_get_info(dev)
    rss0 = _rss()
    model = load(path, dev)
    configure_run(model, run)
    n_nt_bytes, n_nt = non_target_nbytes(model)
    choices = choices_of(art.plan)
    est = estimate(facts, targets, choices, run, n_nt)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (run.batch_size, run.seq_len), generator=gen).to(dev)
    params = trainable_parameters(model)
    opt = make_optimizer(params, run.optimizer, 1e-4)
    model.train()
    t0 = time.perf_counter()
    saved = count = 0
    grads = 0
    for step in range(steps):
        if step == 0:
            loss, saved, count = _saved_activation_bytes(model, ids)
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = _nbytes(p.grad for p in params if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    opt_bytes = _nbytes(v for s in opt.state.values() for k, v in s.items()
                        if isinstance(v, torch.Tensor) and k != "step")
    b = est.breakdown
    rows = [
        Row("backbone", art.plan.estimate.breakdown.get("backbone"), backbone_nbytes(model), True, True,
            "plan's estimate; resident QuantLinear codes + constants"),
        Row("non_target", b.get("non_target"), n_nt_bytes, True, True),
        Row("adapters", b.get("adapters"), _nbytes(params), True, True),
        Row("adapter_grads", b.get("adapter_grads"), grads, True, True),
        Row("optimizer", b.get("optimizer"), opt_bytes, True, True, f"{run.optimizer} states"),
    ]
    info: dict[str, Any] = {"seconds": round(seconds, 3), "plan_total_bytes": art.plan.total_bytes,
                            "estimate": est.to_dict(), "saved_tensors": count, "loss": float(loss.detach())}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        free1, _ = torch.cuda.mem_get_info(dev)
        rows += [Row("allocated (peak)", est.allocated_bytes, torch.cuda.max_memory_allocated(dev) - base_alloc, True,
                     note="torch.cuda.max_memory_allocated"),
                 Row("reserved (peak)", est.allocated_bytes + est.reserve_bytes - run.reserve_context_bytes,
                     torch.cuda.max_memory_reserved(dev), note="max_memory_reserved vs allocated + slack"),
                 Row("device in use", est.total_bytes, free0 - free1 + torch.cuda.memory_reserved(dev),
                     note="after the run; includes the CUDA context only if this process created it here")]
    else:
        slack = unread_shared_input_bytes(facts, targets, choices, run)
        from planner.verify.oracle import measure_step

        peak = measure_step(model, ids, run, trainer="finetune" if run.trainer == "other" else run.trainer)
        info["oracle"] = peak.to_dict()
        rows += [Row("allocated (peak)", est.allocated_bytes, peak.peak_bytes, True,
                     note=f"most live tensor bytes of one {run.trainer} step (planner.verify.oracle)")]
        rows += [Row("activations (saved)", b.get("activations", 0) + b.get("logits", 0) - slack, saved, True,
                     note="autograd saved tensors of one forward vs activations + logits"
                          + (f", less {format_bytes(slack)} of normed inputs no adapter reads (the plan "
                             "counts them in every block, on the safe side)" if slack else "")),
                 Row("transient", b.get("transient"), None, note="in the peak above")]
    rss1 = _rss()
    if rss0 is not None and rss1 is not None:
        info["rss_bytes"] = {"before_load": rss0, "after_steps": rss1, "growth": rss1 - rss0}
    return VerifyReport(str(dev), steps, run.to_dict(), tuple(rows), info)


def load_dense(path: str | Path, dtype: torch.dtype = torch.float32, *, with_adapter: bool = True) -> nn.Module:
    """Reference: the stock transformers model with every target weight dequantized (plain nn.Linear)
    and, if ``with_adapter``, the adapter folder read by ``PeftModel.from_pretrained`` (CPU, eval).
    Its forward is what :func:`load` computes, up to float rounding."""
    art = read_artifact(path)
    base = load_backbone(path, "cpu", torch.float32)
    for meta in art.meta.layers:
        layer = base.get_submodule(meta.name)
        dense = nn.Linear(meta.shape[1], meta.shape[0], bias=layer.bias is not None, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(layer.dense_weight(torch.float32))
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        dense.requires_grad_(False)
        install_module(base, meta.name, dense)
    base.to(dtype)
    if not with_adapter or art.adapter is None:
        return base
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(art.adapter)).eval()


@dataclass(frozen=True)
class VerifyConfig:
    """Options of ``python -m planner verify DIR``: a few training steps measured against the plan."""

    steps: int = _opt(3, "training steps to measure")
    device: str | None = _opt(None, "where to run (default: cuda if available, else cpu)")
    seq_len: int | None = _opt(None, "tokens per sequence (default: the plan's run seq_len)", type=int)
    batch_size: int | None = _opt(None, "sequences per step (default: the plan's run batch_size)", type=int)
    trainer: str | None = _opt(None, "on CPU, measure the peak of a step run through this trainer (default: the "
                               "plan's run setting)", choices=TRAINERS)

    def __post_init__(self) -> None:
        if self.trainer is not None and self.trainer not in TRAINERS:
            raise ValueError(f"trainer must be one of {', '.join(TRAINERS)}; got {self.trainer!r}")
        for name in ("steps", "seq_len", "batch_size"):
            value = getattr(self, name)
            if value is None and name != "steps":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.seq_len is not None and self.seq_len < 2:  # next-token loss needs two tokens
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len!r}")

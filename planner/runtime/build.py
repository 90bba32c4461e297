"""The one builder: a layer's choice + its weight (+ input moments) -> the stored weight and its
adapter's initial factors (:func:`build_layer`), and a model assembled from such layers
(:func:`assemble`).

materialize builds every layer here and writes what it returns; ``planner.load`` reads those files
back into the same :class:`LayerBuild` and assembles them here; the in-memory LoftQ model
(:func:`planner.runtime.lora.build_loftq_model`) does both in one go; the fine-tune proxy's
candidates take their layers from the weight bank (:meth:`planner.scoring.bank.WeightBank.layer`,
the same LoftQ at iters = 1, computed once per (layer, width)) and assemble them here. So the
model a plan is scored with, the one it is built into and the one that is loaded are one model.

Adapters are kept in PEFT's convention: ``lora_B @ lora_A * alpha / r`` is LoftQ's ``B A``, so
``lora_A = A / (alpha / r)`` (:func:`peft_pair`). A 16-bit layer with a rank gets PEFT's default
initialisation (A Kaiming-uniform, seeded by the layer's name; B = 0): plain LoRA.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from loftq import loftq
from loftq.formats import Quantized

from planner.runtime.layers import add_lora, swap_linears
from planner.settings import LayerChoice


@dataclass
class LayerBuild:
    """One built layer. ``stored``: what its QuantLinear holds (a format's tensor, or the 16-bit
    weight); ``lora``: PEFT's (lora_A [r, in], lora_B [out, r]), None without a rank; ``residual``:
    the relative residual LoftQ reached (in the data-aware norm when built with moments)."""

    stored: Quantized | torch.Tensor
    lora: tuple[torch.Tensor, torch.Tensor] | None
    residual: float = 0.0
    best_iter: int = 0
    errors: list[float] = field(default_factory=list)
    rank: int | None = None  # with ``lora`` None: an adapter of this rank left at PEFT's own init (torch's RNG)

    @property
    def adapter_rank(self) -> int:
        return int(self.lora[0].shape[0]) if self.lora is not None else int(self.rank or 0)


def peft_pair(a: torch.Tensor, b: torch.Tensor, rank: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LoftQ's (A [r, in], B [out, r]) as PEFT's (lora_A, lora_B): A divided by the scaling alpha / r."""
    return (a / (alpha / rank)).contiguous(), b.contiguous()


def default_lora(name: str, shape: tuple[int, int], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's default init (A Kaiming-uniform on [r, in], B = 0), seeded by the layer's name so that
    every build of it is the same."""
    out_f, in_f = shape
    gen = torch.Generator().manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)) on [r, in]
    a = (torch.rand(rank, in_f, generator=gen) * 2 - 1) * bound
    return a, torch.zeros(out_f, rank)


def build_layer(name: str, weight: torch.Tensor, choice: LayerChoice, *, alpha: float | None = None, iters: int = 1,
                svd: str = "exact", moment: torch.Tensor | None = None, damp: float = 0.01,
                rounding: str = "nearest", device: torch.device | str | None = None,
                keep_dtype: torch.dtype = torch.bfloat16) -> LayerBuild:
    """LoftQ one layer [out, in] at ``choice`` (T = ``iters`` alternating steps, the best iterate kept;
    ``moment``: the layer's input second moment for the data-aware fit, and with ``rounding``
    "feedback" Q by error feedback where the format can); a 16-bit keep is stored in ``keep_dtype``.
    Runs on ``device`` (default: the weight's); the result is on the CPU."""
    spec, rank = choice.spec, choice.rank
    alpha = float(rank if alpha is None else alpha)
    if spec is None:
        stored = weight.to(keep_dtype)
        residual = float((weight.float() - stored.float()).norm() / weight.float().norm().clamp(min=1e-30))
        lora = peft_pair(*default_lora(name, tuple(weight.shape), rank), rank, alpha) if rank else None
        return LayerBuild(stored.cpu(), lora, residual, 0, [residual])
    w = weight.to(device) if device is not None else weight
    if rounding == "feedback" and not spec.feedback_applies(tuple(w.shape)):
        rounding = "nearest"  # feedback rounds whole blocks of input columns: nearest here
    extra = {} if moment is None else {"calibration": moment.to(w.device), "damp": damp, "rounding": rounding}
    res = loftq(w, spec, rank, iters=iters, svd=svd, **extra)
    errors = res.weighted_errors if moment is not None else res.errors
    lora = peft_pair(res.lora_a.cpu(), res.lora_b.cpu(), rank, alpha) if rank else None
    return LayerBuild(res.quantized.to("cpu"), lora, errors[res.best_iter - 1], res.best_iter, list(errors))


def assemble(model: nn.Module, layers: Mapping[str, LayerBuild], alphas: Mapping[str, float] | None = None, *,
             compute_dtype: torch.dtype = torch.float32, adapter_dtype: torch.dtype | None = None,
             dropout: float = 0.0, device: torch.device | str | None = None) -> nn.Module:
    """Install ``layers`` in ``model`` (modified in place: a copy is the caller's choice): every one
    becomes a frozen QuantLinear, and the ranked ones get a PEFT LoRA adapter holding its ``lora``
    (alpha ``alphas[name]``, default the rank; a layer with a ``rank`` and no ``lora`` keeps PEFT's
    own initialisation). Without any rank the model comes back with every
    parameter frozen (nothing to train); otherwise as a PeftModel with only the adapters trainable."""
    swap_linears(model, {n: b.stored for n, b in layers.items()}, compute_dtype)
    if device is not None:
        model.to(device)
    ranks = {n: b.adapter_rank for n, b in layers.items() if b.adapter_rank}
    if not ranks:
        model.requires_grad_(False)
        return model
    alphas = {n: float((alphas or {}).get(n, r)) for n, r in ranks.items()}
    model = add_lora(model, ranks, alphas, dropout=dropout, adapter_dtype=adapter_dtype or compute_dtype)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in ranks:
            if layers[name].lora is None:
                continue  # PEFT's own init, drawn by add_lora
            mod = modules[f"base_model.model.{name}"]
            lora_a, lora_b = layers[name].lora
            mod.lora_A["default"].weight.copy_(lora_a)
            mod.lora_B["default"].weight.copy_(lora_b)
    return model

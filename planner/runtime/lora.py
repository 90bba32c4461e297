"""Build a trainable LoftQ model in memory from per-layer (bits, rank) choices.

For every target layer: LoftQ at its (bits, rank, iters) gives Q, A, B; the layer becomes a
frozen :class:`planner.runtime.layers.QuantLinear` holding Q, and a PEFT LoRA adapter of that rank is
initialised so that the model at step 0 computes deq(Q) + B A (PEFT scales lora_B @ lora_A by
alpha / r, so A is divided by that scaling). Used by materialize and by the fine-tune proxies.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from loftq import loftq

from planner import progress
from planner.runtime.layers import add_lora, linear_weight, resolve_compute_dtype, swap_linears


@dataclass(frozen=True)
class LayerSpec:
    """What one layer gets. bits 16 = kept in 16 bits (rank may still be > 0: plain LoRA)."""

    bits: int
    rank: int
    alpha: float | None = None  # None: alpha = rank (scaling 1)
    method: str = "nf"
    block_size: int = 64
    iters: int = 1
    double_quant: bool = False


@dataclass
class Built:
    model: nn.Module  # PeftModel (or the bare quantized model when no layer has a rank)
    residuals: dict[str, float]  # relative ||W - deq(Q) - BA|| / ||W|| reached per layer
    best_iters: dict[str, int]
    quantized: dict[str, object]  # name -> QuantizedTensor (or 16-bit tensor) as stored
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (lora_A [r, in], lora_B [out, r])


def build_loftq_model(base: nn.Module, layers: Mapping[str, LayerSpec], *, compute_dtype: torch.dtype | None = None,
                      adapter_dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                      copy_base: bool = True, show_progress: bool = True) -> Built:
    """``base``: a full-precision HF model holding the original weights (deep-copied unless
    ``copy_base`` is False). LoftQ runs on ``device`` (default: the weights' device)."""
    model = copy.deepcopy(base) if copy_base else base
    compute_dtype = compute_dtype or resolve_compute_dtype("auto", device)
    adapter_dtype = adapter_dtype or compute_dtype
    stored: dict[str, object] = {}
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    residuals: dict[str, float] = {}
    best: dict[str, int] = {}
    task = progress.task("LoftQ layers", len(layers)) if show_progress else None
    advance = task.__enter__() if task else (lambda n=1: None)
    try:
        for name, spec in layers.items():
            w = linear_weight(model.get_submodule(name)).detach()
            w = w.to(device) if device is not None else w
            if spec.bits >= 16:
                stored[name] = w.to(compute_dtype if compute_dtype != torch.float32 else torch.bfloat16).cpu()
                residuals[name], best[name] = 0.0, 0
                if spec.rank:  # plain LoRA on a kept layer: standard init (A random, B zero)
                    adapters[name] = None  # type: ignore[assignment]
            else:
                res = loftq(w, spec.bits, spec.rank, iters=spec.iters, method=spec.method,
                            block_size=spec.block_size, double_quant=spec.double_quant)
                stored[name] = res.quantized.to("cpu")
                residuals[name], best[name] = res.error, res.best_iter
                if spec.rank:
                    adapters[name] = (res.lora_a.cpu(), res.lora_b.cpu())
            advance(1)
    finally:
        if task:
            task.__exit__(None, None, None)
    swap_linears(model, stored, compute_dtype)
    ranks = {n: s.rank for n, s in layers.items()}
    alphas = {n: float(s.alpha if s.alpha is not None else s.rank) for n, s in layers.items() if s.rank}
    if any(ranks.values()):
        model = add_lora(model, ranks, alphas, adapter_dtype=adapter_dtype)
        load_adapter_init(model, adapters, ranks, alphas)
    return Built(model, residuals, best, stored, {k: v for k, v in adapters.items() if v is not None})


def load_adapter_init(model: nn.Module, adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor] | None],
                      ranks: Mapping[str, int], alphas: Mapping[str, float]) -> None:
    """Copy LoftQ's (A, B) into the PEFT adapters, undoing PEFT's alpha / r scaling on A."""
    modules = dict(model.named_modules())
    for name, ab in adapters.items():
        if ab is None:
            continue
        a, b = ab
        peft_name = next((k for k in (f"base_model.model.{name}", name) if k in modules), None)
        if peft_name is None:
            raise KeyError(f"no LoRA module for {name}")
        mod = modules[peft_name]
        scaling = alphas[name] / ranks[name]
        with torch.no_grad():
            mod.lora_A["default"].weight.copy_(a / scaling)
            mod.lora_B["default"].weight.copy_(b)

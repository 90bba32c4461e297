"""Build a trainable LoftQ model in memory from per-layer (bits, rank) choices.

For every target layer the one builder (:mod:`planner.runtime.build`) runs LoftQ at its (bits,
rank, iters) and gives Q and PEFT's (lora_A, lora_B); the layer becomes a frozen
:class:`planner.runtime.layers.QuantLinear` holding Q with a LoRA adapter of that rank, so the model
at step 0 computes deq(Q) + B A: what materialize writes and ``planner.load`` reads back.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from planner import progress
from planner.runtime.build import LayerBuild, assemble, build_layer
from planner.runtime.layers import linear_weight, resolve_compute_dtype
from planner.settings import LayerChoice


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

    @property
    def choice(self) -> LayerChoice:
        return LayerChoice(self.bits, self.rank, self.method, self.block_size, self.double_quant)


@dataclass
class Built:
    model: nn.Module  # PeftModel (or the bare quantized model when no layer has a rank)
    layers: dict[str, LayerBuild]  # per layer: what is stored, PEFT's adapter init, the residual reached

    @property
    def residuals(self) -> dict[str, float]:
        return {n: b.residual for n, b in self.layers.items()}


def build_loftq_model(base: nn.Module, layers: Mapping[str, LayerSpec], *, compute_dtype: torch.dtype | None = None,
                      adapter_dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                      copy_base: bool = True, show_progress: bool = True) -> Built:
    """``base``: a full-precision HF model holding the original weights (deep-copied unless
    ``copy_base`` is False). LoftQ runs on ``device`` (default: the weights' device)."""
    model = copy.deepcopy(base) if copy_base else base
    compute_dtype = compute_dtype or resolve_compute_dtype("auto", device)
    keep = compute_dtype if compute_dtype != torch.float32 else torch.bfloat16
    built: dict[str, LayerBuild] = {}
    with progress.task("LoftQ layers", len(layers), enabled=show_progress) as advance:
        for name, spec in layers.items():
            w = linear_weight(model.get_submodule(name)).detach()
            built[name] = build_layer(name, w, spec.choice, alpha=spec.alpha, iters=spec.iters, device=device,
                                      keep_dtype=keep)
            advance(1)
    alphas = {n: float(s.alpha if s.alpha is not None else s.rank) for n, s in layers.items() if s.rank}
    model = assemble(model, built, alphas, compute_dtype=compute_dtype, adapter_dtype=adapter_dtype)
    return Built(model, built)

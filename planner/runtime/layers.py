"""Frozen quantized linear layers, the model surgery that installs them, and PEFT LoRA on top.

A :class:`QuantLinear` holds only what its format stores (:meth:`loftq.formats.Quantized.tensors`:
``qweight`` and the constants) as buffers, so its resident bytes are exactly the stored tensor's
``nbytes``; a 16-bit "keep" layer holds its weight in a 16-bit dtype. Forward dequantizes to the
compute dtype and multiplies; backward dequantizes again (:class:`_DequantLinear`) so autograd never
keeps a weight-sized tensor. How a stored weight decodes (chunked, on CPU or CUDA, with bitsandbytes'
kernel for NF4 on CUDA, GGUF types bit-exact with llama.cpp) is its format's business.
"""
from __future__ import annotations

import logging
import re
from functools import lru_cache
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from loftq.formats import Quantized, Spec

from search_spaces.discovery import is_linear_like, weight_out_in

from planner.devices import resolve_device
from planner.settings import LayerChoice, RunSettings

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_compute_dtype(name: str = "auto", device: torch.device | str | None = None) -> torch.dtype:
    """``auto``: bf16 on a CUDA GPU that supports it, fp16 on one that does not, fp32 on CPU."""
    if name != "auto":
        try:
            return _DTYPES[name]
        except KeyError:
            raise ValueError(f"compute dtype must be auto, {', '.join(_DTYPES)}; got {name!r}") from None
    dev = resolve_device(device)
    if dev.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---------------------------------------------------------------- the layer
class _DequantLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W rebuilt from codes in forward AND backward: nothing weight-sized is saved.

    x: [..., in] in the compute dtype; returns [..., out]. The weight is frozen and the bias is a
    buffer, so only the input gradient is computed: dx = dy W.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantLinear") -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return F.linear(x, layer.dense_weight(x.dtype), layer.bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out @ ctx.layer.dense_weight(grad_out.dtype), None


class QuantLinear(nn.Module):
    """A frozen linear layer stored in a quantizer format (:mod:`loftq.formats`), or as a 16-bit
    weight (``spec`` None, ``bits`` 16).

    Buffers: the format's tensors under their own names (``qweight`` and its constants; for a keep,
    ``qweight`` is the 16-bit weight [out, in]), and ``bias`` [out] in the compute dtype if any.
    """

    def __init__(self, weight: Quantized | torch.Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.compute_dtype = compute_dtype
        if isinstance(weight, torch.Tensor):  # a 16-bit keep
            if weight.dim() != 2 or weight.element_size() != 2 or not weight.is_floating_point():
                raise ValueError(f"a kept weight must be a 2-D 16-bit float tensor, got {weight.dtype} {tuple(weight.shape)}")
            self.spec: Spec | None = None
            self.weight_dtype = weight.dtype
            self._names: tuple[str, ...] = ("qweight",)
            self.register_buffer("qweight", weight.detach())
        else:
            if len(weight.shape) != 2:
                raise ValueError(f"a linear weight must be 2-D (out, in), got shape {weight.shape}")
            self.spec, self.weight_dtype = weight.spec, weight.dtype
            stored = weight.tensors()
            self._names = tuple(stored)
            for name, t in stored.items():
                self.register_buffer(name, t)
        shape = tuple(weight.shape)
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match out_features={self.out_features}")
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype))

    @property
    def bits(self) -> int:
        return 16 if self.spec is None else self.spec.bits

    def quantized(self) -> Quantized:
        """The stored weight in its format (views of the buffers, no copy)."""
        if self.spec is None:
            raise ValueError("a 16-bit keep layer has no quantized weight")
        return self.spec.restore({n: getattr(self, n) for n in self._names}, (self.out_features, self.in_features),
                                 self.weight_dtype)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [out, in] weight in ``dtype`` (default: compute dtype), rebuilt from the buffers."""
        dtype = dtype or self.compute_dtype
        if self.spec is None:
            return self.qweight.to(dtype)
        return self.quantized().dequantize(dtype)

    @property
    def code_nbytes(self) -> int:
        """Bytes of the stored weight (the format's tensors, or the 16-bit weight)."""
        return sum(t.numel() * t.element_size() for n in self._names if (t := getattr(self, n, None)) is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantLinear.apply(x.to(self.compute_dtype), self)

    def extra_repr(self) -> str:
        kind = "keep16" if self.spec is None else self.spec.name
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}, bias={self.bias is not None}"


# ---------------------------------------------------------------- model surgery
def linear_weight(mod: nn.Module) -> torch.Tensor:
    """(out, in) weight of an nn.Linear or of transformers' Conv1D (stored (in, out))."""
    return weight_out_in(mod).detach()


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


def swap_linears(model: nn.Module, weights: Mapping[str, Quantized | torch.Tensor | None],
                 compute_dtype: torch.dtype | None = None, keep_dtype: torch.dtype | None = None) -> dict[str, QuantLinear]:
    """Replace the named nn.Linear / Conv1D modules in place by :class:`QuantLinear`.

    ``weights[name]``: a stored weight of shape (out, in) (:class:`loftq.formats.Quantized`); a 16-bit
    tensor to keep; or None to keep the module's own weight in ``keep_dtype`` (default: the compute
    dtype if 16-bit, else bf16).
    The original dense weight is dropped. Returns the new layers by name.
    """
    compute_dtype = compute_dtype or resolve_compute_dtype("auto")
    keep_dtype = keep_dtype or (compute_dtype if compute_dtype != torch.float32 else torch.bfloat16)
    new: dict[str, QuantLinear] = {}
    for name, w in weights.items():
        mod = model.get_submodule(name)
        if not is_linear_like(mod):
            raise ValueError(f"{name} is a {type(mod).__name__}, not an nn.Linear or Conv1D")
        dense = linear_weight(mod)
        shape = tuple(w.shape) if w is not None else tuple(dense.shape)
        if shape != tuple(dense.shape):
            raise ValueError(f"{name}: weight shape {shape} does not match the module's (out, in) {tuple(dense.shape)}")
        if w is None:
            w = dense.to(keep_dtype).contiguous()
        elif isinstance(w, torch.Tensor):
            w = w.detach().to(keep_dtype).contiguous()
        layer = QuantLinear(w, getattr(mod, "bias", None), compute_dtype)
        device = dense.device if not dense.is_meta else w.device
        _set_module(model, name, layer.to(device))  # a meta weight: a shell model awaiting its targets
        new[name] = layer
    return new


def quantize_model(model: nn.Module, choices: Mapping[str, LayerChoice],
                   compute_dtype: torch.dtype | None = None) -> dict[str, QuantLinear]:
    """Quantize each named layer at its choice (plain quantization, no LoftQ) and swap it in."""
    weights: dict[str, Quantized | None] = {}
    for name, choice in choices.items():
        spec = choice.spec
        weights[name] = None if spec is None else spec.quantize(linear_weight(model.get_submodule(name)))
    return swap_linears(model, weights, compute_dtype)


def backbone_nbytes(model: nn.Module) -> int:
    """Resident bytes of every QuantLinear's stored weight (codes + constants or 16-bit weight)."""
    return sum(m.code_nbytes for m in model.modules() if isinstance(m, QuantLinear))


# ---------------------------------------------------------------- LoRA on top (PEFT)
@lru_cache(maxsize=None)
def _lora_class() -> type:
    from peft.tuners.lora.layer import Linear as LoraLinear

    class QuantLoraLinear(LoraLinear):
        """PEFT's LoRA Linear around a QuantLinear; merging into packed codes is not supported."""

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        def merge(self, *args, **kwargs) -> None:
            raise NotImplementedError("cannot merge LoRA weights into a packed quantized layer")

    return QuantLoraLinear


def add_lora(model: nn.Module, ranks: Mapping[str, int], alphas: Mapping[str, float] | None = None, *,
             dropout: float = 0.0, adapter_dtype: torch.dtype = torch.float32,
             init_lora_weights: bool | str = True) -> nn.Module:
    """Wrap ``model`` with PEFT LoRA: one adapter of ``ranks[name]`` per named module (rank 0 = none),
    alpha ``alphas[name]`` (default: the rank, scaling 1). Adapters are trainable in ``adapter_dtype``;
    every other parameter is frozen. Returns the PeftModel.
    """
    from peft import LoraConfig, get_peft_model

    active = {n: int(r) for n, r in ranks.items() if r > 0}
    if not active:
        raise ValueError("no layer has a rank > 0: nothing to wrap with LoRA")
    alphas = {n: float(alphas[n]) if alphas and n in alphas else float(r) for n, r in active.items()}
    config = LoraConfig(
        target_modules=sorted(active), r=max(active.values()), lora_alpha=max(active.values()),
        rank_pattern={re.escape(n): r for n, r in active.items()},
        alpha_pattern={re.escape(n): a for n, a in alphas.items()},
        lora_dropout=dropout, bias="none", init_lora_weights=init_lora_weights)
    config._register_custom_module({QuantLinear: _lora_class()})
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    for name, p in peft_model.named_parameters():
        is_adapter = "lora_" in name
        if is_adapter and p.dtype != adapter_dtype:
            p.data = p.data.to(adapter_dtype)
        p.requires_grad_(is_adapter)
    return peft_model


def configure_run(model: nn.Module, run: RunSettings) -> None:
    """Apply a run's attention kernel, gradient checkpointing (non-reentrant) and cache setting."""
    model.set_attn_implementation(run.attn_implementation)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers 5 renamed gradient_* to activation_checkpointing_*; older versions have only the former
    kwargs = {"use_reentrant": False}
    if run.gradient_checkpointing and run.finetune:
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()
    if hasattr(base.config, "use_cache"):
        base.config.use_cache = not run.finetune

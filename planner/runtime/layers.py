"""Frozen quantized linear layers, the model surgery that installs them, and PEFT LoRA on top.

A :class:`QuantLinear` holds only what :class:`loftq.QuantizedTensor` stores (packed codes and
constants) as buffers, so its resident bytes are exactly ``QuantizedTensor.nbytes``; a 16-bit
"keep" layer holds its weight in a 16-bit dtype. Forward dequantizes to the compute dtype and
multiplies; backward dequantizes again (:class:`_DequantLinear`) so autograd never keeps a
weight-sized tensor. Dequantization backends live in a registry: bitsandbytes' kernel for NF4 on
CUDA (it consumes our codes bit-exactly), chunked torch for everything else. A layer in a GGUF block
format (:class:`loftq.GGUFTensor`) holds that format's tensor data and decodes it with
:func:`loftq.gguf_quants.decode` (bit-exact with llama.cpp), row chunk by row chunk.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from loftq import GGUF_TYPES, GGUFTensor, QuantConfig, QuantizedTensor, Registry, dequantize, quantize, stored_absmax
from loftq.gguf_quants import decode as gguf_decode
from loftq.bnb import bnb_quant_state

from search_spaces.discovery import is_conv1d, is_linear_like, weight_out_in

from planner.devices import resolve_device
from planner.settings import LayerChoice, RunSettings

log = logging.getLogger(__name__)

CHUNK = 1 << 22  # weights dequantized per torch step: bounds the temporaries (~25 bytes each)
_CONSTANT_NAMES = ("absmax", "absmax_codes", "absmax_scale", "absmax_offset")
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


# ---------------------------------------------------------------- dequantization backends
@dataclass(frozen=True)
class Dequantizer:
    """A way to turn a QuantizedTensor into a dense [out, in] weight; the first that accepts wins."""

    name: str
    accepts: Callable[[QuantizedTensor], bool]
    run: Callable[[QuantizedTensor, torch.dtype], torch.Tensor]


DEQUANTIZERS: Registry[Dequantizer] = Registry("dequantization backend")
_ORDER: list[str] = []


def _register(d: Dequantizer) -> None:
    DEQUANTIZERS.add(d.name, d)
    _ORDER.append(d.name)


@lru_cache(maxsize=None)
def _bnb_available() -> bool:
    try:
        import bitsandbytes.functional  # noqa: F401
    except Exception:  # bnb raises various errors when its native library is missing
        return False
    return True


def dequantize_bnb(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """NF4 codes -> [out, in] in ``dtype`` with bitsandbytes' kernel (CUDA; its CPU op works too)."""
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(qt.packed.view(-1, 1), bnb_quant_state(qt, dtype)).view(qt.shape)


def dequantize_chunked(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """Same numbers as :func:`loftq.dequantize`, written block-aligned chunk by chunk into one
    [out, in] tensor so the fp32/int64 temporaries stay ~``CHUNK`` elements instead of weight-sized."""
    if qt.numel <= CHUNK:
        return dequantize(qt, dtype)
    absmax = stored_absmax(qt)
    flat_cfg = replace(qt.config, double_quant=False)
    step = max(1, CHUNK // qt.block) * qt.block
    out = torch.empty(qt.numel, dtype=dtype, device=qt.packed.device)
    bits = qt.config.bits
    for start in range(0, qt.numel, step):
        stop = min(qt.numel, start + step)
        part = QuantizedTensor(qt.packed[start * bits // 8: -(-stop * bits // 8)], (stop - start,), dtype,
                               flat_cfg, absmax=absmax[start // qt.block: -(-stop // qt.block)], block=qt.block)
        out[start:stop] = dequantize(part, dtype)
    return out.view(qt.shape)


_register(Dequantizer("bnb-nf4", lambda qt: (qt.packed.is_cuda and qt.config.method == "nf" and qt.config.bits == 4
                                             and _bnb_available()), dequantize_bnb))
_register(Dequantizer("torch", lambda qt: True, dequantize_chunked))


def dequantize_gguf(data: torch.Tensor, qtype: str, dtype: torch.dtype) -> torch.Tensor:
    """GGUF tensor data uint8 [out, row bytes] -> [out, in] in ``dtype``, about ``CHUNK`` weights per
    decode call (the fp32 values and the decoder's temporaries stay that size, not weight-sized)."""
    rows, row_bytes = data.shape
    row_len = row_bytes // GGUF_TYPES.get(qtype).type_size * GGUF_TYPES.get(qtype).block_size
    step = max(1, CHUNK // row_len)
    if step >= rows:
        return gguf_decode(data, qtype).to(dtype)
    out = torch.empty(rows, row_len, dtype=dtype, device=data.device)
    for start in range(0, rows, step):
        out[start:start + step] = gguf_decode(data[start:start + step], qtype)
    return out


def pick_dequantizer(qt: QuantizedTensor) -> Dequantizer:
    return next(DEQUANTIZERS.get(n) for n in _ORDER if DEQUANTIZERS.get(n).accepts(qt))


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
    """A frozen linear layer stored as packed 2/3/4/8-bit codes, as a GGUF block format, or as a
    16-bit weight (``bits=16``).

    Buffers: ``qweight`` (uint8 [packed bytes], GGUF tensor data uint8 [out, row bytes], or the
    16-bit weight [out, in]), the constants of the QuantizedTensor under their own names, and
    ``bias`` [out] in the compute dtype if any. ``gguf_type`` names the GGUF format (else None).
    """

    def __init__(self, weight: QuantizedTensor | GGUFTensor | torch.Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.compute_dtype = compute_dtype
        self.gguf_type: str | None = None
        if isinstance(weight, GGUFTensor):
            self.config, self.block, self.weight_dtype = None, GGUF_TYPES.get(weight.qtype).block_size, weight.dtype
            self.gguf_type = weight.qtype
            self.register_buffer("qweight", weight.data)
            shape = weight.shape
        elif isinstance(weight, QuantizedTensor):
            if len(weight.shape) != 2:
                raise ValueError(f"a linear weight must be 2-D (out, in), got shape {weight.shape}")
            self.config: QuantConfig | None = weight.config
            self.block, self.weight_dtype = weight.block, weight.dtype
            self.register_buffer("qweight", weight.packed)
            for name, t in weight.constants().items():
                self.register_buffer(name, t)
            shape = weight.shape
        else:
            if weight.dim() != 2 or weight.element_size() != 2 or not weight.is_floating_point():
                raise ValueError(f"a kept weight must be a 2-D 16-bit float tensor, got {weight.dtype} {tuple(weight.shape)}")
            self.config, self.block, self.weight_dtype = None, 0, weight.dtype
            self.register_buffer("qweight", weight.detach())
            shape = tuple(weight.shape)
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match out_features={self.out_features}")
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype))

    @property
    def bits(self) -> int:
        if self.gguf_type is not None:
            return GGUF_TYPES.get(self.gguf_type).code_bits
        return 16 if self.config is None else self.config.bits

    def quantized(self) -> QuantizedTensor:
        """The stored weight as a QuantizedTensor (views of the buffers, no copy)."""
        if self.config is None:
            raise ValueError("a 16-bit keep layer has no QuantizedTensor")
        consts = {n: getattr(self, n) for n in _CONSTANT_NAMES if getattr(self, n, None) is not None}
        return QuantizedTensor(self.qweight, (self.out_features, self.in_features), self.weight_dtype,
                               self.config, block=self.block, **consts)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [out, in] weight in ``dtype`` (default: compute dtype), rebuilt from the buffers."""
        dtype = dtype or self.compute_dtype
        if self.gguf_type is not None:
            return dequantize_gguf(self.qweight, self.gguf_type, dtype)
        if self.config is None:
            return self.qweight.to(dtype)
        qt = self.quantized()
        return pick_dequantizer(qt).run(qt, dtype)

    @property
    def code_nbytes(self) -> int:
        """Bytes of the stored weight (codes + constants, or the 16-bit weight): QuantizedTensor.nbytes."""
        names = ("qweight",) + _CONSTANT_NAMES
        return sum(t.numel() * t.element_size() for n in names if (t := getattr(self, n, None)) is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantLinear.apply(x.to(self.compute_dtype), self)

    def extra_repr(self) -> str:
        kind = self.gguf_type or ("keep16" if self.config is None else self.config.quant_name)
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}, bias={self.bias is not None}"


# ---------------------------------------------------------------- model surgery
def linear_weight(mod: nn.Module) -> torch.Tensor:
    """(out, in) weight of an nn.Linear or of transformers' Conv1D (stored (in, out))."""
    return weight_out_in(mod).detach()


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


def swap_linears(model: nn.Module, weights: Mapping[str, QuantizedTensor | GGUFTensor | torch.Tensor | None],
                 compute_dtype: torch.dtype | None = None, keep_dtype: torch.dtype | None = None) -> dict[str, QuantLinear]:
    """Replace the named nn.Linear / Conv1D modules in place by :class:`QuantLinear`.

    ``weights[name]``: a QuantizedTensor of shape (out, in); a 16-bit tensor to keep; or None to
    keep the module's own weight in ``keep_dtype`` (default: the compute dtype if 16-bit, else bf16).
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
        elif not isinstance(w, (QuantizedTensor, GGUFTensor)):
            w = w.detach().to(keep_dtype).contiguous()
        layer = QuantLinear(w, getattr(mod, "bias", None), compute_dtype)
        stored = w.packed if isinstance(w, QuantizedTensor) else w.data if isinstance(w, GGUFTensor) else w
        device = dense.device if not dense.is_meta else stored.device
        _set_module(model, name, layer.to(device))  # a meta weight: a shell model awaiting its targets
        new[name] = layer
    return new


def quantize_model(model: nn.Module, choices: Mapping[str, LayerChoice],
                   compute_dtype: torch.dtype | None = None) -> dict[str, QuantLinear]:
    """Quantize each named layer at its choice (plain quantization, no LoftQ) and swap it in."""
    weights: dict[str, QuantizedTensor | None] = {}
    for name, choice in choices.items():
        mod = model.get_submodule(name)
        cfg = choice.quant_config
        weights[name] = None if cfg is None else quantize(linear_weight(mod), config=cfg)
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

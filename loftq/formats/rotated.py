"""Rotated codebook widths: a layer quantized in a randomized-Hadamard basis (QuIP#'s incoherence
processing), a per-layer option of the codebook family ``nf``.

A rotated spec wraps a codebook spec (``nf3``, ``nf3`` with double quantization, ...). It stores
the codes of W' = R_out W R_in^T (:func:`loftq.hadamard.rotate`: sign flips from two seeds, then an
orthonormal Hadamard transform on each side, no padding) and dequantizes to the original basis,
R_out^T deq(Q') R_in. Everything downstream of ``dequantize`` (the runtime layer, LoftQ's low-rank
step, the residual tables, the Fisher errors, the fine-tune proxy) sees an ordinary weight, so:

- LoftQ's fit Q' + B'A' ~ W' in the rotated basis is the fit in the original one mapped back (the
  Frobenius norm is rotation invariant; the data-aware norm ||(W - Q - BA) L|| is computed where
  it is defined): the adapter LoftQ returns is already R_out^T B', A' R_in, an ordinary PEFT pair
  of the same rank (tested against :func:`loftq.hadamard.unrotate_adapter` of the rotated fit);
- error-feedback rounding runs in the rotated basis, under the rotated moment H' = R_in H R_in^T
  (the caller's ``upper``, the original basis' factor, is not used);
- the seeds are stored (a ``rotation`` tensor, int64 [2]: 16 bytes), never the matrices.

Shapes: both sides need a Hadamard order (:func:`loftq.hadamard.hadamard_order`: m * 2^k for a
small buildable m: SmolLM2's 576 = 36 * 16 and 1536 = 12 * 128, MiniLM's 384 = 12 * 32). A menu
width stores the plain codebook spec on a layer whose shape has none (:mod:`loftq.formats.codebook`).
No GGUF type or bitsandbytes layer reads rotated codes: ``ggml_type`` is None and ``bnb_4bit`` False,
so those exports refuse such a plan (they name the layer).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import torch

from ..hadamard import hadamard_order, rotate, unrotate_along
from ..quant import QuantConfig, QuantizedTensor

SUFFIX = "-rot"  # a rotated spec's name and method: nf3-rot, nf-rot
# The seeds of every rotated layer (R_out's signs, R_in's signs): one fixed pair, so a plan's fields
# name the spec; they are stored with the codes all the same, and a folder holding others is refused.
SEEDS = (0x5EED_0001, 0x5EED_0002)
SEED_BYTES = 16
CHUNK = 1 << 18  # weights per slice when dequantize undoes the rotation in place (temporaries that size)


def rotatable(shape: Sequence[int]) -> bool:
    """Whether a weight [out, in] of ``shape`` has a Hadamard order on both sides."""
    return len(shape) == 2 and all(int(s) >= 1 and hadamard_order(int(s)) is not None for s in shape)


@dataclass(frozen=True)
class RotatedSpec:
    """``inner`` (a codebook spec) applied to R_out W R_in^T."""

    inner: QuantConfig
    seed_out: int = SEEDS[0]
    seed_in: int = SEEDS[1]

    family = "nf"
    export_note = "rotated codes multiply in a Hadamard basis: plan with --rotation off for this export"
    randomized_svd = True  # the rotated weight is closer to Gaussian than the plain one the step was tested on

    @property
    def name(self) -> str:
        return self.inner.name + SUFFIX

    @property
    def method(self) -> str:
        return self.inner.method + SUFFIX

    @property
    def bits(self) -> int:
        return self.inner.bits

    @property
    def block_size(self) -> int:
        return self.inner.block_size

    @property
    def double_quant(self) -> bool:
        return self.inner.double_quant

    @property
    def seeds(self) -> tuple[int, int]:
        return (self.seed_out, self.seed_in)

    def nbytes(self, shape: Sequence[int]) -> int:
        return self.inner.nbytes(shape) + SEED_BYTES

    def check_shape(self, shape: Sequence[int]) -> None:
        self.inner.check_shape(shape)
        bad = [int(s) for s in shape if hadamard_order(int(s)) is None]
        if bad:
            raise ValueError(f"{self.name} cannot rotate shape {list(shape)}: no Hadamard matrix of order "
                             f"{bad[0]} (m * 2^k with a small buildable m)")

    def quantize(self, weight: torch.Tensor, *, rounding: str = "nearest", moment: torch.Tensor | None = None,
                 upper: torch.Tensor | None = None, importance: torch.Tensor | None = None,
                 damp: float = 0.01) -> "RotatedTensor":
        """The inner spec's codes of the rotated weight; with ``rounding="feedback"`` (where the inner
        spec applies it) by error feedback under the rotated ``moment`` (needed: ``upper`` belongs
        to the original basis)."""
        shape = tuple(int(s) for s in weight.shape)
        self.check_shape(shape)
        w_rot = rotate(weight.detach().float(), self.seed_out, self.seed_in)
        if rounding == "feedback" and self.inner.feedback_applies(shape):
            if moment is None:
                raise ValueError(f"{self.name}: rounding='feedback' needs the input second moment (moment=H)")
            h_rot = rotate(moment.detach().to(torch.float64), self.seed_in, self.seed_in)
            q = self.inner.quantize(w_rot, rounding="feedback", moment=h_rot, damp=damp)
        else:
            q = self.inner.quantize(w_rot)
        return self.wrap(replace(q, dtype=weight.dtype))

    def wrap(self, inner: QuantizedTensor) -> "RotatedTensor":
        """The rotated tensor whose codes (of the rotated weight) are ``inner``."""
        return RotatedTensor(inner, self)

    def feedback_applies(self, shape: Sequence[int]) -> bool:
        return self.inner.feedback_applies(shape)

    def restore(self, tensors: Mapping[str, torch.Tensor], shape: Sequence[int], dtype: torch.dtype) -> "RotatedTensor":
        """The stored tensor from its codes, constants and ``rotation`` seeds; ValueError when the
        seeds are missing or (read on the CPU, as a folder is loaded) not this spec's."""
        own = dict(tensors)
        seeds = own.pop("rotation", None)
        if seeds is None:
            raise ValueError(f"{self.name}: no rotation tensor (the seeds of the stored basis)")
        if seeds.dtype != torch.int64 or tuple(seeds.shape) != (2,):
            raise ValueError(f"{self.name}: rotation must be int64 [2], got {seeds.dtype} {list(seeds.shape)}")
        if seeds.device.type == "cpu" and tuple(int(s) for s in seeds.tolist()) != self.seeds:
            raise ValueError(f"{self.name}: rotation seeds {seeds.tolist()} are not this planner's {list(self.seeds)}")
        return RotatedTensor(self.inner.restore(own, shape, dtype), self)

    @property
    def ggml_type(self) -> int | None:
        return None  # no GGUF type rotates its input

    @property
    def bnb_4bit(self) -> bool:
        return False  # bitsandbytes' Linear4bit multiplies in the stored basis


@dataclass
class RotatedTensor:
    """A codebook tensor of the rotated weight; :meth:`dequantize` returns the original basis."""

    inner: QuantizedTensor
    spec: RotatedSpec

    @property
    def shape(self) -> tuple[int, ...]:
        return self.inner.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes + SEED_BYTES

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """R_out^T deq(Q') R_in in ``dtype`` (default the weight's), in place in that dtype: the input
        side a slice of rows at a time, the output side a slice of columns at a time, each slice
        computed in fp32 (a 16-bit result is rounded once per side). The peak is that of the inner
        dequantization plus CHUNK-sized temporaries: what a plain width of the same shape needs."""
        w = self.inner.dequantize(dtype or self.dtype)
        rows, cols = w.shape
        step = max(1, CHUNK // cols)
        for r in range(0, rows, step):
            w[r:r + step] = unrotate_along(w[r:r + step].float(), self.spec.seed_in, -1)
        step = max(1, CHUNK // rows)
        for c in range(0, cols, step):
            w[:, c:c + step] = unrotate_along(w[:, c:c + step].float(), self.spec.seed_out, -2)
        return w

    def to(self, device: torch.device | str) -> "RotatedTensor":
        return RotatedTensor(self.inner.to(device), self.spec)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.inner.tensors(), "rotation": torch.tensor(self.spec.seeds, dtype=torch.int64)}

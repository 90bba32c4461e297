"""The codebook family ``nf``: NormalFloat (and uniform, bitsandbytes' int8) codes with blockwise absmax.

Its spec is :class:`loftq.quant.QuantConfig`, its tensor :class:`loftq.quant.QuantizedTensor` (both
carry the format protocol's methods). Menu widths: a plain width is its number of code bits, an
``int`` (2, 3, 4, 8), as it always was; a double-quantized one is a :class:`Width` (QLoRA: the fp32
absmax of every block quantized to 8 bits in blocks of 256, plus one fp32 scale per 256 blocks and
one offset), written ``4dq``. A Width orders after the plain width of its bits and before the next
(4 < 4dq < 8) and compares with ints, so code that sorts widths or asks ``width >= 16`` needs no
change. Residual tables of several widths share one fused pass (:func:`loftq.quant.quantization_residuals`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import total_ordering
from typing import Iterable, Sequence

import torch

from ..quant import METHODS, QuantConfig, parse_quant_name, quant_name, quantization_residuals
from . import Family, register, sort_key

KEEP_BITS = 16
DQ_MODES = ("off", "on", "search")


@total_ordering
@dataclass(frozen=True)
class Width:
    """A codebook width with double-quantized constants: ``Width(4)`` is ``4dq``."""

    bits: int
    double_quant: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 1 < self.bits < KEEP_BITS:
            raise ValueError(f"a Width variant needs quantized bits (< {KEEP_BITS}), got {self.bits!r}")
        if self.double_quant is not True:
            raise ValueError(f"a plain width is its int ({self.bits}), not Width({self.bits}, double_quant=False)")

    def __str__(self) -> str:
        return f"{self.bits}dq"

    def sort_key(self) -> tuple[int, int]:
        return (self.bits, 1)

    def __lt__(self, other: object) -> bool:
        try:
            return self.sort_key() < sort_key(other)
        except TypeError:
            return NotImplemented

    def spec(self, shape: Sequence[int], block_size: int = 64, method: str = "nf") -> QuantConfig:
        return QuantConfig(self.bits, method, block_size, True)


def width_spec(bits: int, shape: Sequence[int], block_size: int = 64, method: str = "nf") -> QuantConfig:
    """The spec of a plain (int) codebook width: the same for every shape."""
    return QuantConfig(int(bits), method, block_size, False)


def names() -> list[str]:
    return [quant_name(m, b) for m in METHODS for b in METHODS.get(m).bits]


def parse(quant: str, bits: int, block_size: int, double_quant: bool) -> QuantConfig | None:
    """The QuantConfig a plan's fields name (``nf4``, ``uniform2``, ``int8``, or a method with its
    bits: ``nf``), or None for another family's name."""
    if quant in METHODS:
        if bits is None:
            raise ValueError(f"the method {quant!r} needs its bits")
        return QuantConfig(bits, quant, block_size, bool(double_quant))
    try:
        method, width = parse_quant_name(quant)
    except ValueError:
        return None
    if bits is not None and width != bits:
        raise ValueError(f"quant {quant!r} stores {width}-bit codes, not bits {bits}")
    return QuantConfig(width, method, block_size, bool(double_quant))


def menu(bits: Iterable[int], double_quant: str = "off") -> tuple:
    """Plain widths (``off``), double-quantized (``on``) or both (``search``), in menu order."""
    if double_quant not in DQ_MODES:
        raise ValueError(f"double_quant must be one of {', '.join(DQ_MODES)}, got {double_quant!r}")
    out: list = []
    for b in sorted({int(b) for b in bits if b < KEEP_BITS}):
        if double_quant != "on":
            out.append(b)
        if double_quant != "off":
            out.append(Width(b))
    return tuple(out)


def residuals(stack: torch.Tensor, specs: Sequence[QuantConfig], dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return quantization_residuals(stack, list(specs), dtype=dtype, checked=True)


def key(spec: QuantConfig):
    return Width(spec.bits) if spec.double_quant else spec.bits


FAMILY = register(Family("nf", parse, menu, residuals, bits=(2, 3, 4, 8), double_quant=True, key=key,
                         description="NormalFloat codebooks with blockwise absmax (planner.load, bitsandbytes)"))

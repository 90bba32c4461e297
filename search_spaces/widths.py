"""Widths on the search menu: how a layer's weight is stored, the first half of a (width, rank) option.

A plain width is its number of code bits, an ``int`` (2, 3, 4, 8; 16 = kept in 16 bits), as it
always was. A variant of a width is a :class:`Width`: today the one variant is double quantization
(QLoRA: the fp32 absmax of every block quantized to 8 bits in blocks of 256, plus one fp32 scale
per 256 blocks and one offset), written ``4dq``. Only variants are objects, so a menu without them
is exactly the ints it was before (the same keys, order and cache keys); a Width orders after the
plain width of its bits and before the next (4 < 4dq < 8) and compares with ints, so code that asks
``width >= 16`` or sorts widths needs no change.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import total_ordering
from typing import Union

from loftq import QuantConfig

KEEP_BITS = 16


@total_ordering
@dataclass(frozen=True)
class Width:
    """A quantized width with double-quantized constants: ``Width(4)`` is ``4dq``."""

    bits: int
    double_quant: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 1 < self.bits < KEEP_BITS:
            raise ValueError(f"a Width variant needs quantized bits (< {KEEP_BITS}), got {self.bits!r}")
        if self.double_quant is not True:
            raise ValueError(f"a plain width is its int ({self.bits}), not Width({self.bits}, double_quant=False)")

    def __str__(self) -> str:
        return f"{self.bits}dq"

    def _key(self) -> tuple[int, int]:
        return (self.bits, 1)

    def __lt__(self, other: object) -> bool:
        if isinstance(other, (Width, int)):
            return self._key() < sort_key(other)
        return NotImplemented


WidthKey = Union[int, Width]


def sort_key(w: WidthKey) -> tuple[int, int]:
    """Menu order: by bits, the plain width before its variant."""
    return w._key() if isinstance(w, Width) else (int(w), 0)


def width(bits: int, double_quant: bool = False) -> WidthKey:
    """The menu key of ``bits`` with or without double quantization (an int when plain)."""
    return Width(bits) if double_quant else bits


def width_bits(w: WidthKey) -> int:
    """Code bits of a width (16: kept in 16 bits)."""
    return w.bits if isinstance(w, Width) else int(w)


def is_double_quant(w: WidthKey) -> bool:
    return isinstance(w, Width) and w.double_quant


def quant_config(w: WidthKey, method: str = "nf", block_size: int = 64) -> QuantConfig | None:
    """The loftq config a quantized width stands for (None for a 16-bit keep); ValueError when
    ``method`` has no such width."""
    bits = width_bits(w)
    if bits >= KEEP_BITS:
        return None
    return QuantConfig(bits, method, block_size, is_double_quant(w))

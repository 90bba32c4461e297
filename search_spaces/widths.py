"""Widths on the search menu: how a layer's weight is stored, the first half of a (width, rank) option.

The widths themselves belong to the quantizer families (:mod:`loftq.formats`): a plain codebook width
is its number of code bits, an ``int`` (2, 3, 4, 8), a double-quantized one a
:class:`loftq.formats.codebook.Width` (``4dq``), a GGUF one the family's own width object
(``q4_k``); 16 means the weight is kept in 16 bits. This module only orders them, reads their bits
and turns a width into the spec a layer of a given shape stores (:func:`resolve`), whatever its
family: nothing here asks which family a width belongs to.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from loftq.formats import Spec, sort_key, widths as family_widths
from loftq.formats.codebook import Width, width_spec

KEEP_BITS = 16
WidthKey = Any  # an int (a plain codebook width, or 16: kept) or a family's width object

__all__ = ["KEEP_BITS", "Width", "WidthKey", "is_double_quant", "is_rotated", "menu", "quantize_width", "resolve", "sort_key",
           "width", "width_bits"]


def width(bits: int, double_quant: bool = False) -> WidthKey:
    """The codebook menu key of ``bits`` with or without double quantization (an int when plain)."""
    return Width(bits) if double_quant else bits


def width_bits(w: WidthKey) -> int:
    """Code bits of a width (16: kept in 16 bits)."""
    return int(getattr(w, "bits", w))


def is_double_quant(w: WidthKey) -> bool:
    return bool(getattr(w, "double_quant", False))


def is_rotated(w: WidthKey) -> bool:
    return bool(getattr(w, "rotated", False))


def menu(bits: Iterable[int], double_quant: str = "off", family: str = "nf",
         rotation: str = "off") -> tuple[WidthKey, ...]:
    """``family``'s widths for ``bits`` under a double quantization mode and a rotation mode, plus 16
    when asked for."""
    bits = sorted(set(bits))
    return family_widths(family, [b for b in bits if b < KEEP_BITS], double_quant, rotation) + \
        ((KEEP_BITS,) if KEEP_BITS in bits else ())


def resolve(w: WidthKey, shape: Sequence[int], method: str = "nf", block_size: int = 64) -> Spec | None:
    """The spec a layer of ``shape`` [out, in] stores at width ``w`` (a width object's own rule, e.g. a
    GGUF type's fallback; a plain int is a codebook width of ``method``), or None for a 16-bit keep."""
    if width_bits(w) >= KEEP_BITS:
        return None
    own = getattr(w, "spec", None)
    return own(shape, block_size, method) if own is not None else width_spec(w, shape, block_size, method)


def quantize_width(weight: Any, w: WidthKey, method: str = "nf", block_size: int = 64, **encode: Any) -> Any:
    """``weight`` [out, in] stored at width ``w`` (a :class:`loftq.formats.Quantized`); ``encode``: the
    spec's keywords (``rounding``, ``moment``, ``upper``, ``importance``, ``damp``)."""
    spec = resolve(w, tuple(weight.shape), method, block_size)
    if spec is None:
        raise ValueError(f"width {w} keeps the weight in 16 bits: nothing to quantize")
    return spec.quantize(weight, **encode)

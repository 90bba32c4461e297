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
from typing import Iterable, Union

from loftq import GGUF_TYPES, QuantConfig, allowed_types

KEEP_BITS = 16
GGUF_ORDER = ("q2_k", "q3_k", "q4_0", "iq4_nl", "q4_k", "q6_k", "q8_0")  # menu order among GGUF widths
# A K-quant needs rows that are whole 256-value super-blocks; on a narrower row the layer takes the
# block-32 type llama.cpp's own quantizer falls back to (it has no q5_0 here: q4_k -> iq4_nl too).
GGUF_FALLBACK = {"q2_k": "iq4_nl", "q3_k": "iq4_nl", "q4_k": "iq4_nl", "q6_k": "q8_0"}


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
        if isinstance(other, (Width, GgufWidth, int)):
            return self._key() < sort_key(other)
        return NotImplemented


@total_ordering
@dataclass(frozen=True)
class GgufWidth:
    """A llama.cpp block format as a width (``GgufWidth("q4_k")``, written ``q4_k``): ``bits`` is the
    width in its name (q4_k: 4; it stores 4.5 bits/weight). A layer whose rows the format cannot
    hold takes :func:`gguf_type_for` its shape instead (the K-quants' fallbacks)."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in GGUF_ORDER:
            raise ValueError(f"unknown GGUF width {self.name!r}; known: {', '.join(GGUF_ORDER)}")

    @property
    def bits(self) -> int:
        return GGUF_TYPES.get(self.name).code_bits

    def __str__(self) -> str:
        return self.name

    def _key(self) -> tuple[int, int]:
        return (self.bits, 2 + GGUF_ORDER.index(self.name))

    def __lt__(self, other: object) -> bool:
        if isinstance(other, (Width, GgufWidth, int)):
            return self._key() < sort_key(other)
        return NotImplemented


WidthKey = Union[int, Width, GgufWidth]


def sort_key(w: WidthKey) -> tuple[int, int]:
    """Menu order: by bits, the plain width before its variant, GGUF formats after both."""
    return w._key() if isinstance(w, (Width, GgufWidth)) else (int(w), 0)


def gguf_type_for(name: str, shape: tuple[int, ...]) -> str:
    """The GGUF type a layer of ``shape`` [out, in] stores for the width ``name``: itself when its
    rows are whole blocks of it, else its fallback (q4_k on a 576-wide row: iq4_nl); ValueError
    when no block-32 type fits either (a row not a multiple of 32)."""
    allowed = allowed_types(tuple(shape))
    t = name
    while t not in allowed:
        if t not in GGUF_FALLBACK:
            raise ValueError(f"no GGUF type can store a layer of shape {tuple(shape)} "
                             f"(rows must be a multiple of 32 values; {name} needs "
                             f"{GGUF_TYPES.get(name).block_size})")
        t = GGUF_FALLBACK[t]
    return t


def gguf_widths(bits: Iterable[int]) -> tuple[WidthKey, ...]:
    """The GGUF menu of ``bits`` (2: q2_k; 3: q3_k; 4: q4_0, iq4_nl, q4_k; 6: q6_k; 8: q8_0; 16: keep)."""
    wanted = set(bits)
    out: list[WidthKey] = [GgufWidth(n) for n in GGUF_ORDER if GGUF_TYPES.get(n).code_bits in wanted]
    return tuple(out) + ((KEEP_BITS,) if KEEP_BITS in wanted else ())


def is_gguf(w: WidthKey) -> bool:
    return isinstance(w, GgufWidth)


def quantize_width(weight, w: WidthKey, method: str = "nf", block_size: int = 64):
    """``weight`` [out, in] stored at width ``w``: a :class:`loftq.QuantizedTensor`, or a
    :class:`loftq.GGUFTensor` for a GGUF width (``loftq.dequantize`` decodes either)."""
    from loftq import gguf_quantize, quantize

    spec = quant_spec(w, tuple(weight.shape), method, block_size)
    if spec is None:
        raise ValueError(f"width {w} keeps the weight in 16 bits: nothing to quantize")
    return gguf_quantize(weight, spec) if isinstance(spec, str) else quantize(weight, config=spec)


def quant_spec(w: WidthKey, shape: tuple[int, ...], method: str = "nf", block_size: int = 64) -> QuantConfig | str | None:
    """What a layer of ``shape`` is stored as at width ``w``: a QuantConfig (codebook widths), a GGUF
    type name (:func:`gguf_type_for`), or None (kept in 16 bits)."""
    if isinstance(w, GgufWidth):
        return gguf_type_for(w.name, shape)
    return quant_config(w, method, block_size)


def width(bits: int, double_quant: bool = False) -> WidthKey:
    """The menu key of ``bits`` with or without double quantization (an int when plain)."""
    return Width(bits) if double_quant else bits


def width_bits(w: WidthKey) -> int:
    """Code bits of a width (16: kept in 16 bits)."""
    return w.bits if isinstance(w, (Width, GgufWidth)) else int(w)


def is_double_quant(w: WidthKey) -> bool:
    return isinstance(w, Width) and w.double_quant


def quant_config(w: WidthKey, method: str = "nf", block_size: int = 64) -> QuantConfig | None:
    """The loftq config a quantized width stands for (None for a 16-bit keep); ValueError when
    ``method`` has no such width."""
    if isinstance(w, GgufWidth):
        raise ValueError(f"{w} is a GGUF type, not a codebook width (quant_spec gives its type per shape)")
    bits = width_bits(w)
    if bits >= KEEP_BITS:
        return None
    return QuantConfig(bits, method, block_size, is_double_quant(w))

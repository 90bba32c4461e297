"""The ``gguf`` family: llama.cpp's block types (:mod:`loftq.gguf_quants`) as a format.

A menu width is a type (:class:`GgufWidth`, written ``q4_k``); the spec a layer stores for it is
that type when the layer's rows are whole blocks of it, else the type llama.cpp's quantizer falls
back to (its ``fallback`` in the registry: ``q4_k -> q5_0`` on a 576-wide row), followed until one
fits. The menu of ``--bits`` is every registered type whose code width is one of them, by width and
then in registration order. Encoders search block scales (:mod:`loftq.gguf_fit`), optionally under a
per-column importance; error-feedback rounding does not apply. Bytes are the GGUF file's.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import total_ordering
from typing import Iterable, Mapping, Sequence

import torch

from ..gguf_quants import GGUF_TYPES, GGUFSpec, gguf_quantize
from ..quant import squared_norm
from . import Family, register, sort_key

KEEP_BITS = 16


def names() -> list[str]:
    return list(GGUF_TYPES)


def menu_order() -> list[str]:
    """Every registered type, by code bits, then in the order they were registered."""
    return sorted(GGUF_TYPES.in_order(), key=lambda n: GGUF_TYPES.get(n).code_bits)


@total_ordering
@dataclass(frozen=True)
class GgufWidth:
    """A llama.cpp block type as a menu width (``GgufWidth("q4_k")``, written ``q4_k``): ``bits`` is
    the width in its name (q4_k: 4; it stores 4.5 bits/weight)."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in GGUF_TYPES:
            raise ValueError(f"unknown GGUF width {self.name!r}; known: {', '.join(menu_order())}")

    @property
    def bits(self) -> int:
        return GGUF_TYPES.get(self.name).code_bits

    def __str__(self) -> str:
        return self.name

    def sort_key(self) -> tuple[int, int]:
        return (self.bits, 2 + menu_order().index(self.name))

    def __lt__(self, other: object) -> bool:
        try:
            return self.sort_key() < sort_key(other)
        except TypeError:
            return NotImplemented

    def spec(self, shape: Sequence[int], block_size: int = 64, method: str = "nf") -> GGUFSpec:
        """The type a layer of ``shape`` [out, in] stores for this width (see the module docstring)."""
        return GGUFSpec(stored_type(self.name, shape))


def fallback_of(name: str) -> str | None:
    """The type llama.cpp's quantizer stores instead of ``name`` on rows it cannot hold (registry data)."""
    return GGUF_TYPES.get(name).fallback


def stored_type(name: str, shape: Sequence[int]) -> str:
    """``name`` when rows of ``shape`` are whole blocks of it, else its fallback chain's first type
    that fits; ValueError when none does (a row not a multiple of 32)."""
    t = name
    while int(shape[-1]) % GGUF_TYPES.get(t).block_size:
        fallback = fallback_of(t)
        if fallback is None:
            raise ValueError(f"no GGUF type can store a layer of shape {tuple(shape)} (rows must be a multiple of "
                             f"{GGUF_TYPES.get(t).block_size} values; {name} needs {GGUF_TYPES.get(name).block_size})")
        t = fallback
    return t


def parse(quant: str, bits: int, block_size: int, double_quant: bool) -> GGUFSpec | None:
    """The spec of a plan's GGUF type (``bits`` the width in its name, ``block_size`` its block, no
    double quantization), or None for another family's name."""
    if quant not in GGUF_TYPES:
        return None
    t = GGUF_TYPES.get(quant)
    if bits is None:  # named alone (loftq(w, "q4_k", ...)): its own width and block
        bits, block_size = t.code_bits, t.block_size
    if bits != t.code_bits or block_size != t.block_size or double_quant:
        raise ValueError(f"{quant} stores {t.code_bits}-bit codes in blocks of {t.block_size} without double "
                         f"quantization; got bits {bits!r}, block_size {block_size!r}, double_quant {double_quant!r}")
    return GGUFSpec(quant)


def menu(bits: Iterable[int], double_quant: str = "off") -> tuple:
    if double_quant != "off":
        raise ValueError("GGUF types store their own block constants: double quantization is for --quant nf")
    wanted = {int(b) for b in bits}
    return tuple(GgufWidth(n) for n in menu_order() if GGUF_TYPES.get(n).code_bits in wanted)


def residuals(stack: torch.Tensor, specs: Sequence[GGUFSpec], dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Matrix by matrix: the block types have no fused pass."""
    out = []
    for spec in specs:
        spec.check_shape(tuple(stack.shape[1:]))
        res = torch.stack([m - gguf_quantize(m, spec.name).dequantize(torch.float32) for m in stack])
        out.append((res.to(dtype), squared_norm(res)))
    return out


FAMILY = register(Family("gguf", parse, menu, residuals, bits=tuple(sorted({GGUF_TYPES.get(n).code_bits for n in GGUF_TYPES})),
                         double_quant=False,
                         description="llama.cpp's GGUF block types (materialize --format gguf)"))

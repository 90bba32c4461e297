"""The codebook family ``nf``: NormalFloat (and uniform, bitsandbytes' int8) codes with blockwise absmax.

Its spec is :class:`loftq.quant.QuantConfig`, its tensor :class:`loftq.quant.QuantizedTensor` (both
carry the format protocol's methods). Menu widths: a plain width is its number of code bits, an
``int`` (2, 3, 4, 8), as it always was; a double-quantized one is a :class:`Width` (QLoRA: the fp32
absmax of every block quantized to 8 bits in blocks of 256, plus one fp32 scale per 256 blocks and
one offset), written ``4dq``; a rotated one (:mod:`loftq.formats.rotated`: the codes of the weight in
a randomized Hadamard basis) is ``Width(3, double_quant=False, rotated=True)``, written ``3r`` (``3rdq``
with double quantization), and stores the plain spec on a layer whose shape has no Hadamard order.
A row-scaled rotated width (``Width(3, True, True, rows=True)``, written ``3rdq-row``) keeps one
absmax per row of the rotated weight instead of one per 64 weights: the rotation spreads a row's
outliers over the whole row, so one scale loses little, and the constants cost ~0.01 bits per weight
instead of 0.127 (double-quantized) or 0.5 (fp32). Its spec is the rotated spec at a block of the
layer's row length (QuIP#'s per-row scale after incoherence processing).
A Width orders after the plain width of its bits and before the next (4 < 4dq < 4r < 4rdq <
4rdq-row < 8) and compares with ints, so code that sorts widths or asks ``width >= 16`` needs no change. Residual
tables of several widths share one fused pass (:func:`loftq.quant.quantization_residuals`; rotated
widths one more on the rotated stack).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import total_ordering
from typing import Iterable, Sequence

import torch

from ..hadamard import rotate, unrotate
from ..quant import METHODS, QuantConfig, parse_quant_name, quant_name, quantization_residuals, squared_norm
from . import Family, register, sort_key
from .rotated import SUFFIX, RotatedSpec, rotatable

KEEP_BITS = 16
DQ_MODES = ("off", "on", "search")
ROTATION_MODES = ("off", "on", "search")  # plain widths only, rotated only, both
ROTATION_MAX_BITS = 4  # rotated widths on the menu: the low ones (8-bit codes lose nothing to outliers)
# rotated bits offered row-scaled only: at 2 and 3 bits the row-scaled width had the lower (NF2) or
# the same (NF3) output error as the 64-block one for 0.116 fewer bits per weight (README "Below 4
# bits"), and no measured plan chose a 64-block 2r/2rdq/3r/3rdq once it was on the menu beside it
ROW_ONLY_MAX_BITS = 3


@total_ordering
@dataclass(frozen=True)
class Width:
    """A codebook width variant: ``Width(4)`` is ``4dq`` (double-quantized constants),
    ``Width(3, False, True)`` is ``3r`` (rotated), ``Width(3, True, True)`` ``3rdq``,
    ``Width(3, True, True, rows=True)`` ``3rdq-row`` (rotated, one scale per row)."""

    bits: int
    double_quant: bool = True
    rotated: bool = False
    rows: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 1 < self.bits < KEEP_BITS:
            raise ValueError(f"a Width variant needs quantized bits (< {KEEP_BITS}), got {self.bits!r}")
        if not all(isinstance(v, bool) for v in (self.double_quant, self.rotated, self.rows)):
            raise ValueError(f"Width's double_quant, rotated and rows are booleans, got {self.double_quant!r}, "
                             f"{self.rotated!r}, {self.rows!r}")
        if self.rows and not self.rotated:
            raise ValueError("a row-scaled width is a rotated one (Width(bits, double_quant, True, rows=True))")
        if not (self.double_quant or self.rotated):
            raise ValueError(f"a plain width is its int ({self.bits}), not Width({self.bits}, double_quant=False)")

    def __str__(self) -> str:
        return f"{self.bits}{'r' if self.rotated else ''}{'dq' if self.double_quant else ''}{'-row' if self.rows else ''}"

    def sort_key(self) -> tuple[int, int]:
        return (self.bits, int(self.double_quant) + 2 * int(self.rotated) + 4 * int(self.rows))

    def __lt__(self, other: object) -> bool:
        try:
            return self.sort_key() < sort_key(other)
        except TypeError:
            return NotImplemented

    def spec(self, shape: Sequence[int], block_size: int = 64, method: str = "nf") -> QuantConfig | RotatedSpec:
        """The spec a layer of ``shape`` [out, in] stores: rotated where both sides have a Hadamard
        order (else the plain spec at ``block_size``); a row-scaled width's block is the row length
        where that is a multiple of 16 longer than ``block_size`` (else it is the rotated width)."""
        if not (self.rotated and rotatable(shape)):
            return QuantConfig(self.bits, method, block_size, self.double_quant)
        row = int(shape[1])
        block = row if self.rows and row > block_size and row % 16 == 0 else block_size
        return RotatedSpec(QuantConfig(self.bits, method, block, self.double_quant))


def width_spec(bits: int, shape: Sequence[int], block_size: int = 64, method: str = "nf") -> QuantConfig:
    """The spec of a plain (int) codebook width: the same for every shape."""
    return QuantConfig(int(bits), method, block_size, False)


def names() -> list[str]:
    """The plain names (each also names its rotated width with ``-rot``)."""
    return [quant_name(m, b) for m in METHODS for b in METHODS.get(m).bits]


def parse(quant: str, bits: int, block_size: int, double_quant: bool) -> QuantConfig | RotatedSpec | None:
    """The QuantConfig a plan's fields name (``nf4``, ``uniform2``, ``int8``, or a method with its
    bits: ``nf``; with ``-rot``, ``nf3-rot`` / ``nf-rot``, the rotated spec), or None for another
    family's name."""
    if isinstance(quant, str) and quant.endswith(SUFFIX):
        inner = parse(quant[:-len(SUFFIX)], bits, block_size, double_quant)
        return RotatedSpec(inner) if inner is not None else None
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


def menu(bits: Iterable[int], double_quant: str = "off", rotation: str = "off") -> tuple:
    """Plain widths (``double_quant="off"``), double-quantized (``on``) or both (``search``), each
    (at most ROTATION_MAX_BITS) also rotated (``rotation="search"``) or only rotated (``on``); every
    rotated bits also row-scaled (double-quantized unless ``double_quant="off"``), and at most
    ROW_ONLY_MAX_BITS only row-scaled (a layer whose row is one 64-block stores the rotated
    64-block there); in menu order."""
    if double_quant not in DQ_MODES:
        raise ValueError(f"double_quant must be one of {', '.join(DQ_MODES)}, got {double_quant!r}")
    if rotation not in ROTATION_MODES:
        raise ValueError(f"rotation must be one of {', '.join(ROTATION_MODES)}, got {rotation!r}")
    dqs = {"off": (False,), "on": (True,), "search": (False, True)}[double_quant]
    out: list = []
    for b in sorted({int(b) for b in bits if b < KEEP_BITS}):
        rots = (False,) if b > ROTATION_MAX_BITS else {"off": (False,), "on": (True,), "search": (False, True)}[rotation]
        out += [Width(b, dq, rot) if dq or rot else b for rot in rots for dq in dqs
                if not (rot and b <= ROW_ONLY_MAX_BITS)]
        if True in rots:
            out.append(Width(b, dqs[-1], True, rows=True))
    return tuple(sorted(out, key=sort_key))


def residuals(stack: torch.Tensor, specs: Sequence[QuantConfig | RotatedSpec],
              dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One fused pass for the plain specs, one on the rotated stack for the rotated ones (their
    residuals mapped back to the original basis)."""
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    plain = [i for i, s in enumerate(specs) if not isinstance(s, RotatedSpec)]
    if plain:
        out.update(zip(plain, quantization_residuals(stack, [specs[i] for i in plain], dtype=dtype, checked=True)))
    by_seeds: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(specs):
        if isinstance(s, RotatedSpec):
            s.check_shape(tuple(stack.shape[-2:]))
            by_seeds.setdefault(s.seeds, []).append(i)
    for (seed_out, seed_in), idx in by_seeds.items():
        turned = rotate(stack.float(), seed_out, seed_in)
        for i, (res, _) in zip(idx, quantization_residuals(turned, [specs[i].inner for i in idx],
                                                            dtype=torch.float32, checked=True)):
            back = unrotate(res, seed_out, seed_in)
            out[i] = (back.to(dtype), squared_norm(back))
    return [out[i] for i in range(len(specs))]


def encode(weight: torch.Tensor, specs: Sequence[QuantConfig | RotatedSpec], *, rounding: str = "nearest",
           moment: torch.Tensor | None = None, upper: torch.Tensor | None = None,
           importance: torch.Tensor | None = None, damp: float = 0.01) -> list:
    """Each spec's ``quantize`` of ``weight`` [out, in], code for code. With feedback rounding the
    plain widths share one column loop (:func:`loftq.rounding.quantize_feedback_many`, one per
    :func:`~loftq.rounding.loop_block`), and the rotated widths of one basis another, row-scaled or
    not, on the weight and moment rotated once; the rest (round to nearest, layers feedback cannot
    round) are encoded one by one."""
    from ..rounding import quantize_feedback_many

    kwargs = dict(rounding=rounding, moment=moment, upper=upper, importance=importance, damp=damp)
    shape = tuple(int(s) for s in weight.shape)
    out: dict[int, object] = {}
    groups: dict[tuple, list[int]] = {}
    if rounding == "feedback":
        for i, s in enumerate(specs):
            if s.feedback_applies(shape):
                basis = s.seeds if isinstance(s, RotatedSpec) else None
                groups.setdefault(basis, []).append(i)
    if groups and moment is None and (upper is None or any(groups)):  # a rotated basis needs the moment
        raise ValueError("rounding='feedback' needs the input second moment (moment=H)")
    for basis, idx in groups.items():
        if basis is None:
            out.update(zip(idx, quantize_feedback_many(weight, [specs[i] for i in idx], moment, damp, upper=upper)))
            continue
        for i in idx:
            specs[i].check_shape(shape)
        w_rot = rotate(weight.detach().float(), *basis)
        h_rot = rotate(moment.detach().to(torch.float64), basis[1], basis[1])
        qs = quantize_feedback_many(w_rot, [specs[i].inner for i in idx], h_rot, damp)
        out.update((i, specs[i].wrap(replace(q, dtype=weight.dtype))) for i, q in zip(idx, qs))
    for i, s in enumerate(specs):
        if i not in out:
            out[i] = s.quantize(weight, **kwargs)
    return [out[i] for i in range(len(specs))]


def key(spec: QuantConfig | RotatedSpec, shape: Sequence[int] | None = None):
    if isinstance(spec, RotatedSpec):  # stored on a layer whose row is one block: row-scaled
        return Width(spec.bits, spec.double_quant, True, rows=shape is not None and spec.block_size == int(shape[-1]))
    return Width(spec.bits) if spec.double_quant else spec.bits


FAMILY = register(Family("nf", parse, menu, residuals, bits=(2, 3, 4, 8), double_quant=True, key=key, rotation=True, encode=encode,
                         description="NormalFloat codebooks with blockwise absmax (planner.load, bitsandbytes)"))

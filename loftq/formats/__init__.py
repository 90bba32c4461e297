"""Quantizer formats: one protocol, registered families (torchao's config -> handler, optuna's one
module per sampler).

- A :class:`Spec` says how one weight is stored: ``nf4`` at block 64 with double-quantized
  constants, or llama.cpp's ``q4_k``. It knows its exact bytes for a shape, encodes a weight (the
  inner quantizer of LoftQ: round to nearest, or by error feedback under the input moments where
  the format can, or scaled under a per-column importance), and rebuilds a stored tensor from the
  tensors a packed folder holds.
- A :class:`Quantized` tensor is what a spec encodes to: it dequantizes (CPU or CUDA, the same
  code), moves, and names the tensors it is stored as (``qweight`` and its constants).
- A :class:`Family` groups the specs of one storage kind: the widths it offers for ``--bits``
  (a menu width resolves to a spec per layer shape), how a plan's fields (``quant``, ``bits``,
  ``block_size``, ``double_quant``) name a spec, and the residuals of many specs on a stack of
  weights at once (the tables' fast path). Registered: ``nf`` (codebooks: NormalFloat, uniform,
  bitsandbytes' int8; :mod:`loftq.formats.codebook`) and ``gguf`` (llama.cpp's block types;
  :mod:`loftq.formats.gguf`). A new family is a new module that registers itself here; nothing
  outside the format modules asks which family a weight belongs to.

A 16-bit "keep" is no format: the weight is stored as it is (``None`` where a spec would be).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import torch

from ..registry import Registry

Shape = tuple[int, int]


@runtime_checkable
class Quantized(Protocol):
    """A stored weight [out, in]: dequantizes to a dense tensor; ``nbytes`` is exactly what it stores."""

    spec: "Spec"
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor: ...

    def to(self, device: torch.device | str) -> "Quantized": ...

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name: ``qweight`` (the codes or block data) and any constants."""
        ...


@runtime_checkable
class Spec(Protocol):
    """How one weight is stored. ``name``: what a plan's ``quant`` field says (``nf4``, ``q4_k``);
    ``bits``: the whole code bits in that name (q4_k: 4, though it stores 4.5 per weight)."""

    family: str
    name: str
    method: str  # what a LayerChoice / packed folder records as its method (codebook: nf; GGUF: the type)
    bits: int
    block_size: int
    double_quant: bool
    randomized_svd: bool  # whether LoftQ's randomized low-rank step was validated on this format

    def nbytes(self, shape: Sequence[int]) -> int: ...

    def check_shape(self, shape: Sequence[int]) -> None:
        """ValueError naming the shape when this spec cannot store a weight of it."""
        ...

    def quantize(self, weight: torch.Tensor, *, rounding: str = "nearest", moment: torch.Tensor | None = None,
                 upper: torch.Tensor | None = None, importance: torch.Tensor | None = None,
                 damp: float = 0.01) -> Quantized:
        """Encode ``weight`` [out, in]. ``moment``: the layer's input second moment H [in, in]; with
        ``rounding="feedback"`` the codes are chosen by error feedback under it where
        :meth:`feedback_applies` (``upper``: its inverse factor, :func:`loftq.rounding.inverse_factor`,
        already computed for the weight's own basis); ``importance`` [in] (default: diag H): the
        per-column weight of the squared error, for formats whose encoder searches scales (what
        llama.cpp's imatrix holds)."""
        ...

    def feedback_applies(self, shape: Sequence[int]) -> bool: ...

    def restore(self, tensors: Mapping[str, torch.Tensor], shape: Sequence[int], dtype: torch.dtype) -> Quantized:
        """The stored tensor from :meth:`Quantized.tensors`' output; ValueError when they do not fit."""
        ...

    @property
    def ggml_type(self) -> int | None:
        """llama.cpp's tensor type when a GGUF file can hold this spec's data as it is, else None."""
        ...

    @property
    def bnb_4bit(self) -> bool:
        """Whether bitsandbytes' Linear4bit reads these codes as they are (NF4)."""
        ...



@dataclass(frozen=True)
class Family:
    """A kind of storage: its specs, its menu and its fast residuals.

    ``parse(quant, bits, block_size, double_quant)``: the spec a plan's fields name, or None when
    ``quant`` is not this family's (ValueError when it is but the fields do not fit).
    ``menu(bits, double_quant[, rotation])``: the menu widths for ``--bits`` (16 excluded) under a
    double quantization mode (``off``, ``on``, ``search``) and, where ``rotation`` is True, a
    rotation mode (the same three), in menu order; each width's ``spec(shape, block_size)`` is the
    spec a layer of that shape stores.
    ``residuals(stack, specs, dtype)``: (W - deq q(W) in ``dtype``, float64 squared norm per matrix)
    for each spec on a stack [L, out, in] (one fused pass where the family has one).
    ``bits``: the ``--bits`` it offers; ``double_quant`` / ``rotation``: whether ``--double-quant`` /
    ``--rotation`` apply;
    ``key(spec, shape)``: the menu width a spec stored on a layer of ``shape`` is shown as in reports.
    ``encode(weight, specs, **quantize_kwargs)``: each spec's ``quantize`` of one weight, code for
    code, computed together where the family shares work between widths (None: one by one)."""

    name: str
    parse: Callable[[str, "int | None", int, bool], "Spec | None"]
    menu: Callable[[Iterable[int], str], tuple[Any, ...]]
    residuals: Callable[[torch.Tensor, Sequence["Spec"], torch.dtype], list[tuple[torch.Tensor, torch.Tensor]]]
    bits: tuple[int, ...]
    double_quant: bool
    key: Callable[["Spec", Any], Any] = lambda spec, shape=None: spec.name  # the menu width shown (4, 4dq, q4_k)
    description: str = ""
    rotation: bool = False
    encode: Callable[..., list["Quantized"]] | None = None


FAMILIES: Registry[Family] = Registry("quantizer family")


def register(family: Family) -> Family:
    return FAMILIES.add(family.name, family)


def spec_from_fields(quant: str, bits: int | None, block_size: int = 64, double_quant: bool = False) -> Spec:
    """The spec a plan or a packed folder names by its fields (``bits`` None: the width in the name);
    ValueError listing what is known."""
    for name in FAMILIES:
        spec = FAMILIES.get(name).parse(quant, bits, block_size, double_quant)
        if spec is not None:
            return spec
    raise ValueError(f"unknown quantizer {quant!r}; known: {', '.join(known_names())} (a codebook name with -rot, "
                     "nf3-rot: its rotated width)")


def known_names() -> list[str]:
    from .codebook import names as codebook_names
    from .gguf import names as gguf_names

    return sorted(codebook_names()) + sorted(gguf_names())


def residuals(stack: torch.Tensor, specs: Sequence[Spec], dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each family computes its specs' residuals on ``stack`` [L, out, in]; in ``specs``' order."""
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for family in dict.fromkeys(s.family for s in specs):
        idx = [i for i, s in enumerate(specs) if s.family == family]
        for i, r in zip(idx, FAMILIES.get(family).residuals(stack, [specs[i] for i in idx], dtype)):
            out[i] = r
    return [out[i] for i in range(len(specs))]


def quantize_many(weight: torch.Tensor, specs: Sequence[Spec], **kwargs: Any) -> list[Quantized]:
    """``[spec.quantize(weight, **kwargs) for spec in specs]``, code for code; a family with an
    ``encode`` encodes its specs together (the codebook family: one feedback column loop for all
    its widths). Equal specs are encoded once and share their result (two menu widths can store a
    layer alike: a row-scaled width on a row of 64 is the rotated 64-block)."""
    unique: list[Spec] = []
    for s in specs:  # by equality, not hash: a family's spec need not be hashable
        if s not in unique:
            unique.append(s)
    slot = [unique.index(s) for s in specs]
    out: dict[int, Quantized] = {}
    for family in dict.fromkeys(s.family for s in unique):
        idx = [i for i, s in enumerate(unique) if s.family == family]
        encode = FAMILIES.get(family).encode
        mine = [unique[i] for i in idx]
        out.update(zip(idx, encode(weight, mine, **kwargs) if encode is not None else
                       [spec.quantize(weight, **kwargs) for spec in mine]))
    return [out[j] for j in slot]


def sort_key(width: Any) -> tuple[int, int]:
    """Menu order of a width: by bits, the plain width (an int) before its variants (a width object's
    own ``sort_key()``); TypeError for anything else."""
    key = getattr(width, "sort_key", None)
    if key is not None:
        return key()
    if isinstance(width, int) and not isinstance(width, bool):
        return (width, 0)
    raise TypeError(f"not a menu width: {width!r}")


def menu_key(spec: Spec, shape: Sequence[int] | None = None) -> Any:
    """The menu width ``spec`` is shown as (``4``, ``4dq``, ``q4_k``, ``3rdq-row``: a row-scaled width
    is told by its block being the row of ``shape``), by its family."""
    return FAMILIES.get(spec.family).key(spec, shape)


def widths(family: str, bits: Iterable[int], double_quant: str = "off", rotation: str = "off") -> tuple[Any, ...]:
    """``family``'s menu widths for ``bits`` (16 excluded) under a double quantization mode and a
    rotation mode (ValueError for a rotation mode other than ``off`` where the family has none)."""
    fam = FAMILIES.get(family)
    if not fam.rotation:
        if rotation != "off":
            raise ValueError(f"{family} widths cannot be rotated (--rotation applies to {', '.join(rotating())})")
        return fam.menu(bits, double_quant)
    return fam.menu(bits, double_quant, rotation)


def rotating() -> list[str]:
    """The families whose widths can be rotated."""
    return [name for name in FAMILIES if FAMILIES.get(name).rotation]


from . import codebook as _codebook  # noqa: E402,F401  (registers "nf")
from . import gguf as _gguf  # noqa: E402,F401  (registers "gguf")

"""llama.cpp's GGUF block formats as LoftQ quantizers: ``encode``/``decode`` and a tensor type.

``encode(w [rows, cols], "q4_k")`` -> uint8 [rows, cols / block * type_size], byte for byte the
tensor data a GGUF file stores for that type; ``decode`` reverses it to fp32, bit-exact with
``gguf.quants.dequantize`` (and llama.cpp). Block-32 formats (q8_0, q5_0, q5_1, q4_0, iq4_nl)
take any width divisible by 32; the K-quants and iq4_xs need rows that are a whole number of
256-value super-blocks (:func:`allowed_types`).
Ours is the encoder (a least-squares scale search per block, see :mod:`loftq.gguf_fit`); GGUF
fixes only the decoding, so any codes are valid.

Why a sibling of :class:`~loftq.quant.QuantizedTensor` instead of it: that type is codes + one
fp32 absmax per block against a global codebook, with an integer width. A GGUF block interleaves
fp16 super-scales, packed integer sub-scales/mins and codes in one record, widths are fractional
(q4_k: 4.5 bits/weight), and the bytes must be exactly GGUF's. :class:`GGUFTensor` stores those
bytes and nothing else, so ``nbytes`` is the size of the tensor's data in a GGUF file.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

import torch

from . import gguf_fit as fit
from . import gguf_layout as lay
from .registry import Registry


@dataclass(frozen=True)
class GGUFType:
    """One GGUF block format: ``block_size`` weights are stored in ``type_size`` bytes."""

    name: str
    ggml_type: int  # ggml's enum value (GGMLQuantizationType), written in GGUF tensor headers
    code_bits: int  # the width in the type's name (q5_1 -> 5, though it stores 6.0 bits/weight)
    block_size: int
    type_size: int
    # fp32 [n, block], objective, column importance [n, block] or None -> fields
    encode_blocks: Callable[[torch.Tensor, str, fit.Columns], lay.Fields]
    pack: Callable[[lay.Fields], torch.Tensor]  # fields -> uint8 [n, type_size]
    decode_blocks: Callable[[torch.Tensor], torch.Tensor]  # uint8 [n, type_size] -> fp32 [n, block]
    description: str = ""
    objective: str = "plain"  # the encoder's default error objective (loftq.gguf_fit.OBJECTIVES)
    # what llama.cpp's quantizer (llama-cpp-python 0.3.36, 0c1e57098) stores instead on a row that is not
    # whole blocks of this type (its quantize log says so); None: a block of 32, every row we take holds it
    fallback: str | None = None
    # ... when an importance vector is given: rms_abs x importance gave the lowest whole-model
    # perplexity on SmolLM2 for 6 of 8 types (plain won on q4_0 and, by 0.1 %, q4_k)
    importance_objective: str = "rms_abs"

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


GGUF_TYPES: Registry[GGUFType] = Registry("GGUF quantization type")
for _t in (  # name, ggml enum, code bits, block, bytes per block, encoder, packer, decoder
    GGUFType("q8_0", 8, 8, lay.QK, 34, fit.encode_q8_0, lay.pack_q8_0, lay.decode_q8_0,
             "8-bit codes, one fp16 scale per 32"),
    GGUFType("q4_0", 2, 4, lay.QK, 18, fit.encode_q4_0, lay.pack_nibbles32, lay.decode_q4_0,
             "4-bit codes -8..7, one fp16 scale per 32", "rms_abs"),
    GGUFType("iq4_nl", 20, 4, lay.QK, 18, fit.encode_iq4_nl, lay.pack_nibbles32, lay.decode_iq4_nl,
             "4-bit non-linear grid, one fp16 scale per 32", "rms_abs"),
    GGUFType("q5_0", 6, 5, lay.QK, 22, fit.encode_q5_0, lay.pack_q5_0, lay.decode_q5_0,
             "5-bit codes -16..15, one fp16 scale per 32", "rms_abs"),
    GGUFType("q5_1", 7, 5, lay.QK, 24, fit.encode_q5_1, lay.pack_q5_1, lay.decode_q5_1,
             "5-bit codes 0..31, one fp16 scale and fp16 offset per 32", "rms_abs"),
    GGUFType("q2_k", 10, 2, lay.QK_K, 84, fit.encode_q2_k, lay.pack_q2_k, lay.decode_q2_k,
             "2-bit codes, 4-bit scales and mins per 16, fp16 d and dmin per 256", "rms_abs", fallback="q4_0"),
    GGUFType("q3_k", 11, 3, lay.QK_K, 110, fit.encode_q3_k, lay.pack_q3_k, lay.decode_q3_k,
             "3-bit codes, 6-bit scales per 16, fp16 d per 256", fallback="q4_0"),
    GGUFType("q4_k", 12, 4, lay.QK_K, 144, fit.encode_q4_k, lay.pack_q4_k, lay.decode_q4_k,
             "4-bit codes, 6-bit scales and mins per 32, fp16 d and dmin per 256", "rms_abs", fallback="q5_0"),
    GGUFType("q5_k", 13, 5, lay.QK_K, 176, fit.encode_q5_k, lay.pack_q5_k, lay.decode_q5_k,
             "5-bit codes, 6-bit scales and mins per 32, fp16 d and dmin per 256", "rms_abs", fallback="q5_1"),
    GGUFType("q6_k", 14, 6, lay.QK_K, 210, fit.encode_q6_k, lay.pack_q6_k, lay.decode_q6_k,
             "6-bit codes, int8 scales per 16, fp16 d per 256", "rms_abs", fallback="q8_0"),
    GGUFType("iq4_xs", 23, 4, lay.QK_K, 136, fit.encode_iq4_xs, lay.pack_iq4_xs, lay.decode_iq4_xs,
             "4-bit non-linear grid, 6-bit scales per 32, fp16 d per 256", "rms_abs", fallback="iq4_nl"),
):
    GGUF_TYPES.add(_t.name, _t)


def gguf_type(name: str) -> GGUFType:
    """The format registered as ``name`` (lower case: ``q4_k``); unknown names list the known."""
    return GGUF_TYPES.get(name)


def allowed_types(shape: tuple[int, ...]) -> tuple[str, ...]:
    """GGUF types that can store a weight of ``shape`` ([out, in]: rows of length ``in``)."""
    return tuple(n for n in GGUF_TYPES if shape[-1] % GGUF_TYPES.get(n).block_size == 0)


def check_shape(shape: tuple[int, ...], name: str) -> GGUFType:
    """The format, or ``ValueError`` naming the shape when its rows are not whole blocks."""
    t = gguf_type(name)
    if len(shape) != 2 or shape[-1] % t.block_size:
        raise ValueError(f"{name} stores [rows, cols] weights with cols a multiple of {t.block_size}; "
                         f"got shape {tuple(shape)}")
    return t


def gguf_nbytes(shape: tuple[int, ...], name: str) -> int:
    """Exact bytes of a [rows, cols] weight stored as ``name`` (the tensor's data in a GGUF file)."""
    t = check_shape(shape, name)
    return shape[0] * (shape[1] // t.block_size) * t.type_size


def column_weights(importance: torch.Tensor, shape: tuple[int, int], block_size: int) -> torch.Tensor:
    """The per-column importance [cols] as every weight's factor, laid out like the weight's blocks:
    fp32 [rows * cols / block_size, block_size] on importance's device, scaled to mean 1.

    ValueError naming the value unless importance is a real [cols] tensor, finite, >= 0 and not all
    zero. A zero entry (a column no calibration input reached) takes the smallest positive one, so a
    block of such columns is fitted by the objective alone rather than zeroed."""
    rows, cols = shape
    if not isinstance(importance, torch.Tensor) or importance.shape != (cols,) or importance.is_complex():
        got = tuple(importance.shape) if isinstance(importance, torch.Tensor) else type(importance).__name__
        raise ValueError(f"importance must be a real tensor of shape [cols] = [{cols}], got {got}")
    imp = importance.detach().float()
    bad = ~torch.isfinite(imp) | (imp < 0)
    if bad.any():
        j = int(bad.nonzero()[0])
        raise ValueError(f"importance must be finite and >= 0; importance[{j}] = {float(importance[j])!r}")
    if not (imp > 0).any():
        raise ValueError("importance is all zero: no column would count; pass None to weigh them alike")
    imp = torch.where(imp > 0, imp, imp[imp > 0].min())
    imp = imp / imp.mean()
    return imp.view(1, cols // block_size, block_size).expand(rows, -1, -1).reshape(-1, block_size)


def encode(weight: torch.Tensor, name: str, objective: str | None = None,
           importance: torch.Tensor | None = None) -> torch.Tensor:
    """fp32/fp16/bf16 [rows, cols] -> uint8 [rows, cols / block_size * type_size] in GGUF layout.

    ``objective``: the error the scale search minimises (``plain``, ``w2``, ``rms_abs``, ``s2w2``;
    see :mod:`loftq.gguf_fit`), default the type's ``objective``. ``importance``: fp32 [cols] >= 0,
    the diagonal of the calibration inputs' second moment E[x_j^2] (llama.cpp's imatrix); the
    squared error of weight (r, j) then counts importance[j] times the objective's factor, so the
    search weighs each error by what it does to the layer's output, and the default objective is
    the type's ``importance_objective``. None: every column alike (the bytes are exactly those
    without the argument). Runs on the weight's device; raises
    ``ValueError`` on a shape the format cannot hold, an unknown objective, non-finite values or a
    bad importance (see :func:`column_weights`). Magnitudes beyond fp16's range saturate the scales.
    """
    t = check_shape(tuple(weight.shape), name)
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"weight contains non-finite values; refusing to encode as {name}")
    rows, cols = weight.shape
    blocks = weight.detach().float().reshape(-1, t.block_size)
    if importance is None:
        columns, default = None, t.objective
    else:
        columns = column_weights(importance, (rows, cols), t.block_size).to(blocks.device)
        default = t.importance_objective
    fields = t.encode_blocks(blocks, objective or default, columns)
    return t.pack(fields).view(rows, cols // t.block_size * t.type_size)


def decode(data: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 [rows, row_bytes] in GGUF layout -> fp32 [rows, row_bytes / type_size * block_size]."""
    t = gguf_type(name)
    if data.dtype != torch.uint8 or data.ndim != 2 or data.shape[1] % t.type_size:
        raise ValueError(f"{name} data must be uint8 [rows, k * {t.type_size}], "
                         f"got {data.dtype} {tuple(data.shape)}")
    rows, nbytes = data.shape
    values = t.decode_blocks(data.reshape(-1, t.type_size))
    return values.view(rows, nbytes // t.type_size * t.block_size)


@dataclass(frozen=True)
class GGUFSpec:
    """A weight stored as GGUF type ``name`` (its block, bytes and decoding are llama.cpp's)."""

    name: str
    family = "gguf"
    double_quant = False
    randomized_svd = False  # LoftQ's block Krylov low-rank step was validated on codebook widths only

    def __post_init__(self) -> None:
        GGUF_TYPES.get(self.name)  # unknown names list the known ones

    @property
    def type(self):
        return GGUF_TYPES.get(self.name)

    @property
    def bits(self) -> int:
        return self.type.code_bits

    @property
    def block_size(self) -> int:
        return self.type.block_size

    @property
    def method(self) -> str:
        return self.name  # a type names itself where a codebook spec names its method

    def nbytes(self, shape: Sequence[int]) -> int:
        return gguf_nbytes(tuple(int(s) for s in shape), self.name)

    def check_shape(self, shape: Sequence[int]) -> None:
        check_shape(tuple(int(s) for s in shape), self.name)

    def quantize(self, weight: torch.Tensor, *, rounding: str = "nearest", moment: torch.Tensor | None = None,
                 upper: torch.Tensor | None = None, importance: torch.Tensor | None = None,
                 damp: float = 0.01) -> "GGUFTensor":
        """The type's encoder; its block scales searched under the per-column ``importance`` [in] (by
        default the diagonal of ``moment``, E[x_j^2]: what llama.cpp's imatrix holds), else under the
        type's own objective. Error-feedback rounding does not apply to a block type: ``rounding`` is
        round-to-nearest's here (:meth:`feedback_applies` says so)."""
        if importance is None and moment is not None:
            importance = moment.diagonal().float()
        return gguf_quantize(weight, self.name, **({"importance": importance} if importance is not None else {}))

    def feedback_applies(self, shape: Sequence[int]) -> bool:
        return False

    def restore(self, tensors: Mapping[str, torch.Tensor], shape: Sequence[int], dtype: torch.dtype) -> GGUFTensor:
        shape = tuple(int(s) for s in shape)
        self.check_shape(shape)
        if set(tensors) != {"qweight"}:
            raise ValueError(f"a {self.name} layer is one qweight tensor, got {', '.join(sorted(tensors))}")
        data = tensors["qweight"]
        want = (shape[0], self.nbytes(shape) // shape[0])
        if data.dtype != torch.uint8 or tuple(data.shape) != want:
            raise ValueError(f"{self.name} data for shape {list(shape)} is uint8 {list(want)}, got "
                             f"{data.dtype} {list(data.shape)}")
        return GGUFTensor(data, shape, dtype, self.name)

    @property
    def ggml_type(self) -> int:
        return self.type.ggml_type

    @property
    def bnb_4bit(self) -> bool:
        return False


@dataclass
class GGUFTensor:
    """A weight stored in a GGUF block format: ``data`` uint8 [rows, row_bytes], nothing else."""

    data: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    qtype: str

    @property
    def quant_name(self) -> str:
        return self.qtype

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """fp32 decode (bit-exact with llama.cpp), then cast to ``dtype`` (default: the original), about
        ``CHUNK`` weights per decode call (its temporaries stay that size, not weight-sized)."""
        dtype = dtype or self.dtype
        rows, row_len = self.shape
        step = max(1, CHUNK // row_len)
        if step >= rows:
            return decode(self.data, self.qtype).to(dtype)
        out = torch.empty(rows, row_len, dtype=dtype, device=self.data.device)
        for start in range(0, rows, step):
            out[start:start + step] = decode(self.data[start:start + step], self.qtype)
        return out

    def to(self, device: torch.device | str) -> "GGUFTensor":
        return replace(self, data=self.data.to(device))

    # -- the format protocol (loftq.formats.Quantized) -------------------------------------------
    @property
    def spec(self) -> GGUFSpec:
        return GGUFSpec(self.qtype)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.data}


CHUNK = 1 << 22  # weights decoded per step by GGUFTensor.dequantize


def gguf_quantize(weight: torch.Tensor, name: str, objective: str | None = None,
                  importance: torch.Tensor | None = None) -> GGUFTensor:
    """Encode ``weight`` [rows, cols] as GGUF type ``name`` (``objective``, ``importance``: see :func:`encode`)."""
    return GGUFTensor(encode(weight, name, objective, importance), tuple(weight.shape), weight.dtype, name)

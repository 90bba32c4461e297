"""Blockwise codebook quantization: ``quantize(w, bits, ...) -> QuantizedTensor`` and back.

Semantics follow bitsandbytes so its kernels can consume our codes: the tensor is flattened, cut
into ``ceil(numel / block_size)`` blocks, each block is scaled by ``1 / absmax`` (fp32), clamped to
[-1, 1] and rounded to the nearest codebook entry (ties go to the lower entry); the tail block is
divided by its absmax. Dequantization is ``codebook[code] * absmax`` in fp32, cast to the dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

import torch

from .codebooks import DQ_BLOCK, code_lookup, int8_codebook, nf_codebook, uniform_codebook
from .packing import pack, packed_numel, unpack
from .registry import Registry

INT8_RECIPROCAL = 7.874015718698502e-3  # 1/127 as bitsandbytes writes it


@dataclass(frozen=True)
class Method:
    """A quantization scheme: a codebook per width and how blocks are laid out."""

    name: str
    bits: tuple[int, ...]
    codebook: Callable[[int], torch.Tensor]
    rowwise: bool = False  # one block per row of the last dim (bnb's int8 layout)
    description: str = ""


METHODS: Registry[Method] = Registry("quantization method")
METHODS.add("nf", Method("nf", (2, 3, 4, 8), nf_codebook, description="NormalFloat-k, blockwise absmax"))
METHODS.add("uniform", Method("uniform", (2, 4, 8), uniform_codebook, description="symmetric uniform, blockwise absmax"))
METHODS.add("int8", Method("int8", (8,), lambda b: int8_codebook(), rowwise=True,
                           description="bitsandbytes row-wise int8: round(127 x / row absmax)"))


@dataclass(frozen=True)
class QuantConfig:
    """How one weight is quantized. ``block_size`` is ignored by row-wise methods."""

    bits: int
    method: str = "nf"
    block_size: int = 64
    double_quant: bool = False

    def __post_init__(self) -> None:
        m = METHODS.get(self.method)  # raises listing the known methods
        if self.bits not in m.bits:
            raise ValueError(f"method {self.method!r} supports bits {m.bits}, got bits={self.bits!r}")
        bs = self.block_size
        # A power of two (the menu's blocks), or any multiple of 16: a row-scaled width's block is
        # the layer's row length (576, 1536, ...), so its blocks are whole rows.
        if not isinstance(bs, int) or isinstance(bs, bool) or bs < 16 or bs % 16:
            raise ValueError(f"block_size must be a multiple of 16 (a power of two, or a row length), got {bs!r}")

    @property
    def spec(self) -> Method:
        return METHODS.get(self.method)

    @property
    def quant_name(self) -> str:
        """Short name for plans and tables: nf4, nf2, nf8, int8, uniform4, ..."""
        return quant_name(self.method, self.bits)

    @classmethod
    def from_name(cls, name: str, block_size: int = 64, double_quant: bool = False) -> "QuantConfig":
        """The config a :attr:`quant_name` stands for (its method and width from the registry)."""
        method, bits = parse_quant_name(name)
        return cls(bits, method, block_size, double_quant)

    # -- the format protocol (loftq.formats.Spec) ------------------------------------------------
    family = "nf"  # the codebook family: NormalFloat, uniform, bitsandbytes' int8
    randomized_svd = True  # LoftQ's block Krylov low-rank step was validated on these widths

    @property
    def name(self) -> str:
        return self.quant_name

    def nbytes(self, shape: Sequence[int]) -> int:
        """Exact bytes stored for a weight of ``shape`` (codes and every constant)."""
        numel = 1
        for s in shape:
            numel *= int(s)
        return expected_nbytes(numel, self, row=int(shape[-1]))

    def check_shape(self, shape: Sequence[int]) -> None:
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"{self.quant_name} stores [out, in] weights; got shape {tuple(shape)}")

    def quantize(self, weight: torch.Tensor, *, rounding: str = "nearest", moment: torch.Tensor | None = None,
                 upper: torch.Tensor | None = None, importance: torch.Tensor | None = None,
                 damp: float = 0.01) -> "QuantizedTensor":
        """Round to nearest, or with ``rounding="feedback"`` by error feedback under the input second
        moment (``moment`` H [in, in], or ``upper``: its inverse factor already computed) where
        :meth:`feedback_applies` (elsewhere to nearest). ``importance`` does not apply: a codebook
        block's scale is its absmax."""
        if rounding == "feedback" and self.feedback_applies(tuple(weight.shape)):
            if upper is None and moment is None:
                raise ValueError("rounding='feedback' needs the input second moment (moment=H or upper=...)")
            return ROUNDERS["feedback"](weight, self, moment, damp, upper=upper)
        return quantize(weight, config=self)

    def feedback_applies(self, shape: Sequence[int]) -> bool:
        """Error feedback rounds whole blocks of input columns: blockwise methods, in % block == 0."""
        return len(shape) == 2 and not self.spec.rowwise and int(shape[1]) % self.block_size == 0

    def restore(self, tensors: Mapping[str, torch.Tensor], shape: Sequence[int],
                dtype: torch.dtype) -> "QuantizedTensor":
        """The QuantizedTensor stored as ``tensors`` (``qweight`` = the packed codes, and the
        constants by name); ValueError when their sizes are not this spec's for ``shape``."""
        own = dict(tensors)
        if "qweight" not in own:
            raise ValueError("no qweight tensor")
        packed = own.pop("qweight")
        unknown = sorted(set(own) - set(CONSTANT_NAMES))
        if unknown:
            raise ValueError(f"unexpected tensors {', '.join(unknown)}")
        block = int(shape[-1]) if self.spec.rowwise else self.block_size
        qt = QuantizedTensor(packed, tuple(int(s) for s in shape), dtype, self, block=block, **own)
        numel = qt.numel
        if packed.dtype != torch.uint8 or packed.numel() != packed_numel(numel, self.bits) or qt.nbytes != self.nbytes(shape):
            raise ValueError(f"{qt.nbytes} bytes ({packed.numel()} of {packed.dtype} codes) are not what "
                             f"{self.quant_name} stores for shape {list(shape)} ({self.nbytes(shape)})")
        return qt

    @property
    def ggml_type(self) -> int | None:
        return None  # no GGUF type holds NormalFloat codes

    @property
    def bnb_4bit(self) -> bool:
        """NF4 at a power-of-two block, which bitsandbytes' kernels take (a row-scaled width's block of
        576 or 1536 is not one: such a layer dequantizes through our own decoder, even on CUDA)."""
        bs = self.block_size
        return self.method == "nf" and self.bits == 4 and not bs & (bs - 1)


        return Width(self.bits) if self.double_quant else self.bits


def quant_name(method: str, bits: int) -> str:
    """The one naming rule: a method with a single width is named alone (``int8``), others get
    their width appended (``nf4``, ``uniform2``)."""
    return method if len(METHODS.get(method).bits) == 1 else f"{method}{bits}"


def parse_quant_name(name: str) -> tuple[str, int]:
    """(method, bits) of a quantizer name, by lookup in the registry (no digit parsing: a future
    name such as ``q8_0`` need not end in its width); ValueError listing the known names."""
    known = {quant_name(m, b): (m, b) for m in METHODS for b in METHODS.get(m).bits}
    try:
        return known[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown quantizer {name!r}; known: {', '.join(sorted(known))}") from None


@dataclass
class QuantizedTensor:
    """Packed codes plus every constant needed to dequantize.

    ``packed``: uint8 [packed_numel]. Without double quantization ``absmax`` is fp32 [n_blocks];
    with it, ``absmax`` is None and ``absmax_codes`` (uint8 [n_blocks]), ``absmax_scale`` (fp32
    [ceil(n_blocks / 256)]) and ``absmax_offset`` (fp32 [1]) hold it. Codebooks are global
    constants of the method and are not stored per tensor.
    """

    packed: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    config: QuantConfig
    absmax: torch.Tensor | None = None
    absmax_codes: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None
    block: int = field(default=64)  # effective block length (row length for row-wise methods)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.block)

    def constants(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in CONSTANT_NAMES if getattr(self, n) is not None}

    @property
    def nbytes(self) -> int:
        """Exact bytes stored: packed codes plus every constant tensor."""
        total = self.packed.numel() * self.packed.element_size()
        for t in self.constants().values():
            total += t.numel() * t.element_size()
        return total

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        moved = {k: v.to(device) for k, v in self.constants().items()}
        return replace(self, packed=self.packed.to(device), **moved)

    # -- the format protocol (loftq.formats.Quantized) -------------------------------------------
    @property
    def spec(self) -> QuantConfig:
        return self.config

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.packed, **self.constants()}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[out, in] in ``dtype`` (default: the original), the numbers of :func:`dequantize`, in
        block-aligned chunks of ~CHUNK weights (the temporaries stay that size, not weight-sized);
        NF4 on CUDA through bitsandbytes' kernel when it is installed (it reads our codes bit-exactly)."""
        dtype = dtype or self.dtype
        if self.packed.is_cuda and self.config.bnb_4bit and _bnb_available():
            from .bnb import bnb_quant_state
            from bitsandbytes.functional import dequantize_4bit

            return dequantize_4bit(self.packed.view(-1, 1), bnb_quant_state(self, dtype)).view(self.shape)
        if self.numel <= CHUNK or self.config.spec.rowwise:
            return _decode(self, dtype)
        absmax = stored_absmax(self)
        flat_cfg = replace(self.config, double_quant=False)
        step = max(1, CHUNK // self.block) * self.block
        out = torch.empty(self.numel, dtype=dtype, device=self.packed.device)
        bits = self.config.bits
        for start in range(0, self.numel, step):
            stop = min(self.numel, start + step)
            part = QuantizedTensor(self.packed[start * bits // 8: -(-stop * bits // 8)], (stop - start,), dtype,
                                   flat_cfg, absmax=absmax[start // self.block: -(-stop // self.block)],
                                   block=self.block)
            out[start:stop] = _decode(part, dtype)
        return out.view(self.shape)


CONSTANT_NAMES = ("absmax", "absmax_codes", "absmax_scale", "absmax_offset")
# rounding name -> quantizer(weight, config, upper=...) other than round-to-nearest: loftq.rounding
# registers "feedback" when the package loads (it builds on this module, so it plugs in, not the reverse)
ROUNDERS: dict[str, Callable[..., "QuantizedTensor"]] = {}
CHUNK = 1 << 22  # weights dequantized per step by QuantizedTensor.dequantize


@lru_cache(maxsize=None)
def _bnb_available() -> bool:
    try:
        import bitsandbytes.functional  # noqa: F401
    except Exception:  # bnb raises various errors when its native library is missing
        return False
    return True


def expected_nbytes(numel: int, config: QuantConfig, row: int | None = None) -> int:
    """Bytes :func:`quantize` stores for ``numel`` weights (``row``: last-dim size, row-wise methods)."""
    block = row if config.spec.rowwise else config.block_size
    if block is None:
        raise ValueError("row-wise methods need the row length")
    n_blocks = -(-numel // block)
    consts = 4 * n_blocks
    if config.double_quant:
        consts = n_blocks + 4 * (-(-n_blocks // DQ_BLOCK)) + 4
    return packed_numel(numel, config.bits) + consts


def count_nonfinite(tensor: torch.Tensor) -> int:
    """How many NaN/Inf values ``tensor`` holds (0 for integer tensors). The common all-finite case
    costs no tensor-sized temporary: min and max propagate NaN and reach Inf (a bool mask per layer
    measurably raised the streaming peak: freed large blocks stay with the allocator)."""
    if not tensor.is_floating_point() or not tensor.numel():
        return 0
    lo, hi = torch.aminmax(tensor)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def check_finite(weight: torch.Tensor, what: str = "weight") -> None:
    bad = count_nonfinite(weight)
    if bad:
        raise ValueError(f"{what} contains {bad} non-finite value(s) (NaN or Inf); refusing to quantize")


def _blocks(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """[n] fp32 -> zero-padded [n_blocks, block] and the tail length (0 = no tail)."""
    tail = flat.numel() % block
    if tail:
        flat = torch.cat([flat, flat.new_zeros(block - tail)])
    return flat.view(-1, block), tail


CLIP_GRID = tuple(1.0 - i / 20 for i in range(15))  # 1.00, 0.95, ..., 0.30: a row scale's share of its absmax
SEARCH_CHUNK = 1 << 20  # weights per step of the scale search


def searches_scale(config: "QuantConfig", shape: Sequence[int]) -> bool:
    """Whether ``config`` on a weight of ``shape`` picks its block scales by search (:func:`row_scales`):
    a blockwise codebook whose block is a whole row longer than 64 (a row-scaled width,
    ``3rdq-row``). One absmax per 64 weights is close to the best scale; one per row of hundreds of
    entries (384 on MiniLM, 576 on SmolLM2) is not: the largest sets it, and most codes go unused."""
    return (not config.spec.rowwise and len(shape) >= 2 and config.block_size > 64
            and config.block_size == int(shape[-1]))


def row_scales(blocks: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Per block [n, block] (fp32), the scale among ``CLIP_GRID`` x its absmax whose round-to-nearest
    codes have the least squared error (ties keep the larger scale; an all-zero block keeps 0).
    Entries beyond the scale take the end code. Measured on 12 SmolLM2 layers in a rotated basis,
    error feedback, output error ||(W - Q) L|| / ||W L|| against the absmax: NF2 0.250 -> 0.152,
    NF3 0.081 -> 0.072, NF4 0.036 -> 0.034 (README "Below 4 bits").

    Every grid scale at once, from each block's sorted values y = w / absmax: the entries that
    round to book value q_k at scale c are a run of the sorted block (between c x its midpoints),
    so the error is sum_k (n_k (c q_k)^2 - 2 c q_k S_k) + sum y^2 from the run lengths n_k and
    prefix sums S_k: one sort and a search of G x (K - 1) bounds per block instead of G roundings
    of every entry (the same scales, 3x faster on SmolLM2's rotated layers)."""
    return row_scales_many(blocks, [codebook])[0]


def row_scales_many(blocks: torch.Tensor, codebooks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`row_scales` of ``blocks`` for each codebook, the blocks sorted once for all of them
    (a layer's row-scaled NF2, NF3 and NF4 search one rotated weight)."""
    n, m = blocks.shape
    absmax = blocks.abs().amax(dim=1)
    outs = [absmax.clone() for _ in codebooks]
    grid = torch.tensor(CLIP_GRID, dtype=torch.float64, device=blocks.device)
    searches = []
    for codebook in codebooks:
        book = codebook.to(blocks.device, torch.float64)
        bounds = (grid[:, None] * (book[:-1] + book[1:])[None, :] / 2).reshape(-1).float()  # [G * (K - 1)]
        searches.append((bounds, grid[:, None] * book[None, :]))  # [G, K]: a code's value, in units of absmax
    step = max(1, SEARCH_CHUNK // max(1, m))
    for start in range(0, n, step):
        am = absmax[start:start + step]
        y = (blocks[start:start + step] / am.clamp(min=1e-30)[:, None]).sort(dim=1).values
        r = y.shape[0]
        prefix = torch.nn.functional.pad(y.double().cumsum(dim=1), (1, 0))  # [r, m + 1]
        for out, (bounds, level) in zip(outs, searches):
            # a value rounds to the entry whose code counts the midpoints strictly below it
            cut = torch.searchsorted(y, bounds.expand(r, -1).contiguous(), right=True).view(r, len(grid), -1)
            edges = torch.cat([cut.new_zeros(r, len(grid), 1), cut, cut.new_full((r, len(grid), 1), m)], dim=2)
            count = edges.diff(dim=2).double()
            total = prefix.gather(1, edges.view(r, -1)).view(r, len(grid), -1).diff(dim=2)
            err = (count * level.square() - 2 * level * total).sum(dim=2)  # [r, G], less sum y^2 (the same for every c)
            out[start:start + step] = am * grid.to(am.dtype)[err.argmin(dim=1)]  # argmin: the first, the larger scale
    return outs


def _encode(flat: torch.Tensor, block: int, codebook: torch.Tensor, absmax: torch.Tensor | None,
            rowwise: bool, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [n] -> (uint8 codes [n, padded to a whole byte], absmax [n_blocks]).

    ``absmax`` given: use it instead of the blocks' own (double quantization).
    """
    n = flat.numel()
    blocks, tail = _blocks(flat, block)
    if absmax is None:
        absmax = blocks.abs().amax(dim=1)
    safe = absmax.clamp(min=1e-38).unsqueeze(1)
    if rowwise:  # bnb int8: round(x * (127 / absmax)), code index = value + 127
        codes = torch.round(blocks * (127.0 / safe)).clamp_(-127, 127).add_(127)
        return codes.to(torch.uint8).reshape(-1)[:n], absmax
    # Keep the zero-padded tail codes up to a whole byte: bnb packs the zero code there. (A 3-bit
    # code straddles bytes: its exact tail is zero bits, see loftq.packing.)
    keep = n + (-n) % (8 // bits) if 8 % bits == 0 else n
    scaled = blocks * (1.0 / safe)
    if tail:  # bnb divides the tail block instead of multiplying by the reciprocal
        scaled[-1] = blocks[-1] / safe[-1]
    scaled.clamp_(-1.0, 1.0)
    codes = code_lookup(codebook).codes(scaled.reshape(-1)[:keep])
    return codes.to(torch.uint8), absmax


def _double_quantize(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    offset = absmax.mean().reshape(1)
    centred = absmax - offset
    codes, scale = _encode(centred, DQ_BLOCK, uniform_codebook(8).to(absmax.device), None, False)
    return {"absmax_codes": codes, "absmax_scale": scale, "absmax_offset": offset}


def _dq_absmax(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    values = uniform_codebook(8).to(codes.device)[codes.long()]
    blocks, _ = _blocks(values, DQ_BLOCK)
    return (blocks * scale.unsqueeze(1)).reshape(-1)[: codes.numel()] + offset


def quantize(weight: torch.Tensor, bits: int | None = None, *, method: str = "nf", block_size: int = 64,
             double_quant: bool = False, config: QuantConfig | None = None) -> QuantizedTensor:
    """Quantize ``weight`` (any shape; fp32, fp16 or bf16) with a codebook and blockwise absmax.

    Either pass ``bits`` (+ method, block_size, double_quant) or a ready :class:`QuantConfig`.
    Raises ``ValueError`` on non-finite input or an unsupported (method, bits) pair.
    """
    if config is None:
        if bits is None:
            raise ValueError("quantize() needs bits or a QuantConfig")
        config = QuantConfig(bits, method, block_size, double_quant)
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    check_finite(weight)
    spec = config.spec
    block = weight.shape[-1] if spec.rowwise else config.block_size
    flat = weight.detach().reshape(-1).float()
    codebook = spec.codebook(config.bits).to(weight.device)
    absmax = row_scales(_blocks(flat, block)[0], codebook) if searches_scale(config, weight.shape) else None
    consts: dict[str, torch.Tensor] = {}
    if config.double_quant:
        true_absmax = _blocks(flat, block)[0].abs().amax(dim=1) if absmax is None else absmax
        consts = _double_quantize(true_absmax)
        # Encode against the absmax that dequantization will see, not the exact one.
        absmax = _dq_absmax(consts["absmax_codes"], consts["absmax_scale"], consts["absmax_offset"])
    codes, absmax = _encode(flat, block, codebook, absmax, spec.rowwise, config.bits)
    if not config.double_quant:
        consts = {"absmax": absmax.float()}
    return QuantizedTensor(pack(codes, config.bits), tuple(weight.shape), weight.dtype, config,
                           block=block, **consts)


def stored_absmax(qt: QuantizedTensor) -> torch.Tensor:
    """The fp32 [n_blocks] absmax actually used to dequantize."""
    if qt.absmax is not None:
        return qt.absmax
    return _dq_absmax(qt.absmax_codes, qt.absmax_scale, qt.absmax_offset)


def dequantize(qt: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A stored weight (any :class:`loftq.formats.Quantized`) -> tensor of its shape in ``dtype``
    (default: the original dtype). A codebook tensor is computed in fp32 (codebook value times
    absmax), then cast, as bitsandbytes does; a GGUF tensor decodes by its own format (bit-exact
    with llama.cpp)."""
    return qt.dequantize(dtype)


def _decode(qt: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The codebook maths of :func:`dequantize` for one QuantizedTensor, in one pass."""
    codes = unpack(qt.packed, qt.config.bits, qt.numel)
    if qt.config.spec.rowwise:  # bnb's int8 arithmetic, in its order: c * absmax * (1/127)
        rows = (codes.float() - 127.0).view(-1, qt.block)
        out = rows * stored_absmax(qt).view(-1, 1) * INT8_RECIPROCAL
        return out.reshape(qt.shape).to(dtype or qt.dtype)
    codebook = qt.config.spec.codebook(qt.config.bits).to(codes.device)
    values = codebook[codes.long()]
    blocks, _ = _blocks(values, qt.block)
    out = (blocks * stored_absmax(qt).unsqueeze(1)).reshape(-1)[: qt.numel]
    return out.reshape(qt.shape).to(dtype or qt.dtype)


def squared_norm(x: torch.Tensor) -> torch.Tensor:
    """float64 squared Frobenius norm over the last two dims: fp32 row norms squared and summed in
    float64 (a float64 copy of a weight stack cost 50x more)."""
    return torch.linalg.vector_norm(x.float(), dim=-1).double().pow(2).sum(-1)


# blocks per step of the fused quantizer: on a CPU its temporaries stay in the L2 cache; on a GPU
# fewer, larger kernels (16 MB temporaries)
CHUNK_BLOCKS = {"cpu": 2048}
CHUNK_BLOCKS_OTHER = 65536


def fake_quantize(weight: torch.Tensor, config: QuantConfig, *, checked: bool = False) -> torch.Tensor:
    """``dequantize(quantize(weight, config=config), float32)`` without packing: fp32, same shape.

    Only the last dim is used for row-wise methods; any leading dims are flattened like quantize().
    ``checked``: the caller already verified the input is finite.
    """
    if not checked:
        check_finite(weight)
    if config.double_quant:
        return _decode(quantize(weight, config=config), torch.float32)
    if config.spec.rowwise:
        rows = weight.detach().reshape(-1, weight.shape[-1]).float()
        absmax = rows.abs().amax(dim=1, keepdim=True)
        codes = torch.round(rows * (127.0 / absmax.clamp(min=1e-38))).clamp_(-127, 127)
        return (codes * absmax * INT8_RECIPROCAL).view(weight.shape)
    return _fused(weight, [config], None)[0][0]


def quantization_residual(weight: torch.Tensor, config: QuantConfig, *, dtype: torch.dtype = torch.float32,
                          checked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, ||R||^2) with R = weight - fake_quantize(weight, config) in ``dtype`` (same shape) and its
    squared Frobenius norm per matrix (float64 [L] for a [L, out, in] stack, [] for one matrix),
    summed from the fp32 residual whatever ``dtype`` is. One fused pass, in cache-sized chunks."""
    return quantization_residuals(weight, [config], dtype=dtype, checked=checked)[0]


def quantization_residuals(weight: torch.Tensor, configs: Sequence[QuantConfig], *,
                           dtype: torch.dtype = torch.float32, checked: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`quantization_residual` for each config; blockwise codebook configs of one block size
    share one pass (absmax, scaled values and lookup cells are computed once for all widths)."""
    if not checked:
        check_finite(weight)
    shared = [c for c in configs if not (c.spec.rowwise or c.double_quant or searches_scale(c, weight.shape))]
    sizes = {c.block_size for c in shared}
    straddle = weight.ndim == 3 and any((weight.shape[1] * weight.shape[2]) % bs for bs in sizes)
    out: dict[QuantConfig, tuple[torch.Tensor, torch.Tensor]] = {}
    for size in sizes if not straddle else ():
        group = [c for c in shared if c.block_size == size]
        residuals, sqs = _fused(weight, group, dtype)
        for c, res, sq in zip(group, residuals, sqs):
            total = sq.view(weight.shape[0] if weight.ndim == 3 else 1, -1).double().sum(dim=1)
            out[c] = res, total if weight.ndim == 3 else total[0]
    for c in configs:
        if c in out:
            continue
        if weight.ndim == 3:  # blocks would straddle two matrices of the stack, or rows are blocks
            parts = [quantization_residual(m, c, dtype=dtype, checked=True) for m in weight]
            out[c] = torch.stack([r for r, _ in parts]), torch.stack([sq for _, sq in parts])
        else:
            res = weight.detach().float() - fake_quantize(weight, c, checked=True)
            out[c] = res.to(dtype), res.double().pow(2).sum()
    return [out[c] for c in configs]


def _fused(weight: torch.Tensor, configs: Sequence[QuantConfig],
           residual_dtype: torch.dtype | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Blockwise codebook configs of one block size, without double quantization, CHUNK_BLOCKS
    blocks at a time: the dequantized weight (fp32) per config, or with ``residual_dtype`` the
    residual weight - dequantized in that dtype and fp32 [n_blocks] per-block squared residuals."""
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    codebooks = [c.spec.codebook(c.bits).to(weight.device) for c in configs]
    scale = max(code_lookup(cb).scale for cb in codebooks)
    lookups = [code_lookup(cb, scale) for cb in codebooks]  # one grid: the cells are shared
    blocks, tail = _blocks(flat, configs[0].block_size)
    outs = [torch.empty(blocks.shape, dtype=residual_dtype or torch.float32, device=weight.device) for _ in configs]
    sqs = [torch.empty(blocks.shape[0], device=weight.device) for _ in configs] if residual_dtype else []
    chunk = CHUNK_BLOCKS.get(weight.device.type, CHUNK_BLOCKS_OTHER)
    for start in range(0, blocks.shape[0], chunk):
        rows = slice(start, start + chunk)
        part = blocks[rows]
        absmax = part.abs().amax(dim=1, keepdim=True)  # 9x faster than aminmax along a dim of 64
        safe = absmax.clamp(min=1e-38)
        scaled = part * safe.reciprocal()
        if tail and start + part.shape[0] == blocks.shape[0]:  # bnb divides the tail block
            scaled[-1] = part[-1] / safe[-1]
        scaled.clamp_(-1.0, 1.0)
        cells = lookups[0].cells(scaled)
        for i, (codebook, lookup) in enumerate(zip(codebooks, lookups)):
            codes = lookup.codes(scaled, cells)
            deq = codebook.index_select(0, codes.view(-1)).view(part.shape).mul_(absmax)
            if not sqs:
                outs[i][rows] = deq
                continue
            torch.sub(part, deq, out=deq)
            outs[i][rows] = deq
            sqs[i][rows] = deq.square_().sum(dim=1)
    if tail:  # the zero padding may quantize to a non-zero code (uniform): not counted
        for out, sq in zip(outs, sqs):
            sq[-1] = out[-1, :tail].float().pow(2).sum()
    return [out.view(-1)[:n].view(weight.shape) for out in outs], sqs

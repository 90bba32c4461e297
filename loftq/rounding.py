"""Data-aware rounding of the quantized weight: error feedback under the input second moment.

Round-to-nearest (:func:`loftq.quant.quantize`) picks each code alone. With the layer's input
second moment H = X^T X / n [in, in], the error that matters is ||(W - Q) L||_F (L L^T = H + damp,
:func:`loftq.solver.calibration_factor`): a rounding error in one input column can be partly undone
by the columns that are still to be rounded, because correlated inputs see them together.
:func:`quantize_feedback` rounds the input columns left to right and, after column j, moves its
error onto the columns right of j by the upper Cholesky factor U of (H + damp)^-1 (the optimal
update of the remaining weights for a fixed rounded column; then U's next row serves the next
column). Columns are taken one run of at most 64 at a time (lazy updates, :func:`loop_block`): inside
a run the next ``STEP`` columns are updated column by column, the rest of the run gets their errors
in one product, and the rest of the matrix gets the whole run's errors in one product at its end.

The result is an ordinary :class:`~loftq.quant.QuantizedTensor` of the config's layout (same packed
codes, same constants, same bytes), so every dequantizer, packer and byte count takes it unchanged.
Only the choice of codes differs: the block scales are round-to-nearest's (W's absmax).
"""
from __future__ import annotations

import math

import torch

from .codebooks import code_lookup
from .packing import pack
from .quant import (ROUNDERS, QuantConfig, QuantizedTensor, _double_quantize, _dq_absmax, check_finite, count_nonfinite,
                    row_scales_many, searches_scale)

ROUNDINGS = ("nearest", "feedback")
STEP = 8  # columns updated one by one; the rest of their block gets their errors in one product
LOOP_BLOCK = 64  # the longest run of columns the loop takes at a time (loop_block)


def check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}; got {rounding!r}")


def feedback_applies(in_features: int, method: str, block_size: int) -> bool:
    """Whether :func:`quantize_feedback` can round a weight with ``in_features`` inputs in this
    format: a blockwise method whose blocks are whole runs of input columns. Where it cannot, the
    planner (tables, weight bank, materialize) rounds that layer to nearest."""
    from .quant import METHODS

    return not METHODS.get(method).rowwise and in_features % block_size == 0


def inverse_factor(second_moment: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor U (fp32 [in, in]) of (H + damp * mean(diag H) * I)^-1: U^T U = (H + ridge)^-1.

    The ridge is :func:`loftq.solver.calibration_factor`'s, so the feedback minimises the norm the
    solver reports. An input that never fires (zero diagonal) has a zero row and column in H: it is
    decoupled from the others and rounds to nearest; with ``damp=0`` its diagonal is set to the
    mean so that the factor exists. Computed in float64.
    """
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    if not isinstance(second_moment, torch.Tensor) or second_moment.ndim != 2 \
            or second_moment.shape[0] != second_moment.shape[1]:
        shape = tuple(second_moment.shape) if isinstance(second_moment, torch.Tensor) else type(second_moment).__name__
        raise ValueError(f"the input second moment must be a square [in, in] tensor, got {shape}")
    check_finite(second_moment, "input second moment")
    h = second_moment.detach().double().clone()
    diag = h.diagonal()
    mean = float(diag.mean()) if diag.numel() else 0.0
    if mean <= 0:  # no input ever fired: every column is dead, nothing couples them
        mean = 1.0
    dead = diag == 0
    diag.add_(damp * max(mean, 1e-12))
    if damp == 0:
        diag[dead] = mean
    # No explicit inverse: with J the reversal, chol(J H J) = M gives H = R R^T, R = J M J upper,
    # so H^-1 = R^-T R^-1 and U = R^-1 (upper, positive diagonal): one Cholesky and one triangular
    # inverse (2.5x faster than inverting H and factoring the inverse, measured at 1536^2).
    lower, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if int(info):
        raise ValueError(f"the input second moment (+ damp={damp}) is not positive definite; use damp > 0")
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    upper = torch.linalg.solve_triangular(lower.flip(0, 1), eye, upper=True)
    if count_nonfinite(upper):
        raise ValueError(f"the input second moment (+ damp={damp}) is too ill-conditioned to invert; raise damp")
    return upper.float()


class _Grid:
    """:func:`loftq.codebooks.code_lookup` for several codebooks at once, each row of a stacked
    column in its own book: the books' lookups at one grid scale (so a value's cell is the same in
    every book), their tables laid end to end, a row's cell offset into its book's part. A value's
    code is the number of midpoints strictly below it (ties to the lower entry, bucketize's codes,
    bit for bit); :meth:`rounded` gives the book entry of that code in one gather (the midpoint in
    the cell and the entries on either side of it)."""

    def __init__(self, codebooks: list[torch.Tensor], out: int, device: torch.device) -> None:
        scale = max(code_lookup(b).scale for b in codebooks)
        lookups = [code_lookup(b.to(device), scale) for b in codebooks]
        self.cells, size = lookups[0].cells, 2 * scale + 1  # the cell of a value, in any of the books
        self.base = torch.cat([lk.base for lk in lookups])
        self.threshold = torch.cat([lk.threshold for lk in lookups])
        below = [b.to(device)[lk.base.long()] for b, lk in zip(codebooks, lookups)]
        above = [b.to(device)[(lk.base.long() + 1).clamp(max=len(b) - 1)] for b, lk in zip(codebooks, lookups)]
        self.near = torch.stack([self.threshold, torch.cat(below), torch.cat(above)], dim=1)  # [k * size, 3]
        self.offsets = (torch.arange(len(codebooks), device=device) * size).repeat_interleave(out)

    def rounded(self, scaled: torch.Tensor, j: int = 0) -> torch.Tensor:
        """The book entry each value of one stacked column (fp32 [rows]) rounds to (``j``: its
        column in the block, unused)."""
        near = self.near.index_select(0, self.cells(scaled).add_(self.offsets))
        return torch.where(scaled > near[:, 0], near[:, 2], near[:, 1])

    def codes(self, scaled: torch.Tensor) -> torch.Tensor:
        """The codes (int32, each in its own book) of a block of stacked columns [columns, rows]."""
        idx = self.cells(scaled).view_as(scaled).add_(self.offsets).reshape(-1)
        codes = self.base.index_select(0, idx)
        codes += scaled.reshape(-1) > self.threshold.index_select(0, idx)
        return codes.view_as(scaled)


class _Search:
    """One codebook: the code by ``bucketize`` over its midpoints (a one-book step needs fewer calls
    so than through :class:`_Grid`: 7 SmolLM2 layers x 4 widths one at a time, 2.38 s against 3.34
    s), kept per column of the block for :meth:`codes`."""

    def __init__(self, codebook: torch.Tensor, block: int, out: int) -> None:
        self.book, self.mids = codebook, (codebook[:-1] + codebook[1:]) / 2
        self.kept = torch.empty(block, out, dtype=torch.long, device=codebook.device)

    def rounded(self, scaled: torch.Tensor, j: int) -> torch.Tensor:
        return self.book.index_select(0, torch.bucketize(scaled, self.mids, out=self.kept[j]))

    def codes(self, scaled: torch.Tensor) -> torch.Tensor:
        return self.kept


def _feedback(w: torch.Tensor, upper: torch.Tensor, codebooks: list[torch.Tensor], block: int,
              scales: list[torch.Tensor]) -> list[torch.Tensor]:
    """Round ``w`` (fp32 [out, in]) column by column with error feedback, once per (codebook, scales).

    ``block``: the run of columns taken at a time (:func:`loop_block`); ``scales``: per format, the
    absmax [out, in // block] to round against (the stored ones, repeated where a format's block is
    longer than the run).
    Returns each format's uint8 codes [out, in]. The formats are stacked along the output rows
    (the feedback moves errors along the input columns, so every output row evolves alone): one
    column step serves every format, and each format's codes are what a call with it alone gives.
    Works on W^T so that a column is a contiguous row; the loop is per column, so each step is a
    few small calls. A value rounds to the book entry whose code is the number of midpoints strictly
    below it (ties to the lower entry: code_lookup's codes), read from :class:`_Grid`'s cells by one
    gather for every format at once (one format: :class:`_Search`); the step needs only the entry,
    so the codes of a block of columns are read once at its end from the scaled values it kept.
    (Profiled on SmolLM2's layers: a compare against all 255 of NF8's midpoints cost 3x the rest of
    the step; a row-wise ``searchsorted`` over the books' padded midpoints was 65-70% of the loop.)
    """
    out, n = w.shape
    k = len(codebooks)
    rows = k * out
    wt = w.t().repeat(1, k)  # [in, k * out]: a copy per format, never the caller's tensor
    grid = _Grid(codebooks, out, w.device) if k > 1 else _Search(codebooks[0].to(w.device), block, out)
    codes = torch.empty(n, rows, dtype=torch.uint8, device=w.device)
    used = torch.cat(scales).t().contiguous()  # [in // block, k * out]
    err = w.new_empty(block, rows)
    scaled = w.new_empty(block, rows)  # the values each column was rounded from
    for g, c0 in enumerate(range(0, n, block)):
        c1 = c0 + block
        part = wt[c0:c1]
        absmax = used[g]
        inv = absmax.clamp(min=1e-38).reciprocal()  # quantize()'s arithmetic: x * (1 / absmax)
        diag = upper[c0:c1, c0:c1]
        for s0 in range(0, block, STEP):  # a second level of lazy updates inside the block
            s1 = min(block, s0 + STEP)
            for j in range(s0, s1):
                x = torch.mul(part[j], inv, out=scaled[j]).clamp_(-1.0, 1.0)
                deq = grid.rounded(x, j) * absmax  # dequantize()'s product, bit for bit
                torch.div(part[j] - deq, diag[j, j], out=err[j])
                if j + 1 < s1:  # small enough to stay on one thread
                    part[j + 1:s1].sub_(diag[j, j + 1:s1, None] * err[j])
            if s1 < block:
                part[s1:].addmm_(diag[s0:s1, s1:].t(), err[s0:s1], alpha=-1.0)
        codes[c0:c1] = grid.codes(scaled)
        if c1 < n:
            wt[c1:].addmm_(upper[c0:c1, c1:].t(), err, alpha=-1.0)
    return [codes[:, i * out:(i + 1) * out].t().contiguous() for i in range(k)]


def _check(weight: torch.Tensor, config: QuantConfig) -> None:
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        what = f"{weight.dtype} {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"feedback rounding takes a 2-D floating weight [out, in], got {what}")
    if config.spec.rowwise:
        raise ValueError(f"feedback rounding needs a blockwise method, not the row-wise {config.method!r}")
    if weight.shape[1] % config.block_size:
        raise ValueError(f"feedback rounding needs in_features ({weight.shape[1]}) divisible by the block "
                         f"size ({config.block_size}): a block must be a run of input columns of one row")
    check_finite(weight)


def quantize_feedback(weight: torch.Tensor, config: QuantConfig, second_moment: torch.Tensor | None = None,
                      damp: float = 0.01, *, upper: torch.Tensor | None = None) -> QuantizedTensor:
    """Quantize ``weight`` [out, in] in ``config``'s format, choosing codes by error feedback under H.

    ``second_moment``: H [in, in] of the layer's inputs (or ``upper``, its :func:`inverse_factor`
    computed once for several calls). Lowers ||(W - deq Q) L|| against :func:`loftq.quant.quantize`;
    with H diagonal (H = I) no error moves and the codes are round-to-nearest's, bit for bit.
    Every block's absmax is taken from W first (and double-quantized when the config says so), and
    the feedback rounds against those stored values: the feedback sees the scales dequantization
    uses, in one pass; an updated weight beyond its block's absmax takes the end code. Measured on 12 SmolLM2 layers (16 x 256 pydoc tokens), mean
    ||(W - Q) L|| / ||W L|| of this / updated exact absmax double-quantized afterwards / a second
    pass against those: NF2 0.2305 / 0.2604 / 0.2611, NF3 0.0808 / 0.0812 / 0.0812, NF4 0.0369 /
    0.0367 / 0.0366. Without double quantization, W's scales against the updated weights' absmax:
    NF2 0.2304 / 0.2604 (after the rank-16 fit, on held-out moments, 0.2473 / 0.2723, where
    round-to-nearest gives 0.2700), NF3 0.0809 / 0.0810, NF4 0.0369 / 0.0364.
    Raises ValueError on non-finite input, a shape mismatch, a row-wise method or in % block != 0.
    """
    return quantize_feedback_many(weight, [config], second_moment, damp, upper=upper)[0]


BATCH_BYTES = 256 << 20  # the stacked working copy of W per call of the column loop, at most


def loop_block(block: int) -> int:
    """The run of columns the feedback loop takes at a time for a format of ``block``: the block,
    at most LOOP_BLOCK. A row-scaled width's block (576-1536 columns) then runs in the 64-blocks'
    loop, its scale repeated per run, instead of a loop of its own (each loop is a pass of Python
    steps over every column). A function of the block alone, so a format's codes are the same
    whichever formats share its loop."""
    return math.gcd(int(block), LOOP_BLOCK)


def quantize_feedback_many(weight: torch.Tensor, configs: list[QuantConfig], second_moment: torch.Tensor | None = None,
                           damp: float = 0.01, *, upper: torch.Tensor | None = None) -> list[QuantizedTensor]:
    """:func:`quantize_feedback` of ``weight`` in each of ``configs``, in one column loop per
    :func:`loop_block` for as many of them as fit BATCH_BYTES of working copy (a row-scaled width
    shares the 64-blocks' loop, its one scale a row repeated per run): each result is the one a call
    with that config alone returns, code for code (the planner's weight bank encodes a layer's
    widths so)."""
    if not configs:
        return []
    for config in configs:
        _check(weight, config)
    if upper is None:
        if second_moment is None:
            raise ValueError("quantize_feedback() needs the input second moment (or its inverse factor)")
        upper = inverse_factor(second_moment.to(weight.device), damp)
    if tuple(upper.shape) != (weight.shape[1],) * 2:
        raise ValueError(f"the input second moment is {tuple(upper.shape)}, the weight has "
                         f"{weight.shape[1]} inputs")
    w = weight.detach().float()
    upper = upper.to(w.device, torch.float32)
    out = w.shape[0]
    # the scales are W's absmax (once per block) or, for a row-scaled width, round-to-nearest's
    # search (the same codes' scales as quantize(); one sort of W for all of them), fixed before
    # any column is rounded
    searched = [i for i, c in enumerate(configs) if searches_scale(c, w.shape)]
    found = dict(zip(searched, row_scales_many(w, [configs[i].spec.codebook(configs[i].bits).to(w.device)
                                                   for i in searched]))) if searched else {}
    absmax: dict[int, torch.Tensor] = {}
    consts, fixed = [], []
    for i, config in enumerate(configs):
        block = config.block_size
        if i in found:
            scales = found[i]
        else:
            if block not in absmax:
                absmax[block] = w.view(out, -1, block).abs().amax(dim=2).reshape(-1)
            scales = absmax[block]
        if config.double_quant:
            c = _double_quantize(scales)
            consts.append(c)
            used = _dq_absmax(c["absmax_codes"], c["absmax_scale"], c["absmax_offset"]).view(out, -1)
        else:
            consts.append({"absmax": scales.clone()})
            used = scales.view(out, -1)
        fixed.append(used.repeat_interleave(block // loop_block(block), dim=1))  # one per run of the loop
    groups: dict[int, list[int]] = {}
    for i, config in enumerate(configs):
        groups.setdefault(loop_block(config.block_size), []).append(i)
    per_call = max(1, BATCH_BYTES // max(1, w.numel() * 4))
    codes: dict[int, torch.Tensor] = {}
    for unit, idx in groups.items():
        for i in range(0, len(idx), per_call):
            part = idx[i:i + per_call]
            books = [configs[j].spec.codebook(configs[j].bits).to(w.device) for j in part]
            codes.update(zip(part, _feedback(w, upper, books, unit, [fixed[j] for j in part])))
    return [QuantizedTensor(pack(codes[i], c.bits), tuple(weight.shape), weight.dtype, c, block=c.block_size, **k)
            for i, (c, k) in enumerate(zip(configs, consts))]


ROUNDERS["feedback"] = quantize_feedback  # QuantConfig.quantize(rounding="feedback") rounds by it

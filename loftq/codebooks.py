"""Codebooks: sorted value tables in [-1, 1] that blockwise-absmax-scaled weights are rounded to.

NormalFloat-k (QLoRA's NF4, the LoftQ repository's NF2, and NF3 by the same construction):
2^(k-1) positive normal quantiles, one zero and 2^(k-1) - 1 negative ones at evenly spaced
probabilities, asymmetric so that zero is exact, scaled to [-1, 1]. ``nf_codebook(4)`` reproduces
bitsandbytes' NF4 table to float32 precision. NF3 is [-1, -0.479, -0.217, 0, 0.161, 0.338, 0.563, 1]:
its positive half is every other positive NF4 value (the probabilities nest), its negative half not.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

DQ_BLOCK = 256  # block of the second-level (double) quantization of the absmax constants (QLoRA)
from scipy.stats import norm

# Probability of the outermost quantile (QLoRA): chosen so that the extreme codes are +-1 after
# normalisation with a finite Gaussian tail.
NF_OFFSET = 0.9677083


@lru_cache(maxsize=None)
def _nf_values(bits: int) -> tuple[float, ...]:
    half = 2 ** (bits - 1)
    positive = norm.ppf(torch.linspace(NF_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1].numpy())
    negative = -norm.ppf(torch.linspace(NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1].numpy())
    values = sorted([*positive.tolist(), 0.0, *negative.tolist()])
    top = max(abs(v) for v in values)
    return tuple(v / top for v in values)


# QLoRA's published NF4 values (the float32 literals bitsandbytes ships). Our construction gives
# the same numbers to within one float32 ulp; the literals make the codes bit-exact with bnb.
NF4_PUBLISHED = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


def nf_construct(bits: int) -> torch.Tensor:
    """NormalFloat-``bits`` from its definition (float64 maths, float32 result)."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"NormalFloat is defined here for 2, 3, 4 or 8 bits, got {bits}")
    return torch.tensor(_nf_values(bits), dtype=torch.float32)


@lru_cache(maxsize=None)
def _nf_table(bits: int) -> torch.Tensor:
    if bits == 4:
        return torch.tensor(NF4_PUBLISHED, dtype=torch.float32)
    return nf_construct(bits)


def nf_codebook(bits: int) -> torch.Tensor:
    """NormalFloat-``bits`` table, shape [2**bits], float32, sorted ascending, min -1, max 1."""
    return _nf_table(bits).clone()


def uniform_codebook(bits: int) -> torch.Tensor:
    """Symmetric uniform table: 2**bits evenly spaced values from -1 to 1 (absmax-scaled)."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"uniform quantization is defined here for 2, 3, 4 or 8 bits, got {bits}")
    return torch.linspace(-1.0, 1.0, 2**bits, dtype=torch.float32)


def int8_codebook() -> torch.Tensor:
    """bitsandbytes' row-wise int8: round(x * 127 / absmax); code c in [-127, 127] means c / 127.

    Stored as 255 values in 8-bit codes (code index = c + 127; index 255 unused).
    """
    return torch.cat([torch.arange(-127, 128, dtype=torch.float32) / 127.0, torch.ones(1)])


# ---------------------------------------------------------------- nearest entry, vectorised
# torch.bucketize (a scalar binary search per element) was most of the residual tables' time. A table
# over a uniform grid of [-1, 1] gives the same codes with gathers: cell(x) = int(x * S + S) holds at
# most one midpoint of the codebook, so code(x) = base[cell] + (x > threshold[cell]).
CELL_SLACK = 1e-6  # > 2**-23: fl(x * S + S) can put x at most this far outside its cell (S a power of 2)


@dataclass(frozen=True)
class CodeLookup:
    """``scale`` S; ``base`` int32 [2S + 1] = number of midpoints below the cell (widened by
    CELL_SLACK); ``threshold`` fp32 [2S + 1] = the midpoint inside the cell, +inf if none."""

    scale: int
    base: torch.Tensor
    threshold: torch.Tensor

    def cells(self, scaled: torch.Tensor) -> torch.Tensor:
        """int64 [numel] grid cell of each value of ``scaled`` (the same for every lookup of this scale)."""
        return (scaled.reshape(-1) * self.scale).add_(self.scale).long()

    def codes(self, scaled: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
        """codes of ``scaled`` (fp32, any shape, values in [-1, 1]): the index of the nearest codebook
        entry, ties to the lower one; equal to ``torch.bucketize(scaled, midpoints)`` (int32)."""
        cells = self.cells(scaled) if cells is None else cells
        codes = self.base.index_select(0, cells)
        codes += scaled.reshape(-1) > self.threshold.index_select(0, cells)
        return codes.view(scaled.shape)


@lru_cache(maxsize=None)
def _lookup(values: tuple[float, ...], device: str, scale: int) -> CodeLookup:
    mids = (torch.tensor(values[:-1]) + torch.tensor(values[1:])) / 2  # fp32, as bucketize sees them
    exact = mids.double()
    while True:
        edges = torch.arange(2 * scale + 1, dtype=torch.float64) / scale - 1
        base = torch.searchsorted(exact, edges - CELL_SLACK)  # midpoints < the cell's lowest value
        upto = torch.searchsorted(exact, edges + 1 / scale + CELL_SLACK, right=True)
        if int((upto - base).max()) <= 1:
            break
        scale *= 2  # NF8's closest midpoints are ~0.005 apart: S = 256
    threshold = torch.cat([mids, torch.tensor([float("inf")])])[base]
    return CodeLookup(scale, base.to(torch.int32).to(device), threshold.to(device))


def code_lookup(codebook: torch.Tensor, scale: int = 64) -> CodeLookup:
    """The :class:`CodeLookup` of a sorted fp32 codebook in [-1, 1], on the codebook's device
    (cached), with the smallest grid scale >= ``scale`` (a power of two) that works."""
    if scale < 1 or scale & (scale - 1):
        raise ValueError(f"scale must be a power of two, got {scale!r}")
    return _lookup(tuple(codebook.float().cpu().tolist()), str(codebook.device), scale)

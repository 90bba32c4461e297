"""Codebooks: sorted value tables in [-1, 1] that blockwise-absmax-scaled weights are rounded to.

NormalFloat-k (QLoRA's NF4, the LoftQ repository's NF2, and NF3 by the same construction):
2^(k-1) positive normal quantiles, one zero and 2^(k-1) - 1 negative ones at evenly spaced
probabilities, asymmetric so that zero is exact, scaled to [-1, 1]. ``nf_codebook(4)`` reproduces
bitsandbytes' NF4 table to float32 precision. NF3 is [-1, -0.479, -0.217, 0, 0.161, 0.338, 0.563, 1]:
its positive half is every other positive NF4 value (the probabilities nest), its negative half not.
"""
from __future__ import annotations

from functools import lru_cache

import torch
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

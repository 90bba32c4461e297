"""Loop-free bit packing of integer codes into uint8.

Within a byte the first code takes the most significant bits (bitsandbytes' NF4 nibble order:
element 2i in the high nibble, 2i+1 in the low one). The code stream is zero-padded to a whole byte.
"""
from __future__ import annotations

import torch

PACKABLE_BITS = (2, 4, 8)


def _per_byte(bits: int) -> int:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"can pack 2, 4 or 8-bit codes, got {bits} bits")
    return 8 // bits


def packed_numel(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` codes of ``bits`` bits."""
    per = _per_byte(bits)
    return (numel + per - 1) // per


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: any shape, integer values in [0, 2**bits) -> flat uint8 [packed_numel(numel, bits)]."""
    per = _per_byte(bits)
    flat = codes.reshape(-1).to(torch.uint8)
    if per == 1:
        return flat.clone()
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    slabs = flat.view(-1, per)  # one row per output byte
    out = torch.zeros(slabs.shape[0], dtype=torch.uint8, device=codes.device)
    for j in range(per):  # per <= 4 slabs shifted together, no per-element loop
        out |= slabs[:, j] << (bits * (per - 1 - j))
    return out


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: flat uint8 -> flat uint8 codes [numel]."""
    per = _per_byte(bits)
    flat = packed.reshape(-1)
    if per == 1:
        return flat[:numel].clone()
    mask = (1 << bits) - 1
    shifts = torch.tensor([bits * (per - 1 - j) for j in range(per)], dtype=torch.uint8, device=flat.device)
    codes = (flat.unsqueeze(1) >> shifts) & mask
    return codes.reshape(-1)[:numel]

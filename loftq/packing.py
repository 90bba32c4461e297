"""Loop-free bit packing of integer codes into uint8.

The code stream is MSB-first: the first code takes the most significant bits (bitsandbytes' NF4
nibble order: element 2i in the high nibble, 2i+1 in the low one). Widths that divide 8 pack whole
codes per byte; a 3-bit code straddles bytes, so 8 codes fill a 24-bit group of 3 bytes. Storage is
exact: ``ceil(numel * bits / 8)`` bytes, the unused low bits of the last byte are zero.
"""
from __future__ import annotations

import torch

PACKABLE_BITS = (2, 3, 4, 8)


def _check(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"can pack {', '.join(map(str, PACKABLE_BITS))}-bit codes, got {bits} bits")


def _group(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte group: (8 // bits, 1) or, for 3 bits, (8, 3)."""
    return (8 // bits, 1) if 8 % bits == 0 else (8, bits)


def packed_numel(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` codes of ``bits`` bits: ceil(numel * bits / 8)."""
    _check(bits)
    return (numel * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: any shape, integer values in [0, 2**bits) -> flat uint8 [packed_numel(numel, bits)]."""
    _check(bits)
    per, nbytes = _group(bits)
    flat = codes.reshape(-1).to(torch.uint8)
    n = flat.numel()
    if per == 1:
        return flat.clone()
    pad = (-n) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    slabs = flat.view(-1, per)  # one row per group
    if nbytes == 1:
        out = torch.zeros(slabs.shape[0], dtype=torch.uint8, device=codes.device)
        for j in range(per):  # per <= 4 slabs shifted together, no per-element loop
            out |= slabs[:, j] << (bits * (per - 1 - j))
        return out
    word = torch.zeros(slabs.shape[0], dtype=torch.int32, device=codes.device)
    for j in range(per):  # the group as one 24-bit integer, first code highest
        word |= slabs[:, j].to(torch.int32) << (bits * (per - 1 - j))
    out = torch.stack([(word >> (8 * (nbytes - 1 - k))) & 0xFF for k in range(nbytes)], dim=1)
    return out.to(torch.uint8).reshape(-1)[: packed_numel(n, bits)]


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: flat uint8 -> flat uint8 codes [numel]."""
    _check(bits)
    per, nbytes = _group(bits)
    flat = packed.reshape(-1)
    if per == 1:
        return flat[:numel].clone()
    mask = (1 << bits) - 1
    if nbytes == 1:
        shifts = torch.tensor([bits * (per - 1 - j) for j in range(per)], dtype=torch.uint8, device=flat.device)
        codes = (flat.unsqueeze(1) >> shifts) & mask
        return codes.reshape(-1)[:numel]
    pad = (-flat.numel()) % nbytes  # the exact tail leaves the last group short of bytes
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, nbytes).to(torch.int32)
    word = torch.zeros(groups.shape[0], dtype=torch.int32, device=flat.device)
    for k in range(nbytes):
        word |= groups[:, k] << (8 * (nbytes - 1 - k))
    shifts = torch.tensor([bits * (per - 1 - j) for j in range(per)], dtype=torch.int32, device=flat.device)
    codes = (word.unsqueeze(1) >> shifts) & mask
    return codes.to(torch.uint8).reshape(-1)[:numel]

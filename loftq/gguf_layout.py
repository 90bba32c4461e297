"""GGUF (llama.cpp) block layouts: fields <-> bytes, and bytes -> fp32 weights.

Every function works on a batch of blocks: ``blocks`` is uint8 [n, type_size], values are fp32
[n, block_size]. :class:`Fields` is what an encoder decides per block (fp16 super-scales, small
integer sub-block scales and mins, the stored unsigned codes); ``pack_*`` lays them out in GGUF's
byte order, ``decode_*`` reverses it and multiplies in the order llama.cpp's reference (and the
``gguf`` package) does, one fp32 rounding per product, so results are bit-exact with both.
Byte layouts, for n blocks (element e of a 256 super-block):

- q8_0 (34 B / 32): d fp16 | int8 q[32];                   w = q * d
- q4_0, iq4_nl (18 B / 32): d fp16 | qs[16];  nibble lo = e < 16, hi = e >= 16 of byte e % 16;
  q4_0: w = d * (u - 8);  iq4_nl: w = d * IQ4_NL_VALUES[u]
- q5_0 (22 B / 32): d | qh[4] | qs[16] (as q4_0);  fifth code bit of e = bit e % 8 of qh[e // 8]
  (one little-endian uint32);  w = d * (u - 16)
- q5_1 (24 B / 32): d | m | qh[4] | qs[16] (as q5_0);  w = d * u + m
- q2_k (84 B): scales[16] (sc | m << 4) | qs[64] | d | dmin;  2-bit code of e at byte
  32 (e // 128) + e % 32, bits 2 ((e // 32) % 4);  w = (d sc) u - (dmin m), sub-block e // 16
- q3_k (110 B): hmask[32] | qs[64] (as q2_k) | scales[12] (16 x 6 bit, offset 32) | d;
  high code bit of e = bit e // 32 of hmask[e % 32];  w = (d s) (u - 4)
- q4_k (144 B): d | dmin | scales[12] (8 x 6-bit sc and m) | qs[128]; nibble of e at byte
  32 (e // 64) + e % 32, hi nibble when (e // 32) is odd;  w = (d sc) u - (dmin m), sub-block e // 32
- q5_k (176 B): d | dmin | scales[12] (as q4_k) | qh[32] | qs[128] (as q4_k); fifth code bit of e =
  bit e // 32 of qh[e % 32];  w = (d sc) u - (dmin m), sub-block e // 32
- iq4_xs (136 B): d | scales_h (uint16: bits 2j..2j+1 = high 2 bits of sub-block j's 6-bit scale) |
  scales_l[4] (low 4 bits, sub-block j in byte j // 2, hi nibble when j is odd) | qs[128] (each
  sub-block of 32 as iq4_nl's 16 bytes);  w = (d (s - 32)) * IQ4_NL_VALUES[u], sub-block e // 32
- q6_k (210 B): ql[128] | qh[64] | int8 scales[16] | d;  low nibble of e at ql[64 (e // 128) + e % 64]
  (hi when (e // 64) is odd), top 2 bits at qh[32 (e // 128) + e % 32] bits 2 ((e // 32) % 4);
  w = (d s) (u - 32)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

QK = 32  # block of the simple formats
QK_K = 256  # super-block of the K-quants
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass
class Fields:
    """One encoder's decisions for n blocks.

    ``d``/``dmin``: fp16 [n] (q5_1: ``dmin`` is its offset m, added rather than subtracted);
    ``scales``/``mins``: int64 [n, sub-blocks] (the stored unsigned or signed values); ``codes``:
    int64 [n, block_size] as stored (unsigned, before any offset).
    """

    d: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor | None = None
    dmin: torch.Tensor | None = None
    mins: torch.Tensor | None = None


def _half_bytes(h: torch.Tensor) -> torch.Tensor:
    """fp16 [n] -> uint8 [n, 2] (little-endian, as GGUF stores it)."""
    return h.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2)


def _half(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte ``at`` of every block, widened exactly to fp32 [n, 1]."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _or_shifted(parts: torch.Tensor, dim: int, step: int) -> torch.Tensor:
    """OR together the slices along ``dim``, slice i shifted left by ``step * i`` (uint8)."""
    out = torch.zeros_like(parts.select(dim, 0), dtype=torch.uint8)
    for i in range(parts.shape[dim]):  # at most 8 slices: a loop over bit planes, not over blocks
        out |= parts.select(dim, i).to(torch.uint8) << (step * i)
    return out


def _split_shifted(packed: torch.Tensor, dim: int, count: int, step: int) -> torch.Tensor:
    """Inverse of :func:`_or_shifted`: uint8 -> int64 with a new axis ``dim`` of ``count`` slices."""
    shifts = torch.arange(0, count * step, step, device=packed.device, dtype=torch.uint8)
    view = [1] * (packed.ndim + 1)
    view[dim] = count
    return ((packed.unsqueeze(dim) >> shifts.view(view)) & ((1 << step) - 1)).long()


# ---- block 32: q8_0, q4_0, iq4_nl -------------------------------------------------------------

def pack_q8_0(f: Fields) -> torch.Tensor:
    q = f.codes.to(torch.int8).view(torch.uint8)
    return torch.cat([_half_bytes(f.d), q], dim=1)


def decode_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    q = blocks[:, 2:].contiguous().view(torch.int8).float()
    return q * _half(blocks, 0)


def pack_nibbles32(f: Fields) -> torch.Tensor:
    """q4_0 and iq4_nl: codes 0..15, element e in byte e % 16 (low nibble first half)."""
    u = f.codes.to(torch.uint8)
    return torch.cat([_half_bytes(f.d), u[:, :16] | (u[:, 16:] << 4)], dim=1)


def _nibbles32(blocks: torch.Tensor) -> torch.Tensor:
    qs = blocks[:, 2:]
    return torch.cat([qs & 15, qs >> 4], dim=1).long()


def decode_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    return _half(blocks, 0) * (_nibbles32(blocks) - 8).float()


def decode_iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    values = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=blocks.device)
    return _half(blocks, 0) * values[_nibbles32(blocks)]


def _pack_high_bits32(u: torch.Tensor) -> torch.Tensor:
    """q5_0 / q5_1's qh: bit 4 of each of 32 codes [n, 32] -> [n, 4], element e at bit e % 8 of byte e // 8."""
    return _or_shifted((u >> 4).view(-1, 4, 8), 2, 1)


def _codes5_32(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The 5-bit codes [n, 32] of a q5_0 / q5_1 block whose qh starts at byte ``at``."""
    high = _split_shifted(blocks[:, at:at + 4], 2, 8, 1).reshape(-1, QK)
    qs = blocks[:, at + 4:]
    return torch.cat([qs & 15, qs >> 4], dim=1).long() | (high << 4)


def pack_q5_0(f: Fields) -> torch.Tensor:
    u = f.codes.to(torch.uint8)
    low = u & 15
    return torch.cat([_half_bytes(f.d), _pack_high_bits32(u), low[:, :16] | (low[:, 16:] << 4)], dim=1)


def decode_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    return _half(blocks, 0) * (_codes5_32(blocks, 2) - 16).float()


def pack_q5_1(f: Fields) -> torch.Tensor:
    u = f.codes.to(torch.uint8)
    low = u & 15
    return torch.cat([_half_bytes(f.d), _half_bytes(f.dmin), _pack_high_bits32(u),
                      low[:, :16] | (low[:, 16:] << 4)], dim=1)


def decode_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    return _half(blocks, 0) * _codes5_32(blocks, 4).float() + _half(blocks, 2)


# ---- super-block 256 --------------------------------------------------------------------------

def _pack_2bit(u: torch.Tensor) -> torch.Tensor:
    """[n, 256] codes 0..3 -> [n, 64]: element h*128 + s*32 + l at byte h*32 + l, bits 2s."""
    return _or_shifted(u.view(-1, 2, 4, 32), 2, 2).view(-1, 64)


def _unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    return _split_shifted(qs.reshape(-1, 2, 32), 2, 4, 2).reshape(-1, QK_K)


def pack_q2_k(f: Fields) -> torch.Tensor:
    scales = (f.scales | (f.mins << 4)).to(torch.uint8)
    return torch.cat([scales, _pack_2bit(f.codes), _half_bytes(f.d), _half_bytes(f.dmin)], dim=1)


def decode_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    sc = blocks[:, :16]
    dl = (_half(blocks, 80) * (sc & 15).float()).unsqueeze(2)
    ml = (_half(blocks, 82) * (sc >> 4).float()).unsqueeze(2)
    q = _unpack_2bit(blocks[:, 16:80]).view(-1, 16, 16).float()
    return (dl * q - ml).reshape(-1, QK_K)


def pack_q3_k(f: Fields) -> torch.Tensor:
    u = f.codes  # 0..7 = q + 4
    hmask = _or_shifted((u >> 2).view(-1, 8, 32), 1, 1)
    s6 = (f.scales + 32).to(torch.uint8)  # 16 x 6 bits
    low = s6 & 15
    high = _or_shifted((s6 >> 4).view(-1, 4, 4), 1, 2)  # byte 8 + k holds sub-blocks k, 4+k, 8+k, 12+k
    scales = torch.cat([low[:, :8] | (low[:, 8:] << 4), high], dim=1)
    return torch.cat([hmask, _pack_2bit(u & 3), scales, _half_bytes(f.d)], dim=1)


def decode_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    hbit = _split_shifted(blocks[:, :32], 1, 8, 1).reshape(-1, QK_K)
    low2 = _unpack_2bit(blocks[:, 32:96])
    raw = blocks[:, 96:108]
    low = torch.cat([raw[:, :8] & 15, raw[:, :8] >> 4], dim=1).long()
    high = _split_shifted(raw[:, 8:], 1, 4, 2).reshape(-1, 16)
    scales = ((low | (high << 4)) - 32).float()
    dl = (_half(blocks, 108) * scales).unsqueeze(2)
    q = (low2 - 4 * (1 - hbit)).view(-1, 16, 16).float()
    return (dl * q).reshape(-1, QK_K)


def _pack_6bit_pairs(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """q4_k's 12 scale bytes for 8 (sc, m) pairs of 6 bits."""
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    first = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    second = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    third = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return torch.cat([first, second, third], dim=1)


def _unpack_6bit_pairs(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b, c = raw[:, :4], raw[:, 4:8], raw[:, 8:12]
    sc = torch.cat([a & 63, (c & 15) | ((a >> 2) & 48)], dim=1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 2) & 48)], dim=1)
    return sc, mn


def _pack_nibbles_k(u: torch.Tensor) -> torch.Tensor:
    """q4_k / q5_k's qs: the low 4 bits of codes [n, 256] -> [n, 128]; sub-blocks 2i, 2i + 1 share
    32 bytes (2i in the low nibbles)."""
    lo = (u.to(torch.uint8) & 15).view(-1, 4, 2, 32)
    return (lo[:, :, 0] | (lo[:, :, 1] << 4)).view(-1, 128)


def pack_q4_k(f: Fields) -> torch.Tensor:
    return torch.cat([_half_bytes(f.d), _half_bytes(f.dmin), _pack_6bit_pairs(f.scales, f.mins),
                      _pack_nibbles_k(f.codes)], dim=1)


def _unpack_nibbles_k(qs: torch.Tensor) -> torch.Tensor:
    """q4_k / q5_k's qs [n, 128] -> the low 4 code bits [n, 8, 32] (int64) by sub-block."""
    qs = qs.reshape(-1, 4, 1, 32)
    return torch.cat([qs & 15, qs >> 4], dim=2).view(-1, 8, 32).long()


def _decode_affine_k(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q4_k / q5_k: scales at bytes 4..15 applied to codes q [n, 8, 32] (fp32)."""
    sc, mn = _unpack_6bit_pairs(blocks[:, 4:16])
    dl = (_half(blocks, 0) * sc.float()).unsqueeze(2)
    ml = (_half(blocks, 2) * mn.float()).unsqueeze(2)
    return (dl * q - ml).reshape(-1, QK_K)


def decode_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    return _decode_affine_k(blocks, _unpack_nibbles_k(blocks[:, 16:]).float())


def pack_q5_k(f: Fields) -> torch.Tensor:
    qh = _or_shifted((f.codes.to(torch.uint8) >> 4).view(-1, 8, 32), 1, 1)
    return torch.cat([_half_bytes(f.d), _half_bytes(f.dmin), _pack_6bit_pairs(f.scales, f.mins), qh,
                      _pack_nibbles_k(f.codes)], dim=1)


def decode_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    high = _split_shifted(blocks[:, 16:48], 1, 8, 1)  # [n, 8, 32]: bit j of qh[l] is sub-block j's
    q = _unpack_nibbles_k(blocks[:, 48:]) | (high << 4)
    return _decode_affine_k(blocks, q.float())


def pack_iq4_xs(f: Fields) -> torch.Tensor:
    s6 = (f.scales + 32).to(torch.uint8)  # 8 x 6 bits
    low = (s6 & 15).view(-1, 4, 2)
    scales_l = low[:, :, 0] | (low[:, :, 1] << 4)
    scales_h = _or_shifted((s6 >> 4).view(-1, 2, 4), 2, 2)  # little-endian uint16, 2 bits per sub-block
    u = f.codes.to(torch.uint8).view(-1, 8, 2, 16)
    qs = (u[:, :, 0] | (u[:, :, 1] << 4)).view(-1, 128)
    return torch.cat([_half_bytes(f.d), scales_h, scales_l, qs], dim=1)


def decode_iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    high = _split_shifted(blocks[:, 2:4], 2, 4, 2).reshape(-1, 8)
    raw = blocks[:, 4:8].unsqueeze(2)
    low = torch.cat([raw & 15, raw >> 4], dim=2).reshape(-1, 8).long()
    dl = (_half(blocks, 0) * ((low | (high << 4)) - 32).float()).unsqueeze(2)
    qs = blocks[:, 8:].reshape(-1, 8, 1, 16)
    u = torch.cat([qs & 15, qs >> 4], dim=2).view(-1, 8, 32).long()
    values = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=blocks.device)
    return (dl * values[u]).reshape(-1, QK_K)


def pack_q6_k(f: Fields) -> torch.Tensor:
    u = f.codes.to(torch.uint8)  # 0..63 = q + 32
    lo = (u & 15).view(-1, 2, 2, 64)
    ql = (lo[:, :, 0] | (lo[:, :, 1] << 4)).view(-1, 128)
    qh = _or_shifted((u >> 4).view(-1, 2, 4, 32), 2, 2).view(-1, 64)
    scales = f.scales.to(torch.int8).view(torch.uint8)
    return torch.cat([ql, qh, scales, _half_bytes(f.d)], dim=1)


def decode_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    ql = blocks[:, :128].reshape(-1, 2, 1, 64)
    low = torch.cat([ql & 15, ql >> 4], dim=2).reshape(-1, 2, 128).long()
    high = _split_shifted(blocks[:, 128:192].reshape(-1, 2, 32), 2, 4, 2).reshape(-1, 2, 128)
    q = ((low | (high << 4)) - 32).view(-1, 16, 16).float()
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    dl = (_half(blocks, 208) * scales).unsqueeze(2)
    return (dl * q).reshape(-1, QK_K)

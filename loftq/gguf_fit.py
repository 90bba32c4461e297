"""Our GGUF encoders: per block, the scale (and min) that minimise the squared error.

llama.cpp's reference quantizers search a few candidate inverse scales around "the extreme value
maps to the end of the grid" and keep the least-squares scale of the best candidate; the K-quants
then quantize the per-sub-block scales themselves against one fp16 super-scale. We do the same
search, vectorised: every candidate of every block at once ([blocks, candidates, block_size]),
so the error criterion is exact and the batch runs on CPU or CUDA alike. After the scales are
final (rounded to what is stored: fp16, small integers), codes are recomputed as the nearest
grid value under the *stored* scales, which is the best code choice for a fixed grid.

The error the search minimises is an *objective* (:data:`OBJECTIVES`), a per-weight importance
multiplying each squared error: ``plain`` weighs all alike (least squares); ``w2`` by the weight's
own square, as llama.cpp's reference quantizers do when no importance matrix is given; ``rms_abs``
by the block's rms plus |w| (the form llama.cpp's q4_k reference uses), ``s2w2`` by
sqrt(2 mean(w²) + w²) (the form it multiplies an importance matrix by). Large weights carry more of
a layer's output, so fitting them closer at the expense of small ones can lower perplexity while
raising the plain error: on SmolLM2, iq4_nl everywhere, rms_abs gave the lowest perplexity of
these (bench.gguf_quants --ppl) and is the q4_0 / iq4_nl default. Codes are the nearest grid value
under any objective (a per-weight factor does not move the nearest point).

Every encoder also takes ``columns`` (:data:`Columns`): the importance of each weight's input
column, E[x_j²] of calibration inputs (llama.cpp's imatrix), laid out like the blocks. It
multiplies the objective's factor, as llama.cpp multiplies its imatrix into sqrt(σ² + x²), so the
search weighs each error by what it does to the layer's output. plain × importance is exactly the
output error under independent inputs and is the lowest on held-out tokens, but rms_abs ×
importance gave the lower whole-model perplexity on SmolLM2 for most types (iq4_nl on all 210
layers: 28.60 without, 27.13 plain, 26.94 s2w2, 26.85 rms_abs; q2_k on down_proj: 200.8 without,
31.5 rms_abs), so it is the default under importance (``GGUFType.importance_objective``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .gguf_layout import IQ4_NL_VALUES, QK_K, Fields

FP16_MAX = 65504.0
CHUNK = 1 << 22  # elements of [blocks, candidates, block] per step (~16 MiB fp32 per temporary)
# every weight's input-column importance, laid out like the blocks ([n, block]); None: all alike
Columns = Optional[torch.Tensor]


def _plain(x: torch.Tensor) -> None:
    return None


def _w2(x: torch.Tensor) -> torch.Tensor:
    # normalised by the row's absmax: the same argmin, and no underflow on tiny blocks
    amax = x.abs().amax(-1, keepdim=True)
    return (x / _safe(amax)).square()


def _rms_abs(x: torch.Tensor) -> torch.Tensor:
    # the block's rms plus |x|: between plain and w2 (normalised as _w2)
    amax = x.abs().amax(-1, keepdim=True)
    return (x.square().mean(-1, keepdim=True).sqrt() + x.abs()) / _safe(amax)


def _s2w2(x: torch.Tensor) -> torch.Tensor:
    # sqrt(sigma^2 + x^2) with sigma^2 twice the block's mean square
    amax = x.abs().amax(-1, keepdim=True)
    y = x / _safe(amax)
    return (2 * y.square().mean(-1, keepdim=True) + y.square()).sqrt()


# objective name -> importance [n, b] of each weight's squared error (None: all equal)
OBJECTIVES: dict[str, Callable[[torch.Tensor], torch.Tensor | None]] = {
    "plain": _plain, "w2": _w2, "rms_abs": _rms_abs, "s2w2": _s2w2}


def importance(x: torch.Tensor, objective: str, columns: Columns = None) -> torch.Tensor | None:
    """Per-weight importance of x [n, b] under ``objective``, times ``columns`` [n, b] (the weight's
    input column importance, laid out like x) when given; unknown names list the known ones."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown GGUF encoder objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    factor = OBJECTIVES[objective](x)
    if columns is None:
        return factor
    return columns if factor is None else factor * columns


def _steps(centre: float, half_width: float, count: int) -> list[float]:
    return torch.linspace(centre - half_width, centre + half_width, count).tolist()


def _snap(y: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``levels`` for every entry of ``y`` (int64)."""
    lo, hi = levels[0].item(), levels[-1].item()
    if levels.numel() == hi - lo + 1:  # a contiguous integer grid: rounding is the nearest value
        return (torch.round(y).clamp_(lo, hi) - lo).long()
    return torch.bucketize(y, (levels[:-1] + levels[1:]) / 2)


def _nearest(y: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The nearest of the sorted ``levels`` (values, fp32) for every entry of ``y``."""
    lo, hi = levels[0].item(), levels[-1].item()
    if levels.numel() == hi - lo + 1:
        return torch.round(y).clamp_(lo, hi)
    return levels[torch.bucketize(y, (levels[:-1] + levels[1:]) / 2)]


def _safe(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.ones_like(d), d)


def fit_symmetric(x: torch.Tensor, levels: torch.Tensor, targets: list[float],
                  weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best scale s per row for x ~= s * levels[code] under sum(weight * err^2).

    x: [n, b]; levels: sorted fp32 grid; targets: candidate grid positions for the row's signed
    extreme value (s0 = extreme / t), each refined to its least-squares scale.
    Returns (scale [n], sum(weight * level^2) [n] of the chosen codes).
    """
    out_s, out_q2 = [], []
    step = max(1, CHUNK // (len(targets) * x.shape[1]))
    t = torch.tensor(targets, dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], step):  # chunks of many blocks, to bound memory
        xc = x[start:start + step]
        wc = torch.ones_like(xc) if weight is None else weight[start:start + step]
        ext = xc.gather(1, xc.abs().argmax(1, keepdim=True))  # [n, 1] signed extreme
        s0 = _safe(ext / t)  # [n, k]
        q = _nearest(xc.unsqueeze(1) / s0.unsqueeze(2), levels)  # [n, k, b]
        wq = wc.unsqueeze(1) * q
        sxq = (wq * xc.unsqueeze(1)).sum(2)
        sqq = (wq * q).sum(2)
        gain = torch.where(sqq > 0, sxq * sxq / sqq.clamp(min=1e-30), torch.zeros_like(sxq))
        best = gain.argmax(1, keepdim=True)
        sqq_best = sqq.gather(1, best).squeeze(1)
        scale = sxq.gather(1, best).squeeze(1) / sqq_best.clamp(min=1e-30)
        out_s.append(torch.where(ext.squeeze(1) == 0, torch.zeros_like(scale), scale))
        out_q2.append(sqq_best)
    return torch.cat(out_s), torch.cat(out_q2)


def fit_affine(x: torch.Tensor, nmax: int, targets: list[float],
               weight: torch.Tensor | None = None, signed_min: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (scale >= 0, min >= 0) per row for x ~= scale * u - min, u in 0..nmax, under
    sum(weight * err^2).

    x: [n, b]. Candidates: the row's range [min(x, 0), max(x)] mapped onto t grid steps; each is
    refined by weighted least squares in (scale, offset) with the offset kept <= 0 (the K-quants
    store -min >= 0). ``signed_min``: the min may take either sign (q5_1 stores an fp16 offset), so
    the range is [min(x), max(x)] and the offset is free. Returns (scale [n], min [n]).
    """
    out_s, out_m = [], []
    step = max(1, CHUNK // (len(targets) * x.shape[1]))
    t = torch.tensor(targets, dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], step):
        xc = x[start:start + step]
        wc = (torch.ones_like(xc) if weight is None else weight[start:start + step]).unsqueeze(1)
        lo = xc.amin(1, keepdim=True)
        lo = lo if signed_min else lo.clamp(max=0)
        span = xc.amax(1, keepdim=True) - lo
        inv = torch.where(span > 0, t / _safe(span), torch.zeros_like(t))  # [n, k]
        u = torch.round((xc - lo).unsqueeze(1) * inv.unsqueeze(2)).clamp_(0, nmax)  # [n, k, b]
        xs = xc.unsqueeze(1)
        wu, wx = wc * u, wc * xs
        nb, sq, squ, sx, sxq = wc.sum(2), wu.sum(2), (wu * u).sum(2), wx.sum(2), (wu * xs).sum(2)
        sxx = (wx * xs).sum(2)
        det = nb * squ - sq * sq
        s_full = (nb * sxq - sq * sx) / _safe(det)
        b_full = (squ * sx - sq * sxq) / _safe(det)
        s_zero = sxq / _safe(squ)  # offset pinned at 0
        b_only = sx / _safe(nb)  # every code 0: only the offset
        b_only = b_only if signed_min else b_only.clamp(max=0)
        b_ok = torch.ones_like(det, dtype=torch.bool) if signed_min else b_full <= 0
        options = [(s_full, b_full, (det > 0) & b_ok & (s_full >= 0)),
                   (s_zero.clamp(min=0), torch.zeros_like(s_zero), squ > 0),
                   (torch.zeros_like(sx), b_only, torch.ones_like(sx, dtype=torch.bool))]
        errs, scales, offs = [], [], []
        for s, b, ok in options:  # three closed forms, each over every candidate at once
            err = sxx - 2 * s * sxq - 2 * b * sx + s * s * squ + 2 * s * b * sq + nb * b * b
            errs.append(torch.where(ok, err, torch.full_like(err, float("inf"))))
            scales.append(s)
            offs.append(b)
        err, s, b = (torch.stack(torch.broadcast_tensors(*v), 2).flatten(1) for v in (errs, scales, offs))
        best = err.argmin(1, keepdim=True)
        out_s.append(s.gather(1, best).squeeze(1))
        out_m.append(-b.gather(1, best).squeeze(1))
    return torch.cat(out_s), torch.cat(out_m)


def to_fp16(d: torch.Tensor) -> torch.Tensor:
    """Round scales to the stored fp16, saturating (a weight beyond fp16 range cannot be stored)."""
    return d.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)


def _grid(lo: int, hi: int, device: torch.device) -> torch.Tensor:
    return torch.arange(lo, hi + 1, dtype=torch.float32, device=device)


def _codes(x: torch.Tensor, eff: torch.Tensor, levels: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest code under stored effective scales eff (x: [n, g, b], eff/offset: [n, g])."""
    y = x if offset is None else x + offset.unsqueeze(2)
    return _snap(y / _safe(eff).unsqueeze(2), levels)


def encode_scaled32(blocks: torch.Tensor, levels: torch.Tensor, targets: list[float], objective: str,
                    columns: Columns = None) -> Fields:
    """q8_0, q4_0, q5_0, iq4_nl: one fp16 scale per 32 values, codes index ``levels``."""
    scale, _ = fit_symmetric(blocks, levels, targets, importance(blocks, objective, columns))
    d = to_fp16(scale)
    return Fields(d=d, codes=_codes(blocks.unsqueeze(1), d.float().unsqueeze(1), levels).squeeze(1))


def encode_q8_0(blocks: torch.Tensor, objective: str = "plain", columns: Columns = None) -> Fields:
    f = encode_scaled32(blocks, _grid(-128, 127, blocks.device), [-128.0, 127.0, 126.5, 127.5, -127.5],
                        objective, columns)
    f.codes = f.codes - 128  # stored as int8
    return f


def encode_q4_0(blocks: torch.Tensor, objective: str = "plain", columns: Columns = None) -> Fields:
    return encode_scaled32(blocks, _grid(-8, 7, blocks.device), _steps(-8, 1, 11) + _steps(7, 1, 5),
                           objective, columns)


def encode_q5_0(blocks: torch.Tensor, objective: str = "plain", columns: Columns = None) -> Fields:
    return encode_scaled32(blocks, _grid(-16, 15, blocks.device), _steps(-16, 1, 11) + _steps(15, 1, 5),
                           objective, columns)


def encode_q5_1(blocks: torch.Tensor, objective: str = "plain", columns: Columns = None) -> Fields:
    """q5_1: w = d * u + m with u in 0..31 and fp16 d, m (m of either sign)."""
    s, m = fit_affine(blocks, 31, _steps(31, 1.5, 16), importance(blocks, objective, columns), signed_min=True)
    d, offset = to_fp16(s), to_fp16(-m)
    codes = _codes(blocks.unsqueeze(1), d.float().unsqueeze(1), _grid(0, 31, blocks.device),
                   -offset.float().unsqueeze(1)).squeeze(1)
    return Fields(d=d, dmin=offset, codes=codes)


def encode_iq4_nl(blocks: torch.Tensor, objective: str = "plain", columns: Columns = None) -> Fields:
    levels = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=blocks.device)
    return encode_scaled32(blocks, levels, _steps(-127, 12, 9) + _steps(113, 12, 5), objective, columns)


def _encode_k_symmetric(blocks: torch.Tensor, sub: int, levels: torch.Tensor, slo: int, shi: int,
                        targets: list[float], objective: str, columns: Columns = None) -> Fields:
    """q3_k / q6_k / iq4_xs: sub-blocks of ``sub`` with codes indexing the sorted ``levels`` (the
    signed integers qlo..qhi, or iq4's grid) and signed integer scales slo..shi times one fp16
    super-scale."""
    x = blocks.view(-1, QK_K // sub, sub)
    imp = importance(x.reshape(-1, sub), objective, None if columns is None else columns.reshape(-1, sub))
    s, q2 = fit_symmetric(x.reshape(-1, sub), levels, targets, imp)
    s, q2 = s.view(x.shape[:2]), q2.view(x.shape[:2])
    # quantize the sub-block scales; the (weighted) error of a scale error ds is ds^2 * sum(w q^2)
    slevels = _grid(slo, shi, blocks.device)
    d_super, _ = fit_symmetric(s, slevels, [float(slo), float(slo) + 0.5, float(shi), float(shi) - 0.5], q2)
    d = to_fp16(d_super)
    sc = _codes(s.unsqueeze(2), d.float().unsqueeze(1), slevels).squeeze(2) + slo
    eff = d.float().unsqueeze(1) * sc.float()  # exactly what the decoder multiplies by
    u = _codes(x, eff, levels).view(-1, QK_K)
    return Fields(d=d, scales=sc, codes=u)


def encode_q6_k(blocks: torch.Tensor, objective: str = "plain", columns: Columns = None) -> Fields:
    return _encode_k_symmetric(blocks, 16, _grid(-32, 31, blocks.device), -128, 127,
                               _steps(-32, 1, 11) + _steps(31, 1, 5), objective, columns)


def encode_q3_k(blocks: torch.Tensor, objective: str = "plain", columns: Columns = None) -> Fields:
    return _encode_k_symmetric(blocks, 16, _grid(-4, 3, blocks.device), -32, 31,
                               _steps(-4, 0.6, 9) + _steps(3, 0.6, 7), objective, columns)


def encode_iq4_xs(blocks: torch.Tensor, objective: str = "plain", columns: Columns = None) -> Fields:
    levels = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=blocks.device)
    return _encode_k_symmetric(blocks, 32, levels, -32, 31, _steps(-127, 12, 9) + _steps(113, 12, 5),
                               objective, columns)


def _encode_k_affine(blocks: torch.Tensor, sub: int, nmax: int, smax: int, targets: list[float],
                     objective: str, columns: Columns = None) -> Fields:
    """q2_k / q4_k: sub-blocks with unsigned codes 0..nmax, unsigned integer scales and mins
    0..smax times the fp16 super-scales d and dmin."""
    x = blocks.view(-1, QK_K // sub, sub)
    imp = importance(x.reshape(-1, sub), objective, None if columns is None else columns.reshape(-1, sub))
    s, m = fit_affine(x.reshape(-1, sub), nmax, targets, imp)
    s, m = s.view(x.shape[:2]), m.view(x.shape[:2])
    w = torch.ones_like(x) if imp is None else imp.view(x.shape)
    slevels = _grid(0, smax, blocks.device)
    ends = [float(smax), smax - 0.5, smax + 0.5]
    # a scale error ds costs ds^2 * sum(w u^2), a min error dm costs dm^2 * sum(w); sum(w u^2) is
    # estimated from the unquantized fit
    u0 = torch.round((x + m.unsqueeze(2)) / _safe(s).unsqueeze(2)).clamp(0, nmax)
    d, _ = fit_symmetric(s, slevels, ends, (w * u0 * u0).sum(2))
    dmin, _ = fit_symmetric(m, slevels, ends, None if imp is None else w.sum(2))
    d, dmin = to_fp16(d), to_fp16(dmin)
    sc = _codes(s.unsqueeze(2), d.float().unsqueeze(1), slevels).squeeze(2)
    mn = _codes(m.unsqueeze(2), dmin.float().unsqueeze(1), slevels).squeeze(2)
    eff = d.float().unsqueeze(1) * sc.float()
    off = dmin.float().unsqueeze(1) * mn.float()
    u = _codes(x, eff, _grid(0, nmax, blocks.device), off).view(-1, QK_K)
    return Fields(d=d, dmin=dmin, scales=sc, mins=mn, codes=u)


def encode_q4_k(blocks: torch.Tensor, objective: str = "plain", columns: Columns = None) -> Fields:
    return _encode_k_affine(blocks, 32, 15, 63, _steps(15, 1, 11), objective, columns)


def encode_q5_k(blocks: torch.Tensor, objective: str = "plain", columns: Columns = None) -> Fields:
    return _encode_k_affine(blocks, 32, 31, 63, _steps(31, 1, 11), objective, columns)


def encode_q2_k(blocks: torch.Tensor, objective: str = "plain", columns: Columns = None) -> Fields:
    return _encode_k_affine(blocks, 16, 3, 15, _steps(3, 0.5, 11), objective, columns)

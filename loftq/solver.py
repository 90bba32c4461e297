"""The LoftQ alternating solver and residual tables.

For W (out x in) and a quantizer q, from A = B = 0:
    Q_t = q(W - B_{t-1} A_{t-1});   B_t, A_t = rank-r truncated SVD of (W - Q_t)
W ~= dequantize(Q) + B @ A with B: out x r, A: r x in (PEFT: lora_B @ lora_A).

Data-aware variant: with H = X^T X / n (in x in, second moment of the layer's inputs) and
H + damp = L L^T, minimise ||(W - Q - BA) L||_F: the best rank-r BA is the truncated SVD of
(W - Q) L mapped back by L^{-1}. Residuals are relative to ||W|| (or ||W L||).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from .formats import Quantized, Spec, residuals as formats_residuals, spec_from_fields
from .quant import QuantConfig, check_finite, squared_norm
from .spectral import top_squared_singular_values, truncated_svd
from .rounding import check_rounding, inverse_factor

DEFAULT_RANKS = (0, 8, 16, 32, 64)


@dataclass
class LoftQResult:
    """Best iterate of the alternating solver.

    ``lora_a``: [rank, in], ``lora_b``: [out, rank] (fp32, on the weight's device).
    ``errors[t]``: relative residual ||W - deq(Q_t) - B_t A_t||_F / ||W||_F of iteration t+1;
    ``weighted_errors`` the same under the calibration metric (data-aware runs only).
    ``best_iter``: 1-based index of the iterate kept.
    """

    quantized: Quantized
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    errors: list[float]
    weighted_errors: list[float] = field(default_factory=list)
    best_iter: int = 1

    @property
    def error(self) -> float:
        return self.errors[self.best_iter - 1]


def calibration_factor(second_moment: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Lower Cholesky factor L of H + damp * mean(diag H) * I; H: [in, in] input second moment."""
    h = second_moment.double()
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"calibration second moment must be square [in, in], got {tuple(h.shape)}")
    check_finite(h, "calibration second moment")
    ridge = damp * h.diagonal().mean().clamp(min=1e-12)
    if h is second_moment:  # already float64: do not add the ridge to the caller's tensor
        h = h.clone()
    h.diagonal().add_(ridge)  # = h + ridge * I, without a second in x in matrix (phi-2's fc2: 839 MB)
    return torch.linalg.cholesky(h).to(second_moment.dtype if second_moment.is_floating_point() else torch.float32)


SVD_METHODS = ("randomized", "exact")


def _low_rank(residual: torch.Tensor, rank: int, factor: torch.Tensor | None,
              svd: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r (B [out, r], A [r, in]) of ``residual`` [out, in] (in the L-weighted norm if given).

    ``svd="randomized"``: the block Krylov truncated SVD (:mod:`loftq.spectral`) where its accuracy
    was tested (rank <= 64, both sides > 192; plain norm, and the weighted one: at most 0.08% above
    the exact residual on 25 SmolLM2 layers x NF2/4/8 x ranks 8-64 with their real moments); a full
    thin SVD otherwise."""
    target = residual if factor is None else residual @ factor
    if svd == "randomized":
        u, s, vh = truncated_svd(target, rank)
    else:
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root
    a = root.unsqueeze(1) * vh[:rank]
    if factor is not None:  # A L = a  =>  A = a L^{-1}
        a = torch.linalg.solve_triangular(factor, a, upper=False, left=False)
    return b, a


def _config(bits: int, method: str | Mapping[int, str], block_size: int, double_quant: bool) -> QuantConfig:
    m = method if isinstance(method, str) else method.get(bits, "nf")
    return QuantConfig(bits, m, block_size, double_quant)


def as_spec(bits: Any, method: str | Mapping[int, str] = "nf", block_size: int = 64,
            double_quant: bool = False) -> Spec:
    """A format spec (:mod:`loftq.formats`) as it is; an int: the codebook width of ``method``; a
    name: the spec it names (``"q4_k"``, ``"nf4"``)."""
    if isinstance(bits, Spec):
        return bits
    if isinstance(bits, int) and not isinstance(bits, bool):
        return _config(bits, method, block_size, double_quant)
    return spec_from_fields(bits, None, block_size, double_quant)


def loftq(weight: torch.Tensor, bits: int | str, rank: int, *, iters: int = 1, method: str | Mapping[int, str] = "nf",
          block_size: int = 64, double_quant: bool = False, calibration: torch.Tensor | None = None,
          damp: float = 0.01, svd: str = "exact", rounding: str = "nearest") -> LoftQResult:
    """LoftQ for one weight [out, in]; returns the best of ``iters`` iterates.

    ``bits``: a codebook width (with ``method``, ``block_size``, ``double_quant``) or the name of a
    GGUF type in ``GGUF_TYPES`` ("q4_k", ...), whose quantizer then replaces the codebook one.
    ``calibration``: optional input second moment H [in, in]; then the low-rank step and the
    choice of the best iterate use ||(W - Q - BA) L||, L L^T = H + damp, and formats whose encoder
    searches scales weigh the columns by diag H (GGUF types).
    ``svd``: "exact" (a full thin SVD per step) or "randomized" (block Krylov, used for codebook
    widths where :func:`loftq.spectral.applies`; measured within 1% of the exact residual on SmolLM2).
    ``rounding``: "nearest" (each code alone) or "feedback" (needs ``calibration``): each Q_t is
    :func:`loftq.rounding.quantize_feedback` of W - B A under H, which lowers ||(W - Q) L||.
    """
    if weight.ndim != 2:
        raise ValueError(f"loftq() takes a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if not isinstance(rank, int) or rank < 0 or rank > min(weight.shape):
        raise ValueError(f"rank must be an int in [0, {min(weight.shape)}], got {rank!r}")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    if svd not in SVD_METHODS:
        raise ValueError(f"svd must be one of {', '.join(SVD_METHODS)}; got {svd!r}")
    check_rounding(rounding)
    if calibration is not None and tuple(calibration.shape) != (weight.shape[1],) * 2:
        raise ValueError(f"calibration must be [in, in] = {[weight.shape[1]] * 2}, got {list(calibration.shape)}")
    if rounding == "feedback" and calibration is None:
        raise ValueError("rounding='feedback' needs calibration=H (the input second moment)")
    check_finite(weight)
    spec = as_spec(bits, method, block_size, double_quant)
    if rounding == "feedback" and not spec.feedback_applies(tuple(weight.shape)):
        raise ValueError(f"rounding='feedback' cannot round {spec.name} for shape {tuple(weight.shape)} "
                         "(it takes a codebook width whose blocks are whole runs of input columns)")
    spec.check_shape(tuple(weight.shape))
    moment = calibration.to(weight.device) if calibration is not None else None
    upper = inverse_factor(moment, damp) if rounding == "feedback" else None
    svd = svd if spec.randomized_svd else "exact"  # where the randomized step was tested
    w = weight.detach().float()
    factor = calibration_factor(calibration.to(w.device).float(), damp) if calibration is not None else None
    w_norm = w.norm().clamp(min=1e-30)
    wl_norm = (w @ factor).norm().clamp(min=1e-30) if factor is not None else w_norm
    b = w.new_zeros(w.shape[0], rank)
    a = w.new_zeros(rank, w.shape[1])
    best: LoftQResult | None = None
    best_score = float("inf")
    errors: list[float] = []
    weighted: list[float] = []
    for t in range(iters):
        qt = spec.quantize(w - b @ a if rank and t else w, rounding=rounding, moment=moment, upper=upper, damp=damp)
        residual = w - qt.dequantize(torch.float32)
        if rank:
            b, a = _low_rank(residual, rank, factor, svd)
            residual = residual - b @ a
        errors.append(float(residual.norm() / w_norm))
        score = errors[-1]
        if factor is not None:
            weighted.append(float((residual @ factor).norm() / wl_norm))
            score = weighted[-1]
        if score < best_score:
            best_score = score
            best = LoftQResult(qt, a.clone(), b.clone(), errors, weighted, t + 1)
        if not rank:  # Q no longer changes
            break
    assert best is not None
    best.errors, best.weighted_errors = errors, weighted
    return best


TABLE_DTYPE = torch.bfloat16  # the Krylov products of the tables (fp32 where bf16 matmuls are slow)


def _width_residuals(w: torch.Tensor, specs: Sequence[Spec], dtype: torch.dtype,
                     uppers: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(W - deq q(W) in ``dtype``, its fp64 squared norm per matrix) for each spec on a stack
    [L, out, in]: each family's own pass (codebook widths fused); ``uppers`` [L, in, in]: each
    matrix's inverse factor, Q by error-feedback rounding (matrix by matrix)."""
    for spec in specs:
        spec.check_shape(tuple(w.shape[1:]))
    if uppers is None:
        return formats_residuals(w, specs, dtype)
    out = []
    for spec in specs:
        res = torch.stack([m - spec.quantize(m, rounding="feedback", upper=u).dequantize(torch.float32)
                           for m, u in zip(w, uppers)])
        out.append((res.to(dtype), squared_norm(res)))
    return out


def table_dtype(device: torch.device) -> torch.dtype:
    """bf16 where it has fast matmuls (CUDA, CPUs with AVX512-BF16/AMX), else fp32. Measured on
    SmolLM2: same worst-case table error as fp32 (the residual's norm is always summed in fp32)."""
    if device.type == "cuda" or (device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return TABLE_DTYPE
    return torch.float32


def residual_table(weight: torch.Tensor, *, bits: Sequence[int | str] = (2, 4, 8), ranks: Sequence[int] = DEFAULT_RANKS,
                   iters: int = 1, method: str | Mapping[int, str] = "nf", block_size: int = 64,
                   double_quant: bool = False, calibration: torch.Tensor | None = None,
                   damp: float = 0.01, factor: torch.Tensor | None = None, rounding: str = "nearest",
                   uppers: torch.Tensor | None = None, dequantized: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Relative LoftQ residuals ||W - Q - BA|| / ||W|| for every (bits, rank) cell; a ``bits`` entry
    may be a GGUF type name (``"q4_k"``: the rows must be whole blocks of it).

    weight: [out, in] -> [len(bits), len(ranks)]; or a batch of same-shape weights [L, out, in]
    -> [L, len(bits), len(ranks)] (one spectrum per matrix and width).
    With iters == 1, Q = q(W) does not depend on r, so one spectrum per width gives the whole rank
    row: res_r^2 = ||W - Q||^2 - sum_{i<=r} sigma_i^2, with ||W - Q||^2 summed exactly (fp32 per
    block) and the top singular values from :func:`loftq.spectral.top_squared_singular_values`
    (block Krylov in :func:`table_dtype`; exact for small matrices and ranks > 64). iters > 1 runs
    the solver once per cell.
    ``calibration`` (H [in, in], shared by the batch) switches to the data-aware norm ||(.) L||;
    ``factor``: that L already computed (``calibration_factor(H, damp)``) [in, in], or one per matrix
    of the batch [L, in, in] (layers with different inputs stacked together).
    ``rounding="feedback"`` (needs the data-aware norm): Q is :func:`loftq.rounding.quantize_feedback`'s,
    as ``loftq(..., rounding="feedback")`` builds it with iters == 1; ``uppers``: the inverse factors
    (:func:`loftq.rounding.inverse_factor`) already computed, [in, in] or one per matrix [L, in, in].
    ``dequantized``: deq q(W) of each width already computed (one [L, out, in] per entry of ``bits``,
    e.g. a weight bank's Q): the residuals are W minus these, nothing is quantized here (iters == 1).
    """
    single = weight.ndim == 2
    w = weight.detach().float().unsqueeze(0) if single else weight.detach().float()
    if w.ndim != 3:
        raise ValueError(f"residual_table() takes [out, in] or [L, out, in], got {tuple(weight.shape)}")
    ranks = list(ranks)
    if any((not isinstance(r, int)) or r < 0 or r > min(w.shape[1:]) for r in ranks):
        raise ValueError(f"ranks must be ints in [0, {min(w.shape[1:])}], got {ranks}")
    check_finite(w)
    if factor is None and calibration is not None:
        factor = calibration_factor(calibration.to(w.device).float(), damp)
    if factor is not None and calibration is None and iters > 1:
        raise ValueError("residual_table(iters > 1) takes calibration=H, not a precomputed factor")
    check_rounding(rounding)
    specs = [as_spec(b, method, block_size, double_quant) for b in bits]
    if rounding == "feedback":
        if factor is None:
            raise ValueError("residual_table(rounding='feedback') needs the data-aware norm (calibration=H or factor)")
        if not all(s.feedback_applies(tuple(w.shape[1:])) for s in specs):
            raise ValueError("rounding='feedback' takes widths whose blocks are runs of input columns (codebook "
                             f"widths, in % block == 0); got {', '.join(s.name for s in specs)} for {tuple(w.shape[1:])}")
        if uppers is None:
            if calibration is None:
                raise ValueError("residual_table(rounding='feedback') with a precomputed factor also takes uppers")
            uppers = inverse_factor(calibration.to(w.device), damp)
        if uppers.ndim == 2:
            uppers = uppers.expand(w.shape[0], *uppers.shape)
    elif uppers is not None:
        raise ValueError("uppers is for rounding='feedback'")
    out = torch.empty(w.shape[0], len(bits), len(ranks), dtype=torch.float64)
    if iters > 1:
        for i in range(w.shape[0]):
            for j, spec in enumerate(specs):
                for k, r in enumerate(ranks):
                    res = loftq(w[i], spec, r, iters=iters, calibration=calibration, damp=damp, rounding=rounding)
                    out[i, j, k] = res.weighted_errors[res.best_iter - 1] if factor is not None else res.error
        return out[0].float() if single else out.float()
    ref = w if factor is None else w @ factor
    ref_sq = squared_norm(ref).clamp(min=1e-60)
    dtype = table_dtype(w.device) if factor is None else torch.float32
    if dequantized is not None:
        if len(dequantized) != len(specs) or any(tuple(d.shape) != tuple(w.shape) for d in dequantized):
            raise ValueError(f"dequantized must hold one {tuple(w.shape)} tensor per width")
        given = [(w - d.to(w.device).float()) for d in dequantized]
        pairs = [(res.to(dtype), squared_norm(res)) for res in given]
    else:
        pairs = _width_residuals(w, specs, dtype, uppers)
    for j, (res, total) in enumerate(pairs):
        if factor is not None:
            res = res @ factor
            total = res.double().pow(2).sum(dim=(1, 2))
        eig = top_squared_singular_values(res, max(ranks), dtype)
        csum = torch.cat([eig.new_zeros(eig.shape[0], 1), eig.cumsum(-1)], dim=-1)
        for k, r in enumerate(ranks):
            left = (total.to(csum.device) - csum[:, min(r, csum.shape[1] - 1)]).clamp(min=0)
            out[:, j, k] = (left / ref_sq).sqrt().cpu()
    return out[0].float() if single else out.float()

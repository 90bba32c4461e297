"""Block Krylov spectra (loftq.spectral) against exact decompositions of real SmolLM2 residuals: the
residual tables' cells and materialize's randomized low-rank step stay within 1% of exact."""
from __future__ import annotations

import pytest
import torch

from loftq import QuantConfig, dequantize, loftq, residual_table
from loftq.quant import fake_quantize
from loftq.spectral import applies, krylov, top_squared_singular_values, truncated_svd

BITS, RANKS = (2, 4, 8), (0, 8, 16, 32, 64)
BLOCKS = (0, 14, 29)
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def exact_residuals(w: torch.Tensor, bits: int, ranks=RANKS) -> list[float]:
    """||W - Q - (best rank r of W - Q)|| / ||W|| from the exact spectrum (float64)."""
    r = (w - fake_quantize(w, QuantConfig(bits))).double()
    gram = r @ r.T if r.shape[0] <= r.shape[1] else r.T @ r
    s2 = torch.linalg.eigvalsh(gram).flip(0)  # squared singular values, descending
    total = r.pow(2).sum()
    return [float(((total - s2[:k].sum()).clamp(min=0) / w.double().pow(2).sum()).sqrt()) for k in ranks]


def test_table_within_one_percent_of_exact_on_real_layers(smollm2_linears) -> None:
    """Every module type of 3 blocks (21 layers, 315 cells), batched by shape as the planner does."""
    names = [f"model.layers.{b}.{m}" for b in BLOCKS for m in MODULES]
    worst = 0.0
    for module in MODULES:
        group = [n for n in names if n.endswith(module)]
        table = residual_table(torch.stack([smollm2_linears[n] for n in group]), bits=BITS, ranks=RANKS)
        for i, name in enumerate(group):
            for j, bits in enumerate(BITS):
                exact = torch.tensor(exact_residuals(smollm2_linears[name], bits))
                worst = max(worst, float(((table[i, j].double() - exact) / exact).abs().max()))
    assert worst < 0.01
    assert worst > 0  # the Krylov estimate ran (an exact decomposition would agree to ~1e-6)


def test_table_is_bit_reproducible(smollm2_linears) -> None:
    w = smollm2_linears["model.layers.3.mlp.up_proj"]
    assert torch.equal(residual_table(w), residual_table(w))


@pytest.mark.parametrize("bits", BITS)
def test_randomized_loftq_within_one_percent_of_exact(smollm2_linears, bits) -> None:
    """materialize's default: ||W - Q - BA|| with the Krylov SVD vs a full SVD, ranks 8..64."""
    for name in [f"model.layers.{b}.{m}" for b in BLOCKS for m in MODULES if "k_proj" not in m
                 and "v_proj" not in m]:
        w = smollm2_linears[name]
        exact = exact_residuals(w, bits, (8, 16, 32, 64))
        for rank, ref in zip((8, 16, 32, 64), exact):
            assert applies(tuple(w.shape), rank)
            res = loftq(w, bits, rank, svd="randomized")
            approx = dequantize(res.quantized, torch.float32) + res.lora_b @ res.lora_a
            assert float((w - approx).norm() / w.norm()) == pytest.approx(res.error, rel=1e-4)
            assert ref <= res.error * (1 + 1e-5) and res.error == pytest.approx(ref, rel=0.01), (name, bits, rank)


def test_truncated_svd_factors(smollm2_linears) -> None:
    """Orthonormal factors, both orientations; exact SVD outside the tested domain."""
    for w in (smollm2_linears["model.layers.3.mlp.up_proj"], smollm2_linears["model.layers.3.mlp.down_proj"]):
        r = w - fake_quantize(w, QuantConfig(4))
        u, s, vh = truncated_svd(r, 16)
        assert u.shape == (w.shape[0], 16) and s.shape == (16,) and vh.shape == (16, w.shape[1])
        eye = torch.eye(16)
        assert torch.allclose(u.T @ u, eye, atol=1e-4) and torch.allclose(vh @ vh.T, eye, atol=1e-4)
        top = top_squared_singular_values(r.unsqueeze(0), 16)[0]
        assert torch.allclose(s.double().pow(2), top, rtol=1e-3)
    small = smollm2_linears["model.layers.3.self_attn.k_proj"]  # 192 x 576: not wider than the basis
    assert not applies(tuple(small.shape), 16) and not applies((576, 576), 128)
    u, s, vh = truncated_svd(small, 8)
    assert torch.allclose(s, torch.linalg.svdvals(small)[:8], rtol=1e-5)


def test_loftq_rejects_an_unknown_svd() -> None:
    with pytest.raises(ValueError, match="'fast'"):
        loftq(torch.randn(8, 64), 4, 2, svd="fast")


def test_low_rank_and_zero_matrices() -> None:
    """A Krylov space that runs out of directions (rank 100 < 192) must not invent energy; zero stays zero."""
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(2, 576, 100, generator=gen) @ torch.randn(2, 100, 1536, generator=gen)
    exact = torch.linalg.svdvals(m.double()).pow(2)[:, :64]
    assert torch.allclose(top_squared_singular_values(m, 64), exact, rtol=1e-3)
    half = top_squared_singular_values(m.bfloat16(), 64, torch.bfloat16)
    assert torch.allclose(half, exact, rtol=2e-2)
    zero = top_squared_singular_values(torch.zeros(1, 300, 400), 16)
    assert torch.equal(zero, torch.zeros(1, 16, dtype=torch.float64))
    u, s, vh = truncated_svd(torch.zeros(300, 400), 8)
    assert torch.equal(s, torch.zeros(8)) and torch.isfinite(u).all() and torch.isfinite(vh).all()


def test_an_exact_fit_has_zero_spectrum() -> None:
    """q5_1 reproduces SmolLM2's Q4_1-derived weights exactly: a zero residual next to a live one
    gives zeros, not a failed eigensolver (its Krylov basis is empty), and the live one is unchanged."""
    torch.manual_seed(0)
    live = torch.randn(1, 576, 576)
    m = torch.cat([torch.zeros(1, 576, 576), live])
    assert applies(tuple(m.shape), 64)
    got = top_squared_singular_values(m, 64)
    assert got.shape == (2, 64) and torch.equal(got[0], torch.zeros(64, dtype=torch.float64))
    assert torch.equal(got[1], top_squared_singular_values(live, 64)[0])
    assert torch.equal(top_squared_singular_values(torch.zeros(2, 8, 4), 16), torch.zeros(2, 4, dtype=torch.float64))


def test_a_failed_ritz_solve_falls_back_to_the_exact_spectrum(monkeypatch) -> None:
    """LAPACK refused a Krylov Ritz matrix once while planning --quant gguf on SmolLM2 (a near-exact
    fit of the data-aware residual): the exact spectrum (the Gram's eigenvalues in float64) is used instead."""
    torch.manual_seed(0)
    m = torch.randn(2, 576, 576)
    real = torch.linalg.eigvalsh

    def refuse_fp32(t: torch.Tensor) -> torch.Tensor:
        if t.dtype != torch.float64:
            raise torch.linalg.LinAlgError("linalg.eigh: failed to converge")
        return real(t)

    monkeypatch.setattr(torch.linalg, "eigvalsh", refuse_fp32)
    got = top_squared_singular_values(m, 64)
    exact = real((m @ m.transpose(-2, -1)).double()).flip(-1)[..., :64]
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=0)


def _exhausted() -> torch.Tensor:
    """A real near-exact fit: SmolLM2's layer-1 q_proj at q5_1 under the data-aware norm (the planner's
    default calibration) leaves two identical non-zero rows of ~1e-4; planning --quant gguf at Q5_K_M's
    bytes got NaN in its residual table there (fp32 eigvalsh of a Ritz matrix with subnormal entries)."""
    from pathlib import Path

    from safetensors.torch import load_file

    row = load_file(str(Path(__file__).parent / "data" / "krylov_exhausted_row.safetensors"))["row"]
    m = torch.zeros(576, 576)
    m[161] = m[177] = row
    return m


def test_an_exhausted_krylov_space_takes_the_exact_spectrum() -> None:
    """A residual of rank ~1 exhausts the Krylov space: its Ritz values came out NaN (the real layer)
    or above the true spectrum (one non-zero entry: 4x its only singular value squared). Such matrices
    take the exact spectrum; a healthy matrix in the same batch keeps its Ritz values bit for bit."""
    torch.manual_seed(0)
    live = torch.randn(1, 576, 576)
    single = torch.zeros(1, 576, 576)
    single[0, 7, 11] = 4e-4
    m = torch.cat([_exhausted().unsqueeze(0), single, live])
    assert applies(tuple(m.shape), 64)
    got = top_squared_singular_values(m, 64)
    assert bool(torch.isfinite(got).all())
    exact = torch.linalg.eigvalsh((m[:2] @ m[:2].transpose(-2, -1)).double()).flip(-1)[..., :64]
    torch.testing.assert_close(got[:2], exact, rtol=1e-5, atol=1e-18)
    assert abs(float(got[1, 0]) - 4e-4 ** 2) < 1e-12  # the one entry, squared
    _, _, t = krylov(m)  # the batch's own Ritz values: the healthy matrix keeps its own
    assert torch.equal(got[2], torch.linalg.eigvalsh(t[2]).double().flip(-1)[:64].clamp(min=0))
    # materialize's low-rank step on the real one: the rank-1 fit leaves nothing of it
    u, s, vh = truncated_svd(m[0], 8)
    assert float(torch.linalg.norm(m[0] - (u * s) @ vh) / torch.linalg.norm(m[0])) < 1e-4

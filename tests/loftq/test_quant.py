"""Quantizers on real weights: bit-exactness against bitsandbytes, error bounds, exact bytes."""
from __future__ import annotations

import pytest
import torch

from loftq import (QuantConfig, dequantize, expected_nbytes, nf_codebook, pack, packed_numel, quantize,
                   unpack)
from loftq.codebooks import NF4_PUBLISHED, nf_construct

bnbf = pytest.importorskip("bitsandbytes.functional")

# Layers of different shapes from the real models (SmolLM2: q 576x576, k 192x576, up 1536x576,
# down 576x1536; MiniLM: 384x384, 1536x384).
SMOL = ["model.layers.0.self_attn.q_proj", "model.layers.3.self_attn.k_proj",
        "model.layers.17.mlp.up_proj", "model.layers.29.mlp.down_proj"]
MINI = ["encoder.layer.0.attention.self.query", "encoder.layer.5.intermediate.dense"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / a.float().norm())


def test_nf_tables() -> None:
    assert (nf_construct(4) - torch.tensor(NF4_PUBLISHED)).abs().max() <= 1.2e-7
    nf2 = nf_codebook(2)
    assert nf2[:2].tolist() == [-1.0, 0.0] and nf2[3] == 1.0 and abs(nf2[2] - 0.3379) < 1e-3
    nf8 = nf_codebook(8)
    assert nf8.numel() == 256 and torch.all(nf8[1:] > nf8[:-1]) and (nf8 == 0).sum() == 1


def test_nf3_table_is_the_nf_construction_at_three_bits() -> None:
    """NF3 as NF2 and NF4 are built: 4 positive normal quantiles at linspace(0.9677083, 0.5, 5)[:-1],
    an exact zero, 3 negative ones at linspace(0.9677083, 0.5, 4)[:-1], divided by the largest."""
    from scipy.stats import norm

    nf3 = nf_codebook(3)
    pos = norm.ppf(torch.linspace(0.9677083, 0.5, 5, dtype=torch.float64)[:-1].numpy())
    neg = -norm.ppf(torch.linspace(0.9677083, 0.5, 4, dtype=torch.float64)[:-1].numpy())
    ref = torch.tensor(sorted([*pos, 0.0, *neg]), dtype=torch.float64)
    assert nf3.dtype == torch.float32 and torch.equal(nf3, (ref / ref.max()).float())
    assert nf3.tolist()[0] == -1.0 and nf3.tolist()[-1] == 1.0 and nf3[3] == 0.0
    assert (nf3 > 0).sum() == 4 and (nf3 < 0).sum() == 3 and torch.all(nf3[1:] > nf3[:-1])
    assert nf3.tolist() == pytest.approx([-1.0, -0.47863, -0.21714, 0.0, 0.16093, 0.33792, 0.56262, 1.0], abs=1e-5)
    # the positive probabilities nest in NF4's: every other positive NF4 value (to one float32 ulp)
    assert (nf3[4:] - torch.tensor(NF4_PUBLISHED)[9::2]).abs().max() <= 1.2e-7


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nf4_bit_exact_with_bnb(smollm2_linears, minilm_linears, dtype) -> None:
    weights = [smollm2_linears[n] for n in SMOL] + [minilm_linears[n] for n in MINI]
    for w in weights:
        w = w.to(dtype)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        qt = quantize(w, 4)
        assert torch.equal(qt.packed, packed.reshape(-1)), "packed nibbles differ from bnb"
        assert torch.equal(qt.absmax, state.absmax)
        assert torch.equal(dequantize(qt), bnbf.dequantize_4bit(packed, state))
        # and bnb's kernel reads our stored codes directly
        state.absmax = qt.absmax
        assert torch.equal(bnbf.dequantize_4bit(qt.packed.view(-1, 1), state), dequantize(qt))


def test_nf4_bit_exact_odd_shapes() -> None:
    g = torch.Generator().manual_seed(0)
    for shape in [(577, 33), (3, 5), (100, 7)]:  # tail blocks, odd element counts
        w = torch.randn(*shape, generator=g)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        qt = quantize(w, 4)
        assert torch.equal(qt.packed, packed.reshape(-1)) and torch.equal(qt.absmax, state.absmax)


def test_int8_rowwise_bit_exact_with_bnb(smollm2_linears) -> None:
    w = smollm2_linears[SMOL[2]]
    codes, stats, _ = torch.ops.bitsandbytes.int8_vectorwise_quant.default(w.clone())
    qt = quantize(w, 8, method="int8")
    ours = unpack(qt.packed, 8, w.numel()).to(torch.int16) - 127
    assert torch.equal(ours, codes.reshape(-1).to(torch.int16))
    assert torch.equal(qt.absmax, stats)
    assert torch.equal(dequantize(qt), bnbf.int8_vectorwise_dequant(codes, stats))


def test_nf8_runs_on_bnb_blockwise_dequant(smollm2_linears) -> None:
    """bnb's dequantize_blockwise with our NF8 table reproduces our dequantization exactly."""
    w = smollm2_linears[SMOL[0]]
    qt = quantize(w, 8)
    codes = unpack(qt.packed, 8, w.numel()).reshape(w.shape)
    state = bnbf.QuantState(absmax=qt.absmax, code=nf_codebook(8), blocksize=64, dtype=torch.float32)
    assert torch.equal(bnbf.dequantize_blockwise(codes, state), dequantize(qt))


# Documented bounds (README): relative Frobenius error on real weights, block 64.
BOUNDS = {("nf", 2): 0.60, ("nf", 3): 0.23, ("nf", 4): 0.11, ("nf", 8): 0.0075, ("int8", 8): 0.02,
          ("uniform", 2): 0.90, ("uniform", 4): 0.17, ("uniform", 8): 0.0075}


@pytest.mark.parametrize("method,bits", sorted(BOUNDS))
def test_error_bounds(smollm2_linears, minilm_linears, method, bits) -> None:
    for w in [smollm2_linears[n] for n in SMOL] + [minilm_linears[n] for n in MINI]:
        err = rel(w, dequantize(quantize(w, bits, method=method)))
        assert 0 < err < BOUNDS[(method, bits)], (method, bits, err)


def test_more_bits_less_error(smollm2_linears) -> None:
    w = smollm2_linears[SMOL[1]]
    errs = [rel(w, dequantize(quantize(w, b))) for b in (2, 4, 8)]
    assert errs[0] > 4 * errs[1] > 16 * errs[2]
    nf3 = rel(w, dequantize(quantize(w, 3)))  # measured: NF2 0.566, NF3 0.203, NF4 0.093
    assert 2 * errs[1] < nf3 < errs[0] / 2


@pytest.mark.parametrize("method,bits,dq", [("nf", 2, False), ("nf", 3, False), ("nf", 4, False), ("nf", 8, False),
                                            ("int8", 8, False), ("nf", 2, True), ("nf", 3, True), ("nf", 4, True)])
def test_nbytes_exact(smollm2_linears, method, bits, dq) -> None:
    for name in SMOL:
        w = smollm2_linears[name]
        qt = quantize(w, bits, method=method, double_quant=dq)
        stored = qt.packed.numel() * qt.packed.element_size() + sum(
            t.numel() * t.element_size() for t in qt.constants().values())
        assert qt.nbytes == stored == expected_nbytes(w.numel(), qt.config, row=w.shape[1])
        assert qt.packed.dtype == torch.uint8 and qt.packed.numel() == packed_numel(w.numel(), bits)
        n_blocks = -(-w.numel() // (w.shape[1] if method == "int8" else 64))
        consts = (n_blocks + 4 * -(-n_blocks // 256) + 4) if dq else 4 * n_blocks
        assert qt.nbytes == w.numel() * bits // 8 + consts


def test_double_quant_saves_bytes_and_costs_little(smollm2_linears) -> None:
    w = smollm2_linears[SMOL[2]]
    plain, dq = quantize(w, 2), quantize(w, 2, double_quant=True)
    assert plain.bits_per_weight == pytest.approx(2.5)  # fp32 absmax per 64 weights: +25% at 2 bits
    assert dq.bits_per_weight < 2.13
    assert rel(w, dequantize(dq)) < 1.01 * rel(w, dequantize(plain))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 64, 1001])
def test_pack_roundtrip(bits, n) -> None:
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = pack(codes, bits)
    assert packed.numel() == packed_numel(n, bits) == -(-n * bits // 8)  # exact: no whole padding bytes
    assert torch.equal(unpack(packed, bits, n), codes)


def test_pack_3bit_layout() -> None:
    """8 codes in 3 bytes, MSB first (the first code in the top 3 bits); a tail keeps only the
    bytes its bits reach, the rest of the last byte zero."""
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    assert pack(codes, 3).tolist() == [0b00101001, 0b11001011, 0b10111000]
    assert pack(codes[:3], 3).tolist() == [0b00101001, 0b10000000]  # 9 bits: 2 bytes
    assert pack(torch.tensor([7], dtype=torch.uint8), 3).tolist() == [0b11100000]
    assert [packed_numel(n, 3) for n in (0, 1, 2, 3, 8, 9, 16, 17)] == [0, 1, 1, 2, 3, 4, 6, 7]
    with pytest.raises(ValueError, match="can pack 2, 3, 4, 8-bit codes, got 5"):
        pack(codes, 5)


def test_nf3_round_trip_with_tails() -> None:
    """NF3 codes round-trip through the exact 3-bit packing for tail blocks and odd element counts,
    with and without double quantization; every code is a nearest NF3 value of its scaled weight."""
    from loftq.quant import fake_quantize

    g = torch.Generator().manual_seed(0)
    for shape in [(577, 33), (3, 5), (100, 7), (1, 1), (64, 64)]:
        w = torch.randn(*shape, generator=g)
        for dq in (False, True):
            qt = quantize(w, 3, double_quant=dq)
            assert qt.packed.numel() == -(-w.numel() * 3 // 8) and qt.nbytes == expected_nbytes(w.numel(), qt.config)
            deq = dequantize(qt)
            assert torch.equal(deq, fake_quantize(w, qt.config))
            assert torch.equal(pack(unpack(qt.packed, 3, w.numel()), 3), qt.packed)  # the tail bits are zero
        plain = quantize(w, 3)
        scaled = (w.reshape(-1) / plain.absmax.repeat_interleave(64)[: w.numel()]).clamp(-1, 1)
        dist = (scaled.unsqueeze(1) - nf_codebook(3)).abs()
        picked = dist.gather(1, unpack(plain.packed, 3, w.numel()).long().unsqueeze(1)).squeeze(1)
        assert torch.all(picked <= dist.min(1).values + 1e-6)


def test_rejects_non_finite_and_bad_config() -> None:
    w = torch.randn(64, 64)
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quantize(w, 4)
    w[3, 5] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        quantize(w, 4)
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(3, "int8")
    with pytest.raises(KeyError, match="known: int8, nf, uniform"):
        QuantConfig(4, "fp4")
    with pytest.raises(ValueError, match="block_size must be a multiple of 16"):
        QuantConfig(4, "nf", block_size=40)
    assert QuantConfig(4, "nf", block_size=576).block_size == 576  # a row length (row-scaled widths)


@pytest.mark.parametrize("method,bits", [("nf", 2), ("nf", 3), ("nf", 4), ("nf", 8), ("int8", 8), ("uniform", 4)])
def test_fake_quantize_equals_round_trip(smollm2_linears, method, bits) -> None:
    from loftq.quant import fake_quantize

    for name in SMOL:
        w = smollm2_linears[name]
        cfg = QuantConfig(bits, method)
        assert torch.equal(fake_quantize(w, cfg), dequantize(quantize(w, config=cfg), torch.float32))


@pytest.mark.parametrize("codebook", ["nf2", "nf4", "nf8", "uniform2", "uniform4", "uniform8"])
def test_code_lookup_equals_bucketize_at_every_edge(codebook) -> None:
    """The gather-based nearest code (ties to the lower entry) against a binary search, at every
    midpoint, every lookup cell edge and their float neighbours, plus random values."""
    from loftq.codebooks import code_lookup

    cb = QuantConfig.from_name(codebook).spec.codebook(QuantConfig.from_name(codebook).bits)
    mids, lookup = (cb[:-1] + cb[1:]) / 2, code_lookup(cb)
    edges = (torch.arange(2 * lookup.scale + 1) / lookup.scale - 1).float()
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    x = torch.cat([mids, edges, *(torch.nextafter(t, d) for t in (mids, edges) for d in (up, down)),
                   torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                   torch.tensor([0.0, -0.0, 1e-45, -1e-45])]).clamp(-1, 1)
    assert torch.equal(lookup.codes(x), torch.bucketize(x, mids, out_int32=True))


@pytest.mark.parametrize("method,bits", [("nf", 2), ("nf", 8), ("uniform", 4), ("int8", 8)])
def test_quantization_residual_is_the_fused_difference(smollm2_linears, method, bits) -> None:
    """R = W - fake_quantize(W) bit for bit (fp32; bf16 = its rounding), ||R||^2 per matrix, also
    with a tail block (uniform codes the zero padding as non-zero: it must not count)."""
    from loftq.quant import fake_quantize, quantization_residual

    cfg = QuantConfig(bits, method)
    stack = torch.stack([smollm2_linears[f"model.layers.{b}.mlp.up_proj"] for b in (1, 2)])
    ref = stack - torch.stack([fake_quantize(m, cfg) for m in stack])
    res, sq = quantization_residual(stack, cfg)
    assert torch.equal(res, ref) and torch.allclose(sq, ref.double().pow(2).sum(dim=(1, 2)), rtol=1e-6)
    half, _ = quantization_residual(stack, cfg, dtype=torch.bfloat16)
    assert torch.equal(half, ref.bfloat16())
    odd = smollm2_linears[SMOL[0]][:37, :51]
    res, sq = quantization_residual(odd, cfg)
    assert torch.equal(res, odd - fake_quantize(odd, cfg))
    assert float(sq) == pytest.approx(float(res.double().pow(2).sum()), rel=1e-6)

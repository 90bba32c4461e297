"""Error-feedback rounding (loftq.rounding) on real SmolLM2 layers with their real input moments
(the pydoc calibration of tests/planner/scoring/test_data_tables.py: 2 x 64 tokens)."""
from __future__ import annotations

import pytest
import torch

from loftq import QuantConfig, dequantize, expected_nbytes, loftq, quantize, quantize_feedback, unpack
from loftq.rounding import inverse_factor
from loftq.solver import calibration_factor
from loftq.quant import _decode
from planner.runtime.layers import QuantLinear
from tests.planner.scoring.test_data_tables import LAYERS, smol  # noqa: F401  (the fixture)

SOME = LAYERS[::3]  # k_proj 0, up_proj 0, v_proj 14, down_proj 14, gate_proj 29


def _weighted(w: torch.Tensor, deq: torch.Tensor, factor: torch.Tensor) -> float:
    return float(((w - deq) @ factor).norm() / (w @ factor).norm())


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_a_real_quantized_tensor_with_round_to_nearests_bytes(smol, bits: int, dq: bool) -> None:  # noqa: F811
    _, store, weights = smol
    name = LAYERS[4]  # down_proj [576, 1536]
    w, cfg = weights[name], QuantConfig(bits, "nf", 64, dq)
    fb, rtn = quantize_feedback(w, cfg, store[name]), quantize(w, config=cfg)
    assert (fb.shape, fb.dtype, fb.config, fb.block) == (rtn.shape, rtn.dtype, rtn.config, rtn.block)
    assert fb.packed.dtype == rtn.packed.dtype == torch.uint8 and fb.packed.shape == rtn.packed.shape
    assert {k: (v.dtype, v.shape) for k, v in fb.constants().items()} == \
        {k: (v.dtype, v.shape) for k, v in rtn.constants().items()}
    assert fb.nbytes == rtn.nbytes == expected_nbytes(w.numel(), cfg)
    if dq:  # the stored constants are round-to-nearest's: the absmax of W's blocks, double-quantized
        assert all(torch.equal(fb.constants()[k], v) for k, v in rtn.constants().items())
    codes = unpack(fb.packed, bits, fb.numel)
    assert int(codes.max()) < 2**bits and not torch.equal(fb.packed, rtn.packed)
    deq = dequantize(fb, torch.float32)
    layer = QuantLinear(fb, compute_dtype=torch.float32)  # the runtime's buffers and dequantizer
    assert layer.code_nbytes == fb.nbytes
    assert torch.equal(layer.dense_weight(torch.float32), deq)
    assert torch.equal(layer.quantized().dequantize(torch.float32), deq) and torch.equal(_decode(fb, torch.float32), deq)


# measured on these 5 layers (2 x 64 tokens), mean ||(W - Q) L|| feedback / round-to-nearest:
# NF2 0.368 (dq 0.306), NF3 0.258 (0.258), NF4 0.239 (0.243); each layer's at most 0.44
MARGIN = {(2, False): 0.41, (2, True): 0.35, (3, False): 0.29, (3, True): 0.29, (4, False): 0.27, (4, True): 0.28}


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_feedback_lowers_the_weighted_error(smol, bits: int, dq: bool) -> None:  # noqa: F811
    _, store, weights = smol
    cfg = QuantConfig(bits, "nf", 64, dq)
    ratios = []
    for name in SOME:
        w, h = weights[name], store[name]
        factor = calibration_factor(h)
        rtn = _weighted(w, dequantize(quantize(w, config=cfg), torch.float32), factor)
        fb = _weighted(w, dequantize(quantize_feedback(w, cfg, h), torch.float32), factor)
        assert fb < 0.5 * rtn, name
        ratios.append(fb / rtn)
    assert sum(ratios) / len(ratios) < MARGIN[bits, dq], ratios


@pytest.mark.parametrize("dq", [False, True])
def test_identity_moment_gives_round_to_nearest_bit_for_bit(smollm2_linears, dq: bool) -> None:
    """H = I (or any diagonal H: dead inputs too) couples no columns: no error moves, so every code
    and constant is round-to-nearest's."""
    w = smollm2_linears[LAYERS[1]]
    for h in (torch.eye(w.shape[1]), torch.diag(torch.rand(w.shape[1]) * (torch.rand(w.shape[1]) > 0.2))):
        for bits in (2, 4):
            cfg = QuantConfig(bits, "nf", 64, dq)
            fb, rtn = quantize_feedback(w, cfg, h), quantize(w, config=cfg)
            assert torch.equal(fb.packed, rtn.packed)
            assert all(torch.equal(fb.constants()[k], v) for k, v in rtn.constants().items())


def test_loftq_with_feedback_beats_data_aware_loftq_at_rank_16(smol) -> None:  # noqa: F811
    _, store, weights = smol
    for name in SOME[:3]:
        w, h = weights[name], store[name]
        for bits in (2, 4):
            near = loftq(w, bits, 16, calibration=h)
            fb = loftq(w, bits, 16, calibration=h, rounding="feedback")
            # measured: 0.38-0.69 of round-to-nearest's weighted residual on these layers
            assert fb.weighted_errors[0] < 0.8 * near.weighted_errors[0], (name, bits)
            factor = calibration_factor(h)
            r = w - dequantize(fb.quantized, torch.float32) - fb.lora_b @ fb.lora_a
            assert float((r @ factor).norm() / (w @ factor).norm()) == pytest.approx(fb.weighted_errors[0], rel=1e-4)


def test_nearest_is_the_default_and_unchanged(smol) -> None:  # noqa: F811
    _, store, weights = smol
    w, h = weights[LAYERS[0]], store[LAYERS[0]]
    default = loftq(w, 3, 16, calibration=h, double_quant=True)
    near = loftq(w, 3, 16, calibration=h, double_quant=True, rounding="nearest")
    assert torch.equal(near.quantized.packed, default.quantized.packed)
    assert torch.equal(near.quantized.packed, quantize(w, 3, double_quant=True).packed)
    assert torch.equal(near.lora_a, default.lora_a) and torch.equal(near.lora_b, default.lora_b)
    assert near.weighted_errors == default.weighted_errors


def test_dead_inputs_round_to_nearest_and_damp_zero_works_when_h_is_definite(smollm2_linears) -> None:
    w = smollm2_linears[LAYERS[1]]  # v_proj [192, 576]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 576, generator=gen) @ torch.randn(576, 576, generator=gen) * 0.1
    x[:, :40] = 0  # inputs that never fire
    h = x.T @ x / x.shape[0]
    cfg = QuantConfig(4, "nf", 64, True)  # fixed stored scales: dead columns keep RTN's codes exactly
    rtn = unpack(quantize(w, config=cfg).packed, 4, w.numel()).view(w.shape)
    for damp in (0.0, 0.01):
        fb = quantize_feedback(w, cfg, h, damp)
        codes = unpack(fb.packed, 4, w.numel()).view(w.shape)
        assert torch.equal(codes[:, :40], rtn[:, :40]) and not torch.equal(codes[:, 40:], rtn[:, 40:])
        factor = calibration_factor(h, 0.01)
        assert _weighted(w, dequantize(fb, torch.float32), factor) < \
            _weighted(w, dequantize(quantize(w, config=cfg), torch.float32), factor)


def test_bad_input_raises_value_error(smollm2_linears) -> None:
    w = smollm2_linears[LAYERS[1]]
    h = torch.eye(576)
    cfg = QuantConfig(4)
    bad_w = w.clone()
    bad_w[3, 5] = float("inf")
    bad_h = h.clone()
    bad_h[1, 2] = float("nan")
    cases = [
        (lambda: quantize_feedback(bad_w, cfg, h), "non-finite"),
        (lambda: quantize_feedback(w, cfg, bad_h), "non-finite"),
        (lambda: quantize_feedback(w, cfg, torch.eye(575)), "inputs"),
        (lambda: quantize_feedback(w, cfg, torch.ones(576)), "square"),
        (lambda: quantize_feedback(w[:, :100], cfg, torch.eye(100)), "divisible"),
        (lambda: quantize_feedback(w, QuantConfig(8, "int8"), h), "row-wise"),
        (lambda: quantize_feedback(w.flatten(), cfg, h), "2-D"),
        (lambda: quantize_feedback(w, cfg), "second moment"),
        (lambda: quantize_feedback(w, cfg, h, damp=-1.0), "damp"),
        (lambda: quantize_feedback(w, cfg, torch.zeros(576, 576) + 1.0, damp=0.0), "positive definite"),
        (lambda: inverse_factor(h, float("nan")), "damp"),
        (lambda: loftq(w, 4, 16, rounding="feedback"), "calibration"),
        (lambda: loftq(w, 4, 16, calibration=h, rounding="gptq"), "rounding"),
        (lambda: loftq(w, "q4_k", 16, calibration=h, rounding="feedback"), "cannot round q4_k"),
        (lambda: loftq(w, 4, 16, calibration=torch.eye(64)), "calibration"),
    ]
    for call, word in cases:
        with pytest.raises(ValueError, match=word):
            call()


def test_many_widths_in_one_column_loop_are_each_widths_own_codes(smol, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The weight bank encodes a layer's widths in one feedback loop (stacked along the output
    rows): every width's codes and constants are those of a call with that width alone, also when
    the batch is split to bound its working copy."""
    import loftq.rounding as rounding

    _, store, weights = smol
    configs = [QuantConfig(b, "nf", 64, dq) for b in (2, 3, 4, 8) for dq in (False, True)]
    for name in (LAYERS[0], LAYERS[4]):  # k_proj [192, 576], down_proj [576, 1536]
        w, h = weights[name], store[name]
        upper = inverse_factor(h)
        alone = [quantize_feedback(w, c, upper=upper) for c in configs]
        for batch in (None, 3 * w.numel() * 4):  # all 8 in one loop; 3 per loop
            if batch is not None:
                monkeypatch.setattr(rounding, "BATCH_BYTES", batch)
            together = rounding.quantize_feedback_many(w, configs, h)
            for c, a, t in zip(configs, alone, together):
                assert t.config == c and torch.equal(t.packed, a.packed), (name, c)
                assert a.constants().keys() == t.constants().keys()
                assert all(torch.equal(a.constants()[k], t.constants()[k]) for k in a.constants())
    assert rounding.quantize_feedback_many(w, [], h) == []


def test_widths_of_other_blocks_share_a_loop_and_keep_their_own_codes(smol) -> None:  # noqa: F811
    """A row-scaled block (the row length) and a 192-block loop at 64 columns a run beside the
    64-blocks (a 32-block loops alone at 32): each width's codes and constants are its own call's,
    and every block's scale is what dequantization reads."""
    import loftq.rounding as rounding

    _, store, weights = smol
    for name in (LAYERS[0], LAYERS[4]):
        w, h = weights[name], store[name]
        row = int(w.shape[1])
        configs = [QuantConfig(3, "nf", 64, True), QuantConfig(3, "nf", row, True), QuantConfig(2, "nf", row, False),
                   QuantConfig(4, "nf", 192, True), QuantConfig(4, "nf", 32, False)]
        assert [rounding.loop_block(c.block_size) for c in configs] == [64, 64, 64, 64, 32]
        upper = rounding.inverse_factor(h)
        together = rounding.quantize_feedback_many(w, configs, upper=upper)
        lower = torch.linalg.cholesky(h.double() + 0.01 * h.diagonal().mean() * torch.eye(row, dtype=torch.float64))
        for c, t in zip(configs, together):
            a = quantize_feedback(w, c, upper=upper)
            assert t.config == c and t.block == c.block_size and torch.equal(t.packed, a.packed), (name, c)
            assert all(torch.equal(a.constants()[k], t.constants()[k]) for k in a.constants())
            # the feedback beats round to nearest at the same scales, in the output norm it minimises
            near = c.quantize(w).dequantize().double()
            fb = t.dequantize().double()
            assert ((w.double() - fb) @ lower).norm() < ((w.double() - near) @ lower).norm(), (name, c)


def test_the_grid_rounds_like_a_binary_search_at_and_around_every_midpoint() -> None:
    """The column loop reads codes off :class:`loftq.rounding._Grid`'s cells instead of a search: at
    every midpoint of NF2/3/4/8 and an even 255-step book, one fp32 step either side of it, the ends
    and random values, each row in its own book, the codes are bucketize's (ties to the lower
    entry) and the rounded values those codes' entries."""
    from loftq.rounding import _Grid

    books = [QuantConfig(b, "nf", 64).spec.codebook(b) for b in (2, 3, 4, 8)] + [torch.linspace(-1, 1, 255)]
    values = []
    for b in books:
        mids = (b[:-1] + b[1:]) / 2
        near = torch.cat([mids, torch.nextafter(mids, torch.tensor(-2.0)), torch.nextafter(mids, torch.tensor(2.0))])
        values.append(torch.cat([near, torch.tensor([-1.0, 1.0, 0.0, -0.0]), torch.rand(500) * 2 - 1]))
    out = max(len(v) for v in values)
    scaled = torch.stack([torch.cat([v, v.new_zeros(out - len(v))]) for v in values]).reshape(-1)
    grid = _Grid(books, out, scaled.device)
    codes = grid.codes(scaled.view(1, -1)).view(len(books), out)
    rounded = grid.rounded(scaled).view(len(books), out)
    for i, b in enumerate(books):
        want = torch.bucketize(scaled.view(len(books), out)[i], (b[:-1] + b[1:]) / 2)
        assert torch.equal(codes[i], want), i
        assert torch.equal(rounded[i], b[want]), i

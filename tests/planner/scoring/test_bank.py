"""The one weight bank, on MiniLM's real weights: PEFT's factor order, LoftQ's numbers, lazy lookups
through a store that several banks can share, and the originals served without a copy."""
from __future__ import annotations

import pytest
import torch

from loftq import loftq
from tests.tiny_models import build_tiny

from planner.scoring.bank import BankSettings, MemoryStore, ModelWeights, WeightBank
from tests.planner.scoring.test_data_tables import smol  # noqa: F401  (the fixture: real SmolLM2 moments)

Q = "encoder.layer.0.attention.self.query"  # 384 x 384
UP = "encoder.layer.0.intermediate.dense"  # 1536 x 384


def test_exact_entry_is_loftq_in_peft_order(minilm_linears: dict[str, torch.Tensor]) -> None:
    """W ~= deq(Q) + B @ A with B [out, r], A [r, in]; Q, B and A are what loftq(iters=1) returns,
    and the residual at every rank is sqrt(||W - Q||^2 - sum_{i<=r} s_i^2) from one spectrum."""
    w = minilm_linears[Q]
    bank = WeightBank({Q: w}, (4,), max_rank=16, svd="exact")
    b, a = bank.factors(Q, 4, 16)
    assert b.shape == (384, 16) and a.shape == (16, 384)
    ref = loftq(w, 4, 16, iters=1)
    assert torch.equal(bank.quantized(Q, 4).packed, ref.quantized.packed)
    torch.testing.assert_close(b @ a, ref.lora_b @ ref.lora_a, rtol=1e-4, atol=1e-5)
    err = w - bank.entry(Q, 4).deq
    s = torch.linalg.svdvals(err)
    for r in (0, 4, 16):
        got = torch.linalg.norm(w - bank.weight(Q, 4, r))
        want = (err.pow(2).sum() - s[:r].pow(2).sum()).sqrt()
        assert float(got) == pytest.approx(float(want), rel=1e-4), r
    # measured: rank 16 removes ~10% of this layer's NF4 error (3.40 -> 3.07)
    assert float(torch.linalg.norm(w - bank.weight(Q, 4, 16))) < 0.92 * float(torch.linalg.norm(err))


def test_randomized_factors_within_1pct_of_exact_and_the_callers_rng_untouched(
        minilm_linears: dict[str, torch.Tensor]) -> None:
    w = minilm_linears[UP]
    exact = WeightBank({UP: w}, (2,), max_rank=8, svd="exact")
    fast = WeightBank({UP: w}, (2,), max_rank=8)
    state = torch.get_rng_state()
    got = torch.linalg.norm(w - fast.weight(UP, 2, 8))
    assert torch.equal(torch.get_rng_state(), state)  # the randomized SVD seeds its own generator
    assert float(got) <= 1.01 * float(torch.linalg.norm(w - exact.weight(UP, 2, 8)))
    assert torch.equal(fast.quantized(UP, 2).packed, exact.quantized(UP, 2).packed)


def test_lookups_are_lazy_and_a_shared_store_computes_each_entry_once(minilm_linears: dict[str, torch.Tensor]) -> None:
    weights = {n: minilm_linears[n] for n in (Q, UP)}
    store = MemoryStore()
    first = WeightBank(weights, (2, 4), max_rank=8, store=store)
    assert len(store) == 0  # nothing computed before a lookup
    first.weight(Q, 4, 8)
    assert len(store) == 1
    second = WeightBank(weights, (2, 4), max_rank=8, store=store)
    assert second.entry(Q, 4) is first.entry(Q, 4)  # the stored entry, not a recomputation
    second.fill()
    assert len(store) == 4  # 2 layers x 2 widths
    # a store never serves another block size: a bank at 128 stores its own entry beside the 64 one
    other = WeightBank(weights, (2, 4), max_rank=8, block_size=128, store=store).entry(Q, 4)
    assert other.quantized.spec.block_size == 128 and first.entry(Q, 4).quantized.spec.block_size == 64
    assert len(store) == 5
    with pytest.raises(ValueError, match="other settings"):  # nor one built with another SVD
        WeightBank(weights, (2, 4), max_rank=8, svd="exact", store=store).entry(Q, 4)
    with pytest.raises(ValueError, match="exceeds the bank's max_rank 8"):
        first.factors(Q, 4, 16)
    with pytest.raises(ValueError, match="not a quantized width"):
        first.entry(Q, 8)


def test_16_bits_is_the_original_tensor_and_ranks_past_the_shape_are_zero(
        minilm_linears: dict[str, torch.Tensor]) -> None:
    w = minilm_linears[Q]
    bank = WeightBank({Q: w}, (4,), max_rank=8)
    assert bank.weight(Q, 16, 8).data_ptr() == w.data_ptr()  # no fp32 copy of the originals
    small = w[:4, :8].clone()
    tiny = WeightBank({"x": small}, (4,), max_rank=8, block_size=16)
    b, a = tiny.factors("x", 4, 6)
    assert b.shape == (4, 6) and a.shape == (6, 8)
    assert not b[:, 4:].any() and not a[4:].any()
    torch.testing.assert_close(tiny.weight("x", 4, 6), small, rtol=0, atol=1e-5)  # rank 4 = full: exact


def test_model_weights_are_out_in_for_conv1d_too() -> None:
    gpt2 = build_tiny("gpt2")
    weights = ModelWeights(gpt2, ["transformer.h.0.attn.c_attn"])
    mod = gpt2.get_submodule("transformer.h.0.attn.c_attn")
    assert list(weights) == ["transformer.h.0.attn.c_attn"]
    assert torch.equal(weights["transformer.h.0.attn.c_attn"], mod.weight.T)  # Conv1D stores [in, out]
    assert "lm_head" in ModelWeights(gpt2) and "transformer.wte" not in ModelWeights(gpt2)


@pytest.mark.parametrize("kwargs, word", [({"svd": "fast"}, "svd"), ({"max_rank": -1}, "max_rank"),
                                          ({"bits": (5,)}, "bits"), ({"dtype": torch.int8}, "dtype")])
def test_settings_validation_names_the_value(kwargs: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        BankSettings(**{"bits": (4,), "max_rank": 8, **kwargs})


def test_feedback_rounding_entries_are_their_own_and_never_mixed(smol, tmp_path) -> None:  # noqa: F811
    """With moments and rounding="feedback": Q is loftq.quantize_feedback's (same bytes as
    round-to-nearest, lower weighted error), the factors are the weighted ones, and the label keeps a
    store (in RAM or on disk) from serving one rounding's entry to the other's bank."""
    from loftq import QuantConfig, dequantize, quantize_feedback
    from loftq.solver import calibration_factor
    from planner.scoring.bank import DiskStore
    from tests.planner.scoring.test_data_tables import LAYERS as SMOL

    _, moments, weights = smol
    name = SMOL[4]  # down_proj [576, 1536]
    w, h = weights[name], moments[name]
    store = MemoryStore()
    near = WeightBank({name: w}, (2, 4), 16, svd="exact", moments=moments, store=store)
    fb = WeightBank({name: w}, (2, 4), 16, svd="exact", moments=moments, rounding="feedback", store=DiskStore(tmp_path, "k"))
    assert (near.label, fb.label) == ("exact/data", "exact/data/feedback")
    factor = calibration_factor(h)
    for bits in (2, 4):
        q = fb.quantized(name, bits)
        assert torch.equal(q.packed, quantize_feedback(w, QuantConfig(bits), h).packed)
        assert q.nbytes == near.quantized(name, bits).nbytes
        ref = loftq(w, bits, 16, calibration=h, rounding="feedback")
        assert torch.equal(q.packed, ref.quantized.packed)
        got = float(((w - fb.weight(name, bits, 16)) @ factor).norm() / (w @ factor).norm())
        assert got == pytest.approx(ref.weighted_errors[0], rel=1e-4)
        assert got < float(((w - near.weight(name, bits, 16)) @ factor).norm() / (w @ factor).norm())
        assert torch.equal(fb.deq(name, bits), dequantize(q, torch.float32))
    with pytest.raises(ValueError, match="other settings"):  # the nearest bank's RAM store
        WeightBank({name: w}, (2, 4), 16, svd="exact", moments=moments, rounding="feedback", store=store).entry(name, 2)
    with pytest.raises(ValueError, match="other settings"):  # the feedback bank's file
        WeightBank({name: w}, (2, 4), 16, svd="exact", moments=moments, store=DiskStore(tmp_path, "k")).entry(name, 2)
    with pytest.raises(ValueError, match="moments"):
        WeightBank({name: w}, (2,), 16, rounding="feedback")
    with pytest.raises(ValueError, match="rounding"):
        WeightBank({name: w}, (2,), 16, moments=moments, rounding="stochastic")


def test_fill_encodes_a_layers_widths_together_as_lookups_one_by_one_would(smol, tmp_path, monkeypatch) -> None:  # noqa: F811
    """fill() encodes the widths a layer's store lacks in one feedback loop: every entry equals the
    one a lookup computes alone, a filled store serves later lookups (nothing is encoded again), and
    a store already holding some widths gets only the others."""
    import loftq.formats as formats
    import planner.scoring.bank as bank_module
    from loftq.formats.codebook import Width
    from planner.scoring.bank import DiskStore
    from tests.planner.scoring.test_data_tables import LAYERS as SMOL

    _, moments, weights = smol
    names = [SMOL[0], SMOL[4]]  # k_proj [192, 576], down_proj [576, 1536]
    sub = {n: weights[n] for n in names}
    menu = (2, 3, Width(3), Width(4), 8, Width(8))  # Width(b): b bits, double-quantized
    kw = dict(svd="exact", moments=moments, rounding="feedback")
    one = WeightBank(sub, menu, 16, store=MemoryStore(), **kw)
    for n in names:
        for b in menu:
            one.entry(n, b, factors=False)
    calls = []
    real = formats.quantize_many

    def counting(weight, specs, **k):
        calls.append(len(specs))
        return real(weight, specs, **k)

    monkeypatch.setattr(bank_module, "quantize_many", counting)
    store = DiskStore(tmp_path, "k")
    WeightBank(sub, menu[:2], 16, store=store, **kw).fill()
    together = WeightBank(sub, menu, 16, store=store, **kw)
    together.fill()
    for n in names:
        for b in menu:
            got, ref = together.quantized(n, b), one.quantized(n, b)
            assert got.spec == ref.spec and all(torch.equal(v, ref.tensors()[k]) for k, v in got.tensors().items())
            assert torch.equal(together.deq(n, b), one.deq(n, b))
    assert calls == [2, 2, 4, 4]  # two widths per layer, then the four the store lacked; lookups encode nothing

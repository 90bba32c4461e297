"""Per-token KL divergence and NLL (planner.train.kld): a hand-computed example, the 99th percentile,
a tiny Llama against itself and a perturbed copy, and SmolLM2 with NF4 layers against the planner's
zero-step KL proxy on the same tokens."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from planner.train.kld import KLDSummary, TextScore, score_blocks, token_kld, token_nll
from planner.train.loop import eval_loss
from tests.tiny_models import build_tiny


def test_token_kld_by_hand() -> None:
    # token 0: P_ref = (1/2, 1/4, 1/4), P = (1/4, 1/2, 1/4): KL = 1/2 ln 2 - 1/4 ln 2 = ln(2) / 4
    # token 1: P_ref uniform over 3, P = (1/2, 1/4, 1/4): KL = -ln 3 + (1/3)(ln 2 + 2 ln 4) = 5/3 ln 2 - ln 3
    ref = torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]).log()
    cand = torch.tensor([[0.25, 0.5, 0.25], [0.5, 0.25, 0.25]]).log() + 7.0  # logits: any shift
    kld = token_kld(ref, cand)
    want = [math.log(2) / 4, 5 / 3 * math.log(2) - math.log(3)]
    assert kld.dtype == torch.float64 and kld.tolist() == pytest.approx(want, abs=1e-7)
    summary = KLDSummary.of(kld)
    assert summary.mean == pytest.approx(sum(want) / 2, abs=1e-7) and summary.tokens == 2
    assert token_kld(ref, ref).tolist() == [0.0, 0.0]
    assert token_kld(cand, ref)[0] == pytest.approx(math.log(2) / 4, abs=1e-7)  # symmetric pair, by chance
    assert token_kld(cand, ref)[1] != pytest.approx(want[1], abs=1e-3)  # not symmetric in general
    with pytest.raises(ValueError, match="one shape"):
        token_kld(ref, cand[:, :2])


def test_token_kld_in_slabs_and_shapes() -> None:
    gen = torch.Generator().manual_seed(0)
    ref, cand = torch.randn(3, 5, 50, generator=gen), torch.randn(3, 5, 50, generator=gen)
    whole = token_kld(ref, cand)
    assert whole.shape == (3, 5) and bool((whole > 0).all())
    assert torch.allclose(token_kld(ref, cand, rows=1), whole, rtol=0, atol=1e-12)
    direct = F.kl_div(cand.double().log_softmax(-1), ref.double().log_softmax(-1), log_target=True,
                      reduction="none").sum(-1)
    assert torch.allclose(whole, direct, rtol=1e-10, atol=1e-12)
    labels = torch.randint(0, 50, (3, 5), generator=gen)
    nll = token_nll(cand, labels, rows=2)
    assert torch.allclose(nll, F.cross_entropy(cand.double().view(-1, 50), labels.view(-1), reduction="none").view(3, 5))


def test_p99_is_numpys_percentile() -> None:
    assert KLDSummary.of(torch.arange(101.0)).p99 == 99.0
    assert KLDSummary.of(torch.arange(10.0)).p99 == pytest.approx(8.91)  # 0.99 * 9, linear interpolation
    values = torch.rand(1000, generator=torch.Generator().manual_seed(1)) ** 4  # skewed, as per-token KL is
    s = KLDSummary.of(values.view(10, 100))
    assert s.p99 == pytest.approx(float(np.percentile(values.double().numpy(), 99)), rel=1e-12)
    assert s.mean == pytest.approx(float(values.double().mean())) and s.tokens == 1000
    assert s.to_dict() == {"mean": s.mean, "p99": s.p99, "tokens": 1000}
    with pytest.raises(ValueError, match="no tokens"):
        KLDSummary.of(torch.empty(0))


@pytest.fixture(scope="module")
def tiny_llama() -> torch.nn.Module:
    return build_tiny("llama")


def test_score_blocks_self_perturbed_and_nll(tiny_llama: torch.nn.Module) -> None:
    blocks = torch.randint(0, 320, (5, 24), generator=torch.Generator().manual_seed(0))
    noisy = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        w = noisy.lm_head.weight  # random init is near uniform: only the head moves the distribution much
        w.add_(5 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(2)))
    tiny_llama.train()
    score = score_blocks(noisy, blocks, {"self": noisy, "clean": tiny_llama}, batch_size=2)
    assert tiny_llama.training and not noisy.training  # modes restored
    assert score.tokens == 5 * 23 and score.kld["self"].tokens == score.kld["clean"].tokens == 5 * 23
    assert score.kld["self"].mean == 0.0 and score.kld["self"].p99 == 0.0
    clean = score.kld["clean"]
    assert 0.1 < clean.mean < 1.0 and clean.p99 > clean.mean
    assert score.nll == pytest.approx(eval_loss(noisy, blocks, batch_size=3), rel=1e-6)
    assert score.ppl == pytest.approx(math.exp(score.nll))
    again = score_blocks(noisy, blocks, {"clean": tiny_llama}, batch_size=5)  # batching does not matter
    assert again.kld["clean"].mean == pytest.approx(clean.mean, rel=1e-5) and again.nll == pytest.approx(score.nll)
    bare = score_blocks(noisy, blocks)
    assert bare.kld == {} and bare.nll == pytest.approx(score.nll) and isinstance(bare, TextScore)
    with pytest.raises(ValueError, match="LongTensor"):
        score_blocks(noisy, blocks[:, :1])


def test_smollm2_nf4_layers_match_the_zero_step_proxy(smollm2_model: torch.nn.Module) -> None:
    """Four NF4 layers (rank 0): the KL is the planner proxy's (fp32) on the same tokens, the NLL
    eval_loss's; SmolLM2 against itself is exactly 0."""
    from planner.scoring.bank import ModelWeights, WeightBank
    from planner.scoring.proxy import ZeroStepProxy

    names = [f"model.layers.{i}.{m}" for i in (0, 29) for m in ("self_attn.q_proj", "mlp.down_proj")]
    ids = torch.randint(0, smollm2_model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    bank = WeightBank(ModelWeights(smollm2_model, names), (4,), max_rank=0)
    quantized = copy.deepcopy(smollm2_model)
    for n in names:
        quantized.get_submodule(n).weight.data = bank.weight(n, 4, 0).to(torch.float32).contiguous()
    score = score_blocks(quantized, ids, {"fp32": smollm2_model, "self": quantized})
    proxy = ZeroStepProxy(smollm2_model, bank, ids, chunk=2).score({n: (4, 0) for n in names})
    assert score.kld["self"].mean == 0.0 and score.kld["fp32"].tokens == 62
    assert score.kld["fp32"].mean == pytest.approx(proxy.kl, rel=1e-3) and score.kld["fp32"].mean > 1e-3
    assert score.kld["fp32"].p99 > 2 * score.kld["fp32"].mean  # per-token KL is skewed
    assert score.nll == pytest.approx(eval_loss(quantized, ids), rel=1e-5)

"""The zero-step proxy on real weights: SmolLM2 (KL to the full model) and MiniLM (1 - cos of the
pooled embeddings). Four layers are swapped (the first and last blocks' q_proj and down_proj, or
MiniLM's query and output projections); tokens are seeded random ids, which is enough to compare
the proxy with a direct computation on the same tokens."""
from __future__ import annotations

import pytest
import torch

from planner.scoring.bank import ModelWeights, WeightBank
from planner.scoring.proxy import ZeroStepProxy
from planner.scoring.sensitivity import pooled_embedding

SMOL = [f"model.layers.{i}.{m}" for i in (0, 29) for m in ("self_attn.q_proj", "mlp.down_proj")]
MINI = [f"encoder.layer.{i}.{m}" for i in (0, 5) for m in ("attention.self.query", "output.dense")]


def _ids(vocab: int, n: int = 3, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def smol(smollm2_model: torch.nn.Module):
    bank = WeightBank(ModelWeights(smollm2_model, SMOL), (2, 4), max_rank=8)
    ids = _ids(smollm2_model.config.vocab_size)
    return smollm2_model, bank, ids, ZeroStepProxy(smollm2_model, bank, ids, chunk=2)


@torch.no_grad()
def _logprobs_with(model: torch.nn.Module, ids: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """[n, seq - 1, vocab] log-probabilities with ``weights`` set by hand, originals put back after."""
    saved = {n: model.get_submodule(n).weight.data for n in weights}
    try:
        for n, w in weights.items():
            model.get_submodule(n).weight.data = w
        return model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
    finally:
        for n, w in saved.items():
            model.get_submodule(n).weight.data = w


def test_kl_of_the_model_against_itself_is_zero(smol) -> None:
    model, _, _, proxy = smol
    score = proxy.score({n: (16, 0) for n in SMOL})
    assert abs(score.kl) <= 1e-7
    assert score.loss == pytest.approx(score.ref_loss, rel=1e-7) and score.ref_loss > 1.0


def test_kl_equals_a_direct_computation_and_the_weights_come_back(smol) -> None:
    model, bank, ids, proxy = smol
    before = {n: model.get_submodule(n).weight.data for n in SMOL}
    assignment = {n: (2, 0) if ".0." in n else (4, 8) for n in SMOL}
    score = proxy.score(assignment)
    full = _logprobs_with(model, ids, {})
    cand = _logprobs_with(model, ids, {n: bank.weight(n, b, r) for n, (b, r) in assignment.items()})
    kl = float((full.exp() * (full - cand)).sum(-1).mean())  # mean over the 3 x 23 predicted tokens
    labels = ids[:, 1:].unsqueeze(-1)
    assert score.kl > 0 and score.kl == pytest.approx(kl, rel=1e-4)
    assert score.loss == pytest.approx(float(-cand.gather(-1, labels).mean()), rel=1e-5)
    assert score.ref_loss == pytest.approx(float(-full.gather(-1, labels).mean()), rel=1e-5)
    for n in SMOL:  # the very storage the model had, not a copy
        assert model.get_submodule(n).weight.data_ptr() == before[n].data_ptr()
    with pytest.raises(ValueError, match="encoders"):
        proxy.cosine_distances(assignment)


def test_kl_grows_as_the_candidate_moves_away(smol) -> None:
    _, _, _, proxy = smol
    kls = [proxy.score({n: choice for n in SMOL}).kl for choice in ((4, 8), (4, 0), (2, 0))]
    assert 0 < kls[0] < kls[1] < kls[2], kls


def test_encoder_distance_is_zero_for_the_same_model_and_direct_otherwise(minilm_model: torch.nn.Module) -> None:
    bank = WeightBank(ModelWeights(minilm_model, MINI), (2,), max_rank=8)
    ids = _ids(minilm_model.config.vocab_size)
    proxy = ZeroStepProxy(minilm_model, bank, ids, causal=False)
    same = proxy.score({n: (16, 0) for n in MINI})
    assert abs(same.kl) <= 1e-6 and same.loss == same.kl and same.ref_loss == 0.0
    moved = proxy.score({n: (2, 0) for n in MINI})
    with torch.no_grad():
        ref = pooled_embedding(minilm_model, ids)
        saved = {n: minilm_model.get_submodule(n).weight.data for n in MINI}
        for n in MINI:
            minilm_model.get_submodule(n).weight.data = bank.weight(n, 2, 0)
        cand = pooled_embedding(minilm_model, ids)
        for n, w in saved.items():
            minilm_model.get_submodule(n).weight.data = w
    direct = float((1 - torch.nn.functional.cosine_similarity(ref, cand, dim=-1)).mean())
    assert moved.kl > 1e-5 and moved.kl == pytest.approx(direct, rel=1e-4)

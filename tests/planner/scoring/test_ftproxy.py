"""Fine-tune proxy: diversity, pruning, choice, determinism, equality with build_loftq_model, and
training exactly as the user's fine-tune (planner.train.loop.train_lora) trains."""
from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
import torch

from loftq.quant import dequantize
from planner.runtime.lora import LayerSpec, build_loftq_model
from planner.scoring.bank import BankEntry, MemoryStore, ModelWeights, WeightBank, entry_key
from planner.scoring.ftproxy import (CandidateBuilder, FinetuneSettings, finetune, hamming, rescore_with_finetune,
                                    select_diverse)
from planner.train.loop import eval_loss, train_lora
from planner.search.study import Candidate
from tests.tiny_models import build_tiny

OPTIONS = [(2, 0), (2, 8), (4, 0), (4, 8), (8, 8), (8, 0)]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_tiny("llama")
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    # learnable data (a repeating pattern), and a model briefly trained on it so quantization matters
    pattern = torch.arange(40) % 37 + 3
    blocks = torch.stack([torch.roll(pattern, -i)[:32] for i in range(16)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for i in range(60):
        ids = blocks[i % 16: i % 16 + 2]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    targets = [SimpleNamespace(name=n) for n in names]
    problem = SimpleNamespace(table=SimpleNamespace(options=OPTIONS, targets=targets), budget=10_000)
    return model, names, problem, blocks[:12], blocks[12:]


def test_select_diverse_distinct_and_spread():
    choices = [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [1, 1, 1, 1], [2, 2, 2, 2]]
    scores = [0.1, 0.1, 0.2, 0.3, 0.9]
    picked = select_diverse(choices, scores, 3)
    assert picked[0] == 0
    assert len({tuple(choices[i]) for i in picked}) == 3  # no duplicates
    assert 2 not in picked  # the near-duplicate of the best loses to farther plans
    assert select_diverse(choices, scores, 10) == select_diverse(choices, scores, 10)
    assert len(select_diverse(choices, scores, 10)) == 4  # only 4 distinct plans exist


def test_bank_equals_build_loftq_model(setup):
    model, names, _, _, val = setup
    assignment = {n: OPTIONS[i % len(OPTIONS)] for i, n in enumerate(names)}
    ours = CandidateBuilder(model).build(assignment)
    ref = build_loftq_model(model, {n: LayerSpec(b, r) for n, (b, r) in assignment.items()},
                            compute_dtype=torch.float32, show_progress=False).model
    assert abs(eval_loss(ours, val) - eval_loss(ref, val)) < 1e-5


def test_builder_reuses_the_search_banks_factors(setup):
    """With the guided search's WeightBank, no SVD is re-run: its randomized factors are the
    adapters' init, and the built model matches the exact-SVD builder's."""
    model, names, _, _, val = setup
    wb = WeightBank(ModelWeights(model, names), (2, 4, 8), max_rank=8)
    assignment = {n: OPTIONS[i % len(OPTIONS)] for i, n in enumerate(names)}
    net = CandidateBuilder(model, max_rank=8, bank=wb).build(assignment)
    name, (bits, rank) = next((n, br) for n, br in assignment.items() if br[1] and br[0] < 16)
    lora = net.get_submodule(f"base_model.model.{name}")
    assert torch.equal(lora.lora_A["default"].weight, wb.factors(name, bits, rank).a)  # alpha = r: scaling 1
    assert torch.equal(lora.lora_B["default"].weight, wb.factors(name, bits, rank).b)
    exact_builder = CandidateBuilder(model, max_rank=8)
    exact = exact_builder.build(assignment)
    # randomized top-8 factors: residual within 1% of the exact SVD's, loss within 0.5%
    b, a = wb.factors(name, bits, 8)
    b0, a0 = exact_builder.bank.factors(name, bits, 8)
    resid = wb.original(name) - wb.entry(name, bits).deq
    assert torch.linalg.norm(resid - b @ a) <= 1.01 * torch.linalg.norm(resid - b0 @ a0)
    assert torch.linalg.norm(resid - b0 @ a0) < torch.linalg.norm(resid)
    assert abs(eval_loss(net, val) - eval_loss(exact, val)) < 5e-3 * eval_loss(exact, val)
    with pytest.raises(ValueError, match="ranks up to 16"):
        CandidateBuilder(model, max_rank=16, bank=wb)


def _cands(names, specs, budget_bytes=None):
    out = []
    for t, spec in enumerate(specs):
        choice = [OPTIONS.index(spec)] * len(names)
        out.append(Candidate(choice, bytes=budget_bytes[t] if budget_bytes else 100, objective=float(t), trial=t))
    return out


def test_chosen_is_lowest_loss_among_feasible(setup):
    model, names, problem, train, val = setup
    cands = _cands(names, [(4, 8), (2, 0), (8, 8)], budget_bytes=[100, 100, 20_000])  # 8-bit is over budget
    chosen, records = rescore_with_finetune(problem, cands, model, train, val, top_k=3, steps=4, seed=0,
                                            lr=1e-3, pruner=optuna.pruners.NopPruner())
    feasible = [r for r in records if r["feasible"] and not r["pruned"]]
    assert len(records) == 3 and sum(not r["feasible"] for r in records) == 1
    best = min(feasible, key=lambda r: r["loss"])
    assert best["chosen"] and sum(r["chosen"] for r in records) == 1
    assert chosen.trial == best["trial"] and chosen.bytes <= problem.budget
    assert {"trial", "objective", "bytes", "loss", "chosen"} <= set(records[0])
    # the plan without adapters is not trained: its score is its step-0 validation loss
    frozen = next(r for r in records if r["trial"] == 1)
    assert frozen["steps"] == 0
    assert frozen["loss"] == pytest.approx(eval_loss(CandidateBuilder(model).build({n: (2, 0) for n in names}), val,
                                                     batch_size=4))


def test_adapter_less_plan_wins_when_training_cannot_catch_up(setup):
    model, names, problem, train, val = setup
    cands = _cands(names, [(2, 8), (8, 0)])  # 2-bit + adapters, 2 steps vs 8-bit with nothing to train
    chosen, records = rescore_with_finetune(problem, cands, model, train, val, top_k=1, steps=2, seed=0,
                                            pruner=optuna.pruners.NopPruner())
    assert [r["steps"] for r in records] == [2, 0]
    assert records[1]["loss"] < records[0]["loss"] and records[1]["chosen"] and chosen.trial == 1


def test_pruning_stops_hopeless_candidate(setup):
    model, names, problem, train, val = setup
    cands = _cands(names, [(8, 8), (2, 8)])  # 2-bit on every layer: hopeless after a few steps
    _, records = rescore_with_finetune(problem, cands, model, train, val, top_k=2, steps=8, eval_every=2, seed=0,
                                       lr=1e-3)
    assert not records[0]["pruned"] and records[0]["steps"] == 8
    assert records[1]["pruned"] and records[1]["steps"] < 8 and not records[1]["chosen"]


def test_deterministic_with_fixed_seed(setup):
    model, names, problem, train, val = setup
    cands = _cands(names, [(4, 8), (2, 8)])
    runs = [rescore_with_finetune(problem, cands, model, train, val, top_k=2, steps=3, seed=1,
                                  pruner=optuna.pruners.NopPruner())[1] for _ in range(2)]
    assert [r["loss"] for r in runs[0]] == [r["loss"] for r in runs[1]]


def test_finetune_lowers_train_loss(setup):
    model, names, _, train, val = setup
    net = CandidateBuilder(model).build({n: (2, 8) for n in names})
    before = eval_loss(net, val)
    assert len(finetune(net, train, FinetuneSettings(steps=10, lr=3e-3)).train_losses) == 10
    assert eval_loss(net, val) < before
    assert hamming([1, 2, 3], [1, 0, 3]) == 1


def _proxy_losses(model, names, assignment, built, train, val, optimizer: str) -> tuple[float, ...]:
    """The proxy's train losses from a bank whose store holds ``built``'s very Q and factors."""
    bank = WeightBank(ModelWeights(model, names), (2, 4, 8), max_rank=8, svd="exact", store=MemoryStore())
    for n, layer in built.layers.items():
        if layer.lora is None:
            continue
        lora_a, lora_b = layer.lora  # PEFT's: A / (alpha / r) with alpha = r, so LoftQ's A itself
        qt = layer.stored
        bank.store.put(n, entry_key(qt.spec), BankEntry(qt, dequantize(qt, torch.float32), lora_b, lora_a, "exact"))
    torch.manual_seed(0)
    net = CandidateBuilder(model, max_rank=8, bank=bank).build(assignment)
    evals: list[int] = []
    result = finetune(net, train, FinetuneSettings(steps=4, lr=1e-2, seed=3, eval_every=2, optimizer=optimizer), val,
                      on_eval=lambda step, loss: evals.append(step) and False)
    assert evals == [2, 4]  # held-out evaluations in between do not disturb training
    return result.train_losses


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_proxy_trains_as_the_finetune_does(setup, optimizer, monkeypatch):
    """Same seed, data and adapter factors: the proxy's first-step losses equal the user's fine-tune's.

    The fine-tune trains build_loftq_model's model (what materialize writes and ``load`` reads back,
    exact LoftQ factors) with train_lora and the run's optimizer, as ``python -m planner finetune``
    does. The proxy initialises from its bank (randomized SVD in a search): here the bank's store
    holds the very Q and factors LoftQ gave the fine-tune. Tolerance: 1e-6 relative per step. The
    same fp32 operations run in the same order, so the losses agree to the last bit (measured: 0);
    the slack only covers a BLAS that changes its reduction order between calls. The old proxy's
    AdamW weight decay of 0.01 moves these losses by 1.4e-5 (measured), so this test catches it.
    """
    model, names, _, train, val = setup
    assignment = {n: OPTIONS[i % len(OPTIONS)] for i, n in enumerate(names)}
    built = build_loftq_model(model, {n: LayerSpec(b, r) for n, (b, r) in assignment.items()},
                              compute_dtype=torch.float32, show_progress=False)
    ft = train_lora(built.model, train, steps=4, lr=1e-2, seed=3, optimizer=optimizer, show_progress=False)
    # (built.layers hold LoftQ's outputs, copied into the model: training leaves them)
    proxy = _proxy_losses(model, names, assignment, built, train, val, optimizer)
    assert len(proxy) == len(ft.train_losses) == 4 and proxy[1] != proxy[0]  # the steps did train
    gap = max(abs(p - f) / abs(f) for p, f in zip(proxy, ft.train_losses))
    assert gap <= 1e-6, (proxy, ft.train_losses)
    if optimizer == "adamw":  # the old proxy (AdamW, weight decay 0.01) would fail the tolerance
        import planner.train.loop as loop

        monkeypatch.setattr(loop, "make_optimizer", lambda params, name, lr: torch.optim.AdamW(params, lr=lr))
        old = _proxy_losses(model, names, assignment, built, train, val, optimizer)
        assert max(abs(p - f) / abs(f) for p, f in zip(old, ft.train_losses)) > 1e-6

"""Block-streamed scoring equals whole-model scoring, and its memory does not grow with depth."""
from __future__ import annotations

import copy

import pytest
import torch

from planner.verify.oracle import LiveBytes
from planner.scoring.bank import DiskStore, MemoryStore, ModelWeights, WeightBank
from planner.scoring.proxy import StreamedZeroStepProxy, ZeroStepProxy
from planner.scoring.scorer import Scorer, SourceWeights, shell_model
from planner.scoring.sensitivity import (empirical_fisher, fisher_total, module_weight, streamed_fisher_rows,
                                         target_modules)
from search_spaces.widths import quantize_width
from planner.scoring.stream import BlockStream, StreamUnsupported
from planner.sources import resolve
from tests.tiny_models import save_tiny_checkpoint, tiny_config


def streamed_fisher_errors(stream, ids: torch.Tensor, bits, **kw) -> torch.Tensor:
    """The streamed Fisher-weighted errors [n_layers, len(bits)] (the mean of the per-sequence rows)."""
    return fisher_total(streamed_fisher_rows(stream, ids, bits, **kw))


def fisher_errors(weights: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor], bits) -> torch.Tensor:
    """The reference: 1/2 sum F (W - deq q_b(W))^2 per layer and width, F the whole-model Fisher."""
    return torch.tensor([[0.5 * float((fisher[n] * (w.float() - quantize_width(w, b).dequantize(torch.float32)) ** 2).sum())
                          for b in bits] for n, w in weights.items()], dtype=torch.float64)


def _ids(vocab: int, n: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def smollm():
    src = resolve("smollm2-135m")
    return src, src.load_model(torch.float32)


def test_stream_loss_equals_full_model(smollm):
    src, model = smollm
    st = BlockStream(src, [t.name for t in src.targets()])
    ids = _ids(49152, 2, 24)
    inp = st.capture(ids)
    h = inp.hidden
    with torch.no_grad():
        for i in range(len(st)):
            with st.block(i) as blk:
                h = st.run(blk, h, inp)
        loss = st.head(h, lambda m: m(input_ids=ids, labels=ids).loss)
        ref = model(input_ids=ids, labels=ids).loss
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    assert all(p.is_meta for p in st.blocks.parameters())  # every block went back to meta


def test_streamed_fisher_equals_full_fisher_on_smollm2(smollm, tmp_path):
    src, model = smollm
    targets = [t.name for t in src.targets()]
    some = targets[:7] + targets[-7:]  # the first and the last block: the backward reaches both ends
    ids = _ids(49152, 2, 24, seed=1)
    got = streamed_fisher_errors(BlockStream(src, some), ids, (2, 4), folder=tmp_path)
    fisher = empirical_fisher(model, some, ids, causal=True)
    mods = target_modules(model, some)
    want = fisher_errors({n: module_weight(mods[n]).detach() for n in some}, fisher, (2, 4))
    assert (want > 0).all()
    assert torch.allclose(got, want, rtol=1e-2, atol=0)  # the bound; measured: bit-identical
    assert list(tmp_path.iterdir()) == []  # the boundary file is unlinked


def test_streamed_proxy_equals_full_proxy_on_smollm2(smollm):
    src, model = smollm
    names = [t.name for t in src.targets()]
    bank = WeightBank(ModelWeights(model, names), (2, 4), 8)
    ids = _ids(49152, 2, 24, seed=2)
    assignment = {n: ((2, 8) if i % 3 == 0 else (4, 0)) for i, n in enumerate(names)}
    full = ZeroStepProxy(model, bank, ids, causal=True).score(assignment)
    streamed = StreamedZeroStepProxy(BlockStream(src, names), bank, ids, causal=True).score(assignment)
    assert full.kl > 1e-3
    for a, b in ((streamed.kl, full.kl), (streamed.loss, full.loss), (streamed.ref_loss, full.ref_loss)):
        assert a == pytest.approx(b, rel=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "bert", "phi", "qwen2"])
def test_stream_matches_full_model_on_other_architectures(arch, tmp_path):
    folder = save_tiny_checkpoint(arch, tmp_path / arch)
    src = resolve(str(folder))
    model = src.load_model(torch.float32)
    names = [t.name for t in src.targets()]
    causal = src.facts.is_decoder
    ids = _ids(320, 3, 16)
    st = BlockStream(src, names)
    got = streamed_fisher_errors(st, ids, (2, 4), causal=causal)
    fisher = empirical_fisher(model, names, ids, causal=causal)
    mods = target_modules(model, names)
    want = fisher_errors({n: module_weight(mods[n]).detach() for n in names}, fisher, (2, 4))
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-12)
    bank = WeightBank(ModelWeights(model, names), (2,), 4)
    assignment = {n: (2, 4) for n in names}
    a = ZeroStepProxy(model, bank, ids, causal=causal).score(assignment)
    b = StreamedZeroStepProxy(st, bank, ids, causal=causal).score(assignment)
    assert a.kl > 0 and b.kl == pytest.approx(a.kl, rel=1e-4)


def test_encoder_decoder_is_refused_and_scored_whole(tmp_path):
    src = resolve(str(save_tiny_checkpoint("t5", tmp_path / "t5")))
    with pytest.raises(StreamUnsupported):
        BlockStream(src, [t.name for t in src.targets()])
    scorer = Scorer(src, src.targets(), causal=src.facts.is_decoder)
    assert not scorer.streamed and scorer.model is not None


def test_disk_store_round_trip_and_corruption(smollm, tmp_path):
    src, model = smollm
    names = [t.name for t in src.targets()][:3]
    mem = WeightBank(ModelWeights(model, names), (2, 4), 8, store=MemoryStore())
    disk = WeightBank(SourceWeights(src, src.targets()[:3]), (2, 4), 8, store=DiskStore(tmp_path, "k1"))
    disk.fill()
    again = WeightBank(SourceWeights(src, src.targets()[:3]), (2, 4), 8, store=DiskStore(tmp_path, "k1"))
    for n in names:
        for b in (2, 4):
            e = again.store.get(n, f"nf{b}")  # entries by spec name
            assert e is not None and e.deq is None  # read back, not recomputed
            assert e.b is None and e.a is None  # fill quantizes; factors wait for a rank above 0
            assert torch.equal(e.quantized.packed, mem.quantized(n, b).packed)
            assert torch.equal(again.weight(n, b, 0), mem.weight(n, b, 0))
            assert again.store.get(n, f"nf{b}").b is None  # rank 0 needs no SVD
            assert torch.equal(again.weight(n, b, 8), mem.weight(n, b, 8))
            stored = DiskStore(tmp_path, "k1").get(n, f"nf{b}")  # the factors, computed once, are in the file now
            assert stored.rank == 8 and torch.equal(stored.b, mem.factors(n, b, 8).b)
    path = tmp_path / f"{names[0]}.nf2.safetensors"
    path.write_bytes(path.read_bytes()[:100])  # truncated: recomputed, with a warning
    assert DiskStore(tmp_path, "k1").get(names[0], "nf2") is None
    assert DiskStore(tmp_path, "other-key").get(names[1], "nf2") is None


def test_candidates_built_on_the_shell_equal_those_on_the_full_model(smollm):
    from planner.scoring.ftproxy import CandidateBuilder

    src, model = smollm
    names = [t.name for t in src.targets()]
    bank = WeightBank(ModelWeights(model, names), (2, 4), 8)
    assignment = {n: ((4, 8) if i % 2 else (16, 8)) for i, n in enumerate(names)}
    shell = shell_model(src, names)
    assert all(p.is_meta for n, p in shell.named_parameters() if n.endswith(".weight") and n[:-7] in names)
    a = CandidateBuilder(model, max_rank=8, bank=bank).build(assignment)
    b = CandidateBuilder(shell, max_rank=8, bank=bank).build(assignment)
    ids = _ids(49152, 1, 16)
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def _tiny_llama(tmp_path, depth: int):
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(tiny_config("llama"))
    cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size = depth, 128, 320
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    folder = tmp_path / f"d{depth}"
    model.save_pretrained(folder, max_shard_size="200KB")
    return resolve(str(folder))


def test_streamed_scoring_memory_does_not_grow_with_depth(tmp_path):
    """Live tensor bytes (TorchDispatchMode) of the sensitivity and a proxy trial at depth 2 vs 8:
    what grows is bounded by a small multiple of one block's fp32 size, not the depth's."""
    peaks = {}
    for depth in (2, 8):
        src = _tiny_llama(tmp_path, depth)
        names = [t.name for t in src.targets()]
        ids = _ids(320, 4, 32)
        st = BlockStream(src, names)
        bank = WeightBank(SourceWeights(src, src.targets()), (2, 4), 8, store=DiskStore(tmp_path / f"bank{depth}", "k"))
        bank.fill()
        with LiveBytes() as live:
            streamed_fisher_errors(st, ids, (2, 4), folder=tmp_path / "scratch")
            proxy = StreamedZeroStepProxy(st, bank, ids[:2], causal=True)
            proxy.score({n: (2, 8) for n in names})
        peaks[depth] = live.peak
    block_fp32 = 4 * (4 * 128 * 128 + 3 * 128 * 320)
    per_block = (peaks[8] - peaks[2]) / 6
    assert per_block < 0.25 * block_fp32, (peaks, block_fp32)

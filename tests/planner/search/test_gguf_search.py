"""The search choosing llama.cpp's GGUF types (``--quant gguf``): per-layer types (K-quants only on
rows a multiple of 256, llama.cpp's fallbacks elsewhere), exact bytes, residual tables and bank
entries computed with the GGUF quantizers, and a plan that materializes to exactly those bytes."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from loftq import GGUFTensor, dequantize, gguf_nbytes, gguf_quantize
from planner import progress
from planner.artifact.layout import read_artifact
from planner.cli.app import main
from planner.search.config import PlanConfig
from planner.scoring.bank import DiskStore, WeightBank
from planner.scoring.tables import TableSettings, compute_tables
from planner.search.prepare import extremes, prepare
from planner.search.flow import make_plan
from planner.settings import LayerChoice, RunSettings
from planner.sources import resolve
from search_spaces.choices import SearchSpace, menu
from loftq.formats.gguf import GgufWidth, stored_type as gguf_type_for
from search_spaces.widths import Width
from tests.tiny_models import save_tiny_llama_with_real_tokenizer

RUN = RunSettings(mode="inference", seq_len=128, batch_size=1, device="cpu")
ALL = (2, 3, 4, 6, 8)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    progress.set_enabled(False)
    yield
    progress.set_enabled(True)


def test_the_gguf_menu_and_its_per_layer_types() -> None:
    widths = menu(ALL + (16,), quant="gguf")
    assert [str(w) for w in widths] == ["q2_k", "q3_k", "q4_0", "iq4_nl", "q4_k", "iq4_xs", "q6_k", "q8_0", "16"]
    assert sorted(widths) == list(widths) and widths[-1] == 16
    assert sorted([GgufWidth("q4_k"), 4, Width(4), 8, 2]) == [2, 4, Width(4), GgufWidth("q4_k"), 8]
    # SmolLM2: down_proj rows (1536 = 6 x 256) take every K-quant; 576-wide rows fall back as the vendored
    # llama.cpp's quantizer does (q2_k/q3_k -> q4_0, q4_k -> q5_0, iq4_xs -> iq4_nl, q6_k -> q8_0)
    assert [gguf_type_for(str(w), (576, 1536)) for w in widths[:-1]] == [str(w) for w in widths[:-1]]
    assert [gguf_type_for(str(w), (1536, 576)) for w in widths[:-1]] == \
        ["q4_0", "q4_0", "q4_0", "iq4_nl", "q5_0", "iq4_nl", "q8_0", "q8_0"]
    with pytest.raises(ValueError, match="multiple of 32"):
        gguf_type_for("q4_k", (64, 48))
    with pytest.raises(ValueError, match="double quantization"):
        menu((4,), "search", "gguf")
    with pytest.raises(ValueError, match="subset"):
        SearchSpace(bits=(6,))  # 6 bits is only a GGUF width
    assert SearchSpace(bits=(4, 6), quant="gguf").widths == (GgufWidth("q4_0"), GgufWidth("iq4_nl"),
                                                             GgufWidth("q4_k"), GgufWidth("iq4_xs"), GgufWidth("q6_k"))
    with pytest.raises(ValueError, match="--quant gguf"):
        PlanConfig(bits=(2, 6))


@pytest.fixture(scope="module")
def smol_layers() -> dict:
    """Block 0's q_proj (576-wide rows) and down_proj (1536-wide) of the packaged SmolLM2."""
    src = resolve("smollm2-135m")
    targets = [t for t in src.targets() if t.name.startswith("model.layers.0.")
               and t.name.rsplit(".", 1)[-1] in ("q_proj", "down_proj")]
    return {t.name: (t, w.float()) for t, w in src.iter_weights(targets)}


def test_prepare_costs_the_type_each_layer_stores() -> None:
    cfg = PlanConfig(quant="gguf", bits=ALL, ranks=(0, 8), quick=True)
    prep = prepare(cfg, RUN)
    assert [str(w) for w, r in prep.options[::2]] == ["q2_k", "q3_k", "q4_0", "iq4_nl", "q4_k", "iq4_xs", "q6_k",
                                                      "q8_0"]
    for i, t in enumerate(prep.targets):
        for k, (w, r) in enumerate(prep.options):
            choice = prep.choice_of((w, r), t)
            want = gguf_type_for(str(w), tuple(t.shape))
            assert choice.quant == want and choice.rank == r
            if r == 0:
                assert int(prep.costs[i, k]) == gguf_nbytes(tuple(t.shape), want)
    downs = [i for i, t in enumerate(prep.targets) if t.name.endswith("down_proj")]
    assert len(downs) == 30  # the only layers whose rows hold a K-quant
    k2 = prep.options.index((GgufWidth("q2_k"), 0))
    assert all(int(prep.costs[i, k2]) == 576 * 1536 // 256 * 84 for i in downs)
    assert int(prep.costs[0, k2]) == gguf_nbytes((576, 576), "q4_0")


def test_tables_and_bank_quantize_with_the_gguf_types(smol_layers: dict, tmp_path: Path) -> None:
    widths = tuple(w for w in menu(ALL, quant="gguf"))
    settings = TableSettings(bits=widths, ranks=(0, 8))
    stream = [(t, w) for t, w in smol_layers.values()]
    tables = compute_tables(iter(stream), len(stream), settings, torch.device("cpu"))
    for name, (t, w) in smol_layers.items():
        for j, width in enumerate(widths):
            qtype = gguf_type_for(str(width), tuple(t.shape))
            deq = gguf_quantize(w, qtype).dequantize(torch.float32)
            rel = float((w - deq).double().norm() / w.double().norm())
            assert float(tables.table[tables.names.index(name), j, 0]) == pytest.approx(rel, rel=1e-5), (name, width)
            assert tables.table[tables.names.index(name), j, 1] < tables.table[tables.names.index(name), j, 0]
    q_row = tables.of("model.layers.0.self_attn.q_proj")  # widths that store one type there share its row
    assert torch.equal(q_row[widths.index(GgufWidth("iq4_xs"))], q_row[widths.index(GgufWidth("iq4_nl"))])
    assert torch.equal(q_row[widths.index(GgufWidth("q2_k"))], q_row[widths.index(GgufWidth("q4_0"))])
    down = tables.of("model.layers.0.mlp.down_proj")[:, 0]
    # q2_k > q3_k > q4_0 > q8_0 (q4_k nearly reproduces the packaged file's Q4_1 values: README)
    assert down[0] > down[1] > down[2] > down[7] and down[7] == down.min()

    weights = {name: w for name, (_, w) in smol_layers.items()}
    store = DiskStore(tmp_path / "bank", "k")
    bank = WeightBank(weights, widths, 8, store=store)
    bank.fill()
    q = "model.layers.0.self_attn.q_proj"
    assert bank.quantized(q, GgufWidth("q4_k")).qtype == "q5_0"  # the fallback, stored once
    assert len(list((tmp_path / "bank").glob(f"{q}.*"))) == 4  # q4_0, iq4_nl, q5_0, q8_0
    d = "model.layers.0.mlp.down_proj"
    qt = bank.quantized(d, GgufWidth("q3_k"))
    assert isinstance(qt, GGUFTensor) and qt.nbytes == gguf_nbytes((576, 1536), "q3_k")
    assert torch.equal(qt.data, gguf_quantize(weights[d], "q3_k").data)
    again = WeightBank(weights, widths, 8, store=DiskStore(tmp_path / "bank", "k"))
    assert torch.equal(dequantize(again.quantized(d, GgufWidth("q3_k")), torch.float32),
                       qt.dequantize(torch.float32))
    b, a = again.factors(d, GgufWidth("q3_k"), 8)
    res0 = (weights[d] - qt.dequantize(torch.float32)).norm()
    assert (weights[d] - qt.dequantize(torch.float32) - b @ a).norm() < res0


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama_with_real_tokenizer(tmp_path_factory.mktemp("tiny-llama"))


def test_a_gguf_plan_is_within_budget_and_materializes_to_its_bytes(tiny_dir: Path, tmp_path: Path) -> None:
    cfg = PlanConfig(model=str(tiny_dir), quant="gguf", bits=(4, 8), ranks=(0, 4), calib_seqs=2, proxy_seqs=1, quick=True,
                     calib_seq_len=64, trials=3, cache_dir=str(tmp_path / "cache"))
    prep = prepare(cfg, RUN)
    lo, hi = extremes(prep)
    budget = (prep.estimate(lo).total_bytes + prep.estimate(hi).total_bytes) // 2
    outcome = make_plan(cfg, RUN, budget)
    plan = outcome.plan
    assert plan.estimate.total_bytes <= budget and outcome.budget_binds
    quants = {layer.quant for layer in plan.layers}
    # 64/160-wide rows: no K-quant (q4_k falls back to q5_0, iq4_xs to iq4_nl)
    assert quants <= {"q4_0", "iq4_nl", "q5_0", "q8_0"} and len(quants) >= 2, quants
    for layer in plan.layers:
        assert layer.bytes >= gguf_nbytes(layer.shape, layer.quant)
        assert LayerChoice(layer.bits, 0, layer.quant, layer.block_size).quant == layer.quant
    path = tmp_path / "plan.json"
    from planner.artifact.plan import save_plan

    save_plan(plan, path)
    assert main(["materialize", str(path), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    stored = {m.name: m for m in read_artifact(tmp_path / "out").meta.layers}
    for layer in plan.layers:
        assert stored[layer.name].nbytes == gguf_nbytes(layer.shape, layer.quant), layer.name
    # the same space planned with nf: another family, another study and another plan file format
    nf = make_plan(dataclasses.replace(cfg, quant="nf", bits=(2, 4, 8)), RUN, budget).plan
    assert not any(layer.quant in quants for layer in nf.layers)

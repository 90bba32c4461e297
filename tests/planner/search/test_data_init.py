"""--init loftq-data end to end on a tiny local llama (real tokenizer): the moments pass before the
tables, the plan records the init, materialize builds with each layer's input moment, and plain
LoftQ stays exactly what it was."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import planner
from loftq import loftq
from planner.artifact.layout import read_artifact, read_layer
from planner.artifact.plan import load_plan, save_plan
from planner.cli.app import main
from planner.search.config import PlanConfig
from planner.errors import PlannerError
from planner.scoring.moments import plan_moments
from planner.scoring.bank import entry_key
from planner.search.prepare import extremes, prepare
from planner.search.flow import make_plan
from planner.settings import RunSettings
from planner.sources import resolve
from search_spaces.choices import menu
from search_spaces.widths import resolve as resolve_width
from tests.tiny_models import save_tiny_llama_with_real_tokenizer

RUN = RunSettings(seq_len=128, batch_size=1, device="cpu")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama_with_real_tokenizer(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def planned(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The same budget planned with plain and with data-aware LoftQ (exact search, one cache)."""
    root = tmp_path_factory.mktemp("plans")
    cfg = PlanConfig(model=str(tiny_dir), ranks=(0, 4, 8), bits=(2, 4, 8), calib_seqs=2, proxy_seqs=1, quick=True,
                     calib_seq_len=64, search="exact", cache_dir=str(root / "cache"))
    prep = prepare(cfg, RUN)
    lo, hi = extremes(prep)
    budget = (prep.estimate(lo).total_bytes + prep.estimate(hi).total_bytes) // 2
    plain = make_plan(cfg, RUN, budget).plan
    data = make_plan(dataclasses.replace(cfg, init="loftq-data"), RUN, budget).plan
    return cfg, root, plain, data


def test_the_plan_records_its_init_and_its_residuals_are_in_that_norm(planned) -> None:
    cfg, root, plain, data = planned
    assert plain.init.method == "loftq" and plain.document_version == 4
    init = data.init
    assert (init.method, init.seqs, init.seq_len, init.damp, init.data) == ("loftq-data", 2, 64, 0.01, None)
    assert init.corpus and data.to_dict()["schema_version"] == 5 and data.to_dict()["init"]["corpus"] == init.corpus
    assert "moments_s" in data.search.timings and "moments_s" not in plain.search.timings
    assert len(list((root / "cache" / "moments").glob("*/block-*.safetensors"))) == 3  # one file per block
    # the residuals differ (another norm), and the same choice costs the same bytes
    src = resolve(str(cfg.model))
    store, corpus = plan_moments(src, [l.name for l in data.layers], init, cache_dir=root / "cache")
    assert corpus == init.corpus
    weights = dict(src.iter_weights(src.targets()))
    for layer in data.layers:
        if layer.bits == 16:
            continue
        w = next(v for t, v in weights.items() if t.name == layer.name)
        res = loftq(w, layer.bits, layer.rank, calibration=store[layer.name], damp=0.01, svd="exact")
        assert layer.residual == pytest.approx(res.weighted_errors[0], rel=0.02, abs=1e-6), layer.name
    assert [l.bytes for l in data.layers if (l.bits, l.rank) == (plain.layer(l.name).bits, plain.layer(l.name).rank)] \
        == [plain.layer(l.name).bytes for l in data.layers
            if (l.bits, l.rank) == (plain.layer(l.name).bits, plain.layer(l.name).rank)]


def _layers(out: Path) -> dict[str, tuple]:
    art = read_artifact(out)
    from safetensors.torch import load_file

    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    got = {}
    for meta in art.meta.layers:
        q = read_layer(art.backbone, meta)
        a = next((v for k, v in adapter.items() if meta.name in k and "lora_A" in k), None)
        b = next((v for k, v in adapter.items() if meta.name in k and "lora_B" in k), None)
        got[meta.name] = (q, a, b)
    return got


def test_materialize_honours_the_init(planned, tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    cfg, root, plain, data = planned
    monkeypatch.setenv("LOFTQ_PLANNER_CACHE", str(root / "cache"))
    save_plan(data, tmp_path / "data.json")
    save_plan(plain, tmp_path / "plain.json")
    built = planner.materialize(tmp_path / "data.json", tmp_path / "data")
    assert built.plan.init == data.init and load_plan(tmp_path / "data" / "plan.json").init == data.init
    assert built.plan.created_with["materialize"]["backbone_bytes"] == data.estimate.breakdown["backbone"]
    src = resolve(str(tiny_dir))
    store, _ = plan_moments(src, [l.name for l in data.layers], data.init, cache_dir=root / "cache")
    weights = {t.name: w for t, w in src.iter_weights(src.targets())}
    got = _layers(tmp_path / "data")
    checked = 0
    for layer in data.layers:
        if layer.bits == 16 or not layer.rank:
            continue
        want = loftq(weights[layer.name], layer.bits, layer.rank, method=layer.method, block_size=layer.block_size,
                     double_quant=layer.double_quant, calibration=store[layer.name], damp=0.01, svd="randomized")
        q, a, b = got[layer.name]
        assert torch.equal(a.float(), want.lora_a) and torch.equal(b.float(), want.lora_b), layer.name
        assert built.plan.layer(layer.name).residual == round(want.weighted_errors[0], 6)
        checked += 1
    assert checked >= 3
    # --init loftq on the same plan: plain LoftQ, exactly loftq() without calibration (as before this change)
    again = planner.materialize(tmp_path / "data.json", tmp_path / "as-plain", planner.MaterializeConfig(init="loftq"))
    assert again.plan.init.method == "loftq" and json.loads((tmp_path / "as-plain" / "plan.json").read_text())[
        "schema_version"] == 4
    got = _layers(tmp_path / "as-plain")
    for layer in data.layers:
        if layer.bits == 16 or not layer.rank:
            continue
        want = loftq(weights[layer.name], layer.bits, layer.rank, method=layer.method, block_size=layer.block_size,
                     double_quant=layer.double_quant)
        assert torch.equal(got[layer.name][1].float(), want.lora_a)


def test_materialize_recomputes_missing_moments_and_refuses_other_text(planned, tmp_path: Path, monkeypatch,
                                                                      capsys) -> None:
    cfg, root, plain, data = planned
    monkeypatch.setenv("LOFTQ_PLANNER_CACHE", str(tmp_path / "empty-cache"))
    save_plan(data, tmp_path / "data.json")
    built = planner.materialize(tmp_path / "data.json", tmp_path / "out")  # moments recomputed, same numbers
    assert [l.residual for l in built.plan.layers if l.bits < 16] == \
        [l.residual for l in planner.materialize(tmp_path / "data.json", tmp_path / "cached").plan.layers if l.bits < 16]
    assert list((tmp_path / "empty-cache" / "moments").iterdir())
    other = dataclasses.replace(data, init=dataclasses.replace(data.init, corpus="0" * 16))
    save_plan(other, tmp_path / "other.json")
    with pytest.raises(PlannerError, match="is not the one the plan was made with"):
        planner.materialize(tmp_path / "other.json", tmp_path / "out2")
    capsys.readouterr()
    assert main(["materialize", str(tmp_path / "other.json"), "--out", str(tmp_path / "out3")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not the one the plan was made with" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out3").exists()


def test_the_search_scores_the_data_aware_candidates(planned, tiny_dir: Path) -> None:
    """With moments the weight bank's deq(Q) + B_r A_r is the data-aware LoftQ of every rank (what
    materialize builds), and a guided plan with the fine-tune proxy runs on it."""
    from planner.scoring.bank import WeightBank

    cfg, root, plain, data = planned
    src = resolve(str(tiny_dir))
    store, _ = plan_moments(src, [l.name for l in data.layers], data.init, cache_dir=root / "cache")
    weights = {t.name: w for t, w in src.iter_weights(src.targets())}
    name = "model.layers.1.mlp.down_proj"
    bank = WeightBank({name: weights[name]}, (2, 4), 8, svd="exact", moments=store)
    for bits in (2, 4):
        for rank in (4, 8):
            want = loftq(weights[name], bits, rank, calibration=store[name])
            from loftq import dequantize

            dense = dequantize(want.quantized, torch.float32) + want.lora_b @ want.lora_a
            assert torch.allclose(bank.weight(name, bits, rank), dense, atol=1e-5), (bits, rank)
    assert bank.entry(name, 2).svd == "exact/data"
    prep = prepare(cfg, RUN)
    lo, hi = extremes(prep)
    guided = dataclasses.replace(cfg, init="loftq-data", search="guided", trials=2, proxy_top=1, proxy_steps=2)
    out = make_plan(guided, RUN, (prep.estimate(lo).total_bytes + prep.estimate(hi).total_bytes) // 2)
    assert out.plan.init == data.init and out.plan.search.trials == 2


def test_materialize_rounding_feedback_builds_loftq_feedback_and_lowers_the_output_error(
        planned, tiny_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """--rounding feedback: every quantized layer whose input width is a multiple of the block is
    exactly loftq(..., rounding="feedback") under its moment (same bytes as nearest) with a lower
    weighted residual; the others round to nearest; a plain plan without --init loftq-data is refused
    with one line and exit 2."""
    cfg, root, plain, data = planned
    monkeypatch.setenv("LOFTQ_PLANNER_CACHE", str(root / "cache"))
    save_plan(data, tmp_path / "data.json")
    save_plan(plain, tmp_path / "plain.json")
    near = planner.materialize(tmp_path / "data.json", tmp_path / "near")
    fb = planner.materialize(tmp_path / "data.json", tmp_path / "fb", planner.MaterializeConfig(rounding="feedback"))
    src = resolve(str(tiny_dir))
    store, _ = plan_moments(src, [l.name for l in data.layers], data.init, cache_dir=root / "cache")
    weights = {t.name: w for t, w in src.iter_weights(src.targets())}
    got, got_near = _layers(tmp_path / "fb"), _layers(tmp_path / "near")
    checked = 0
    for layer in data.layers:
        if layer.bits == 16:
            continue
        q, a, b = got[layer.name]
        if layer.shape[1] % layer.block_size:
            assert torch.equal(q.packed, got_near[layer.name][0].packed), layer.name
            continue
        want = loftq(weights[layer.name], layer.bits, layer.rank, method=layer.method, block_size=layer.block_size,
                     double_quant=layer.double_quant, calibration=store[layer.name], damp=0.01, svd="randomized",
                     rounding="feedback")
        assert torch.equal(q.packed, want.quantized.packed), layer.name  # the feedback codes, as stored
        assert not torch.equal(q.packed, got_near[layer.name][0].packed), layer.name  # and not nearest's
        if layer.rank:
            assert torch.equal(a.float(), want.lora_a) and torch.equal(b.float(), want.lora_b), layer.name
        assert fb.plan.layer(layer.name).residual == round(want.weighted_errors[0], 6)
        assert fb.plan.layer(layer.name).residual < near.plan.layer(layer.name).residual, layer.name
        assert fb.plan.layer(layer.name).bytes == near.plan.layer(layer.name).bytes
        checked += 1
    assert checked >= 3
    capsys.readouterr()
    assert main(["materialize", str(tmp_path / "plain.json"), "--out", str(tmp_path / "x"), "--rounding", "feedback"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--init loftq-data" in err[0]
    assert not (tmp_path / "x").exists()


def test_plan_rounding_feedback_is_recorded_and_materialize_follows_it(planned, tmp_path: Path, monkeypatch) -> None:
    """--rounding feedback on the plan command: the search's candidates use it, the plan records it
    (schema v6, init.rounding) and materialize builds it without being told; --rounding nearest
    overrides, and the folder's plan says what was built."""
    cfg, root, plain, data = planned
    monkeypatch.setenv("LOFTQ_PLANNER_CACHE", str(root / "cache"))
    with pytest.raises(ValueError, match="--init loftq-data"):
        dataclasses.replace(cfg, rounding="feedback")
    fcfg = dataclasses.replace(cfg, init="loftq-data", rounding="feedback")
    budget = data.budget_bytes
    outcome = make_plan(fcfg, RUN, budget)
    plan = outcome.plan
    # the exact search's costs are feedback Q's: residuals no higher than round-to-nearest's in the
    # norm both minimise (lower on average), and Fisher errors of other codes
    nearest = make_plan(dataclasses.replace(cfg, init="loftq-data"), RUN, budget).problem.table
    fb = outcome.problem.table
    quantized = torch.tensor([b < 16 for b, _ in fb.options])
    assert fb.options == nearest.options
    assert (fb.frob[:, quantized] <= nearest.frob[:, quantized] * (1 + 1e-4)).all()
    assert float(fb.frob[:, quantized].sum()) < 0.95 * float(nearest.frob[:, quantized].sum())
    assert not torch.allclose(fb.est[:, quantized], nearest.est[:, quantized])
    assert plan.init.rounding == "feedback" and plan.to_dict()["schema_version"] == 6
    assert plan.to_dict()["init"]["rounding"] == "feedback" and plan.estimate.total_bytes <= budget
    save_plan(plan, tmp_path / "fb.json")
    assert load_plan(tmp_path / "fb.json") == plan
    built = planner.materialize(tmp_path / "fb.json", tmp_path / "fb")
    told = planner.materialize(tmp_path / "fb.json", tmp_path / "told", planner.MaterializeConfig(rounding="feedback"))
    near = planner.materialize(tmp_path / "fb.json", tmp_path / "near", planner.MaterializeConfig(rounding="nearest"))
    assert built.plan.init.rounding == "feedback" and near.plan.init.rounding is None
    a, b, n = _layers(tmp_path / "fb"), _layers(tmp_path / "told"), _layers(tmp_path / "near")
    differ = 0
    for layer in plan.layers:
        if layer.bits == 16:
            continue
        assert torch.equal(a[layer.name][0].packed, b[layer.name][0].packed), layer.name
        differ += not torch.equal(a[layer.name][0].packed, n[layer.name][0].packed)
    assert differ >= 3


def test_each_layer_and_width_is_quantized_once_per_plan_with_feedback_rounding(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 27: with feedback rounding the weight bank's Q is the one source of the residual tables,
    the Fisher errors and the candidates: every (layer, spec) is encoded exactly once in a plan (a
    guided search with a fine-tune proxy: every stage that reads Q runs), with the default levers
    and --rotation search (double-quantized widths, plain, rotated and row-scaled rotated: a rotated
    spec is encoded on the rotated weight, so its key is that weight's digest)."""
    import hashlib
    from collections import Counter

    import loftq.quant as quant
    import loftq.rounding as rounding

    counts: Counter = Counter()

    def key(weight: torch.Tensor, config) -> tuple[str, str]:
        digest = hashlib.sha1(weight.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
        return digest, f"{config.quant_name}{'dq' if config.double_quant else ''}-b{config.block_size}"

    real_quantize, real_many = quant.quantize, rounding.quantize_feedback_many
    real_residuals = quant.quantization_residuals

    def counting_quantize(weight, bits=None, *, config=None, **kw):
        cfg = config if config is not None else quant.QuantConfig(bits, kw.get("method", "nf"), kw.get("block_size", 64),
                                                                  kw.get("double_quant", False))
        counts[key(weight, cfg)] += 1
        return real_quantize(weight, bits, config=config, **kw)

    def counting_feedback(weight, configs, *args, **kw):  # every feedback encoding runs through it
        for c in configs:
            counts[key(weight, c)] += 1
        return real_many(weight, configs, *args, **kw)

    def counting_residuals(weight, configs, **kw):
        for m in (weight if weight.ndim == 3 else weight[None]):
            for c in configs:
                counts[key(m, c)] += 1
        return real_residuals(weight, configs, **kw)

    monkeypatch.setattr(quant, "quantize", counting_quantize)
    monkeypatch.setattr(rounding, "quantize_feedback_many", counting_feedback)
    monkeypatch.setattr(quant, "quantization_residuals", counting_residuals)
    import loftq.formats.codebook as codebook

    monkeypatch.setattr(codebook, "quantization_residuals", counting_residuals)
    model = save_tiny_llama_with_real_tokenizer(tmp_path / "tiny")
    cfg = PlanConfig(model=str(model), ranks=(0, 4), rotation="search", trials=3, proxy_top=1, proxy_steps=2, calib_seqs=2, proxy_seqs=1,
                     calib_seq_len=64, cache_dir=str(tmp_path / "cache"))
    prep = prepare(cfg, RUN)
    lo, hi = extremes(prep)
    make_plan(cfg, RUN, (prep.estimate(lo).total_bytes + prep.estimate(hi).total_bytes) // 2)
    assert (cfg.double_quant, cfg.init, cfg.rounding) == ("on", "loftq-data", "feedback")
    widths = menu(cfg.bits, cfg.double_quant, cfg.quant, cfg.rotation)
    assert [str(w) for w in widths] == ["2dq", "2rdq-row", "3dq", "3rdq-row", "4dq", "4rdq", "4rdq-row", "8dq"]
    specs = {(t.name, entry_key(resolve_width(w, tuple(t.shape)))) for t in prep.targets for w in widths}
    # every layer rotatable; the 160-long rows of down_proj row-scaled (64-long rows: the rotated 64-block)
    assert {k for _, k in specs} >= {"nf2dq", "nf3-rotdq", "nf3-rotdq-b160", "nf4-rotdq", "nf8dq"}, sorted({k for _, k in specs})
    assert len(counts) == len(specs), (len(counts), len(specs))
    assert set(counts.values()) == {1}, [k for k, v in counts.items() if v > 1][:5]

"""NF3 and double quantization on the search menu: options, byte costs, residual tables and Fisher
errors per width (a double-quantized width is computed, not assumed equal to the plain one), plans
that choose them, and their materialized bytes; on a tiny local llama with a real tokenizer."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from loftq import loftq
from planner.artifact.plan import load_plan
from planner.cli.app import main
from planner.search.config import PlanConfig
from planner.memory import layer_bytes
from planner.search.prepare import extremes, fingerprint, options_of, prepare, study_name_for, table_settings
from planner.search.flow import make_plan
from planner.settings import LayerChoice, RunSettings
from planner.scoring.tables import TableSettings, residual_tables
from search_spaces.widths import Width, width_bits
from tests.tiny_models import save_tiny_llama_with_real_tokenizer

RUN = RunSettings(seq_len=128, batch_size=1, device="cpu")
MENU = (2, Width(2), 3, Width(3), 4, Width(4), 8, Width(8))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama_with_real_tokenizer(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def cfg(tiny_dir: Path, tmp_path: Path) -> PlanConfig:
    return PlanConfig(model=str(tiny_dir), bits=(2, 3, 4, 8), ranks=(0, 4, 8), double_quant="search", quick=True,
                      search="exact", calib_seqs=2, proxy_seqs=1, calib_seq_len=64, trials=2,
                      cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "plan.json"))


def test_plain_menu_is_the_ints_it_was(cfg: PlanConfig) -> None:
    """Without double quantization the options, table settings, study name and fingerprint are
    exactly what they were before widths could be variants (ints, the same keys)."""
    plain = replace(cfg, bits=(2, 4, 8), double_quant="off")
    opts = options_of(plain)
    assert opts == [(b, r) for b in (2, 4, 8) for r in (0, 4, 8)] and all(type(w) is int for w, _ in opts)
    assert table_settings(plain) == TableSettings(bits=(2, 4, 8), ranks=(0, 4, 8), method="nf", block_size=64)
    prep = prepare(plain, RUN)
    assert "double_quant" not in fingerprint(prep, 10**9, "x")["space"]
    assert study_name_for(prep, 10**9) != study_name_for(prepare(replace(plain, double_quant="on"), RUN), 10**9)
    on = options_of(replace(plain, double_quant="on"))
    assert [w for w, r in on if r == 0] == [Width(2), Width(4), Width(8)]


def test_every_width_is_costed_and_scored_as_stored(cfg: PlanConfig) -> None:
    prep = prepare(cfg, RUN)
    assert [w for w, r in prep.options if r == 0] == list(MENU)
    facts = prep.source.facts
    for i, t in enumerate(prep.targets):
        for k, (w, r) in enumerate(prep.options):
            choice = LayerChoice.of(w, r, "nf", 64)
            assert (choice.bits, choice.double_quant) == (width_bits(w), isinstance(w, Width))
            assert int(prep.costs[i, k]) == layer_bytes(t, choice, RUN, facts)
        plain = {w: int(prep.costs[i, k]) for k, (w, r) in enumerate(prep.options) if r == 0}
        assert all(plain[Width(b)] < plain[b] for b in (2, 3, 4, 8))  # 64-weight blocks: 1 B + 8/256 B vs 4 B
    settings = table_settings(cfg)
    assert settings.bits == MENU
    tables = residual_tables(prep.source, prep.targets, settings, cache_dir=Path(cfg.cache_dir))
    weights = dict((t.name, w) for t, w in prep.source.iter_weights(prep.targets[:4]))
    differ = 0
    for name, w in weights.items():
        for b in MENU:
            want = loftq(w, width_bits(b), 0, double_quant=isinstance(b, Width)).error
            assert tables.cell(name, b, 0) == pytest.approx(want, rel=1e-5), (name, b)
        differ += sum(tables.cell(name, Width(b), 0) != tables.cell(name, b, 0) for b in (2, 3, 4, 8))
        assert tables.cell(name, 2, 0) > tables.cell(name, 3, 0) > tables.cell(name, 4, 0)
    assert differ > 0  # the double-quantized rows are their own numbers


def test_fisher_errors_of_double_quantized_widths_are_their_own(cfg: PlanConfig) -> None:
    """The objective's rank-0 estimate of a width is 1/2 sum F (W - Q_w)^2 with Q_w as stored: for 4dq
    the double-quantized absmax, recomputed here from the Fisher of the same calibration blocks."""
    from planner.scoring.sensitivity import fisher_rows, fisher_total
    from planner.scoring.scorer import load_full_model
    from planner.search.stages import calibration
    from planner.train.data import load_corpus

    prep = prepare(cfg, RUN)
    table = make_plan(cfg, RUN, prep.estimate(extremes(prep)[1]).total_bytes).problem.table  # any budget: one table
    model = load_full_model(prep.source, causal=True)  # the whole-model reference; planning streams
    train, _ = calibration(prep, load_corpus())
    names = [t.name for t in prep.targets]
    errs = fisher_total(fisher_rows(model, names, train, [4, Width(4)], causal=True))
    k4, k4dq = prep.options.index((4, 0)), prep.options.index((Width(4), 0))
    torch.testing.assert_close(table.est[:, k4], errs[:, 0], rtol=1e-6, atol=0)
    torch.testing.assert_close(table.est[:, k4dq], errs[:, 1], rtol=1e-6, atol=0)
    assert bool((table.est[:, k4dq] != table.est[:, k4]).any())
    assert (table.est[:, k4dq] / table.est[:, k4]).sub(1).abs().max() < 0.05  # DQ costs little


def test_a_tight_plan_takes_nf3_and_double_quant_and_materializes_its_bytes(cfg: PlanConfig, tmp_path: Path) -> None:
    """Between uniform 3dq and uniform 4 (both rank 0) the exact plan mixes widths; every layer's
    stored bytes after materialize are the plan's, and load gives those bytes back."""
    import planner
    from planner.artifact.layout import read_artifact
    from planner.runtime.layers import backbone_nbytes

    prep = prepare(cfg, RUN)
    at = {w: [prep.options.index((w, 0))] * len(prep.targets) for w in (Width(3), 4)}
    budget = (prep.estimate(at[Width(3)]).total_bytes + prep.estimate(at[4]).total_bytes) // 2
    plan = make_plan(cfg, RUN, budget).plan
    kinds = {(x.bits, x.double_quant) for x in plan.layers}
    assert plan.total_bytes <= budget and {(3, True), (4, True)} <= kinds, kinds
    assert all(x.quant == f"nf{x.bits}" for x in plan.layers)
    built = planner.materialize(_save(plan, tmp_path), tmp_path / "m", planner.MaterializeConfig(device="cpu"))
    meta = read_artifact(built.path).meta
    assert {m.name: (m.bits, m.double_quant, m.nbytes) for m in meta.layers} == \
        {x.name: (x.bits, x.double_quant, x.stored_bytes) for x in plan.layers}
    assert backbone_nbytes(planner.load(built.path, "cpu")) == plan.estimate.breakdown["backbone"] == meta.nbytes
    for x in built.plan.layers:  # materialize reaches the table's residual (rank > 0: randomized eigenvalues)
        assert x.residual == pytest.approx(plan.layer(x.name).residual, abs=2e-6 if x.rank == 0 else 3e-3)


def _save(plan, tmp_path: Path) -> Path:
    from planner.artifact.plan import save_plan

    return save_plan(plan, tmp_path / "plan.json")


def test_cli_bits_3_and_double_quant(cfg: PlanConfig, capsys: pytest.CaptureFixture) -> None:
    args = ["--model", cfg.model, "--cache-dir", cfg.cache_dir, "--out", cfg.out, "--quick", "--ranks", "0,4",
            "--calib-seqs", "2", "--proxy-seqs", "1", "--calib-seq-len", "64", "--seq-len", "128",
            "--device", "cpu", "--search", "exact", "--bits", "2,3", "--budget", "10GB"]
    assert main([*args, "--double-quant", "on", "--json"]) == 0
    plan = load_plan(cfg.out)
    assert {(x.bits, x.double_quant) for x in plan.layers} == {(3, True)}  # the budget does not bind
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["total_bytes"] == plan.total_bytes
    assert main(["show", cfg.out]) == 0
    Path(cfg.out).unlink()
    assert main([*args, "--double-quant", "maybe"]) == 2
    assert main([*args[:-4], "--bits", "2,5", "--budget", "10GB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "maybe" in err[-2] and "bits must be a non-empty subset of 2,3,4,8,16; got 2,5" in err[-1]
    assert not Path(cfg.out).exists()

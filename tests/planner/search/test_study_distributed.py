"""Two plan workers on one study in a real PostgreSQL server; one is SIGKILLed mid-trial."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from planner.artifact.plan import load_plan
from planner.search.config import PlanConfig
from planner.search.stages import fisher_units, table_units
from planner.search.prepare import extremes, prepare
from planner.settings import RunSettings
from tests.pg import postgres_url  # noqa: F401 - the fixture
from tests.planner.search.test_pipeline import tiny_dir  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.slow


def _worker(args: list[str], out: Path, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "LOFTQ_PLANNER_HEARTBEAT": "1,3", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "planner", *args, "--out", str(out), "--cache-dir", str(cache)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _running_trial_of(url: str, names: list[str], pid: int) -> bool:
    prefix = f"{socket.gethostname()}:{pid}:"
    for name in names:
        try:
            study = optuna.load_study(storage=url, study_name=name)
        except KeyError:
            continue
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = t.user_attrs.get("worker", "")
            if owner.startswith(prefix):
                return True
            if name.endswith(":proxy") and not owner:  # a claimed candidate says its worker when done
                return True
    return False


def test_two_workers_split_the_work_and_survive_a_sigkill(tiny_dir: Path, postgres_url: str, tmp_path: Path) -> None:
    url, name = postgres_url, "tiny-shared"
    cfg = PlanConfig(model=str(tiny_dir), ranks=(0, 4, 8), calib_seqs=6, proxy_seqs=2, calib_seq_len=64, quick=True)
    prep = prepare(cfg, RunSettings(seq_len=128, batch_size=1, device="cpu"))
    lo, hi = (prep.estimate(c).total_bytes for c in extremes(prep))
    args = ["--model", str(tiny_dir), "--ranks", "0,4,8", "--quick", "--calib-seqs", "6", "--proxy-seqs", "2",
            "--calib-seq-len", "64", "--seq-len", "128", "--batch-size", "1", "--device", "cpu",
            "--budget", str((lo + hi) // 2), "--trials", "10", "--proxy-top", "3", "--proxy-steps", "6",
            "--storage", url, "--study-name", name]
    a = _worker(args, tmp_path / "a.json", tmp_path / "cache-a")
    b = _worker(args, tmp_path / "b.json", tmp_path / "cache-b")
    killed, deadline = False, time.monotonic() + 240
    while b.poll() is None and time.monotonic() < deadline:  # kill b while it is inside a trial
        if _running_trial_of(url, [name, name + ":proxy"], b.pid):
            os.kill(b.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    b.wait()
    assert killed, f"worker b finished before it could be killed: {b.stderr.read()[-2000:]}"
    assert a.wait(300) == 0, a.stderr.read()[-3000:]

    plan = load_plan(tmp_path / "a.json")
    main = optuna.load_study(storage=url, study_name=name)
    states = [t.state for t in main.get_trials()]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 10  # the study's total
    assert states.count(TrialState.FAIL) <= 1 and TrialState.RUNNING not in states

    # the plan is the best feasible candidate recorded in the study, by the one-worker rule
    proxy = optuna.load_study(storage=url, study_name=name + ":proxy")
    records = [t.user_attrs["result"] for t in proxy.get_trials(states=(TrialState.COMPLETE,)) if "result" in t.user_attrs]
    done = [r for r in records if r["feasible"] and not r["pruned"]]
    best = min(done, key=lambda r: r["loss"])
    chosen = [c for c in plan.search.proxy.candidates if c["chosen"]]
    assert [c["trial"] for c in chosen] == [best["trial"]]
    choice = next(t.user_attrs["choice"] for t in main.get_trials() if t.number == best["trial"])
    assert [(l.bits, l.rank) for l in plan.layers] == [prep.options[k] for k in choice]
    assert plan.total_bytes <= plan.budget_bytes

    # the precomputation was split: every shard computed exactly once, by one of the two workers
    work = optuna.load_study(storage=url, study_name=name + ":work")
    shards = [t for t in work.get_trials(states=(TrialState.COMPLETE,)) if "result" in t.user_attrs]
    keys = [f"{t.user_attrs['kind']}/{t.user_attrs['shard']}" for t in shards]
    want = [f"{s['kind']}/{s['shard']}" for s in table_units(prep) + fisher_units(6)]
    assert sorted(keys) == sorted(want)
    by_worker = {t.user_attrs["worker"].split(":")[1] for t in shards}
    # which worker claims which unit is start-up timing: usually both get some, but on a loaded
    # machine one worker has claimed every unit before the other finished importing (seen once in a
    # full suite on 2 cores); what must hold is that each unit ran once, by one of the two
    assert by_worker and by_worker <= {str(a.pid), str(b.pid)}, by_worker

    # collect writes the same plan from the storage alone
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "planner", "collect", "--storage", url, "--study-name", name,
                          "--out", str(tmp_path / "c.json"), "--cache-dir", str(tmp_path / "cache-c")],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert load_plan(tmp_path / "c.json").layers == plan.layers

    # a worker with other settings is refused with one line
    other = subprocess.run([sys.executable, "-m", "planner", *args[:-8], "--trials", "10", "--proxy-top", "3",
                            "--proxy-steps", "7", "--storage", url, "--study-name", name,
                            "--out", str(tmp_path / "d.json"), "--cache-dir", str(tmp_path / "cache-a")],
                           cwd=ROOT, env=env, capture_output=True, text=True)
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1, other.stderr
    assert "another proxy" in other.stderr


def test_two_workers_with_every_lever_write_the_one_machine_plan(tiny_dir: Path, postgres_url: str,
                                                                   tmp_path: Path) -> None:
    """Issue 27: the strongest configuration (3-bit widths, double quantization chosen per layer, the
    data-aware initialisation, feedback rounding), the exact search, no fine-tune proxy: two workers
    sharing a PostgreSQL study split the tables and the Fisher errors and both write the layers the
    one-machine plan has, bit for bit (residuals and sensitivities included)."""
    url, name = postgres_url, "tiny-levers"
    cfg = PlanConfig(model=str(tiny_dir), bits=(2, 3, 4, 8), ranks=(0, 4, 8), double_quant="search", init="loftq-data",
                     rounding="feedback", search="exact", calib_seqs=4, proxy_seqs=2, calib_seq_len=64)
    prep = prepare(cfg, RunSettings(seq_len=128, batch_size=1, device="cpu"))
    lo, hi = (prep.estimate(c).total_bytes for c in extremes(prep))
    args = ["--model", str(tiny_dir), "--bits", "2,3,4,8", "--ranks", "0,4,8", "--double-quant", "search",
            "--init", "loftq-data", "--rounding", "feedback", "--search", "exact", "--proxy-top", "0",
            "--calib-seqs", "4", "--proxy-seqs", "2", "--calib-seq-len", "64", "--seq-len", "128", "--batch-size", "1",
            "--device", "cpu", "--budget", str((lo + hi) // 2)]
    alone = _worker(args, tmp_path / "alone.json", tmp_path / "cache-alone")
    assert alone.wait(300) == 0, alone.stderr.read()[-3000:]
    shared = args + ["--storage", url, "--study-name", name]
    a = _worker(shared, tmp_path / "a.json", tmp_path / "cache-a")
    b = _worker(shared, tmp_path / "b.json", tmp_path / "cache-b")
    assert a.wait(300) == 0, a.stderr.read()[-3000:]
    assert b.wait(300) == 0, b.stderr.read()[-3000:]
    one = load_plan(tmp_path / "alone.json")
    assert {l.quant for l in one.layers} & {"nf3"} or any(l.double_quant for l in one.layers)  # the levers are used
    assert load_plan(tmp_path / "a.json").layers == one.layers == load_plan(tmp_path / "b.json").layers
    assert one.init.method == "loftq-data" and one.init.rounding == "feedback"
    work = optuna.load_study(storage=url, study_name=name + ":work")
    shards = [t for t in work.get_trials(states=(TrialState.COMPLETE,)) if "result" in t.user_attrs]
    keys = sorted(f"{t.user_attrs['kind']}/{t.user_attrs['shard']}" for t in shards)
    assert keys == sorted(f"{u['kind']}/{u['shard']}" for u in table_units(prep) + fisher_units(4))
    assert len({t.user_attrs["worker"] for t in shards}) == 2  # both computed some of it

"""The shared fine-tune proxy's pruning rule: against the candidates ranked ahead that are alive at
the same step, waiting for one another worker is still training (the single-worker decision)."""
from __future__ import annotations

import threading
import time

import optuna
from optuna.trial import TrialState

from planner.search.drivers import ALIVE, AheadMedianPruner


def _claimed(tmp_path, ranks):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="p:proxy")
    for r in ranks:
        study.enqueue_trial({}, user_attrs={"kind": "proxy", "shard": 100 + r, "zero_step_rank": r})
    return study, [study.ask() for _ in ranks]


def _evaluate(study, rank, shared, curve, warmup=10):
    """Report ``curve`` ({step: loss}) as a candidate's evaluations; the steps at which it was pruned."""
    pruner = AheadMedianPruner(study, rank, warmup, shared, poll_s=0.02)
    local = optuna.create_study(pruner=pruner)
    trial = local.ask()
    for step, loss in sorted(curve.items()):
        trial.report(loss, step)
        if trial.should_prune():
            return step, pruner
    return None, pruner


def test_waits_for_the_candidate_ahead_then_prunes_against_it(tmp_path) -> None:
    study, (t0, t1) = _claimed(tmp_path, [0, 1])

    def ahead_worker():
        time.sleep(0.4)  # the other worker reaches step 10 later than this one
        assert _evaluate(study, 0, t0, {5: 2.5, 10: 2.0})[0] is None  # nothing ahead of rank 0: never pruned

    th = threading.Thread(target=ahead_worker)
    th.start()
    t = time.perf_counter()
    pruned_at, pruner = _evaluate(study, 1, t1, {5: 3.5, 10: 3.0, 15: 2.9})
    th.join()
    assert pruned_at == 10 and pruner.waited_s >= 0.3 and time.perf_counter() - t >= 0.3
    assert study.trials[0].user_attrs[ALIVE] == 10 and study.trials[0].intermediate_values == {5: 2.5, 10: 2.0}
    assert ALIVE not in study.trials[1].user_attrs or study.trials[1].user_attrs[ALIVE] == 5


def _finish(study, trial, curve, pruned):
    trial.set_user_attr("result", {"steps": max(curve), "pruned": pruned,
                                   "curve": {str(k): v for k, v in curve.items()}})
    study.tell(trial, 0.0)


def test_better_than_the_median_survives_and_pruned_ones_stop_counting(tmp_path) -> None:
    study, (t0, t1, t2, t3) = _claimed(tmp_path, [0, 1, 2, 3])
    assert _evaluate(study, 0, t0, {10: 2.0, 15: 1.9, 20: 1.8})[0] is None
    _finish(study, t0, {10: 2.0, 15: 1.9, 20: 1.8}, False)
    assert _evaluate(study, 1, t1, {10: 4.0})[0] == 10  # worse than rank 0 at step 10
    _finish(study, t1, {10: 4.0}, True)
    # rank 1 was pruned at step 10, so it is not alive there: against rank 0 alone (2.0), 2.5 is
    # pruned (counting rank 1 the median would be 3.0 and it would survive)
    assert _evaluate(study, 2, t2, {10: 2.5})[0] == 10
    _finish(study, t2, {10: 2.5}, True)
    assert _evaluate(study, 3, t3, {10: 1.95, 15: 1.85})[0] is None  # ahead of rank 0 at 10 and 15
    assert study.trials[3].user_attrs[ALIVE] == 15
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 3 + [TrialState.RUNNING]

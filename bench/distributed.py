"""Many workers, one study: wall time of each stage with 1 vs 2 workers on a throwaway PostgreSQL.

    python -m bench.distributed [--model smollm2-135m] [--budget 2.1GB] [--trials 8] [--proxy-top 4]

Runs, each on a fresh study and fresh cache dirs (nothing reused between runs):
  1w-1c  one worker pinned to core 0, one thread               (the peer)
  2w-2c  two workers, each pinned to its own core, one thread
  1w-2t  one worker on cores 0,1 with two threads               (reference)
  2w-kill two workers, the second SIGKILLed once half the trials are done
and prints wall time, per-stage seconds (from each plan's search.timings), the speed-up of 2w-2c over
1w-1c (goal >= 1.6x), the load average and thread counts. Run it alone: a ratio measured while
other jobs share the cores is noise.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("weight_bank_s", "precompute_s", "search_s", "finetune_proxy_s", "total_s")


def _start(args: argparse.Namespace, url: str, study: str, tag: str, cores: str, threads: int, tmp: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "LOFTQ_PLANNER_THREADS": str(threads), "LOFTQ_PLANNER_HEARTBEAT": "2,6", "PYTHONPATH": str(ROOT)}
    cmd = ["taskset", "-c", cores, sys.executable, "-c",
           f"import torch; torch.set_num_threads({threads}); from planner.cli.app import main; raise SystemExit(main())",
           "--model", args.model, "--budget", args.budget, "--trials", str(args.trials), "--proxy-top", str(args.proxy_top),
           "--proxy-steps", str(args.proxy_steps), "--storage", url, "--study-name", study,
           "--out", str(tmp / f"{study}-{tag}.json"), "--cache-dir", str(tmp / f"cache-{study}-{tag}")]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / f"{study}-{tag}.log", "w"))


def _done_trials(url: str, study: str) -> int:
    import optuna

    try:
        s = optuna.load_study(storage=url, study_name=study)
    except KeyError:
        return 0
    return sum(t.state.is_finished() for t in s.get_trials(deepcopy=False))


def run_case(args: argparse.Namespace, url: str, name: str, workers: list[tuple[str, int]], tmp: Path,
             kill_at: int | None = None) -> dict:
    t0 = time.perf_counter()
    procs = [_start(args, url, name, f"w{i}", cores, threads, tmp) for i, (cores, threads) in enumerate(workers)]
    killed = False
    while any(p.poll() is None for p in procs):
        if kill_at is not None and not killed and _done_trials(url, name) >= kill_at and procs[-1].poll() is None:
            os.kill(procs[-1].pid, signal.SIGKILL)
            killed = True
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    stages, proxy = {}, []
    for i, p in enumerate(procs):
        out = tmp / f"{name}-w{i}.json"
        if p.returncode == 0 and out.exists():
            search = json.loads(out.read_text())["search"]
            stages[f"w{i}"] = search["timings"]
            # who trained which candidate, how far, and how long it waited for the ones ranked ahead
            proxy = proxy or [{k: c.get(k) for k in ("trial", "worker", "steps", "pruned", "seconds", "waited_s", "loss")}
                              for c in (search.get("proxy") or {}).get("candidates", [])]
    return {"case": name, "wall_s": round(wall, 1), "killed": killed,
            "rc": [p.returncode for p in procs], "stages": stages, "proxy": proxy}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", default="2.1GB")  # 200MB fits nothing in fine-tune mode
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--proxy-top", type=int, default=4)
    ap.add_argument("--proxy-steps", type=int, default=20)
    ap.add_argument("--cases", default="1w-1c,2w-2c,1w-2t,2w-kill")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.pg import postgres_url_or_skip  # the one throwaway-cluster implementation

    cluster = postgres_url_or_skip()
    url = next(cluster)
    layouts = {"1w-1c": ([("0", 1)], None), "2w-2c": ([("0", 1), ("1", 1)], None),
               "1w-2t": ([("0,1", 2)], None), "2w-kill": ([("0", 1), ("1", 1)], args.trials // 2)}
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        for case in args.cases.split(","):
            workers, kill_at = layouts[case]
            print(f"load average before {case}: {os.getloadavg()}", flush=True)
            results.append(run_case(args, url, case, workers, Path(tmp), kill_at))
            print(json.dumps(results[-1]), flush=True)
    cluster.close()
    print(f"\n{args.model} budget {args.budget}, {args.trials} trials, --proxy-top {args.proxy_top} x "
          f"{args.proxy_steps} steps; load average now {os.getloadavg()}")
    print(f"{'case':8} {'wall s':>8} " + " ".join(f"{s:>17}" for s in STAGES))
    for r in results:
        first = next(iter(r["stages"].values()), {})
        print(f"{r['case']:8} {r['wall_s']:8.1f} " + " ".join(f"{first.get(s, float('nan')):17.1f}" for s in STAGES))
    walls = {r["case"]: r["wall_s"] for r in results}
    if "1w-1c" in walls and "2w-2c" in walls:
        print(f"speed-up 2 workers / 1 worker (one core each): {walls['1w-1c'] / walls['2w-2c']:.2f}x (goal >= 1.6x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

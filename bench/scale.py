"""Planning at scale: memory and time of plan + materialize on random-weight checkpoints of real shapes.

    python -m bench.scale [--work DIR] [--depths 2,4,8,16] [--models llama,phi-2,phi-2-ft] [--skip-phi2]
                          [--only-build] [--hidden H --intermediate I] [--json F]

Cases (checkpoints from :mod:`bench.synthetic`, built once under ``--work/checkpoints``):
  llama-dN   a Llama at hidden 2048, intermediate 5632 (TinyLlama's block), N blocks: plan + materialize
  phi-2      the phi-2 shape of planner/shipped/models/phi-2.json: plan + materialize
  phi-2-ft   the same checkpoint and budget, planned with --proxy-top 1 (plan only)
Every plan uses seq 256, 8 calibration and 2 proxy sequences, 4 trials, --proxy-top 0 (unless
phi-2-ft) and a budget halfway between the smallest and the largest plan (``--dry-run --json``),
so the plan mixes widths; each run gets a fresh cache folder and study (nothing is reused).
Each command runs as a child process, sampled every 0.2 s in /proc (its process tree): peak
RssAnon, peak RssFile (apart), VmHWM (read by the child at exit), wall time, the plan's
``search.timings`` with the peak RssAnon inside each stage (aligned at the child's main() start),
and on CUDA ``torch.cuda.max_memory_reserved`` (read by the child at exit). The depth series gives
the growth per added block: (peak anon at d2 - at d1) / (d2 - d1) against one block's packed bytes
(the plan's stored bytes of the added blocks; issue 14's target is <= 1.5x). Prints uptime and load
average with the table: run it alone (a number measured while other jobs share the cores is noise).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.synthetic import Spec, build, checkpoint_bytes

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
STAGES = ("tables_s", "sensitivity_s", "exact_solve_s", "search_s", "finetune_proxy_s")  # in run order
# the child: the planner's CLI, then its own VmHWM and CUDA peaks into argv[1]
CHILD = r"""
import json, logging, sys, time
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
from planner.cli.app import main
start = time.time()
rc = main(sys.argv[2:])
import torch
doc = {"rc": rc, "main_start": start, "threads": torch.get_num_threads()}
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        doc["vmhwm"] = int(line.split()[1]) * 1024
if torch.cuda.is_available() and torch.cuda.is_initialized():
    doc["cuda_max_reserved"] = torch.cuda.max_memory_reserved()
    doc["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
json.dump(doc, open(sys.argv[1], "w"))
sys.exit(rc)
"""


def load_line() -> str:
    up = float(Path("/proc/uptime").read_text().split()[0])
    return f"up {up / 3600:.1f} h, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} cpus"


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def _status(pid: int) -> dict[str, int]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    keys = ("RssAnon:", "RssFile:", "VmHWM:")
    return {ln.split()[0][:-1]: int(ln.split()[1]) * 1024 for ln in lines if ln.startswith(keys)}


def run_sampled(cmd: list[str], log: Path, kill_above: float, period: float = 0.2) -> dict[str, Any]:
    """Run ``python -c CHILD <stats> cmd...``; sample its process tree until it exits."""
    stats = log.with_suffix(".stats.json")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(stats), *cmd], cwd=ROOT, env=env,
                                stdout=err, stderr=subprocess.STDOUT)
        series, hwm, killed = [], {}, False
        while proc.poll() is None:
            anon = file = 0
            for p in _tree(proc.pid):
                st = _status(p)
                anon, file = anon + st.get("RssAnon", 0), file + st.get("RssFile", 0)
                hwm[p] = max(hwm.get(p, 0), st.get("VmHWM", 0))
            series.append((round(time.time() - t0, 2), anon, file))
            if kill_above and anon > kill_above and not killed:
                proc.kill()
                killed = True
            time.sleep(period)
    wall = time.time() - t0
    child = json.loads(stats.read_text()) if stats.is_file() else {}
    out = {"cmd": "python -m planner " + shlex.join(cmd), "rc": proc.returncode, "killed_above_bytes": killed and kill_above,
           "wall_s": round(wall, 1), "peak_anon": max((a for _, a, _ in series), default=0),
           "peak_file": max((f for _, _, f in series), default=0),
           "vmhwm": child.get("vmhwm") or sum(hwm.values()), "samples": len(series), "load": load_line()}
    out.update({k: child[k] for k in ("cuda_max_reserved", "cuda_max_allocated", "threads") if k in child})
    summary = [ln for ln in log.read_text().splitlines() if ln.startswith("{")]  # a command's --json line
    if summary:
        try:
            out["summary"] = json.loads(summary[-1])
        except ValueError:
            pass
    out["_series"], out["_main_start"] = series, child.get("main_start", t0) - t0
    return out


def stage_peaks(timings: dict[str, float], series: list, main_start: float) -> dict[str, dict[str, float | None]]:
    """Seconds and peak RssAnon per stage; the guided search's seconds are the rest of total_s."""
    t = dict(timings)
    if "search_s" not in t and "total_s" in t:
        t["search_s"] = max(0.0, t["total_s"] - sum(t.get(k, 0.0) for k in STAGES))
    out, start = {}, main_start
    for key in STAGES:
        if key in t:
            end = start + t[key]
            inside = [a for s, a, _ in series if start <= s <= end]
            out[key[:-2]] = {"s": round(t[key], 1), "peak_anon": max(inside) if inside else None}
            start = end
    return out


def dry_run_budget(ckpt: Path, base: list[str], frac: float) -> tuple[int, int, int]:
    """(smallest plan, largest plan, budget ``frac`` of the way between them) in bytes (``--dry-run --json``)."""
    out = subprocess.run([sys.executable, "-m", "planner", "--model", str(ckpt), "--dry-run", "--json", *base],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True, check=True).stdout
    doc = json.loads(out)
    return doc["min_bytes"], doc["max_bytes"], int(doc["min_bytes"] + frac * (doc["max_bytes"] - doc["min_bytes"]))


def plan_bytes(plan: Path) -> dict[str, Any]:
    """Stored (packed) bytes of the plan's target layers, total and per block; the bits histogram."""
    from planner.artifact.plan import load_plan

    p = load_plan(plan)
    per_block: dict[int, int] = {}
    for layer in p.layers:
        block = int(layer.name.split(".layers.")[1].split(".")[0]) if ".layers." in layer.name else -1
        per_block[block] = per_block.get(block, 0) + layer.stored_bytes
    bits = [layer.bits for layer in p.layers]
    return {"packed": sum(per_block.values()), "packed_per_block": per_block,
            "bf16": sum(2 * layer.numel for layer in p.layers),
            "bits_hist": {str(b): bits.count(b) for b in sorted(set(bits))},
            "ranks": sorted({layer.rank for layer in p.layers})}


def run_case(name: str, ckpt: Path, args: argparse.Namespace, proxy_top: int, materialize: bool,
             budget: tuple[int, int, int]) -> list[dict[str, Any]]:
    folder = args.work / "runs" / name
    if not args.resume:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    plan = folder / "plan.json"
    cmd = ["--model", str(ckpt), "--budget", str(budget[2]), *base_args(args), "--calib-seqs", str(args.calib_seqs),
           "--proxy-seqs", str(args.proxy_seqs), "--trials", str(args.trials), "--proxy-top", str(proxy_top),
           "--out", str(plan), "--cache-dir", str(folder / "cache"), *shlex.split(args.extra)]
    common = {"case": name, "checkpoint": str(ckpt), "weights_bytes": checkpoint_bytes(ckpt),
              "min_bytes": budget[0], "max_bytes": budget[1], "budget": budget[2]}
    print(f"# {name}: plan ({load_line()})", flush=True)
    rows = [{**common, "step": "plan", **run_sampled(cmd, folder / "plan.log", args.kill_above)}]
    if rows[0]["rc"] == 0:
        doc = json.loads(plan.read_text())
        rows[0]["timings"] = doc["search"]["timings"]
        rows[0]["stages"] = stage_peaks(doc["search"]["timings"], rows[0]["_series"], rows[0]["_main_start"])
        rows[0]["plan"] = plan_bytes(plan)
        if materialize:
            print(f"# {name}: materialize ({load_line()})", flush=True)
            mcmd = ["materialize", str(plan), "--out", str(folder / "artifact"), "--json"]
            rows.append({**common, "step": "materialize", **run_sampled(mcmd, folder / "materialize.log", args.kill_above)})
    if not args.keep:
        for sub in ("cache", "artifact"):
            shutil.rmtree(folder / sub, ignore_errors=True)
    for r in rows:
        if r["rc"] != 0:
            why = f"killed at {r['killed_above_bytes'] / GB:.1f} GB of RssAnon" if r["killed_above_bytes"] else f"rc {r['rc']}"
            print(f"# {name} {r['step']} failed ({why}): see {folder / (r['step'] + '.log')}", flush=True)
        r["series"] = r.pop("_series")[:: max(1, r["samples"] // 500)]  # at most ~500 points in the JSON
        r.pop("_main_start")
    return rows


def base_args(args: argparse.Namespace) -> list[str]:
    return ["--seq-len", str(args.seq_len), "--calib-seq-len", str(args.seq_len)]


def growth(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per added block, between consecutive depths of the llama series, for plan and materialize."""
    plans = {r["depth"]: r for r in rows if r.get("depth") and r["step"] == "plan" and r["rc"] == 0}
    out = []
    for step in ("plan", "materialize"):
        by_depth = {r["depth"]: r for r in rows if r.get("depth") and r["step"] == step and r["rc"] == 0}
        depths = sorted(d for d in by_depth if d in plans)
        for d1, d2 in zip(depths, depths[1:]):
            anon = (by_depth[d2]["peak_anon"] - by_depth[d1]["peak_anon"]) / (d2 - d1)
            packed = (plans[d2]["plan"]["packed"] - plans[d1]["plan"]["packed"]) / (d2 - d1)
            bf16 = (plans[d2]["plan"]["bf16"] - plans[d1]["plan"]["bf16"]) / (d2 - d1)
            out.append({"step": step, "d1": d1, "d2": d2, "anon_per_block": anon, "packed_per_block": packed,
                        "bf16_per_block": bf16, "ratio": anon / packed if packed else float("nan")})
    return out


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / GB:.2f}"


def report(rows: list[dict[str, Any]], grow: list[dict[str, Any]]) -> str:
    cuda = any("cuda_max_reserved" in r for r in rows)
    head = ["case", "step", "budget GB", "bits hist", "wall s", "peak RssAnon GB", "peak RssFile GB", "VmHWM GB"]
    head += ["CUDA max reserved GB"] * cuda + ["stages: s (peak RssAnon GB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        stages = ", ".join(f"{k} {v['s']:.1f} ({_gb(v['peak_anon'])})" for k, v in r.get("stages", {}).items())
        if "seconds" in r.get("summary", {}):  # materialize's own time (LoftQ and writing)
            stages = f"materialize {r['summary']['seconds']:.1f}"
        cells = [r["case"], r["step"] + ("" if r["rc"] == 0 else f" FAILED rc {r['rc']}"), f"{r['budget'] / GB:.3f}",
                 " ".join(f"{b}:{n}" for b, n in r.get("plan", {}).get("bits_hist", {}).items()),
                 f"{r['wall_s']:.1f}", f"{r['peak_anon'] / GB:.2f}", f"{r['peak_file'] / GB:.2f}", f"{r['vmhwm'] / GB:.2f}"]
        cells += [f"{r.get('cuda_max_reserved', 0) / GB:.2f}"] * cuda + [stages]
        lines.append("| " + " | ".join(cells) + " |")
    for g in grow:
        lines.append(f"\n{g['step']} d{g['d1']}->d{g['d2']}: peak RssAnon grows {g['anon_per_block'] / 1e6:.1f} MB per "
                     f"added block = {g['ratio']:.2f}x its packed bytes ({g['packed_per_block'] / 1e6:.1f} MB; bf16 "
                     f"{g['bf16_per_block'] / 1e6:.1f} MB) (target <= 1.5x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/loftq-bench-scale"), help="checkpoints and runs")
    ap.add_argument("--depths", default="2,4,8,16", help="llama depth series (comma-separated blocks)")
    ap.add_argument("--models", default="llama,phi-2,phi-2-ft", help="cases: llama (the series), phi-2, phi-2-ft")
    ap.add_argument("--skip-phi2", action="store_true", help="drop phi-2 and phi-2-ft")
    ap.add_argument("--only-build", action="store_true", help="build the checkpoints, run nothing")
    ap.add_argument("--hidden", type=int, help="override the width (smoke runs), both shapes")
    ap.add_argument("--intermediate", type=int, help="override the MLP width (smoke runs), both shapes")
    ap.add_argument("--phi2-layers", type=int, help="phi-2 blocks (default: the shipped 32)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-seqs", type=int, default=8)
    ap.add_argument("--proxy-seqs", type=int, default=2)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--budget-frac", type=float, default=0.5,
                    help="budget: this fraction of the way from the smallest to the largest plan")
    ap.add_argument("--extra", default="", help="more plan options, e.g. '--score-device cpu'")
    ap.add_argument("--kill-above", type=float, help="GB of RssAnon at which a run is killed (default: 70%% of RAM)")
    ap.add_argument("--keep", action="store_true", help="keep each run's cache and materialized folder")
    ap.add_argument("--resume", action="store_true", help="reuse what an interrupted run of a case left in its "
                    "cache (its tables, weight bank, study) instead of starting fresh; the memory peaks are then "
                    "those of the resumed part only")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    mem_total = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    args.kill_above = args.kill_above * GB if args.kill_above else 0.7 * mem_total
    models = [m for m in args.models.split(",") if m and not (args.skip_phi2 and m.startswith("phi-2"))]
    width = dict(hidden=args.hidden, intermediate=args.intermediate)
    specs: list[tuple[str, Spec, int | None]] = []
    if "llama" in models:
        specs += [(f"llama-d{d}", Spec("llama", d, **width), d) for d in map(int, args.depths.split(","))]
    if "phi-2" in models or "phi-2-ft" in models:
        specs.append(("phi-2", Spec("phi-2", args.phi2_layers or 32, **width), None))
    print(load_line(), flush=True)
    rows: list[dict[str, Any]] = []
    for name, spec, depth in specs:
        t0 = time.time()
        ckpt = build(spec, args.work)
        print(f"# {name}: {ckpt} ({checkpoint_bytes(ckpt) / GB:.2f} GB of bf16 weights, ready in "
              f"{time.time() - t0:.0f} s)", flush=True)
        if args.only_build:
            continue
        budget = dry_run_budget(ckpt, base_args(args) + shlex.split(args.extra), args.budget_frac)
        cases = [(name, 0, True)] if name != "phi-2" or "phi-2" in models else []
        if name == "phi-2" and "phi-2-ft" in models:
            cases.append(("phi-2-ft", 1, False))
        for case, top, mat in cases:
            for r in run_case(case, ckpt, args, top, mat, budget):
                rows.append({**r, "depth": depth})
    if not rows:
        return 0
    grow = growth(rows)
    print(f"\n{load_line()}; seq {args.seq_len}, {args.calib_seqs} calibration + {args.proxy_seqs} proxy sequences, "
          f"{args.trials} trials\n")
    print(report(rows, grow))
    if args.json:
        from bench.common import write_json

        write_json(args.json, {"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "growth": grow})
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

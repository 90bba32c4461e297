"""Hadamard transform speed: ``loftq.hadamard.hadamard_transform`` against a dense matmul with the full n x n matrix.

For each weight shape [out, in] (SmolLM2's down_proj 576 x 1536, phi-2's fc2 2560 x 10240; random
N(0, 0.02), seeded) and each side (``in``: every row, n = in, dim -1; ``out``: every column, n = out,
dim 0), three ways of computing the same Ĥ v, all fp32, timed in this process, alternated, the
median of ``--repeats``:

- ours: the default transform (one [m, m] matmul + radix-2^RADIX_BITS Walsh-Hadamard stages);
- radix-2: the same transform with ``radix_bits=1`` (the classic butterfly: k passes over memory);
- peer, dense: ``W @ Ĥ^T`` (or ``Ĥ @ W``) with the full n x n matrix built before the clock starts.

The load average (``uptime``) is printed before and after with the thread count: a ratio measured
while other jobs share the cores is noise. Accuracy, asserted (exit 1 when off): ours against the
dense product, max |difference| / max |dense| <= 1e-5.

    python -m bench.hadamard_speed [--shapes 576x1536,2560x10240] [--threads N] [--repeats 3] [--device cpu] [--json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from loftq.hadamard import RADIX_BITS, hadamard_matrix, hadamard_order, hadamard_transform
from planner.devices import resolve_device

TOLERANCE = 1e-5
DEFAULT_SHAPES = "576x1536,2560x10240"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_side(w: torch.Tensor, side: str, repeats: int, device: torch.device) -> dict:
    dim = -1 if side == "in" else 0
    n = w.shape[dim]
    h = (hadamard_matrix(n) / math.sqrt(n)).to(device)
    ways = {
        "ours": lambda: hadamard_transform(w, dim=dim),
        "radix2": lambda: hadamard_transform(w, dim=dim, radix_bits=1),
        "dense": (lambda: w @ h.T) if side == "in" else (lambda: h @ w),
    }
    results = {name: fn() for name, fn in ways.items()}  # warm-up, and the accuracy check
    ref = results["dense"]
    err = float((results["ours"] - ref).abs().max() / ref.abs().max())
    runs: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, fn in ways.items():
            runs[name].append(timed(fn, device))
    med = {name: statistics.median(t) for name, t in runs.items()}
    m, k = hadamard_order(n)
    return {"side": side, "n": n, "m": m, "k": k, "ours_s": med["ours"], "radix2_s": med["radix2"],
            "dense_s": med["dense"], "dense_over_ours": med["dense"] / med["ours"],
            "radix2_over_ours": med["radix2"] / med["ours"], "max_rel_diff_vs_dense": err,
            "runs_s": {name: [round(t, 5) for t in ts] for name, ts in runs.items()}}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        out, inp = (int(v) for v in item.strip().lower().split("x"))
        if hadamard_order(out) is None or hadamard_order(inp) is None:
            raise ValueError(f"shape {item!r} has a width with no supported Hadamard order")
        shapes.append((out, inp))
    return shapes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated OUTxIN weight shapes")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for every way")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as exc:
        print(f"bad --shapes {args.shapes!r}: {exc}", file=sys.stderr)
        return 2
    if args.repeats < 1 or args.threads < 1:
        print(f"bad --repeats {args.repeats!r} or --threads {args.threads!r}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    gen = torch.Generator().manual_seed(0)
    report = {"device": device.type, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "radix_bits": RADIX_BITS, "uptime_before": uptime(), "cases": []}
    for out, inp in shapes:
        w = (torch.randn(out, inp, generator=gen) * 0.02).to(device)
        for side in ("in", "out"):
            report["cases"].append({"shape": [out, inp], **run_side(w, side, args.repeats, device)})
    report["uptime_after"] = uptime()
    ok = all(c["max_rel_diff_vs_dense"] <= TOLERANCE for c in report["cases"])
    if args.json:
        print(json.dumps(report))
    else:
        print(f"device {device.type}, {report['threads']} threads, fp32, median of {args.repeats}; "
              f"radix 2^{RADIX_BITS}\n  before: {report['uptime_before']}\n  after:  {report['uptime_after']}")
        for c in report["cases"]:
            print(f"  [{c['shape'][0]} x {c['shape'][1]}] {c['side']:>3} side, n = {c['n']} = {c['m']} * 2^{c['k']}: "
                  f"ours {c['ours_s'] * 1e3:.2f} ms, radix-2 {c['radix2_s'] * 1e3:.2f} ms, "
                  f"dense n x n {c['dense_s'] * 1e3:.2f} ms -> dense / ours {c['dense_over_ours']:.1f}x, "
                  f"radix-2 / ours {c['radix2_over_ours']:.1f}x (max rel diff {c['max_rel_diff_vs_dense']:.1e})")
    if not ok:
        print(f"accuracy check failed: ours differs from the dense product by more than {TOLERANCE}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

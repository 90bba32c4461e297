"""Residual-table speed against PEFT's LoftQ, measured in the same run.

SmolLM2-135M, its 210 target Linears: our full iters=1 table (bits 2/4/8 x ranks 0/8/16/32/64,
15 cells per layer) against PEFT's ``loftq_init`` computing ONE cell (NF4, rank 16, 1 iteration)
per layer, with only PEFT's compute device patched (it hard-codes cuda). Prints both times, the
ratio, and the largest relative difference between our (4, 16) cell and PEFT's residual.
With a CUDA GPU, also times a table for phi-2's shapes (random weights; target < 60 s on an H100).

    python -m bench.loftq_speed [--layers N] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before the hub libraries are imported: they read it once

from tests.peft_ref import peft_loftq_init  # noqa: E402
from loftq import residual_table  # noqa: E402
from planner.sources import resolve  # noqa: E402

BITS, RANKS = (2, 4, 8), (0, 8, 16, 32, 64)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours(weights: dict[str, torch.Tensor], device: torch.device) -> tuple[float, dict[str, torch.Tensor]]:
    by_shape: dict[tuple, list[str]] = {}
    for name, w in weights.items():
        by_shape.setdefault(tuple(w.shape), []).append(name)
    sync(device)
    start = time.perf_counter()
    out: dict[str, torch.Tensor] = {}
    for names in by_shape.values():
        stack = torch.stack([weights[n] for n in names]).to(device)
        tab = residual_table(stack, bits=BITS, ranks=RANKS).cpu()
        out.update(zip(names, tab))
    sync(device)
    return time.perf_counter() - start, out


def peft(weights: dict[str, torch.Tensor], device: torch.device) -> tuple[float, dict[str, float]]:
    init = peft_loftq_init(device.type)
    sync(device)
    start = time.perf_counter()
    res = {}
    for name, w in weights.items():
        w = w.to(device)
        deq, a, b = init(w, 4, 16, 1)
        res[name] = float((w - deq - b @ a).norm() / w.norm())
    sync(device)
    return time.perf_counter() - start, res


def phi2_table(device: torch.device) -> float:
    """phi-2 shapes: 32 blocks x (q, k, v, dense 2560x2560; fc1 10240x2560; fc2 2560x10240)."""
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = [(2560, 2560)] * 4 + [(10240, 2560), (2560, 10240)]
    sync(device)
    start = time.perf_counter()
    for shape in set(shapes):
        count = 32 * shapes.count(shape)
        for i in range(0, count, 16):
            n = min(16, count - i)
            stack = torch.randn(n, *shape, generator=gen, device=device) * 0.02
            residual_table(stack, bits=BITS, ranks=RANKS)
    sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=None, help="use only the first N layers")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = resolve("smollm2-135m")
    targets = source.targets()[: args.layers]
    weights = {t.name: w for t, w in source.iter_weights(targets)}
    t_ours, tables = ours(weights, device)
    t_peft, peft_res = peft(weights, device)
    cell = {n: float(tables[n][BITS.index(4), RANKS.index(16)]) for n in weights}
    worst = max(abs(cell[n] - peft_res[n]) / peft_res[n] for n in weights)
    report = {"device": device.type, "threads": torch.get_num_threads(), "layers": len(weights),
              "ours_full_table_s": round(t_ours, 2), "cells_per_layer": len(BITS) * len(RANKS),
              "peft_one_cell_s": round(t_peft, 2), "speedup_vs_peft_one_cell": round(t_peft / t_ours, 2),
              "max_rel_diff_4bit_r16": worst}
    if device.type == "cuda":
        report["phi2_table_s"] = round(phi2_table(device), 1)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"device {device.type} ({torch.get_num_threads()} threads), SmolLM2-135M, {len(weights)} Linears")
    print(f"  ours: full table {len(BITS)}x{len(RANKS)} cells/layer   {t_ours:7.2f} s")
    print(f"  PEFT loftq_init: one cell (nf4, r16)  {t_peft:7.2f} s")
    print(f"  ratio PEFT-one-cell / ours-full-table = {t_peft / t_ours:.2f}x (target >= 1, aim 3)")
    print(f"  (4-bit, r16) residual vs PEFT: max relative difference {worst:.2e} (target <= 1e-2)")
    if "phi2_table_s" in report:
        print(f"  phi-2-shaped table on {torch.cuda.get_device_name()}: {report['phi2_table_s']} s (target < 60)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

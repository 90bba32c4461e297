"""Residual-table speed against PEFT's LoftQ, measured in the same run.

Ours: the planner's full iters=1 table (``planner.scoring.tables.compute_tables``: NF2/NF4/NF8 x
ranks 0/8/16/32/64 = 15 cells per layer). Peer: PEFT's ``loftq_init`` computing ONE cell (NF4,
rank 16, 1 iteration) per layer, with only its compute device patched (it hard-codes cuda). Cases:

- ``smollm2``: SmolLM2-135M's 210 target Linears (real weights, Q4_1 before dequantisation);
- ``phi2``: one phi-2 block with random N(0, 0.02) weights of the real shapes (q, k, v, dense
  2560x2560; fc1 10240x2560; fc2 2560x10240), seeded.

Both sides run in this process pinned to ``--threads``, alternated, and the median of ``--repeats``
runs is reported with the load average before and after. Accuracy, asserted (exit 1 when off):
every cell of our table against the exact residual (float64 eigenvalues of the Gram matrix of
W - Q; for phi2 one layer of each shape) within 1%, and our (4, 16) cell against PEFT's residual.

    python -m bench.loftq_speed [--case smollm2,phi2] [--threads N] [--repeats 3] [--layers N] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before the hub libraries are imported: they read it once

from tests.peft_ref import peft_loftq_init  # noqa: E402
from loftq import QuantConfig  # noqa: E402
from loftq.quant import fake_quantize  # noqa: E402
from planner import progress  # noqa: E402
from planner.devices import resolve_device  # noqa: E402
from planner.scoring.tables import TableSettings, compute_tables  # noqa: E402
from search_spaces.facts import TargetLayer  # noqa: E402

BITS, RANKS = (2, 4, 8), (0, 8, 16, 32, 64)
TOLERANCE = 0.01
PHI2_SHAPES = {"q_proj": (2560, 2560), "k_proj": (2560, 2560), "v_proj": (2560, 2560), "dense": (2560, 2560),
               "fc1": (10240, 2560), "fc2": (2560, 10240)}
Weights = list[tuple[TargetLayer, torch.Tensor]]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def smollm2_weights(layers: int | None) -> Weights:
    from planner.sources import resolve

    source = resolve("smollm2-135m")
    return list(source.iter_weights(source.targets()[:layers]))


def phi2_weights(layers: int | None) -> Weights:
    gen = torch.Generator().manual_seed(0)
    out = [(TargetLayer(f"model.layers.0.{name}", shape, name, 0), torch.randn(*shape, generator=gen) * 0.02)
           for name, shape in PHI2_SHAPES.items()]
    return out[:layers]


def ours(weights: Weights, device: torch.device) -> tuple[float, dict[str, torch.Tensor]]:
    sync(device)
    start = time.perf_counter()
    tables = compute_tables(iter(weights), len(weights), TableSettings(bits=BITS, ranks=RANKS), device)
    sync(device)
    return time.perf_counter() - start, dict(zip(tables.names, tables.table))


def peft(weights: Weights, device: torch.device) -> tuple[float, dict[str, float]]:
    init = peft_loftq_init(device.type)
    sync(device)
    start = time.perf_counter()
    res = {}
    for target, w in weights:
        w = w.to(device)
        deq, a, b = init(w, 4, 16, 1)
        res[target.name] = float((w - deq - b @ a).norm() / w.norm())
    sync(device)
    return time.perf_counter() - start, res


def exact_cells(w: torch.Tensor) -> torch.Tensor:
    """[len(BITS), len(RANKS)] exact relative residuals (float64 spectrum of W - Q)."""
    out = torch.empty(len(BITS), len(RANKS), dtype=torch.float64)
    w_sq = w.double().pow(2).sum()
    for j, bits in enumerate(BITS):
        r = (w - fake_quantize(w, QuantConfig(bits))).double()
        gram = r @ r.T if r.shape[0] <= r.shape[1] else r.T @ r
        s2 = torch.linalg.eigvalsh(gram).flip(0)
        total = r.pow(2).sum()
        for k, rank in enumerate(RANKS):
            out[j, k] = ((total - s2[:rank].sum()).clamp(min=0) / w_sq).sqrt()
    return out


def run_case(case: str, layers: int | None, repeats: int, device: torch.device) -> dict:
    weights = smollm2_weights(layers) if case == "smollm2" else phi2_weights(layers)
    t_ours, t_peft = [], []
    tables: dict[str, torch.Tensor] = {}
    peft_res: dict[str, float] = {}
    for _ in range(repeats):  # alternated, so that a change in machine load hits both sides
        t, tables = ours(weights, device)
        t_ours.append(t)
        t, peft_res = peft(weights, device)
        t_peft.append(t)
    cell = {n: float(tables[n][BITS.index(4), RANKS.index(16)]) for n in tables}
    vs_peft = max(abs(cell[n] - peft_res[n]) / peft_res[n] for n in tables)
    checked = weights if case == "smollm2" else [next(x for x in weights if x[1].shape == s)
                                                   for s in dict.fromkeys(x[1].shape for x in weights)]
    vs_exact = max(float(((tables[t.name].double() - ex) / ex).abs().max())
                   for t, w in checked for ex in [exact_cells(w)])
    med_ours, med_peft = statistics.median(t_ours), statistics.median(t_peft)
    return {"case": case, "layers": len(weights), "cells_per_layer": len(BITS) * len(RANKS),
            "ours_full_table_s": round(med_ours, 3), "peft_one_cell_s": round(med_peft, 3),
            "speedup_vs_peft_one_cell": round(med_peft / med_ours, 2),
            "runs_ours_s": [round(t, 3) for t in t_ours], "runs_peft_s": [round(t, 3) for t in t_peft],
            "max_rel_diff_vs_exact": vs_exact, "exact_checked_layers": len(checked),
            "max_rel_diff_4bit_r16_vs_peft": vs_peft}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="smollm2,phi2", help="comma-separated: smollm2, phi2")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for both sides")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None, help="use only the first N layers of each case")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.case.split(",") if c.strip()]
    if not cases or any(c not in ("smollm2", "phi2") for c in cases) or args.repeats < 1 or args.threads < 1:
        print(f"bad --case {args.case!r}, --repeats or --threads", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    progress.set_enabled(False)
    device = resolve_device(args.device)
    report = {"device": device.type, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "loadavg_before": [round(x, 2) for x in os.getloadavg()],
              "cases": [run_case(c, args.layers, args.repeats, device) for c in cases],
              "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    ok = all(c["max_rel_diff_vs_exact"] <= TOLERANCE and c["max_rel_diff_4bit_r16_vs_peft"] <= TOLERANCE
             for c in report["cases"])
    if args.json:
        print(json.dumps(report))
    else:
        print(f"device {device.type}, {report['threads']} threads for both sides, median of {args.repeats}; "
              f"load average before {report['loadavg_before']}, after {report['loadavg_after']}")
        for c in report["cases"]:
            print(f"  {c['case']} ({c['layers']} Linears): ours full table ({c['cells_per_layer']} cells/layer) "
                  f"{c['ours_full_table_s']:.2f} s, PEFT one cell (nf4, r16) {c['peft_one_cell_s']:.2f} s "
                  f"-> {c['speedup_vs_peft_one_cell']:.2f}x (target >= 3)")
            print(f"    max relative difference: vs exact {c['max_rel_diff_vs_exact']:.2e} "
                  f"({c['exact_checked_layers']} layers), (4, 16) vs PEFT {c['max_rel_diff_4bit_r16_vs_peft']:.2e} "
                  f"(limit {TOLERANCE})")
    if not ok:
        print(f"accuracy check failed: a cell is more than {TOLERANCE:.0%} off", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The memory model against the peak oracle on the 128k-vocabulary grid (every trainer, 1k and 4k
tokens, checkpointing and attention), with the oracle's shapes-only step, and optionally the
computed step beside it (same bytes expected, and how much longer it takes).

    python -m bench.oracle_grid [--computed CASES] [--out bench/results/oracle_grid.json]

The grid is ``tests/planner/test_oracle.py``'s (tiny Llama: hidden 64, 2 blocks, NF4 r8, bf16,
vocabulary 128,256, batch 4), measured by the test's own ``measure_case``. Each row: the predicted
allocated bytes, the measured peak, their ratio and the seconds of the case (the tiny model built
and measured). ``--computed all`` (or a comma list of row numbers, 0-based) also measures those
rows with the arithmetic done (``measure_step(compute=True)``: 1.5-6 min a case on 2 cores) and
records whether the bytes are identical. Run it alone (``uptime`` before and after).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import write_json


def measure(seq: int, trainer: str, ck: bool, attn: str, compute: bool) -> tuple[int, int, float]:
    """(predicted allocated bytes, measured peak bytes, seconds) of one grid case: the test's own
    case (model, batch and settings), timed with building the tiny model."""
    from tests.planner.test_oracle import LLAMA3_VOCAB, measure_case

    t0 = time.perf_counter()
    predicted, step = measure_case("llama", trainer, seq, LLAMA3_VOCAB, compute=compute,
                                   gradient_checkpointing=ck, attn_implementation=attn)
    return predicted, step.peak_bytes, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--computed", default="", help="rows also measured with the arithmetic: 'all' or 0,3,...")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from tests.planner.test_oracle import GRID

    torch.set_num_threads(2)
    cases = [tuple(p.values) for p in GRID]
    computed = set(range(len(cases))) if args.computed == "all" else {int(x) for x in args.computed.split(",") if x}
    before = Path("/proc/loadavg").read_text().split()[:3]
    rows = []
    for i, (seq, trainer, ck, attn) in enumerate(cases):
        predicted, peak, seconds = measure(seq, trainer, ck, attn, compute=False)
        row = {"tokens": 4 * seq, "trainer": trainer, "checkpointing": ck, "attention": attn,
               "predicted_bytes": predicted, "measured_bytes": peak, "ratio": round(predicted / peak, 4),
               "shapes_only_s": round(seconds, 1)}
        if i in computed:
            _, computed_peak, computed_s = measure(seq, trainer, ck, attn, compute=True)
            row.update(computed_bytes=computed_peak, same_bytes=computed_peak == peak, computed_s=round(computed_s, 1))
        rows.append(row)
        print(json.dumps(row), flush=True)
    doc = {"command": "python -m bench.oracle_grid" + (f" --computed {args.computed}" if args.computed else ""),
           "loadavg_before": before, "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
           "threads": torch.get_num_threads(), "rows": rows}
    if args.out:
        write_json(args.out, doc)


if __name__ == "__main__":
    main()

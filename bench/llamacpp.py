"""llama.cpp itself on ``materialize --format gguf`` output (issue 18): perplexity and bytes.

For each of our GGUF-type plans of the packaged SmolLM2 (hand-made choices), ``python -m planner materialize plan.json --out DIR --format
gguf --non-target-dtype fp32`` writes DIR/gguf/model.gguf + adapter.gguf. On the same token ids
(the pydoc corpus' test split, ``token_blocks`` with SmolLM2's tokenizer, no BOS added on either
side) the perplexity is computed by

- llama.cpp (llama-cpp-python, CPU): model.gguf with adapter.gguf applied (``lora_path``), and
  model.gguf alone;
- ours: ``planner.load(DIR)`` (packed QuantLinear + PEFT LoRA, fp32), with and without the adapter;

and issue 18 asks the two to agree within 1%. The peer is llama.cpp's own quantizer
(``llama_model_quantize``, ``pure``: every block tensor in one type, overrides by regex) from an F32
GGUF of the same weights (the packaged Q4_1 file's targets dequantized; token embedding kept in its
stored Q8_0 in every file, so only the target tensors differ): uniform Q4_0, uniform IQ4_NL, and the
Q8_0 (attn_v, ffn_down) / Q4_0 mix; bytes are whole-file sizes (model + adapter).

With ``--planned q4_0,mix`` the planner's own GGUF plan (``--quant gguf``: it chooses every layer's
type and rank) is built at the serving memory of each of those plans without adapter, and with
``--finetune-steps N`` every plan with an adapter is also evaluated after the same short fine-tune
(``python -m planner finetune``, train split), its trained ``adapter.gguf`` run by llama.cpp; with
``--peer-lora-rank R`` each of llama.cpp's files gets the same fine-tune of a rank-R LoRA (PEFT's
default init, QLoRA's recipe) on its own quantized weights.

    python -m bench.llamacpp [--json] [--out bench/results/llamacpp.json] [--ours mix_r16,q4_0_r8]
                             [--planned q4_0,mix] [--trials 8] [--finetune-steps 0] [--peer-lora-rank 0]
                             [--blocks 16] [--seq-len 128] [--threads 2] [--no-peer] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

try:
    import llama_cpp
except ImportError:  # one line, like the other benches' missing-package exits
    raise SystemExit("bench.llamacpp needs llama-cpp-python (it builds llama.cpp): pip install llama-cpp-python") from None

from planner.files.atomic import atomic_write_bytes
from planner.build.gguf_export import Base, _write
from planner.artifact.plan import save_plan
from planner.cli.app import main as planner_main
from planner.settings import LayerChoice, RunSettings
from planner.sources import resolve
from planner.sources.packaged import packaged_gguf
from planner.train.data import CorpusConfig, load_corpus, token_blocks
from planner.build.manual import plan_from_choices

MODEL = "smollm2-135m"
LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# our plans: (type per projection, LoRA rank everywhere)
OURS: dict[str, tuple[dict[str, str], int]] = {
    "mix_r16": ({leaf: "q8_0" if leaf in ("v_proj", "down_proj") else "q4_0" for leaf in LEAVES}, 16),
    "q4_0_r8": ({leaf: "q4_0" for leaf in LEAVES}, 8),
    "q4_0_r16": ({leaf: "q4_0" for leaf in LEAVES}, 16),
    "iq4_nl_r8": ({leaf: "iq4_nl" for leaf in LEAVES}, 8),
}
BITS = {"q8_0": 8, "q4_0": 4, "iq4_nl": 4}
# --planned: the planner's own plan at the memory of these types without adapter (llama.cpp's peers' layouts)
PLANNED_AT = {"q4_0": OURS["q4_0_r8"][0], "iq4_nl": OURS["iq4_nl_r8"][0], "mix": OURS["mix_r16"][0]}
# llama.cpp's quantizer: (ftype, {tensor regex: ggml type}) with pure=True
PEERS: dict[str, tuple[int, dict[str, int]]] = {
    "llama.cpp Q4_0": (llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, {}),
    "llama.cpp IQ4_NL": (llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_NL, {}),
    "llama.cpp Q8_0/Q4_0 mix": (llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
                                {r"attn_v\.weight": llama_cpp.GGML_TYPE_Q8_0, r"ffn_down\.weight": llama_cpp.GGML_TYPE_Q8_0}),
}


# ---------------------------------------------------------------- our files
def cli(argv: list[str]) -> None:
    """``python -m planner ARGV`` in this process; stop the bench if it fails."""
    if planner_main(argv) != 0:
        raise SystemExit(f"python -m planner {' '.join(argv)} failed")


def build_ours(name: str, root: Path, seq_len: int) -> tuple[Path, float | None]:
    """Plan ``name`` of OURS for SmolLM2, materialized through the CLI with --format gguf; (DIR, seconds).
    A ROOT/NAME with a model.gguf (an earlier run's, ``--work``) is reused as is (seconds None)."""
    if (root / name / "gguf" / "model.gguf").is_file():
        return root / name, None
    types, rank = OURS[name]
    source = resolve(MODEL)
    choices = {t.name: LayerChoice(BITS[types[t.name.rsplit(".", 1)[-1]]], rank, types[t.name.rsplit(".", 1)[-1]], 32)
               for t in source.targets()}
    plan = save_plan(plan_from_choices(source, choices, RunSettings(device="cpu", seq_len=seq_len)),
                     root / f"{name}.json")
    out, start = root / name, time.perf_counter()
    # fp32 non-target weights: planner.load then holds the GGUF's own embedding and norm values
    argv = ["materialize", str(plan), "--out", str(out), "--format", "gguf", "--non-target-dtype", "fp32",
            "--device", "cpu"]
    cli(argv)
    return out, time.perf_counter() - start


def ours_nll(folder: Path, blocks: torch.Tensor, adapter: Path | None = None) -> tuple[float, float | None, torch.Tensor]:
    """planner.load(DIR) on CPU in fp32: (mean nll with the adapter, without it or None, logits of block 0);
    ``adapter``: a fine-tuned adapter folder instead of the LoftQ initialisation."""
    import planner
    from planner.train.loop import eval_loss

    model = planner.load(folder, "cpu", torch.float32, **({"adapter": adapter} if adapter is not None else {}))
    # batches of 8: QuantLinear dequantizes its weight once per forward
    with_adapter = eval_loss(model, blocks, batch_size=8)
    with torch.no_grad():
        logits = model(blocks[:1]).logits[0].float()
    bare = None
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            bare = eval_loss(model, blocks, batch_size=8)
    return with_adapter, bare, logits


def build_planned(peer: str, root: Path, seq_len: int, trials: int) -> tuple[Path, float | None]:
    """The planner's own GGUF plan (``--quant gguf``, every type on the menu, llama.cpp's serving
    memory at ``seq_len``) at the memory of ``peer``'s choices without adapter (the same estimate:
    so its backbone plus f16 adapters take at most the peer's backbone bytes), materialized like
    :func:`build_ours`. ROOT/planned-PEER is reused when an earlier run left it (seconds None)."""
    name = f"planned-{peer}"
    if (root / name / "gguf" / "model.gguf").is_file():
        return root / name, None
    types = PLANNED_AT[peer]
    source = resolve(MODEL)
    run = RunSettings(mode="inference", engine="llama.cpp", seq_len=seq_len)
    choices = {t.name: LayerChoice(BITS[types[t.name.rsplit(".", 1)[-1]]], 0, types[t.name.rsplit(".", 1)[-1]], 32)
               for t in source.targets()}
    budget = plan_from_choices(source, choices, run).estimate.total_bytes
    start = time.perf_counter()
    argv = ["--model", MODEL, "--budget", str(budget), "--quant", "gguf", "--bits", "2,3,4,6,8", "--mode", "inference",
            "--seq-len", str(seq_len), "--trials", str(trials), "--out", str(root / f"{name}.json")]
    cli(argv)
    argv = ["materialize", str(root / f"{name}.json"), "--out", str(root / name), "--format", "gguf",
            "--non-target-dtype", "fp32", "--device", "cpu"]
    cli(argv)
    return root / name, time.perf_counter() - start


def finetuned(folder: Path, steps: int, seq_len: int) -> Path | None:
    """``python -m planner finetune DIR --steps N`` (train split, seed 0) into DIR/ft: the trained
    adapter as PEFT and as adapter.gguf; None when the plan has no adapter to train."""
    out = folder / f"ft-{steps}"
    if (out / "adapter.gguf").is_file():
        return out
    if not (folder / "gguf" / "adapter.gguf").is_file():
        return None
    argv = ["finetune", str(folder), "--steps", str(steps), "--seq-len", str(seq_len), "--device", "cpu",
            "--out", str(out), "--force"]
    cli(argv)
    return out


def peer_finetuned(peer: Path, rank: int, steps: int, seq_len: int, root: Path) -> Path:
    """QLoRA's recipe on llama.cpp's own file: a rank-``rank`` LoRA with PEFT's default init (B = 0)
    on every target layer of ``peer`` (its dequantized weights kept in bf16 for training: 0.1 % of
    Q4_0's own error), ``python -m planner finetune --steps N`` as for our plans, the trained
    adapter written as adapter.gguf against the peer's own tensors. Returns the fine-tune folder."""
    folder = root / f"{peer.stem}-lora{rank}"
    out = folder / f"ft-{steps}"
    if (out / "adapter.gguf").is_file():
        return out
    source = resolve(str(peer))
    choices = {t.name: LayerChoice(16, rank) for t in source.targets()}
    plan = save_plan(plan_from_choices(source, choices, RunSettings(device="cpu", seq_len=seq_len)),
                     root / f"{folder.name}.json")
    for argv in (["materialize", str(plan), "--out", str(folder), "--format", "gguf", "--non-target-dtype", "fp32",
                  "--device", "cpu", "--model", str(peer), "--force"],
                 ["finetune", str(folder), "--steps", str(steps), "--seq-len", str(seq_len), "--device", "cpu",
                  "--out", str(out), "--force"]):
        cli(argv)
    return out


# ---------------------------------------------------------------- llama.cpp
def llama_nll(model_path: Path, blocks: torch.Tensor, threads: int, lora: Path | None = None) -> tuple[float, np.ndarray]:
    """llama.cpp's mean next-token nll over ``blocks`` [n, seq] (each block evaluated from an empty
    KV cache, the ids exactly as given) and the logits of block 0 [seq, vocab]."""
    seq = int(blocks.shape[1])
    llm = llama_cpp.Llama(str(model_path), lora_path=str(lora) if lora else None, logits_all=True, n_ctx=seq,
                          n_batch=seq, n_ubatch=seq, n_threads=threads, n_threads_batch=threads, verbose=False)
    total, count, first = 0.0, 0, None
    try:
        for row in blocks.tolist():
            llm.reset()
            llm.eval(row)
            logits = np.array(llm.scores[:seq], dtype=np.float64)
            if first is None:
                first = logits.astype(np.float32)
            pred = logits[:-1]
            top = pred.max(axis=1, keepdims=True)
            lse = top[:, 0] + np.log(np.exp(pred - top).sum(axis=1))
            total += float((lse - pred[np.arange(seq - 1), row[1:]]).sum())
            count += seq - 1
    finally:
        llm.close()
    return total / count, first


def write_f32_base(base_path: Path, out: Path) -> Path:
    """The base GGUF with every block weight matrix dequantized to F32 (rows in llama.cpp's order, as
    stored); the token embedding, norms and metadata as stored. llama.cpp's quantizer input."""
    import gguf

    base = Base(base_path)
    writer = base.writer()
    base.copy_metadata(writer)
    data = []
    for t in base.reader.tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2 and t.tensor_type != gguf.GGMLQuantizationType.F32:
            shape = tuple(int(d) for d in reversed(t.shape))
            writer.add_tensor_info(t.name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
            data.append((t.name, lambda t=t: np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type),
                                                                 dtype=np.float32)))
        else:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)
            data.append((t.name, lambda t=t: t.data))
    return _write(out, writer, data)


def llama_quantize(src: Path, out: Path, ftype: int, overrides: dict[str, int], threads: int) -> Path:
    """llama.cpp's quantizer: every block tensor in ``ftype``'s type unless a regex of ``overrides``
    names it; token embedding and output in Q8_0 (the base's, copied)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.ftype, params.pure = threads, ftype, True
    params.token_embedding_type = params.output_tensor_type = llama_cpp.GGML_TYPE_Q8_0
    keep = []
    if overrides:
        table = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, qtype) in enumerate(overrides.items()):
            keep.append(pattern.encode())
            table[i].pattern, table[i].type = keep[-1], qtype
        table[len(overrides)].pattern = None
        params.tt_overrides = table
    tmp = out.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize failed for {out.name}")
    os.replace(tmp, out)
    return out


def tensor_types(path: Path) -> dict[str, int]:
    """GGML type name -> number of block weight matrices of that type in a GGUF."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def reference_check(theirs: float, their_logits: np.ndarray, blocks: torch.Tensor) -> dict[str, Any]:
    """llama.cpp on the F32-target file against transformers on the packaged GGUF (fp32, the weights
    every plan starts from): how far llama.cpp's own arithmetic (activations rounded to 8 bits for its
    quantized matmuls, the Q8_0 head, an f16 KV cache) moves perplexity with no export involved."""
    from transformers import AutoModelForCausalLM

    from planner.train.loop import eval_loss

    path = packaged_gguf(MODEL)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    mine = eval_loss(ref, blocks, batch_size=8)
    with torch.no_grad():
        logits = ref(blocks[:1]).logits[0].float().numpy()
    return {"plan": "F32 targets vs transformers (no export)", "ppl_llamacpp": math.exp(theirs),
            "ppl_ours": math.exp(mine), "ratio": math.exp(theirs - mine), "ppl_llamacpp_no_adapter": math.exp(theirs),
            "ppl_ours_no_adapter": math.exp(mine), "ratio_no_adapter": math.exp(theirs - mine),
            "max_abs_logit_diff_block0": float(np.abs(their_logits - logits).max()),
            "max_abs_logit_block0": float(np.abs(logits).max()), "within_1pct": abs(math.exp(theirs - mine) - 1) < 0.01}


# ---------------------------------------------------------------- the run
def test_blocks(folder: Path, n_blocks: int, seq_len: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder / "backbone"))
    test = load_corpus(CorpusConfig(source="pydoc", seed=0)).test
    return token_blocks(tok, test, seq_len, max_tokens=n_blocks * seq_len)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(), time.perf_counter() - start


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    rows, checks, blocks = [], [], None
    builds = [(name, lambda name=name: build_ours(name, root, args.seq_len)) for name in args.ours]
    builds += [(f"planned at {peer}'s memory", lambda peer=peer: build_planned(peer, root, args.seq_len, args.trials))
               for peer in args.planned]
    for name, build in builds:
        folder, build_s = build()
        if blocks is None:
            blocks = test_blocks(folder, args.blocks, args.seq_len)
        model, adapter = folder / "gguf" / "model.gguf", folder / "gguf" / "adapter.gguf"
        has_adapter = adapter.is_file()
        (mine, mine_bare, my_logits), t_ours = timed(lambda: ours_nll(folder, blocks))
        (theirs, their_logits), t_llama = timed(lambda: llama_nll(model, blocks, args.threads,
                                                                  adapter if has_adapter else None))
        theirs_bare = llama_nll(model, blocks, args.threads)[0] if has_adapter else theirs
        mine_bare = mine if mine_bare is None else mine_bare
        diff = float(np.abs(their_logits - my_logits.numpy()).max())
        check = {"plan": name, "ppl_llamacpp": math.exp(theirs), "ppl_ours": math.exp(mine),
                 "ratio": math.exp(theirs - mine), "ppl_llamacpp_no_adapter": math.exp(theirs_bare),
                 "ppl_ours_no_adapter": math.exp(mine_bare), "ratio_no_adapter": math.exp(theirs_bare - mine_bare),
                 "max_abs_logit_diff_block0": diff, "max_abs_logit_block0": float(my_logits.abs().max()),
                 "within_1pct": abs(math.exp(theirs - mine) - 1) < 0.01 and abs(math.exp(theirs_bare - mine_bare) - 1) < 0.01,
                 "materialize_s": build_s and round(build_s, 1), "ours_eval_s": round(t_ours, 1), "llamacpp_eval_s": round(t_llama, 1)}
        ft = finetuned(folder, args.finetune_steps, args.seq_len) if args.finetune_steps else None
        if ft is not None:  # the same short fine-tune, then each side runs the trained adapter
            check["ppl_llamacpp_finetuned"] = math.exp(llama_nll(model, blocks, args.threads, ft / "adapter.gguf")[0])
            check["ppl_ours_finetuned"] = math.exp(ours_nll(folder, blocks, ft)[0])
            check["finetune_steps"] = args.finetune_steps
        checks.append(check)
        size = model.stat().st_size
        extra = adapter.stat().st_size if has_adapter else 0
        rows.append({"name": f"ours {name} (LoftQ)", "model_bytes": size, "adapter_bytes": extra,
                     "total_bytes": size + extra, "ppl_llamacpp": check["ppl_llamacpp"],
                     "ppl_llamacpp_no_adapter": check["ppl_llamacpp_no_adapter"],
                     "ppl_llamacpp_finetuned": check.get("ppl_llamacpp_finetuned"), "types": tensor_types(model)})
        print(json.dumps(check), flush=True)
    if args.peer:
        src = write_f32_base(packaged_gguf(MODEL), root / "smollm2-f32.gguf")
        for label, (ftype, overrides) in PEERS.items():
            out = llama_quantize(src, root / f"peer-{ftype}-{len(overrides)}.gguf", ftype, overrides, args.threads)
            nll, _ = llama_nll(out, blocks, args.threads)
            rows.append({"name": label, "model_bytes": out.stat().st_size, "adapter_bytes": 0,
                         "total_bytes": out.stat().st_size, "ppl_llamacpp": math.exp(nll),
                         "ppl_llamacpp_no_adapter": math.exp(nll), "types": tensor_types(out)})
            if args.finetune_steps and args.peer_lora_rank:
                ft = peer_finetuned(out, args.peer_lora_rank, args.finetune_steps, args.seq_len, root)
                extra = (ft / "adapter.gguf").stat().st_size
                rows.append({**rows[-1], "name": f"{label} + LoRA r{args.peer_lora_rank} (default init)",
                             "adapter_bytes": extra, "total_bytes": rows[-1]["model_bytes"] + extra,
                             "ppl_llamacpp_finetuned": math.exp(llama_nll(out, blocks, args.threads,
                                                                          ft / "adapter.gguf")[0])})
            print(json.dumps(rows[-1]), flush=True)
        nll, their_logits = llama_nll(src, blocks, args.threads)
        rows.append({"name": "F32 targets (the dequantized Q4_1 weights)", "model_bytes": src.stat().st_size,
                     "adapter_bytes": 0, "total_bytes": src.stat().st_size, "ppl_llamacpp": math.exp(nll),
                     "ppl_llamacpp_no_adapter": math.exp(nll), "types": tensor_types(src)})
        checks.append(reference_check(nll, their_logits, blocks))
        print(json.dumps(checks[-1]), flush=True)
    return {"checks": checks, "rows": rows, "tokens": {"blocks": int(blocks.shape[0]), "seq_len": int(blocks.shape[1]),
                                                       "split": "pydoc test, seed 0", "bos": "none"}}


def table(result: dict[str, Any]) -> str:
    lines = ["| file | model MB | adapter MB | total MB | ppl (llama.cpp) | ppl without adapter | after fine-tune |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: r["total_bytes"]):
        ft = r.get("ppl_llamacpp_finetuned")
        lines.append(f"| {r['name']} | {r['model_bytes'] / 1e6:.1f} | {r['adapter_bytes'] / 1e6:.1f} | "
                     f"{r['total_bytes'] / 1e6:.1f} | {r['ppl_llamacpp']:.3f} | {r['ppl_llamacpp_no_adapter']:.3f} | "
                     f"{'–' if ft is None else f'{ft:.3f}'} |")
    lines += ["", "| plan | ppl llama.cpp | ppl ours | ratio | no adapter: llama.cpp / ours | ratio | max abs logit diff |",
              "|---|---|---|---|---|---|---|"]
    for c in result["checks"]:
        lines.append(f"| {c['plan']} | {c['ppl_llamacpp']:.4f} | {c['ppl_ours']:.4f} | {c['ratio']:.4f} | "
                     f"{c['ppl_llamacpp_no_adapter']:.4f} / {c['ppl_ours_no_adapter']:.4f} | "
                     f"{c['ratio_no_adapter']:.4f} | {c['max_abs_logit_diff_block0']:.3g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ours", default="mix_r16,q4_0_r8", help=f"comma-separated plans of {', '.join(OURS)}")
    ap.add_argument("--planned", default="", help="also the planner's own --quant gguf plan at the memory of each "
                    f"of these layouts without adapter (comma-separated, of {', '.join(PLANNED_AT)})")
    ap.add_argument("--trials", type=int, default=8, help="Optuna trials of --planned")
    ap.add_argument("--finetune-steps", type=int, default=0, help="also evaluate every plan with an adapter after "
                    "`python -m planner finetune DIR --steps N` (0: off)")
    ap.add_argument("--peer-lora-rank", type=int, default=0, help="with --finetune-steps: also fine-tune a LoRA of "
                    "this rank (PEFT's default init) on each of llama.cpp's files the same way (0: off)")
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peer", dest="peer", action="store_false", help="skip llama.cpp's own quantizer")
    ap.add_argument("--work", default=None, help="keep the built folders and GGUFs here and reuse those already "
                    "there (default: a temporary folder)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.ours = [n.strip() for n in args.ours.split(",") if n.strip()]
    args.planned = [n.strip() for n in args.planned.split(",") if n.strip()]
    unknown = [n for n in args.ours if n not in OURS]
    if unknown:
        ap.error(f"unknown plan {unknown[0]}; known: {', '.join(OURS)}")
    unknown = [n for n in args.planned if n not in PLANNED_AT]
    if unknown:
        ap.error(f"unknown --planned {unknown[0]}; known: {', '.join(PLANNED_AT)}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("LOFTQ_PLANNER_CACHE", "/tmp/cache-llama")
    start, load_before = time.perf_counter(), os.getloadavg()
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        result = run(args, Path(args.work))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as tmp:
            result = run(args, Path(tmp))
    result.update({"wall_s": round(time.perf_counter() - start, 1), "threads": args.threads,
                   "llama_cpp_python": llama_cpp.__version__, "loadavg_1m_before": load_before[0],
                   "loadavg_1m_after": os.getloadavg()[0],
                   "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()})
    if args.out:
        atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps(result, indent=2) if args.json else table(result))
    print(f"wall {result['wall_s']} s; {result['uptime']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

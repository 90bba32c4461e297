"""The planner against llama.cpp *with an importance matrix* at equal bytes, refereed by llama.cpp's
own tools (issue 28, parts 4 and 6): PPL and KL divergence against bytes, on two texts.

On the packaged SmolLM2 (its Q4_1 GGUF, ``M``), with the tools of ``bench/build_llamacpp_tools.sh``
(``W`` = the work folder, ``CTX`` = ``--ctx``, 512 by default):

1. texts: ``W/calib.txt`` = the planner's own calibration tokens (the first 16 x 256 of the pydoc
   train split, decoded, one block more so that llama's tokenizer still finds 16 chunks);
   ``W/test.txt`` = the pydoc test split; ``W/ood.txt`` = bench/texts (sha256-verified);
2. the reference: ``llama-quantize --allow-requantize M W/ref-f32.gguf F32`` (the shipped weights
   dequantized) and ``llama-perplexity -m W/ref-f32.gguf -f W/TEXT.txt -c CTX --kl-divergence-base
   W/TEXT.kld`` (its logits);
3. ``llama-imatrix -m M -f W/calib.txt -o W/imatrix.gguf -c 256 --chunks 16 --no-ppl``;
4. peers: ``llama-quantize --allow-requantize --imatrix W/imatrix.gguf --token-embedding-type q8_0
   M W/peer-R.gguf R`` per recipe R (q8_0: the base's own embedding type, which our model.gguf
   copies, so only the 210 target tensors differ); the effective types from its log;
5. ours at each peer's bytes: ``python -m planner --budget B --quant gguf --mode inference --engine
   llama.cpp --seq-len CTX --adapter-dtype fp16`` (every other option at the planner's default),
   where B is the planner's own llama.cpp memory model of the peer's target bytes less
   ``SLACK`` (the adapter file's header), then ``python -m planner materialize --format gguf``;
   With ``--ablate-bits 2,3,4,6,8`` the planner also plans at ``--ablate-recipes``' bytes with that
   menu (no q5_1, which reproduces the shipped Q4_1 blocks exactly): how much of the margin that is;
6. every file: ``llama-perplexity -m FILE [--lora adapter.gguf] --kl-divergence-base W/TEXT.kld
   --kl-divergence -c CTX``: PPL, mean KLD with the tool's ±, its 99th percentile, both texts.

Writes ``--out`` (JSON, every command as run), ``--plot`` (mean KLD against model + adapter bytes)
and, with ``--fallbacks FILE``, the quantize logs' lines for blocks 0 and 3 (the test fixture of
tests/loftq/test_llamacpp_fallbacks.py). Each step's output in ``W`` is reused by a rerun.

    python -m bench.llamacpp_frontier --work DIR [--recipes Q3_K_M,Q4_K_M,Q5_K_M] [--plan-recipes ...]
        [--ctx 512] [--threads 2] [--out bench/results/llamacpp_frontier.json] [--plot ...png]
        [--fallbacks tests/loftq/data/llama_quantize_fallbacks.txt]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.llamacpp_report import plot, table, verdicts
from bench.llamacpp_tools import (ROOT, built_commit, effective_types, kld_stats, missing_tools,
                                  perplexity_final, quantize_log_tensors, run_tool, types_by_module)

RECIPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ3_XXS", "IQ4_XS", "Q4_K_M", "Q5_K_M", "Q6_K")
TEXTS = ("test", "ood")
MODEL = "smollm2-135m"
SLACK = 64 * 1024  # bytes kept free for adapter.gguf's header and tensor padding
FIXTURE_BLOCKS = re.compile(r"(\]|warning:) +blk\.(0|3)\.")


def cached(path: Path, step: Any) -> dict[str, Any]:
    """``step()``'s JSON result, kept in ``path`` so a rerun skips it."""
    if path.is_file():
        return json.loads(path.read_text())
    result = step()
    path.write_text(json.dumps(result, indent=1))
    return result


def write_texts(work: Path) -> dict[str, Path]:
    from bench.evaluation import ood_text
    from planner.artifact.records import DEFAULT_CALIB_SEQ_LEN, DEFAULT_CALIB_SEQS
    from planner.scoring.moments import calibration_blocks
    from planner.sources import resolve
    from planner.train.data import CorpusConfig, load_corpus

    paths = {name: work / f"{name}.txt" for name in ("calib", *TEXTS)}
    if not all(p.is_file() for p in paths.values()):
        source = resolve(MODEL)
        blocks, _ = calibration_blocks(source, None, DEFAULT_CALIB_SEQS + 1, DEFAULT_CALIB_SEQ_LEN)
        paths["calib"].write_text(source.tokenizer().decode(blocks.flatten().tolist()))
        paths["test"].write_text(load_corpus(CorpusConfig(source="pydoc", seed=0)).test.text)
        paths["ood"].write_text(ood_text().text)
    return paths


def reference(work: Path, model: Path, texts: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """The f32 reference file and, per text, its PPL and the logits every KLD is measured against."""
    ref = work / "ref-f32.gguf"

    def quantize() -> dict[str, Any]:
        r = run_tool("llama-quantize", "--allow-requantize", model, ref, "F32", args.threads, rel=work)
        return {"command": r.command, "seconds": r.seconds}

    out = {"file": ref.name, **cached(work / "ref-f32.json", quantize), "bytes": ref.stat().st_size}
    for text in TEXTS:
        def base(text: str = text) -> dict[str, Any]:
            r = run_tool("llama-perplexity", "-m", ref, "-f", texts[text], "-c", args.ctx, "-t", args.threads,
                         "--kl-divergence-base", work / f"{text}.kld", rel=work)
            return {**perplexity_final(r.log), "command": r.command, "seconds": r.seconds}
        out[text] = cached(work / f"ref-{text}.json", base)
    return out


def imatrix(work: Path, model: Path, calib: Path, args: argparse.Namespace) -> dict[str, Any]:
    from planner.artifact.records import DEFAULT_CALIB_SEQ_LEN, DEFAULT_CALIB_SEQS

    def step() -> dict[str, Any]:
        r = run_tool("llama-imatrix", "-m", model, "-f", calib, "-o", work / "imatrix.gguf", "-c",
                     DEFAULT_CALIB_SEQ_LEN, "--chunks", DEFAULT_CALIB_SEQS, "--no-ppl", "-t", args.threads, rel=work)
        return {"command": r.command, "seconds": r.seconds}
    return {"file": "imatrix.gguf", **cached(work / "imatrix.json", step)}


def gguf_targets(path: Path) -> tuple[int, list[tuple[str, str]]]:
    """(bytes, [(name, type)]) of the block weight matrices of a GGUF file (the 210 targets)."""
    import gguf

    total, named = 0, []
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            total += int(t.n_bytes)
            named.append((t.name, t.tensor_type.name.lower()))
    return total, named


def embedding_type(model: Path) -> str:
    """The base's token-embedding type (the packaged SmolLM2 "Q4_1" file keeps it in q8_0), which
    our model.gguf copies: the peers get it too, so only the target tensors differ."""
    import gguf

    return next(t.tensor_type.name.lower() for t in gguf.GGUFReader(str(model)).tensors if t.name == "token_embd.weight")


def peer(work: Path, model: Path, recipe: str, args: argparse.Namespace) -> dict[str, Any]:
    """llama.cpp's recipe with the imatrix; its effective types as its quantize log states them."""
    out, log = work / f"peer-{recipe}.gguf", work / f"peer-{recipe}.log"
    if not (out.is_file() and log.is_file()):
        run_tool("llama-quantize", "--allow-requantize", "--imatrix", work / "imatrix.gguf", "--token-embedding-type",
                 embedding_type(model), model, out, recipe, args.threads, rel=work, log_path=log)
    text = log.read_text()
    target_bytes, stored = gguf_targets(out)
    tensors = quantize_log_tensors(text)
    return {"recipe": recipe, "kind": "llama.cpp + imatrix", "file": out.name, "model_bytes": out.stat().st_size,
            "adapter_bytes": 0, "total_bytes": out.stat().st_size, "target_bytes": target_bytes,
            "types": effective_types(tensors), "types_in_file": dict(Counter(t for _, t in stored).most_common()),
            "by_module": types_by_module([(t.name, t.stored) for t in tensors]),
            "fallbacks": sum(t.requested is not None for t in tensors), "command": text.splitlines()[0][2:]}


def budget_for(target_bytes: int, ctx: int) -> tuple[int, Any]:
    """The ``--budget`` whose allocatable bytes are the fixed llama.cpp terms plus ``target_bytes``
    less SLACK (the planner's own memory model, as the plan command builds it), and its RunSettings."""
    from planner.memory import fixed_bytes
    from planner.overheads import reserve_bytes
    from planner.settings import RunSettings
    from planner.sources import resolve

    source = resolve(MODEL)
    run = RunSettings(mode="inference", engine="llama.cpp", seq_len=ctx, adapter_dtype="fp16")
    targets = source.targets()
    allocated = fixed_bytes(source.facts, targets, run, source.non_target_params(targets)) + target_bytes - SLACK
    return allocated + reserve_bytes(allocated, run), run


def planner_cli(argv: list[str], work: Path, log: Path) -> dict[str, Any]:
    """``python -m planner ARGV`` as a child process (its log in ``log``); the command and wall time."""
    start = time.perf_counter()
    with open(log, "w") as fh:
        done = subprocess.run([sys.executable, "-m", "planner", *argv], stdout=fh, stderr=subprocess.STDOUT)
    command = "python -m planner " + " ".join(a.replace(str(work) + "/", "") for a in argv)
    seconds = round(time.perf_counter() - start, 1)
    print(f"$ {command}  -> exit {done.returncode}, {seconds} s", flush=True)
    if done.returncode:
        raise SystemExit(f"python -m planner failed (exit {done.returncode}); see {log}")
    return {"command": command, "seconds": seconds}


def ours_name(recipe: str, bits: str | None = None) -> str:
    """The plan's file stem and folder name in the work folder."""
    return f"ours-{recipe}" + (f"-bits{bits.replace(',', '')}" if bits else "")


def ours(work: Path, peer_row: dict[str, Any], args: argparse.Namespace, bits: str | None = None) -> dict[str, Any]:
    """The planner's plan at the peer's bytes, materialized for llama.cpp (with ``bits``: that ``--bits``
    menu instead of the default, an ablation row of kind ``planner --bits BITS``)."""
    recipe = peer_row["recipe"]
    name = ours_name(recipe, bits)
    plan, folder = work / f"{name}.json", work / name
    budget, _ = budget_for(peer_row["target_bytes"], args.ctx)
    plan_argv = ["--model", MODEL, "--budget", str(budget), "--quant", "gguf", "--mode", "inference", "--engine",
                 "llama.cpp", "--seq-len", str(args.ctx), "--adapter-dtype", "fp16", "--out", str(plan)]
    plan_argv += ["--bits", bits] if bits else []
    build_argv = ["materialize", str(plan), "--out", str(folder), "--format", "gguf", "--force"]
    steps = [cached(work / f"{name}.{step}.json", lambda argv=argv, step=step: planner_cli(
        argv, work, work / f"{name}.{step}.log")) for step, argv in (("plan", plan_argv), ("build", build_argv))]
    model, adapter = folder / "gguf" / "model.gguf", folder / "gguf" / "adapter.gguf"
    layers = json.loads(plan.read_text())["layers"]
    extra = adapter.stat().st_size if adapter.is_file() else 0
    target_bytes, stored = gguf_targets(model)
    return {"recipe": recipe, "kind": f"planner --bits {bits}" if bits else "planner", "file": str(model.relative_to(work)),
            "adapter": str(adapter.relative_to(work)) if extra else None, "budget": budget,
            "model_bytes": model.stat().st_size, "adapter_bytes": extra, "total_bytes": model.stat().st_size + extra,
            "target_bytes": target_bytes, "types": dict(Counter(t for _, t in stored).most_common()),
            "by_module": types_by_module(stored), "adapters": sum(1 for la in layers if la["rank"] > 0),
            "ranks_by_module": {m: dict(Counter(la["rank"] for la in layers if la["name"].endswith("." + m)))
                                for m in sorted({la["name"].rsplit(".", 1)[-1] for la in layers})}, "fits_peer": model.stat().st_size + extra <= peer_row["total_bytes"],
            "commands": [s["command"] for s in steps], "seconds": [s["seconds"] for s in steps]}


def evaluate(work: Path, row: dict[str, Any], texts: dict[str, Path], args: argparse.Namespace) -> None:
    """llama-perplexity's PPL and KLD against the reference on each text, into ``row[text]``."""
    name = Path(row["file"]).parts[0].removesuffix(".gguf")
    for text in TEXTS:
        def step(text: str = text) -> dict[str, Any]:
            lora = ["--lora", work / row["adapter"]] if row.get("adapter") else []
            r = run_tool("llama-perplexity", "-m", work / row["file"], *lora, "-f", texts[text], "--kl-divergence-base",
                         work / f"{text}.kld", "--kl-divergence", "-c", args.ctx, "-t", args.threads, rel=work)
            return {**kld_stats(r.log), "command": r.command, "seconds": r.seconds,
                    "loadavg_1m": round(os.getloadavg()[0], 2)}
        row[text] = cached(work / f"eval-{name}-{text}.json", step)


def evaluated(work: Path, name: str) -> bool:
    return all((work / f"eval-{name}-{text}.json").is_file() for text in TEXTS)


def write_fallbacks(work: Path, recipes: list[str], path: Path) -> None:
    """The quantize logs' per-tensor lines of blocks 0 and 3 (whitespace collapsed): the fixture of
    tests/loftq/test_llamacpp_fallbacks.py, with a header naming the tool and the command."""
    lines = [f"# llama-quantize of llama.cpp {built_commit()} (llama-cpp-python 0.3.36's vendored source, "
             "bench/build_llamacpp_tools.sh) on the packaged SmolLM2-135M-Instruct.Q4_1.gguf",
             "# written by python -m bench.llamacpp_frontier --fallbacks: per recipe ('== R'), its command, the",
             "# lines of blocks 0 and 3 (its fallback warnings, then each tensor's 'converting to') and the fallback count"]
    for recipe in recipes:
        log = (work / f"peer-{recipe}.log").read_text().splitlines()
        command = log[0][2:].replace(str(work) + "/", "").split()
        lines += [f"== {recipe}", "# " + " ".join(Path(a).name if a.endswith(".gguf") else a for a in command)]
        for line in log[1:]:
            line = " ".join(line.split())
            if "required fallback quantization" in line or FIXTURE_BLOCKS.search(line) and "warning:" in line:
                lines.append(line)
            elif FIXTURE_BLOCKS.search(line) and "converting to" in line:  # the size after it is not needed
                lines.append(line[:line.index(" .. ") + 3])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from planner.sources.packaged import packaged_gguf

    work, model = args.work, packaged_gguf(MODEL)
    texts = write_texts(work)
    result: dict[str, Any] = {"llama_cpp": built_commit(), "model": str(model.name), "ctx": args.ctx,
                              "threads": args.threads, "slack_bytes": SLACK, "reference": reference(work, model, texts, args),
                              "imatrix": imatrix(work, model, texts["calib"], args), "rows": []}
    peers = {r: peer(work, model, r, args) for r in args.recipes}
    if args.fallbacks:
        write_fallbacks(work, args.recipes, args.fallbacks)
    # the recipes with a plan first: a run cut short still has whole pairs
    for recipe in args.plan_recipes + [r for r in args.recipes if r not in args.plan_recipes]:
        if args.stage != "plans" and not (args.report_only and not evaluated(work, f"peer-{recipe}")):
            evaluate(work, peers[recipe], texts, args)
            result["rows"].append(peers[recipe])
            print(json.dumps({k: peers[recipe][k] for k in ("recipe", "total_bytes", "types")}), flush=True)
        if args.stage != "peers" and recipe in args.plan_recipes and not (
                args.report_only and not evaluated(work, ours_name(recipe))):
            row = ours(work, peers[recipe], args)
            evaluate(work, row, texts, args)
            result["rows"].append(row)
            print(json.dumps({k: row[k] for k in ("recipe", "total_bytes", "types", "adapters")}), flush=True)
    for recipe in args.ablate_recipes if args.stage != "peers" and args.ablate_bits else ():
        if not (args.report_only and not evaluated(work, ours_name(recipe, args.ablate_bits))):
            row = ours(work, peers[recipe], args, bits=args.ablate_bits)
            evaluate(work, row, texts, args)
            result["rows"].append(row)
            print(json.dumps({k: row[k] for k in ("recipe", "kind", "total_bytes", "types", "adapters")}), flush=True)
    result["verdicts"] = verdicts(result["rows"])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for every file; a rerun reuses what is there")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="llama-quantize recipes (peers)")
    ap.add_argument("--plan-recipes", default="Q3_K_M,Q4_K_M,Q5_K_M", help="recipes at whose bytes the planner plans")
    ap.add_argument("--ablate-bits", default=None, help="also plan with this --bits menu (e.g. 2,3,4,6,8: no q5_0/q5_1/"
                    "q5_k) at --ablate-recipes' bytes: rows of kind 'planner --bits BITS', outside the verdicts")
    ap.add_argument("--ablate-recipes", default="Q3_K_M,Q4_K_M", help="recipes at whose bytes --ablate-bits plans")
    ap.add_argument("--ctx", type=int, default=512, help="llama-perplexity -c (it scores the second half of each window)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "llamacpp_frontier.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "bench" / "results" / "llamacpp_frontier.png")
    ap.add_argument("--fallbacks", type=Path, default=None, help="also write the fallback fixture here")
    ap.add_argument("--stage", choices=("all", "peers", "plans"), default="all",
                    help="peers: evaluate llama.cpp's files only; plans: build and evaluate ours only (two processes)")
    ap.add_argument("--report-only", action="store_true", help="report the files already evaluated in --work; run nothing new")
    args = ap.parse_args(argv)
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    args.plan_recipes = [r.strip() for r in args.plan_recipes.split(",") if r.strip()]
    args.ablate_recipes = [r.strip() for r in args.ablate_recipes.split(",") if r.strip()]
    if unknown := [r for r in args.plan_recipes + args.ablate_recipes if r not in args.recipes]:
        ap.error(f"--plan-recipes/--ablate-recipes {unknown[0]} is not among --recipes")
    if problem := missing_tools():
        print(f"bench.llamacpp_frontier: {problem}", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LOFTQ_PLANNER_CACHE", str(args.work / "cache"))
    start, uptime = time.perf_counter(), subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    result = run(args)
    result.update({"wall_s": round(time.perf_counter() - start, 1), "uptime_before": uptime,
                   "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()})
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.plot)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

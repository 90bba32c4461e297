"""The ``materialize``, ``finetune`` and ``verify`` commands (registered in :data:`planner.cli.app.COMMANDS`).

    python -m planner materialize PLAN --out DIR [--iters T] [--force] [--device D] [--format hf-bnb]
    python -m planner finetune DIR [--data FILE] [--steps N] [--lr LR] [--out ADAPTER_DIR] [--json]
    python -m planner verify DIR [--steps N] [--json]

Options come from config dataclasses: :class:`~planner.build.materialize.MaterializeConfig`,
:class:`~planner.train.loop.FinetuneConfig`, :class:`~planner.search.config.VerifyConfig`, and each
command's output options below. Output folders are checked before any work. Bad input: one line on
stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from planner.budget import format_bytes
from planner.cli import preflight
from planner.cli.app import COMMANDS, Command
from planner.cli.flags import Report, add_options, config_from, user_config
from planner.verify.report import VerifyConfig
from planner.errors import PlannerError
from planner.files.atomic import sweep_temps
from planner.options import option
from planner.train.loop import FinetuneConfig
from planner.build.gguf_export import adapter_dtype_option
from planner.build.materialize import MaterializeConfig
from planner.progress import stdout_console
from planner.settings import TRAINERS

DEFAULT_FINETUNED = "finetuned-adapter"  # inside DIR unless --out says otherwise


@dataclass(frozen=True)
class MaterializeOutput:
    out: str = option(MISSING, "folder to create (refused if it exists, unless --force; a symlink, file or "
                      "device there is always refused)")
    json: bool = option(False, "print a JSON summary")


@dataclass(frozen=True)
class FinetuneOutput:
    out: str | None = option(None, f"adapter folder to write (default: DIR/{DEFAULT_FINETUNED}); with a llama.cpp "
                             "export in DIR (materialize --format gguf) it also holds adapter.gguf")
    force: bool = option(False, "replace an existing --out folder")
    gguf_adapter_dtype: str = adapter_dtype_option()
    json: bool = option(False, "print a JSON summary")


# ---------------------------------------------------------------- materialize
def _materialize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", help="a plan.json written by `python -m planner`")
    add_options(p, MaterializeOutput)
    add_options(p, MaterializeConfig)


def materialize_command(args: argparse.Namespace) -> int:
    from planner.build.materialize import materialize
    from planner.scoring.moments import plan_moments

    cfg, io = config_from(MaterializeConfig, args), config_from(MaterializeOutput, args)
    result = materialize(args.plan, io.out, cfg, moments=plan_moments)  # checks --out before any work
    layers = result.plan.layers
    summary = {"out": str(result.path), "layers": len(layers), "computed": len(result.computed),
               "resumed": len(layers) - len(result.computed), "seconds": round(result.seconds, 2),
               "backbone_bytes": result.plan.created_with["materialize"]["backbone_bytes"],
               "mean_residual": sum(lay.residual or 0.0 for lay in layers) / len(layers)}
    if io.json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        stdout_console().print(f"materialized {summary['layers']} layers ({summary['resumed']} resumed) in "
                               f"{summary['seconds']} s: backbone {format_bytes(summary['backbone_bytes'])}, mean "
                               f"residual {summary['mean_residual']:.4f} -> {result.path}")
    return 0


# ---------------------------------------------------------------- finetune
def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a folder written by `materialize`")
    add_options(p, FinetuneOutput)
    add_options(p, FinetuneConfig)


def finetune_command(args: argparse.Namespace) -> int:
    cfg, io = config_from(FinetuneConfig, args), config_from(FinetuneOutput, args)
    out = preflight.output_dir(Path(io.out) if io.out else Path(args.dir) / DEFAULT_FINETUNED)
    preflight.finetune_io(args.dir, out, cfg.data)
    sweep_temps(args.dir)  # a killed finetune's half-built adapter folder (a live writer's is kept)
    if out.exists() and not io.force:
        raise PlannerError(f"{out} already exists; pass --force to replace it")
    result, model = run_finetune(args.dir, cfg)
    save_adapter(model, args.dir, out, io.gguf_adapter_dtype)
    summary = {"out": str(out), **result.to_dict()}
    if io.json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        first, last = result.train_losses[0], result.train_losses[-1]
        evals = ", ".join(f"step {s}: {v:.4f}" for s, v in result.eval_losses)
        stdout_console().print(f"{len(result.train_losses)} steps in {result.seconds:.1f} s; train loss {first:.4f} -> "
                               f"{last:.4f}; held-out loss {evals}; adapter -> {out}")
    return 0


def run_finetune(path: str | Path, cfg: FinetuneConfig) -> tuple[Any, Any]:
    """Load DIR, tokenize the train and val splits, train; returns (TrainResult, model)."""
    from transformers import AutoTokenizer

    from planner.train.data import CorpusConfig, load_corpus, token_blocks
    from planner.train.loop import train_lora
    from planner.artifact.layout import read_artifact
    from planner.runtime.load import load
    from planner.runtime.layers import configure_run

    art = read_artifact(path)
    run = art.run
    seq_len, batch = cfg.seq_len or run.seq_len, cfg.batch_size or run.batch_size
    from planner.verify.report import facts_of

    try:  # a hand-edited seq_len would allocate for a context the model does not have
        dataclasses.replace(run, seq_len=seq_len).check_model(facts_of(art), str(art.path))
    except ValueError as err:
        raise PlannerError(f"{path}: {err}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(art.backbone))
    except Exception as err:  # no or broken tokenizer files: the user's artifact, one line
        raise PlannerError(f"{art.backbone}: cannot load the tokenizer ({type(err).__name__})") from None
    corpus = load_corpus(user_config(CorpusConfig, source=cfg.data or "pydoc"))
    train = token_blocks(tokenizer, corpus.train, seq_len, max_tokens=seq_len * max(batch, cfg.steps * batch))
    val = token_blocks(tokenizer, corpus.val, seq_len, max_tokens=seq_len * cfg.eval_seqs)
    if train.shape[0] < batch:
        raise PlannerError(f"the train split has {train.shape[0]} blocks of {seq_len} tokens, fewer than a batch of {batch}")
    model = load(path, cfg.device)
    configure_run(model, run)
    result = train_lora(model, train, steps=cfg.steps, lr=cfg.lr, batch_size=batch, seed=cfg.seed, eval_blocks=val,
                        eval_every=cfg.eval_every, grad_clip=cfg.grad_clip, optimizer=run.optimizer)
    return result, model


def save_adapter(model: Any, path: str | Path, out: str | Path, gguf_adapter_dtype: str | None = None) -> Path:
    """The trained adapter as a PEFT folder (DIR/adapter's config, new weights): temp folder + rename;
    with DIR's llama.cpp export, also adapter.gguf in ``gguf_adapter_dtype`` (default f16)."""
    from peft import get_peft_model_state_dict

    from planner.build.adapter import write_trained_adapter

    return write_trained_adapter(Path(path), get_peft_model_state_dict(model), Path(out), gguf_adapter_dtype)


# ---------------------------------------------------------------- verify
def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a folder written by `materialize`")
    add_options(p, Report)
    add_options(p, VerifyConfig)


def verify_command(args: argparse.Namespace) -> int:
    from planner.verify.report import verify

    cfg = config_from(VerifyConfig, args)
    report = verify(args.dir, steps=cfg.steps, device=cfg.device, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                    trainer=cfg.trainer)
    if config_from(Report, args).json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=1) + "\n")
        return 0 if report.ok else 1
    table = Table(title=f"verify {args.dir}: {report.steps} steps on {report.device}, seq {report.run['seq_len']} x "
                        f"batch {report.run['batch_size']}")
    for col in ("term", "estimate", "measured", "ratio", "ok", "note"):
        table.add_column(col, justify="right" if col in ("estimate", "measured", "ratio") else "left")
    for r in report.rows:
        table.add_row(r.term, format_bytes(r.estimate) if r.estimate is not None else "-",
                      format_bytes(r.measured) if r.measured is not None else "-",
                      f"{r.ratio:.3f}" if r.ratio is not None else "-", {True: "yes", False: "NO", None: ""}[r.ok],
                      r.note)
    console = stdout_console()
    console.print(table)
    rss = report.info.get("rss_bytes")
    if rss:
        console.print(f"process RSS grew by {format_bytes(rss['growth'])} (information only)")
    console.print("all checked terms agree" if report.ok else "some checked terms differ by more than 5%")
    return 0 if report.ok else 1


COMMANDS["materialize"] = Command("build a plan: LoftQ per layer -> packed backbone + PEFT adapter folder",
                                  _materialize_args, materialize_command)
COMMANDS["finetune"] = Command("short LoRA fine-tune of a materialized model with held-out loss",
                               _finetune_args, finetune_command)
COMMANDS["verify"] = Command("measure the memory of a few training steps against the plan's estimate",
                             _verify_args, verify_command)

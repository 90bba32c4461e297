"""The ``imatrix`` command: the planner's calibration importance as a llama.cpp importance matrix.

    python -m planner imatrix --model M [--data TEXT] --out FILE [--format gguf|dat]

For every target layer, the diagonal of its input second moment H = X^T X / n over the calibration
sequences the plan command uses (``--data``, ``--calib-seqs`` x ``--calib-seq-len``, the same
defaults and the same moments cache), i.e. the per-column mean of x_j^2, written under llama.cpp's
GGUF tensor names by :func:`planner.sources.imatrix.write_imatrix` (GGUF, what ``llama-imatrix``
writes by default, or the legacy ``.dat``). One chunk per calibration sequence. Llama-family models
only (the name mapping). The file is written atomically and may not replace an input.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass
from pathlib import Path

from planner.cli import preflight
from planner.cli.app import COMMANDS, Command
from planner.cli.flags import add_options, config_from
from planner.errors import PlannerError
from planner.files.paths import Output, check_outputs
from planner.options import option
from planner.search.config import PlanConfig

# the plan command's options this one shares (their defaults and help are PlanConfig's)
SHARED = ("model", "data", "calib_seqs", "calib_seq_len", "target_modules", "score_device", "cache_dir",
          "trust_remote_code", "offline")
FORMATS = ("gguf", "dat")


@dataclass(frozen=True)
class ImatrixOutput:
    out: str = option(MISSING, "the imatrix file to write (refused if it is an input: the model, --data)")
    format: str = option("gguf", "gguf (what llama-imatrix writes by default) or dat (its legacy format)",
                         choices=FORMATS)


def _arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, ImatrixOutput)
    add_options(p, PlanConfig, only=SHARED)


def imatrix_command(args: argparse.Namespace) -> int:
    from planner.devices import resolve_device
    from planner.progress import stdout_console
    from planner.scoring.moments import calibration_importance
    from planner.search.prepare import source_and_targets
    from planner.sources.imatrix import gguf_tensor_name, write_imatrix

    cfg, io = config_from(PlanConfig, args), config_from(ImatrixOutput, args)
    out = preflight.output_file(io.out)
    check_outputs([Output(out, "--out")], preflight.plan_inputs(cfg))
    preflight.cache_dir(cfg)
    source, targets = source_and_targets(cfg)
    for t in targets:  # before the calibration pass: a model llama.cpp's names do not cover fails now
        try:
            gguf_tensor_name(t.name)
        except PlannerError:
            raise PlannerError(f"{cfg.model}: target {t.name} has no llama.cpp tensor name (the imatrix mapping "
                               "covers the llama family)") from None
    names = [t.name for t in targets]
    importance, tokens = calibration_importance(source, names, cfg.data, cfg.calib_seqs, cfg.calib_seq_len,
                                                cache_dir=cfg.cache_path, device=resolve_device(cfg.score_device))
    seqs = tokens // cfg.calib_seq_len
    path = write_imatrix(out, importance, tokens=tokens, datasets=(cfg.data or "pydoc",),
                         chunk_size=cfg.calib_seq_len, chunk_count=seqs, fmt=io.format,
                         in_features={t.name: int(t.shape[-1]) for t in targets})
    stdout_console().print(f"imatrix of {len(names)} layers over {seqs} x {cfg.calib_seq_len} tokens of "
                           f"{cfg.data or 'pydoc'} -> {Path(path)} ({io.format})")
    return 0


COMMANDS["imatrix"] = Command("write the planner's calibration importance (diag of each layer's input second moment) "
                              "as a llama.cpp imatrix file", _arguments, imatrix_command)

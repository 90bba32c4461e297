"""Exit status 2 with one line is for the user's mistakes only; every option is a dataclass field;
a full disk in the middle of a real plan run is one line and leaves nothing half-written."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from planner.cli.app import COMMANDS, _register, build_parser, main
from tests.faults import disk_full_on_fsync

ROOT = Path(__file__).resolve().parents[3]


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------- exit 2 only for the user's mistakes
def test_an_internal_value_error_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ValueError raised inside a command's work is a bug: it propagates, it is not 'exit 2'."""
    import planner.cli.dryrun as dryrun

    def broken(*args, **kwargs):
        raise ValueError("internal: shapes disagree")

    monkeypatch.setattr(dryrun, "estimate", broken)
    with pytest.raises(ValueError, match="internal: shapes disagree"):
        main(["--model", "phi-2", "--budget", "11GB", "--dry-run"])


def test_an_internal_error_exits_1_with_a_traceback_from_the_shell() -> None:
    code = ("import sys, planner.cli.dryrun as d\n"
            "def broken(*a, **k): raise ValueError('internal: shapes disagree')\n"
            "d.estimate = broken\n"
            "from planner.cli.app import entry\n"
            "sys.argv = ['planner', '--model', 'phi-2', '--dry-run']\n"
            "entry()\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "shapes disagree" in proc.stderr


@pytest.mark.parametrize("argv, needle", [
    (["verify", "/nonexistent", "--steps", "0"], "steps must be a positive integer"),
    (["verify", "/nonexistent", "--seq-len", "1"], "seq_len must be >= 2"),
    (["finetune", "/nonexistent", "--lr", "-1"], "lr must be a positive number"),
    (["finetune", "/nonexistent", "--eval-every", "0"], "eval_every"),
    (["materialize", "/nonexistent/plan.json", "--out", "/tmp/x", "--iters", "0"], "iters must be an integer in [1, 100]"),
    (["--model", "phi-2", "--budget", "1GB", "--trials", "-1"], "trials must be an integer >= 0"),
    (["--model", "phi-2", "--budget", "1GB", "--lora-dropout", "1.5"], "lora_dropout"),
    (["--model", "phi-2", "--dry-run", "--target-modules", "no_such_module"], "no_such_module"),
])
def test_a_bad_option_value_is_one_line_and_exit_2(capsys: pytest.CaptureFixture, argv: list[str],
                                                   needle: str) -> None:
    rc, out, err = _run(capsys, *argv)
    assert rc == 2 and out == "" and err.count("\n") == 1 and needle in err, err


# ---------------------------------------------------------------- one mechanism for an option
def _option_dataclasses() -> list[type]:
    from planner.build.materialize import MaterializeConfig
    from planner.cli.build_cmd import FinetuneOutput, MaterializeOutput
    from planner.cli.flags import Report
    from planner.cli.imatrix_cmd import ImatrixOutput
    from planner.cli.plan_cmd import CollectCommand, PlanCommand
    from planner.search.config import PlanConfig
    from planner.verify.report import VerifyConfig
    from planner.settings import RunSettings
    from planner.train.loop import FinetuneConfig

    return [PlanConfig, RunSettings, PlanCommand, Report, MaterializeConfig, MaterializeOutput, FinetuneConfig,
            FinetuneOutput, VerifyConfig, CollectCommand, ImatrixOutput]


def test_every_option_of_every_command_is_a_dataclass_field() -> None:
    """Default and help written once: each --flag's default is its field's, its help starts with the field's."""
    _register()
    declared = {}
    for cls in _option_dataclasses():
        for f in dataclasses.fields(cls):
            declared.setdefault(f.name, []).append(f)
    for name in COMMANDS:
        for action in build_parser(name)._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            candidates = declared.get(action.dest, [])
            assert any(action.help.startswith(f.metadata["help"])
                       and (f.default is dataclasses.MISSING or action.default == f.default)
                       for f in candidates), f"{name} {action.option_strings}: not from a config dataclass"


def test_one_field_helper() -> None:
    import planner.build.materialize
    import planner.search.config
    import planner.settings
    import planner.train.loop
    from planner.options import option

    for module in (planner.search.config, planner.settings, planner.build.materialize, planner.train.loop):
        assert module._opt is option, module.__name__


def test_the_dry_run_does_not_change_the_parsed_arguments(capsys: pytest.CaptureFixture) -> None:
    from planner.cli.plan_cmd import plan_command

    _register()
    args = build_parser("plan").parse_args(["--model", "phi-2", "--dry-run", "--json", "--bits", "2,4,16"])
    before = dict(vars(args))
    assert plan_command(args) == 0
    assert vars(args) == before
    report = json.loads(capsys.readouterr().out)
    assert report["search_space"]["keep16"] is True and report["max"]["plan"]["bits"] == [16]


# ---------------------------------------------------------------- a full disk in a real run
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-block llama with MiniLM's real tokenizer, as a local safetensors folder."""
    from tests.tiny_models import save_tiny_llama_with_real_tokenizer

    return save_tiny_llama_with_real_tokenizer(tmp_path_factory.mktemp("tiny-llama"), max_shard_size="10GB")


def _plan(tiny_dir: Path, work: Path, *extra: str) -> list[str]:
    return ["--model", str(tiny_dir), "--cache-dir", str(work / "cache"), "--out", str(work / "plan.json"),
            "--search", "exact", "--ranks", "0,4", "--calib-seqs", "2", "--proxy-seqs", "1", "--calib-seq-len", "32",
            "--seq-len", "64", "--device", "cpu", "--budget", "1GB", *extra]


@pytest.mark.parametrize("fails_on", ["plan.json", ".safetensors"])
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tiny_dir: Path, tmp_path: Path, capsys,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 fails_on: str) -> None:
    """ENOSPC at the fsync of the plan (after all the work) or of the first cache file: exit 2, no
    plan, no temp file; once there is space again the same command writes the plan."""
    from planner import progress

    monkeypatch.setattr(progress, "_enabled", False)  # progress bars share stderr with the error line
    failed = disk_full_on_fsync(monkeypatch, fails_on)
    rc, out, err = _run(capsys, *_plan(tiny_dir, tmp_path))
    assert failed and rc == 2 and err.count("\n") == 1 and "No space left on device" in err, err
    assert not (tmp_path / "plan.json").exists()
    assert [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")] == []
    monkeypatch.undo()
    rc, _, err = _run(capsys, *_plan(tiny_dir, tmp_path))
    assert rc == 0 and (tmp_path / "plan.json").is_file(), err


def test_every_command_builds_its_parser_and_help(capsys) -> None:
    """Each registered command's options come from its dataclasses: --help of each exits 0 (a command
    whose options were hand-written against a removed helper failed only when a user asked for it)."""
    from planner.cli.app import COMMANDS, _register, main

    _register()
    assert {"plan", "models", "show", "collect", "materialize", "finetune", "verify", "imatrix"} <= set(COMMANDS)
    for name in COMMANDS:
        assert main([name, "--help"]) == 0, name
        assert "usage: python -m planner" in capsys.readouterr().out

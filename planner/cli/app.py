"""``python -m planner``: one entry point, subcommands in a table (:data:`COMMANDS`).

Each command module (:data:`COMMAND_MODULES`) registers its :class:`Command`: its options come from
config dataclasses through :mod:`planner.cli.flags` (default and help defined once). Exit status 2
with one line on stderr is for the user's mistakes only: a :class:`~planner.errors.PlannerError`
(bad input, impossible request, an output path or storage that cannot be used) or an argparse
usage error. Anything else, an internal ``ValueError`` included, is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

from planner.errors import PlannerError

log = logging.getLogger(__name__)
# bitsandbytes' import-time kernel warning is silenced in planner/__init__.py (the API's users see it too)
# PEFT reads transformers' deprecated is_gradient_checkpointing when it wraps a model: not ours to show
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


@dataclass(frozen=True)
class Command:
    """A subcommand: how to add its options to a parser, and what runs it (returns the exit status)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}
DEFAULT_COMMAND = "plan"
# each registers its entries in COMMANDS on import
COMMAND_MODULES = ("planner.cli.plan_cmd", "planner.cli.build_cmd", "planner.cli.imatrix_cmd")
LOCAL_DEVICE_COMMANDS = ("materialize", "finetune", "verify")


def _register() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name)


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one PlannerError line (exit 2) instead of the full usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise PlannerError(f"{message} (see {self.prog} --help)")


def build_parser(command: str) -> argparse.ArgumentParser:
    cmd = COMMANDS[command]
    prog = "python -m planner" + ("" if command == DEFAULT_COMMAND else f" {command}")
    others = ", ".join(n for n in COMMANDS if n != DEFAULT_COMMAND)
    parser = _Parser(prog=prog, description=cmd.help, epilog=f"other commands: {others}" if others else None)
    cmd.add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 with one line on stderr for the user's mistakes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _register()
    command = argv.pop(0) if argv and argv[0] in COMMANDS else DEFAULT_COMMAND
    try:
        parser = build_parser(command)
        args = parser.parse_args(_dash_values(parser, argv))
        # devices this process will run on (the plan command's --device is where the planned run happens)
        from planner.devices import check_local_device  # imports torch: not before the arguments parse

        for attr in (("device", "score_device") if command in LOCAL_DEVICE_COMMANDS else ("score_device",)):
            check_local_device(getattr(args, attr, None), "--" + attr.replace("_", "-"))
        return COMMANDS[command].run(args)
    except SystemExit as exit_:  # argparse: --help (0)
        return int(exit_.code or 0)
    except PlannerError as err:
        sys.stderr.write(f"error: {err}\n")
        return err.exit_code
    except KeyboardInterrupt:  # Ctrl-C: the work done so far is kept (caches, DIR.partial); no traceback
        sys.stderr.write("interrupted; run the same command again to resume from what is cached\n")
        return 130


def _dash_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--budget -1GB`` as ``--budget=-1GB``: argparse reads a value that starts with a dash as an
    option and answers "expected one argument"; joined, the value reaches its own check (which
    names it). Only values after an option that takes one, and that are no option themselves."""
    takes_value = {s for a in parser._actions if a.option_strings and a.nargs is None for s in a.option_strings}
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if (tok in takes_value and i + 1 < len(argv) and argv[i + 1].startswith("-")
                and argv[i + 1] not in parser._option_string_actions and argv[i + 1] != "--"):
            out.append(f"{tok}={argv[i + 1]}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


def entry() -> None:
    """Console-script entry point (``loftq-planner``)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())

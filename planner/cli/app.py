"""``python -m planner``: one entry point, subcommands in a table (:data:`COMMANDS`).

``python -m planner --model M --budget B --dry-run [--json]`` (the default ``plan`` command with
``--dry-run``) reads no weights: it prints the memory breakdown of the smallest and the largest
plan of the search space and whether each fits the budget. Options of the run come from
:class:`~planner.settings.RunSettings` fields (default and help defined once). Bad input: one line
on stderr and exit status 2 (PlannerError, invalid settings, argparse errors).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable, Mapping, Sequence

from planner.budget import format_bytes, parse_budget
from planner.errors import PlannerError
from planner.memory import MemoryEstimate, estimate, layer_bytes
from planner.settings import LayerChoice, RunSettings, run_fields

log = logging.getLogger(__name__)
# bitsandbytes warns on every CPU import that an optional faster 4-bit kernel package ("kernels") is
# missing; nothing here needs it, and the line reads like a failure in every command's output
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# PEFT reads transformers' deprecated is_gradient_checkpointing when it wraps a model: not ours to show
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
DRY_RUN_METHOD = "nf"  # NF2 / NF4 / NF8, as planner.search.pipeline plans them


@dataclass(frozen=True)
class Command:
    """A subcommand: how to add its options to a parser, and what runs it (returns the exit status)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}
DEFAULT_COMMAND = "plan"


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_dataclass_options(parser: argparse.ArgumentParser, dataclass_fields: Sequence, defaults: Any = None) -> None:
    """One ``--name`` option per dataclass field: type from the default, help and choices from the
    field metadata, bools as ``--x/--no-x``, int tuples as comma lists."""
    for f in dataclass_fields:
        default = getattr(defaults, f.name) if defaults is not None else f.default
        if default is MISSING:
            continue
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        shown = "" if default is None or "(default" in meta.get("help", "") else f" (default: {default})"
        kwargs: dict[str, Any] = {"default": default, "help": f"{meta.get('help', '')}{shown}"}
        if default is None:
            kwargs["type"] = meta.get("type", str)
        elif isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            kwargs["type"] = _int_tuple
        else:
            kwargs["type"] = type(default)
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
        parser.add_argument(flag, dest=f.name, **kwargs)


def run_settings_from(args: argparse.Namespace) -> RunSettings:
    return RunSettings(**{f.name: getattr(args, f.name) for f in run_fields()})


# ---------------------------------------------------------------- --dry-run (used by the plan command)
def extreme_choices(targets: Sequence, space: Any, run: RunSettings, facts: Any) -> tuple[dict, dict]:
    """Per group of layers sharing a choice, the option with the fewest and the most bytes: since
    bytes add up per layer, these are the smallest and the largest plan of the space."""
    from search_spaces.choices import group_targets

    low: dict[str, LayerChoice] = {}
    high: dict[str, LayerChoice] = {}
    for members in group_targets(targets, space.granularity).values():
        shared = set(space.choices_for(members[0]))
        for t in members[1:]:
            shared &= set(space.choices_for(t))
        if not shared:
            raise PlannerError(f"no (bits, rank) choice fits every layer of the group of {members[0].name}")
        options = [LayerChoice(b, r, DRY_RUN_METHOD, space.block_size) for b, r in sorted(shared)]
        costs = [sum(layer_bytes(t, o, run, facts) for t in members) for o in options]
        lo, hi = options[costs.index(min(costs))], options[costs.index(max(costs))]
        for t in members:
            low[t.name], high[t.name] = lo, hi
    return low, high


def _summary(choices: Mapping[str, LayerChoice]) -> dict[str, Any]:
    bits = sorted({c.bits for c in choices.values()})
    ranks = sorted({c.rank for c in choices.values()})
    return {"bits": bits, "ranks": ranks}


def dry_run(args: argparse.Namespace) -> int:
    from search_spaces.choices import SearchSpace

    from planner.sources import resolve

    run = run_settings_from(args)
    space = SearchSpace(bits=args.bits, ranks=args.ranks, keep16=args.keep16, block_size=args.block_size,
                        granularity=args.granularity)
    budget = parse_budget(args.budget) if args.budget is not None else None
    source = resolve(args.model, allow_download=False)  # shape facts suffice: never download for a dry run
    modules = [m.strip() for m in args.target_modules.split(",")] if args.target_modules else None
    targets = source.targets(modules)
    if not targets:
        raise PlannerError(f"{args.model}: no target layers found")
    non_target = source.non_target_params(targets)
    low, high = extreme_choices(targets, space, run, source.facts)
    est_min = estimate(source.facts, targets, low, run, non_target)
    est_max = estimate(source.facts, targets, high, run, non_target)
    report = {
        "model": args.model, "architecture": source.facts.architecture, "target_layers": len(targets),
        "budget_bytes": budget, "run": run.to_dict(), "search_space": space.to_dict(),
        "min_bytes": est_min.total_bytes, "max_bytes": est_max.total_bytes,
        "min": {**est_min.to_dict(), "plan": _summary(low)}, "max": {**est_max.to_dict(), "plan": _summary(high)},
        "fits_min": None if budget is None else est_min.total_bytes <= budget,
        "fits_max": None if budget is None else est_max.total_bytes <= budget,
    }
    from planner.fit import fit_lines, fit_space  # longest context / largest batch per uniform plan

    fits = fit_space(budget, source.facts, targets, space, run, non_target, DRY_RUN_METHOD) if budget else []
    report["fit"] = [f.to_dict() for f in fits]
    sys.stdout.write(json.dumps(report, indent=1) + "\n" if args.json else _table(report, est_min, est_max)
                     + "".join(line + "\n" for line in (fit_lines(fits, run, budget) if fits else [])))
    return 0


def _table(report: dict[str, Any], lo: MemoryEstimate, hi: MemoryEstimate) -> str:
    keys = list(dict.fromkeys(list(lo.breakdown) + list(hi.breakdown)))
    rows = [(k, lo.breakdown.get(k, 0), hi.breakdown.get(k, 0)) for k in keys]
    rows += [("= allocated", lo.allocated_bytes, hi.allocated_bytes), ("+ reserve", lo.reserve_bytes, hi.reserve_bytes),
             ("= total", lo.total_bytes, hi.total_bytes)]
    plans = [f"bits {report[k]['plan']['bits']} ranks {report[k]['plan']['ranks']}" for k in ("min", "max")]
    lines = [f"{report['model']} ({report['architecture']}, {report['target_layers']} target layers), "
             f"{report['run']['mode']} seq {report['run']['seq_len']} x batch {report['run']['batch_size']}",
             f"{'':14}{'smallest plan':>26}{'largest plan':>26}", f"{'':14}{plans[0]:>26}{plans[1]:>26}"]
    lines += [f"{name:14}{format_bytes(a):>26}{format_bytes(b):>26}" for name, a, b in rows]
    if report["budget_bytes"] is not None:
        fits = lambda ok: "fits" if ok else "does not fit"  # noqa: E731
        lines.append(f"budget {format_bytes(report['budget_bytes'])} ({report['budget_bytes']} B): smallest plan "
                     f"{fits(report['fits_min'])}, largest plan {fits(report['fits_max'])}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- entry points
COMMAND_MODULES = ("planner.cli.plan_cmd", "planner.cli.build_cmd")  # each registers its entries in COMMANDS on import


def _register() -> None:
    import importlib

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
    parser = _Parser(prog=prog, description=cmd.help,
                                     epilog=f"other commands: {others}" if others else None)
    cmd.add_arguments(parser)
    return parser


LOCAL_DEVICE_COMMANDS = ("materialize", "finetune", "verify")


def check_local_device(name: str | None, flag: str) -> None:
    """A device this machine can run on, or one line naming what is wrong (before any work starts)."""
    if not name:
        return
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise PlannerError(f"{flag} {name!r} is not a device; use cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PlannerError(f"{flag} {name}: no CUDA GPU is available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PlannerError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise PlannerError(f"{flag} {name!r}: only cpu and cuda are supported")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 with one line on stderr for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _register()
    command = argv.pop(0) if argv and argv[0] in COMMANDS else DEFAULT_COMMAND
    try:
        args = build_parser(command).parse_args(argv)
        # devices this process will run on (the plan command's --device is where the planned run happens)
        for attr in (("device", "score_device") if command in LOCAL_DEVICE_COMMANDS else ("score_device",)):
            check_local_device(getattr(args, attr, None), "--" + attr.replace("_", "-"))
        return COMMANDS[command].run(args)
    except SystemExit as exit_:  # argparse: usage error (2) or --help (0)
        return int(exit_.code or 0)
    except PlannerError as err:
        sys.stderr.write(f"error: {err}\n")
        return err.exit_code
    except ValueError as err:  # invalid settings: the dataclasses name the bad value
        line = str(err).strip("'\"").splitlines()[0] if str(err) else repr(err)
        sys.stderr.write(f"error: {line}\n")
        return 2


def entry() -> None:
    """Console-script entry point (``loftq-planner``)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())

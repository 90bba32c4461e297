"""Command-line options from config dataclasses: the one way a ``--flag`` is declared.

A setting is a dataclass field made with :func:`planner.options.option` (default and help written
once); :func:`add_options` turns fields into argparse options and :func:`config_from` turns the
parsed arguments back into the frozen, validated dataclass. An invalid value (the dataclass raises
``ValueError`` naming it) becomes a :class:`~planner.errors.PlannerError`: one line and exit 2. A
``ValueError`` anywhere else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, fields
from typing import Any, Collection, TypeVar

from planner.errors import PlannerError
from planner.options import int_tuple, option

T = TypeVar("T")


@dataclass(frozen=True)
class Report:
    """The option of every command that prints a report (``models``, ``show``, ``verify``)."""

    json: bool = option(False, "print JSON instead of tables")


def add_options(parser: Any, config: type, *, only: Collection[str] | None = None,
                skip: Collection[str] = ()) -> None:
    """One ``--name`` option per field of the dataclass ``config`` (``only`` those named, minus
    ``skip``): type from the default, help and choices from the field metadata, bools as
    ``--x/--no-x``, int tuples as comma lists, a field without default as a required option."""
    for f in fields(config):
        if (only is not None and f.name not in only) or f.name in skip:
            continue
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        kwargs: dict[str, Any] = {"help": meta.get("help", "")}
        if f.default is MISSING:
            kwargs.update(required=True, type=meta.get("type", str))
        else:
            default = f.default
            if default not in (None, "") and "(default" not in kwargs["help"]:
                kwargs["help"] += f" (default: {default})"
            kwargs["default"] = default
            if default is None:
                kwargs["type"] = meta.get("type", str)
            elif isinstance(default, bool):
                kwargs["action"] = argparse.BooleanOptionalAction
            elif isinstance(default, tuple):
                kwargs["type"] = int_tuple
            else:
                kwargs["type"] = type(default)
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        parser.add_argument(flag, dest=f.name, **kwargs)


def config_from(config: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """The dataclass ``config`` built from the parsed ``args`` (fields absent from ``args`` keep their
    defaults); an invalid value is the user's mistake: PlannerError with the dataclass's message."""
    values = {f.name: getattr(args, f.name) for f in fields(config) if hasattr(args, f.name)}
    return user_config(config, **{**values, **overrides})


def user_config(config: type[T], **values: Any) -> T:
    """``config(**values)`` for values the user typed: its ValueError becomes one PlannerError line."""
    try:
        return config(**values)
    except ValueError as err:
        raise PlannerError(str(err).strip().splitlines()[0] if str(err).strip() else repr(err)) from None

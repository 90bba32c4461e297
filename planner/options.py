"""The one helper that declares a setting: a dataclass field carrying its default and its help.

Every config dataclass (:class:`~planner.search.config.PlanConfig`, :class:`~planner.settings.RunSettings`,
:class:`~planner.build.materialize.MaterializeConfig`, :class:`~planner.train.loop.FinetuneConfig`,
...) declares its fields with :func:`option`; :mod:`planner.cli.flags` turns those fields into
``--flag`` options, so a default and its help are written once. Imports nothing from ``planner``, so
every layer may use it.
"""
from __future__ import annotations

from dataclasses import field
from typing import Any


def option(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with ``default`` and CLI metadata: ``help`` and, for example, ``choices``
    (allowed values) or ``type`` (the parser of a field whose default is None)."""
    return field(default=default, metadata={"help": help, **extra})


def int_tuple(text: str) -> tuple[int, ...]:
    """``"2,4,8"`` -> (2, 4, 8), sorted and unique: the parser of a comma-list option."""
    import argparse

    try:
        return tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None

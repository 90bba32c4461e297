"""The command line: ``python -m planner [plan|models|show|materialize|finetune|verify] ...``.

Owns argument parsing (options generated from the config dataclasses, :mod:`planner.cli.options`),
the subcommands (:mod:`.plan_cmd`, :mod:`.build_cmd`), the dry run, rendering of reports and the
demo. May import every other part of ``planner``; nothing imports it back.
"""
from planner.cli.app import entry, main  # noqa: F401

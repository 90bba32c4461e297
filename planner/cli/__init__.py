"""The command line: ``python -m planner [plan|models|show|collect|materialize|finetune|verify|imatrix] ...``.

``app`` is the entry point and parser (exit 2 with one line for the user's mistakes only),
``flags`` turns config dataclass fields into ``--flags`` (the one way to declare an option),
``preflight`` checks a command's inputs and outputs, the storage and the cache before heavy work,
``dryrun`` is the plan command's ``--dry-run`` and ``fit`` its longest context / largest batch; the
subcommands live in ``plan_cmd``, ``build_cmd`` and ``imatrix_cmd``; ``demo`` is ``make demo``. May import every
other part of ``planner``; nothing imports it back.
"""
from planner.cli.app import entry, main  # noqa: F401

"""``python -m planner``: see :mod:`planner.cli`."""
from .cli import entry

entry()

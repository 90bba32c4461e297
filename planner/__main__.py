"""``python -m planner``: see :mod:`planner.cli.app`."""
from planner.cli.app import entry

entry()

"""User-facing errors: the CLI prints ``str(err)`` as one line on stderr and exits with status 2."""
from __future__ import annotations


class PlannerError(Exception):
    """Bad input or an impossible request (budget, model, plan file, data, ...). One clear line."""

    exit_code = 2


class ConfigError(PlannerError, ValueError):
    """A setting of a config dataclass out of its range: a PlannerError (one line, exit 2) for the
    CLI and the Python API alike, and still a ValueError, as dataclass validation raises."""

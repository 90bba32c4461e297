"""Small checkers for what is read from disk: each returns the value or raises a ValueError that
names the field and the bad value (plan files, search records)."""
from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence


def whole(name: str, value: Any, minimum: int | None = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def number(name: str, value: Any, optional: bool = False, signed: bool = False) -> float | None:
    if value is None and optional:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{' or null' if optional else ''}, got {value!r}")
    if value < 0 and not signed:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def text(name: str, value: Any, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def obj(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{name} must be a JSON object with string keys, got {type(value).__name__}")
    return dict(value)


def keys(name: str, d: Mapping[str, Any], required: Sequence[str], optional: Sequence[str] = ()) -> None:
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{name} is missing field(s) {', '.join(missing)}")
    unknown = sorted(set(d) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"{name} has unknown field(s) {', '.join(unknown)}")


def plain_json(name: str, value: Any) -> Any:
    """A JSON round trip: rejects NaN and non-JSON values now rather than at save time, and makes
    tuples lists so that a record equals its reloaded copy."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} is not plain JSON: {err}") from None

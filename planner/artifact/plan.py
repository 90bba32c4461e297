"""The plan file (schema v1): what every target layer gets, the budget, the estimate, provenance.

A plan is plain data: it does not know how the search found it (STYLE 4). :func:`save_plan`
writes it atomically (temp file in the same folder, fsync, ``os.replace``), so an interrupted or
failed save never leaves a half-written plan; :func:`load_plan` validates every field and turns any
problem into a one-line :class:`~planner.errors.PlannerError` that names the file.

Validation lives in the dataclasses' ``__post_init__`` (``ValueError`` naming the bad value), so a
plan built in memory is checked exactly like one read from disk.
"""
from __future__ import annotations

import io
import json
import math
import os
import platform
import re
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Sequence

from planner.artifact.atomic import atomic_write
from planner.errors import PlannerError

SCHEMA_VERSION = 1
ALLOWED_BITS = (2, 4, 8, 16)
MODES = ("finetune", "inference")
MODEL_KEYS = ("id", "source", "architecture", "weights_sha256")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TRAILING_INT = re.compile(r"(\d+)$")


# -- small checkers: each raises ValueError naming the field and the bad value -------------------

def _int(name: str, value: Any, minimum: int | None = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def _num(name: str, value: Any, optional: bool = False, signed: bool = False) -> float | None:
    if value is None and optional:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{' or null' if optional else ''}, got {value!r}")
    if value < 0 and not signed:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def _version(value: Any) -> int:
    version = _int("schema_version", value, 1)
    if version > SCHEMA_VERSION:
        raise ValueError(f"schema_version {version} is newer than this planner supports "
                         f"({SCHEMA_VERSION}); upgrade loftq-planner")
    return version


def _str(name: str, value: Any, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _obj(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{name} must be a JSON object with string keys, got {type(value).__name__}")
    return dict(value)


def _keys(name: str, d: Mapping[str, Any], required: Sequence[str], optional: Sequence[str] = ()) -> None:
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{name} is missing field(s) {', '.join(missing)}")
    unknown = sorted(set(d) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"{name} has unknown field(s) {', '.join(unknown)}")


# -- schema -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerPlan:
    """The choice for one target layer (one entry per layer whatever the search granularity).

    ``shape`` is (out_features, in_features); ``bits`` 16 means kept in 16 bits (``quant`` names
    the dtype then). ``rank`` 0 = no adapter. ``bytes``: what this layer's choice costs in the
    memory model. ``residual``: ‖W − deq(Q) − BA‖_F / ‖W‖_F (None when not computed).
    """

    name: str
    shape: tuple[int, int]
    bits: int
    quant: str
    block_size: int
    rank: int
    alpha: float
    iters: int
    residual: float | None
    bytes: int
    sensitivity: float | None = None
    double_quant: bool = False

    def __post_init__(self) -> None:
        _str("name", self.name)
        if not isinstance(self.shape, (list, tuple)) or len(self.shape) != 2:
            raise ValueError(f"shape must be [out_features, in_features], got {self.shape!r}")
        object.__setattr__(self, "shape", tuple(_int("shape", s, 1) for s in self.shape))
        if _int("bits", self.bits, None) not in ALLOWED_BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, ALLOWED_BITS))}; got {self.bits!r}")
        _str("quant", self.quant)
        tail = _TRAILING_INT.search(self.quant)
        if tail and int(tail.group(1)) != self.bits:  # "nf4" with bits 2 is a corrupt entry
            raise ValueError(f"quant {self.quant!r} does not match bits {self.bits}")
        _int("block_size", self.block_size, 1)
        _int("rank", self.rank, 0)
        if self.rank > min(self.shape):
            raise ValueError(f"rank {self.rank} exceeds min(shape) = {min(self.shape)}")
        _num("alpha", self.alpha)
        _int("iters", self.iters, 0)
        _num("residual", self.residual, optional=True)
        _int("bytes", self.bytes, 0)
        _num("sensitivity", self.sensitivity, optional=True, signed=True)
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant must be true or false, got {self.double_quant!r}")

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerPlan":
        d = _obj("layer", d)
        _keys("layer", d, ("name", "shape", "bits", "quant", "block_size", "rank", "alpha", "iters",
                           "residual", "bytes"), ("sensitivity", "double_quant"))
        return cls(**d)


@dataclass(frozen=True)
class Plan:
    """A whole plan; see ARCHITECTURE.md "Plan JSON". ``run`` holds every run setting (its ``mode``,
    if present, must equal ``mode``); ``estimate`` = ``{"total_bytes": int, "breakdown": {str: int},
    ...}``; ``search`` and ``created_with`` are free-form JSON objects recorded for provenance."""

    schema_version: int
    model: dict[str, Any]
    budget_bytes: int
    mode: str
    run: dict[str, Any]
    estimate: dict[str, Any]
    layers: tuple[LayerPlan, ...]
    search: dict[str, Any] = field(default_factory=dict)
    created_with: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _version(self.schema_version)
        model = _obj("model", self.model)
        missing = [k for k in MODEL_KEYS if k not in model]
        if missing:  # extra keys (revision, dtype, ...) are allowed here
            raise ValueError(f"model is missing field(s) {', '.join(missing)}")
        for key in ("id", "source", "architecture"):
            _str(f"model.{key}", model[key])
        sha = _str("model.weights_sha256", model["weights_sha256"], optional=True)
        if sha is not None and not _SHA256.fullmatch(sha):
            raise ValueError(f"model.weights_sha256 must be 64 lowercase hex digits, got {sha!r}")
        _int("budget_bytes", self.budget_bytes, 1)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        run = _obj("run", self.run)
        if "mode" in run and run["mode"] != self.mode:
            raise ValueError(f"run.mode {run['mode']!r} differs from mode {self.mode!r}")
        _check_run(run)
        estimate = _check_estimate(_obj("estimate", self.estimate))
        layers = _check_layers(self.layers)
        layer_bytes = sum(layer.bytes for layer in layers)
        if layer_bytes > estimate["total_bytes"]:
            raise ValueError(f"layers' bytes ({layer_bytes}) exceed estimate.total_bytes ({estimate['total_bytes']})")
        object.__setattr__(self, "layers", layers)
        for name, value in (("model", model), ("run", run), ("estimate", estimate),
                            ("search", _obj("search", self.search)),
                            ("created_with", _obj("created_with", self.created_with))):
            object.__setattr__(self, name, _plain_json(name, value))

    @property
    def total_bytes(self) -> int:
        return int(self.estimate["total_bytes"])

    def layer(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r} in the plan")

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "model": dict(self.model),
                "budget_bytes": self.budget_bytes, "mode": self.mode, "run": dict(self.run),
                "estimate": dict(self.estimate), "layers": [layer.to_dict() for layer in self.layers],
                "search": dict(self.search), "created_with": dict(self.created_with)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
        d = _obj("plan", d)
        if "schema_version" in d:  # report a newer schema before any field it may have renamed
            _version(d["schema_version"])
        _keys("plan", d, ("schema_version", "model", "budget_bytes", "mode", "run", "estimate", "layers",
                          "search", "created_with"))
        if not isinstance(d["layers"], list):
            raise ValueError(f"layers must be a list, got {type(d['layers']).__name__}")
        layers = []
        for i, entry in enumerate(d["layers"]):
            label = entry.get("name") if isinstance(entry, Mapping) else None
            try:
                layers.append(LayerPlan.from_dict(entry))
            except (ValueError, TypeError) as err:
                raise ValueError(f"layers[{i}]{f' ({label})' if isinstance(label, str) else ''}: {err}") from None
        return cls(**{**d, "layers": tuple(layers)})


def _plain_json(name: str, value: dict[str, Any]) -> dict[str, Any]:
    """A JSON round trip: rejects NaN and non-JSON values now rather than at save time, and makes
    tuples lists so that a plan equals its reloaded copy."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} is not plain JSON: {err}") from None


def _check_run(run: dict[str, Any]) -> None:
    """The run settings must build a RunSettings (missing ones take today's defaults)."""
    from planner.settings import RunSettings  # local: keeps plan import light and cycle-free

    try:
        RunSettings.from_dict(run)
    except (TypeError, ValueError) as err:
        raise ValueError(f"run: {err}") from None


def _check_estimate(estimate: dict[str, Any]) -> dict[str, Any]:
    for key in ("total_bytes", "breakdown"):
        if key not in estimate:
            raise ValueError(f"estimate is missing field {key}")
    total = _int("estimate.total_bytes", estimate["total_bytes"], 0)
    breakdown = _obj("estimate.breakdown", estimate["breakdown"])
    for key, value in breakdown.items():
        _int(f"estimate.breakdown.{key}", value, 0)
    if sum(breakdown.values()) > total:
        raise ValueError(f"estimate.breakdown sums to {sum(breakdown.values())} > total_bytes {total}")
    estimate["breakdown"] = breakdown
    return estimate


def _check_layers(layers: Any) -> tuple[LayerPlan, ...]:
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"layers must be a non-empty list, got {layers!r}")
    seen: set[str] = set()
    for i, layer in enumerate(layers):
        if not isinstance(layer, LayerPlan):
            raise ValueError(f"layers[{i}] must be a LayerPlan, got {type(layer).__name__}")
        if layer.name in seen:
            raise ValueError(f"duplicate layer name {layer.name!r}")
        seen.add(layer.name)
    return tuple(layers)


# -- files --------------------------------------------------------------------------------------

def save_plan(plan: Plan, path: str | os.PathLike) -> Path:
    """Write ``plan`` as indented JSON, atomically. NaN/Infinity or non-JSON values in the free-form
    dicts raise (``ValueError``/``TypeError``) and leave nothing behind."""

    def write(fh: BinaryIO) -> None:
        text = io.TextIOWrapper(fh, encoding="utf-8", newline="\n")
        json.dump(plan.to_dict(), text, indent=1, allow_nan=False)  # streams: may fail mid-way
        text.write("\n")
        text.flush()
        text.detach()  # leave fh open for atomic_write's fsync

    return atomic_write(path, write)


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and validate a plan; any problem raises PlannerError("<path>: <problem>") on one line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PlannerError(f"{path}: plan file not found") from None
    except OSError as err:
        raise PlannerError(f"{path}: cannot read plan file ({err.strerror or err})") from None
    if not raw.strip():
        raise PlannerError(f"{path}: plan file is empty")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise PlannerError(f"{path}: not a plan file (not UTF-8 text)") from None
    except json.JSONDecodeError as err:
        hint = "truncated JSON" if _ends_early(err) else "not valid JSON"
        raise PlannerError(f"{path}: {hint} (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except ValueError as err:
        raise PlannerError(f"{path}: {err}") from None
    try:
        return Plan.from_dict(data)
    except (ValueError, TypeError) as err:
        raise PlannerError(f"{path}: invalid plan: {_one_line(err)}") from None


def _ends_early(err: json.JSONDecodeError) -> bool:
    """The parser ran out of text: at the end, inside a string (strict JSON strings cannot span
    lines, so an unterminated one means the file ended) or inside true/false/null."""
    tail = err.doc[err.pos:].strip()
    return (not tail or err.msg.startswith("Unterminated string")
            or any(word.startswith(tail) for word in ("true", "false", "null")))


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} is not allowed in a plan")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


# -- provenance and display ---------------------------------------------------------------------

def created_with() -> dict[str, str | None]:
    """Versions of the planner and the libraries that shape a plan (None: not installed).

    Read from package metadata, never by importing (bitsandbytes prints on import)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for key, dist in (("planner", "loftq-planner"), ("torch", "torch"), ("transformers", "transformers"),
                      ("peft", "peft"), ("bitsandbytes", "bitsandbytes")):
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[key] = None
    return versions


@dataclass(frozen=True)
class BlockRow:
    """One transformer block of :func:`summary_by_block`: ``cells`` maps a column (module type, as
    short as stays unambiguous) to (bits, rank); ``block`` is None for layers outside the blocks."""

    block: int | None
    cells: dict[str, tuple[int, int]]
    params: int
    bytes: int

    bit_params: int = 0  # sum of bits x numel, for the weighted mean

    @property
    def bits_per_weight(self) -> float:
        """Parameter-weighted mean of the layers' bits (adapters not included)."""
        return self.bit_params / self.params if self.params else 0.0


@dataclass(frozen=True)
class BlockSummary:
    """Columns (module types in first-seen order) and one row per block (in block order)."""

    columns: tuple[str, ...]
    rows: tuple[BlockRow, ...]

    def __iter__(self) -> Iterator[BlockRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def _split_name(name: str) -> tuple[int | None, str]:
    """'model.layers.3.mlp.up_proj' -> (3, 'mlp.up_proj'); no numeric part -> (None, name)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and i + 1 < len(parts):
            return int(part), ".".join(parts[i + 1:])
    return None, name


def _short_columns(paths: Sequence[str]) -> dict[str, str]:
    """Shortest dotted suffix of each path that no other path ends with (q_proj, output.dense)."""
    short = {}
    for path in paths:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(o != path and (o == suffix or o.endswith("." + suffix)) for o in paths):
                break
        short[path] = suffix
    return short


def summary_by_block(plan: Plan) -> BlockSummary:
    """Group the layers by block index (the first numeric part of the name) for a compact table."""
    split = [(_split_name(layer.name), layer) for layer in plan.layers]
    paths = list(dict.fromkeys(path for (_, path), _ in split))
    short = _short_columns(paths)
    rows: dict[int | None, dict[str, Any]] = {}
    for (block, path), layer in split:
        row = rows.setdefault(block, {"cells": {}, "params": 0, "bytes": 0, "bits": 0})
        row["cells"][short[path]] = (layer.bits, layer.rank)
        row["params"] += layer.numel
        row["bytes"] += layer.bytes
        row["bits"] += layer.bits * layer.numel
    order = sorted(rows, key=lambda b: (b is None, b if b is not None else 0))
    return BlockSummary(
        columns=tuple(dict.fromkeys(short[p] for p in paths)),
        rows=tuple(BlockRow(b, rows[b]["cells"], rows[b]["params"], rows[b]["bytes"], rows[b]["bits"])
                   for b in order))

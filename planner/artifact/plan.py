"""The plan file (schema v5): what every target layer gets, the budget, the estimate, provenance.

A plan is plain data: it does not know how the search found it (STYLE 4). :func:`save_plan`
writes it atomically (temp file in the same folder, fsync, ``os.replace``), so an interrupted or
failed save never leaves a half-written plan; :func:`load_plan` validates every field and turns any
problem into a one-line :class:`~planner.errors.PlannerError` that names the file. Older schema
versions are read by :mod:`planner.artifact.plan_versions` and come back as the current one.

Validation lives in the dataclasses' ``__post_init__`` (``ValueError`` naming the bad value), so a
plan built in memory is checked exactly like one read from disk. What is checked beyond types:
- each layer's ``quant`` names a spec of a registered format (:func:`loftq.formats.spec_from_fields`:
  ``nf4`` of width ``bits`` at its ``block_size``, or a GGUF type such as ``q4_k`` with ``bits`` the
  width in its name, ``block_size`` its block, rows whole blocks), or ``bf16``/``fp16`` for a 16-bit keep; ``bits_per_weight`` equals
  8 x the bytes loftq stores for it / its weights; ``rank`` <= min(shape);
- the estimate adds up: breakdown sum = ``allocated_bytes``, allocated + reserve = ``total_bytes``
  (the reserve is kept as it was estimated: its CUDA terms are refined between versions, and a plan
  written under older terms must still load);
- bytes agree with the memory model: ``breakdown.backbone``, ``adapters``, ``adapter_grads`` and
  ``optimizer`` equal the sums of what each layer's choice costs under ``run``; each layer's
  ``bytes`` is those terms plus its adapter's activations (0 without an adapter or when serving);
  and the layers' activation parts fit within ``breakdown.activations``.
"""
from __future__ import annotations

import io
import json
import os
import platform
import re
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence

from loftq.formats import Spec, spec_from_fields
from search_spaces.facts import TargetLayer

from planner.files.atomic import atomic_write
from planner.files.paths import input_problem
from planner.artifact.checks import keys, number, obj, plain_json, text, whole
from planner.artifact.records import InitRecord, ProxyRecord, SearchRecord
from planner.errors import PlannerError
from planner.memory import MemoryEstimate, layer_param_breakdown
from planner.settings import LayerChoice, RunSettings

SCHEMA_VERSION = 6
PLAIN_VERSION = 4  # a plan with plain LoftQ is written as this version (plan_versions: v4 -> v5)
DATA_VERSION = 5  # a data-aware plan served by torch: v5 (v6 added run.engine/ubatch and init.rounding)
MAX_ITERS = 100  # LoftQ alternating steps per layer: the error stops falling within a few (paper: 1-5)
KEEP16 = ("bf16", "fp16")  # the dtypes a 16-bit layer may be kept in
MODES = ("finetune", "inference")
MODEL_KEYS = ("id", "source", "architecture", "weights_sha256")
LAYER_FIELDS = ("name", "shape", "bits", "quant", "block_size", "rank", "alpha", "iters", "residual", "bytes",
                "bits_per_weight")
_SHA256 = re.compile(r"[0-9a-f]{64}")
Estimate = MemoryEstimate  # the plan records the memory model's own estimate type

__all__ = ["Estimate", "InitRecord", "LayerPlan", "Plan", "ProxyRecord", "SCHEMA_VERSION", "SearchRecord", "load_plan",
           "save_plan"]


def _version(value: Any) -> int:
    version = whole("schema_version", value, 1)
    if version > SCHEMA_VERSION:
        raise ValueError(f"schema_version {version} is newer than this planner supports "
                         f"({SCHEMA_VERSION}); upgrade loftq-planner")
    return version


def _widths() -> tuple[int, ...]:
    """Every code width a registered family offers, and 16 (a keep)."""
    from loftq.formats import FAMILIES

    return tuple(sorted({b for f in FAMILIES for b in FAMILIES.get(f).bits} | {16}))


# -- schema -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerPlan:
    """The choice for one target layer (one entry per layer whatever the search granularity).

    ``shape`` is (out_features, in_features); ``bits`` is the code width, 16 meaning kept in 16 bits
    (``quant`` names the dtype then); ``quant`` names a registered quantizer, which need not end in
    its width, or is a GGUF block format (then ``bits`` is the width in its name: 4 for ``q4_k``,
    whose ``bits_per_weight`` is 4.5); ``bits_per_weight``: stored bits per weight including the
    quantization constants (loftq's exact byte count; derived when None). ``rank`` 0 = no adapter. ``bytes``: what this
    layer's choice costs in the memory model. ``residual``: ||W - deq(Q) - BA||_F / ||W||_F, or with
    the plan's ``init`` loftq-data ||(W - deq(Q) - BA) L||_F / ||W L||_F (None when not computed).
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
    bits_per_weight: float | None = None
    sensitivity: float | None = None
    double_quant: bool = False

    def __post_init__(self) -> None:
        text("name", self.name)
        if not isinstance(self.shape, (list, tuple)) or len(self.shape) != 2:
            raise ValueError(f"shape must be [out_features, in_features], got {self.shape!r}")
        object.__setattr__(self, "shape", tuple(whole("shape", s, 1) for s in self.shape))
        if whole("bits", self.bits, None) not in _widths():
            raise ValueError(f"bits must be one of {', '.join(map(str, _widths()))}; got {self.bits!r}")
        text("quant", self.quant)
        whole("block_size", self.block_size, 1)
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant must be true or false, got {self.double_quant!r}")
        self.spec  # noqa: B018 — the format validates quant, bits, block_size and the shape
        whole("rank", self.rank, 0)
        if self.rank > min(self.shape):
            raise ValueError(f"rank {self.rank} exceeds min(shape) = {min(self.shape)}")
        number("alpha", self.alpha)
        whole("iters", self.iters, 0)
        if self.iters > MAX_ITERS:
            raise ValueError(f"iters must be at most {MAX_ITERS} LoftQ steps, got {self.iters}")
        number("residual", self.residual, optional=True)
        whole("bytes", self.bytes, 0)
        number("sensitivity", self.sensitivity, optional=True, signed=True)
        exact = 8 * self.stored_bytes / self.numel
        if self.bits_per_weight is None:
            object.__setattr__(self, "bits_per_weight", exact)
        elif number("bits_per_weight", self.bits_per_weight) != exact:
            raise ValueError(f"bits_per_weight {self.bits_per_weight!r} is not what {self.quant} stores for "
                             f"shape {list(self.shape)} at block {self.block_size} ({exact!r})")

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def spec(self) -> Spec | None:
        """The format spec ``quant`` names (:mod:`loftq.formats`; None for a 16-bit keep); ValueError
        when ``quant`` is no registered quantizer of width ``bits`` accepting ``block_size`` and the
        layer's shape, or a keep's ``quant`` is not a 16-bit dtype."""
        if self.bits == 16:
            if self.quant not in KEEP16:
                raise ValueError(f"a 16-bit layer's quant must be one of {', '.join(KEEP16)}; got {self.quant!r}")
            return None
        spec = spec_from_fields(self.quant, self.bits, self.block_size, self.double_quant)
        if spec.name != self.quant:  # a method alone ("nf") is no quantizer name: nf4 is
            raise ValueError(f"unknown quantizer {self.quant!r}; did you mean {spec.name!r}?")
        spec.check_shape(self.shape)
        return spec

    @property
    def method(self) -> str:
        """The format's method (``nf``, ``uniform``, ``int8``, or a type that names itself: ``q4_k``);
        ``keep16`` for 16-bit layers."""
        spec = self.spec
        return "keep16" if spec is None else spec.method

    @property
    def stored_bytes(self) -> int:
        """Bytes of the stored weight: its format's exact count, or 2 per weight for a 16-bit keep."""
        spec = self.spec
        return 2 * self.numel if spec is None else spec.nbytes(self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, derive_bits_per_weight: bool = False) -> "LayerPlan":
        """``derive_bits_per_weight``: a reader of an older schema may leave it None."""
        d = obj("layer", d)
        keys("layer", d, LAYER_FIELDS, ("sensitivity", "double_quant"))
        layer = cls(**d)
        if d["bits_per_weight"] is None and not derive_bits_per_weight:
            raise ValueError("bits_per_weight must be a finite number, got None")
        return layer


@dataclass(frozen=True)
class Plan:
    """A whole plan; see ARCHITECTURE.md "Plan JSON". ``run``: the run the memory model planned for
    (``run.mode`` equals ``mode``); ``estimate``: the memory model's numbers for the whole plan;
    ``search``: how the plan was found; ``created_with``: free-form provenance (versions, materialize);
    ``init``: how materialize initialises the adapters (:class:`InitRecord`; plain LoftQ by default)."""

    schema_version: int
    model: dict[str, Any]
    budget_bytes: int
    mode: str
    run: RunSettings
    estimate: MemoryEstimate
    layers: tuple[LayerPlan, ...]
    search: SearchRecord = field(default_factory=lambda: SearchRecord("manual"))
    created_with: dict[str, Any] = field(default_factory=dict)
    init: InitRecord = field(default_factory=InitRecord)

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version of a plan in memory must be {SCHEMA_VERSION}, got "
                             f"{self.schema_version!r} (older files are upgraded by load_plan)")
        model = obj("model", self.model)
        missing = [k for k in MODEL_KEYS if k not in model]
        if missing:  # extra keys (revision, dtype, ...) are allowed here
            raise ValueError(f"model is missing field(s) {', '.join(missing)}")
        for key in ("id", "source", "architecture"):
            text(f"model.{key}", model[key])
        for key in ("weights_sha256", "weights_content_sha256"):  # the first required, the second from v3 on
            sha = text(f"model.{key}", model.get(key), optional=key != "weights_sha256")
            if sha is not None and not _SHA256.fullmatch(sha):
                raise ValueError(f"model.{key} must be 64 lowercase hex digits (the model's fingerprint), got {sha!r}")
        whole("budget_bytes", self.budget_bytes, 1)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        for name, kind in (("run", RunSettings), ("estimate", MemoryEstimate), ("search", SearchRecord),
                           ("init", InitRecord)):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        if self.run.mode != self.mode:
            raise ValueError(f"run.mode {self.run.mode!r} differs from mode {self.mode!r}")
        layers = _check_layers(self.layers)
        _check_bytes(layers, self.run, self.estimate)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "model", plain_json("model", model))
        object.__setattr__(self, "created_with", plain_json("created_with", obj("created_with", self.created_with)))

    @property
    def total_bytes(self) -> int:
        return self.estimate.total_bytes

    def layer(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r} in the plan")

    @property
    def document_version(self) -> int:
        """The oldest schema version that says all this plan says (see :mod:`planner.artifact.plan_versions`):
        v4 for plain LoftQ served by torch (every v4 reader reads it right), v5 for a data-aware one,
        v6 for one served by llama.cpp (its run records ``engine`` and ``ubatch``) or whose Q is
        rounded by error feedback (``init.rounding``) or whose data-aware norm is an importance matrix's
        (``init.imatrix``: a v6 field with a default, no schema bump; a v6 reader older than it refuses
        the field by name)."""
        if self.run.engine != "auto" or self.init.rounding is not None or self.init.imatrix is not None:
            return SCHEMA_VERSION
        return DATA_VERSION if self.init.data_aware else PLAIN_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = {"schema_version": self.document_version, "model": dict(self.model),
               "budget_bytes": self.budget_bytes, "mode": self.mode, "run": self.run.to_dict(),
               "estimate": self.estimate.to_dict(), "layers": [layer.to_dict() for layer in self.layers],
               "search": self.search.to_dict(), "created_with": dict(self.created_with)}
        if self.document_version > PLAIN_VERSION:
            out["init"] = self.init.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
        """A plan document of this or any older schema version (older ones are upgraded first)."""
        from planner.artifact.plan_versions import upgrade

        d = obj("plan", d)
        if "schema_version" not in d:
            raise ValueError("plan is missing field(s) schema_version")
        version = _version(d["schema_version"])  # report a newer schema before any field it may have renamed
        d = upgrade(d, version, SCHEMA_VERSION)
        keys("plan", d, ("schema_version", "model", "budget_bytes", "mode", "run", "estimate", "layers",
                         "search", "created_with", "init"))
        if not isinstance(d["layers"], list):
            raise ValueError(f"layers must be a list, got {type(d['layers']).__name__}")
        layers = []
        for i, entry in enumerate(d["layers"]):
            label = entry.get("name") if isinstance(entry, Mapping) else None
            try:
                layers.append(LayerPlan.from_dict(entry, derive_bits_per_weight=version < 2))
            except (ValueError, TypeError, KeyError) as err:
                where = f" ({label})" if isinstance(label, str) else ""
                raise ValueError(f"layers[{i}]{where}: {_message(err)}") from None
        parts = {}
        for name, reader in (("run", RunSettings.from_dict), ("estimate", MemoryEstimate.from_dict),
                             ("search", SearchRecord.from_dict), ("init", InitRecord.from_dict)):
            try:
                parts[name] = reader(obj(name, d[name]))
            except (TypeError, KeyError) as err:
                raise ValueError(f"{name}: {_message(err)}") from None
            except ValueError as err:
                raise ValueError(err if str(err).startswith(name) else f"{name}: {err}") from None
        return cls(**{**d, **parts, "layers": tuple(layers)})


def _message(err: BaseException) -> str:
    return err.args[0] if isinstance(err, KeyError) and err.args else str(err)


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


PARAM_TERMS = ("backbone", "adapters", "adapter_grads", "optimizer")


def _check_bytes(layers: Sequence[LayerPlan], run: RunSettings, est: MemoryEstimate) -> None:
    """The byte numbers agree with the memory model (see the module docstring for what is checked)."""
    sums = dict.fromkeys(PARAM_TERMS, 0)
    activations = 0
    for layer in layers:
        choice = LayerChoice.from_spec(layer.spec, layer.rank)
        terms = layer_param_breakdown(TargetLayer(layer.name, layer.shape, layer.name.rsplit(".", 1)[-1], -1),
                                      choice, run)
        own = layer.bytes - sum(terms.values())
        if own < 0 or (own and (not layer.rank or not run.finetune)):
            raise ValueError(f"layer {layer.name}: bytes {layer.bytes} are not its weight, adapter and optimizer "
                             f"bytes ({sum(terms.values())}) plus its adapter's activations")
        activations += own
        for key, value in terms.items():
            sums[key] += value
    for key, value in sums.items():
        if (key in est.breakdown or value) and est.breakdown.get(key) != value:
            raise ValueError(f"estimate.breakdown.{key} is {est.breakdown.get(key)}, the layers' choices cost {value}")
    if activations > est.breakdown.get("activations", 0):
        raise ValueError(f"the layers' adapter activations ({activations}) exceed estimate.breakdown.activations "
                         f"({est.breakdown.get('activations', 0)})")


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
    problem = input_problem(path)  # a FIFO would block the read, a device never end it
    if problem is not None:
        raise PlannerError(f"{path}: plan file not found" if problem == "missing" else
                           f"{path}: cannot read plan file: it is {problem}")
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
    except RecursionError:
        raise PlannerError(f"{path}: invalid plan: JSON nested deeper than Python can parse") from None
    depth = nesting_depth(data)
    if depth > MAX_DEPTH:
        raise PlannerError(f"{path}: invalid plan: JSON nested {depth} levels deep (a plan needs at most {MAX_DEPTH})")
    try:
        return Plan.from_dict(data)
    except (ValueError, TypeError) as err:
        raise PlannerError(f"{path}: invalid plan: {_one_line(err)}") from None


MAX_DEPTH = 32  # a plan's deepest value sits about 6 levels down; free-form records get room, not 5000 levels


def nesting_depth(value: Any) -> int:
    """How deeply JSON containers nest in ``value`` (a scalar: 0), counted without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:  # no need to walk further than the limit
                stack.extend((v, depth) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _ends_early(err: json.JSONDecodeError) -> bool:
    """The parser ran out of text: at the end, inside a string (strict JSON strings cannot span
    lines, so an unterminated one means the file ended) or inside true/false/null."""
    tail = err.doc[err.pos:].strip()
    return (not tail or err.msg.startswith("Unterminated string")
            or any(word.startswith(tail) for word in ("true", "false", "null"))
            or re.fullmatch(r"[-+.eE0-9]+", tail) is not None)  # a number cut after its sign, point or exponent


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

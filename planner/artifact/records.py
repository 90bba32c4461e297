"""How a plan was found, recorded in the plan for provenance: :class:`SearchRecord` (the search) and
:class:`ProxyRecord` (the proxies that ranked its candidates). Plain data, validated on construction.

Known fields are typed; anything else a writer wants to keep goes into ``SearchRecord.extra`` (a
plain JSON object), so a reader never has to guess which keys exist.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from planner.artifact.checks import keys, number, obj, plain_json, text, whole


def _rows(name: str, rows: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(rows, (list, tuple)):
        raise ValueError(f"{name} must be a list of JSON objects, got {type(rows).__name__}")
    return tuple(plain_json(f"{name}[{i}]", obj(f"{name}[{i}]", row)) for i, row in enumerate(rows))


@dataclass(frozen=True)
class ProxyRecord:
    """The proxy that chose among the candidates. ``candidates``: one JSON object per candidate
    (trial, objective, bytes, chosen, kl/loss, shaping, ...); with the fine-tune proxy, ``steps`` is
    its LoRA step count and ``zero_step_kind`` / ``zero_step_candidates`` keep the zero-step ranking."""

    kind: str
    ref_loss: float | None = None
    adapter_margin: float | None = None
    candidates: tuple[dict[str, Any], ...] = ()
    steps: int | None = None
    zero_step_kind: str | None = None
    zero_step_candidates: tuple[dict[str, Any], ...] | None = None

    def __post_init__(self) -> None:
        text("search.proxy.kind", self.kind)
        number("search.proxy.ref_loss", self.ref_loss, optional=True, signed=True)
        number("search.proxy.adapter_margin", self.adapter_margin, optional=True, signed=True)
        object.__setattr__(self, "candidates", _rows("search.proxy.candidates", self.candidates))
        if self.steps is not None:
            whole("search.proxy.steps", self.steps)
        text("search.proxy.zero_step_kind", self.zero_step_kind, optional=True)
        if self.zero_step_candidates is not None:
            object.__setattr__(self, "zero_step_candidates",
                               _rows("search.proxy.zero_step_candidates", self.zero_step_candidates))

    def chosen(self) -> dict[str, Any] | None:
        """The candidate row marked chosen, if any."""
        return next((c for c in self.candidates if c.get("chosen")), None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "ref_loss": self.ref_loss, "adapter_margin": self.adapter_margin,
                               "candidates": [dict(c) for c in self.candidates]}
        for name in ("steps", "zero_step_kind"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.zero_step_candidates is not None:
            out["zero_step_candidates"] = [dict(c) for c in self.zero_step_candidates]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ProxyRecord":
        d = obj("search.proxy", d)
        keys("search.proxy", d, ("kind",), [f.name for f in fields(cls)])
        return cls(**d)


@dataclass(frozen=True)
class SearchRecord:
    """What the search did: ``mode`` (exact, guided, direct, manual), ``seed``, ``trials`` run, the
    Optuna ``storage`` (credentials redacted) and ``study_name``, the ``objective`` it minimised,
    the ``exact_optimum`` of the additive objective, the ``chosen_objective`` and their ``gap``,
    whether the budget binds, the ``allocatable_bytes`` the knapsack had, stage ``timings``
    (seconds), the ``proxy`` record, and ``extra`` (anything else, plain JSON)."""

    mode: str
    seed: int | None = None
    trials: int = 0
    storage: str | None = None
    study_name: str | None = None
    objective: str | None = None
    exact_optimum: float | None = None
    chosen_objective: float | None = None
    gap: float | None = None
    budget_binds: bool | None = None
    allocatable_bytes: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    proxy: ProxyRecord | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        text("search.mode", self.mode)
        if self.seed is not None:
            whole("search.seed", self.seed, None)
        whole("search.trials", self.trials)
        for name in ("storage", "study_name", "objective"):
            text(f"search.{name}", getattr(self, name), optional=True)
        for name in ("exact_optimum", "chosen_objective", "gap"):
            number(f"search.{name}", getattr(self, name), optional=True, signed=True)
        if self.budget_binds is not None and not isinstance(self.budget_binds, bool):
            raise ValueError(f"search.budget_binds must be true, false or null, got {self.budget_binds!r}")
        if self.allocatable_bytes is not None:
            whole("search.allocatable_bytes", self.allocatable_bytes, None)
        timings = obj("search.timings", self.timings)
        for key, value in timings.items():
            number(f"search.timings.{key}", value)
        object.__setattr__(self, "timings", timings)
        if self.proxy is not None and not isinstance(self.proxy, ProxyRecord):
            raise ValueError(f"search.proxy must be a ProxyRecord, got {type(self.proxy).__name__}")
        extra = plain_json("search.extra", obj("search.extra", self.extra))
        clash = sorted(set(extra) & {f.name for f in fields(self)})
        if clash:
            raise ValueError(f"search.extra repeats known field(s) {', '.join(clash)}")
        object.__setattr__(self, "extra", extra)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "proxy":
                value = value.to_dict() if value is not None else None
            if value is not None and value != {} or f.name in ("mode", "trials"):
                out[f.name] = dict(value) if isinstance(value, dict) else value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SearchRecord":
        d = obj("search", d)
        keys("search", d, ("mode",), [f.name for f in fields(cls)])
        proxy = d.pop("proxy", None)
        return cls(**d, proxy=None if proxy is None else ProxyRecord.from_dict(proxy))


from planner.settings import INITS  # noqa: E402  (one definition: the plan command's choices)

HEX = frozenset("0123456789abcdef")
DEFAULT_DAMP = 0.01  # loftq.solver.calibration_factor's ridge, as a fraction of mean(diag H)
# the calibration the plan command uses by default (PlanConfig's --calib-seqs / --calib-seq-len), and
# what materialize --init loftq-data takes for a plan made without one: defined once, here
DEFAULT_CALIB_SEQS = 16
DEFAULT_CALIB_SEQ_LEN = 256


@dataclass(frozen=True)
class InitRecord:
    """How materialize initialises Q, A and B (and the norm the plan's residuals are in).

    ``loftq``: B A fits W - Q in the Frobenius norm. ``loftq-data``: in the layer-output norm
    ||(W - Q - BA) L||, L L^T = H + ``damp`` mean(diag H) I, H = X^T X / n the layer's input second
    moment over the first ``seqs`` sequences of ``seq_len`` tokens of the train split of ``data``
    (None: pydoc), whose corpus fingerprint is ``corpus`` (materialize checks it; None: not known yet).
    ``rounding`` ``feedback`` (loftq-data only): Q's codes are chosen by error feedback under the same
    moments (:mod:`loftq.rounding`); None: round to nearest.
    ``imatrix`` (loftq-data only): H is not the calibration moment but diag(importance) of the
    llama.cpp importance matrix at that path (the per-column mean of x_j^2 it holds), whose bytes
    have the sha256 ``imatrix_sha256``; materialize must be given a file with that digest. Both or
    neither; not with feedback rounding (it needs the full moments, an imatrix is their diagonal).
    The calibration fields still say which text the Fisher sensitivity ran on."""

    method: str = "loftq"
    data: str | None = None
    seqs: int | None = None
    seq_len: int | None = None
    corpus: str | None = None
    damp: float | None = None
    rounding: str | None = None
    imatrix: str | None = None
    imatrix_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.method not in INITS:
            raise ValueError(f"init.method must be one of {', '.join(INITS)}; got {self.method!r}")
        if self.rounding is not None and self.rounding != "feedback":
            raise ValueError(f"init.rounding must be feedback or absent (round to nearest); got {self.rounding!r}")
        text("init.data", self.data, optional=True)
        text("init.corpus", self.corpus, optional=True)
        number("init.damp", self.damp, optional=True)
        for name in ("seqs", "seq_len"):
            if getattr(self, name) is not None:
                whole(f"init.{name}", getattr(self, name), 1)
        self._check_imatrix()
        calibration = ("seqs", "seq_len", "corpus", "damp")
        given = [name for name in calibration if getattr(self, name) is not None]
        if self.data_aware and not {"seqs", "seq_len", "damp"} <= set(given):
            raise ValueError("init loftq-data needs seqs, seq_len and damp")
        if not self.data_aware and (given or self.data is not None or self.rounding is not None):
            raise ValueError(f"init loftq takes no calibration settings, got "
                             f"{', '.join(given or (['data'] if self.data is not None else ['rounding']))}")

    def _check_imatrix(self) -> None:
        text("init.imatrix", self.imatrix, optional=True)
        sha = self.imatrix_sha256
        if sha is not None and not (isinstance(sha, str) and len(sha) == 64 and all(c in HEX for c in sha)):
            raise ValueError(f"init.imatrix_sha256 must be 64 lowercase hex digits, got {sha!r}")
        if (self.imatrix is None) != (sha is None):
            raise ValueError("init.imatrix and init.imatrix_sha256 go together (the file and its digest)")
        if sha is not None and not self.data_aware:
            raise ValueError("init.imatrix is the data-aware norm's diagonal: it needs method loftq-data")
        if sha is not None and self.rounding is not None:
            raise ValueError("init.imatrix cannot go with rounding feedback (it needs the full input moments)")

    @property
    def data_aware(self) -> bool:
        return self.method == "loftq-data"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InitRecord":
        d = obj("init", d)
        keys("init", d, ("method",), [f.name for f in fields(cls)])
        return cls(**d)

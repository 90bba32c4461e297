"""Readers of older plan files: each turns a version-N document into a version-(N+1) one, so every
plan ever written loads as the current schema (``upgrade``). A new schema version adds one function
here and its test; none is ever removed.

The rule (README "Plan format"): a change that an older planner would misread or reject (a new
required field, a renamed or removed field, a changed meaning or unit) bumps ``SCHEMA_VERSION`` and
comes with a reader from the previous version; a reader refuses newer versions with one line.

v1 -> v2:
- layers gain ``bits_per_weight`` (stored bits per weight, constants included), computed from the
  layer's quantizer; the v1 rule that ``quant``'s trailing digits equal ``bits`` is replaced by a
  registry lookup of ``quant`` (done when the v2 layer is built);
- ``estimate`` gains ``allocated_bytes`` (= sum of the breakdown) and ``reserve_bytes`` (= total -
  allocated) where a v1 writer left them out;
- ``run`` is completed with every setting (v1 let missing ones take the defaults) and its ``mode``
  set from the plan's;
- ``search`` keys that are not SearchRecord fields move into ``search.extra`` (v1's record was
  free-form); a record without ``mode`` gets mode ``unknown``.
v2 -> v3: nothing to convert. v3 accepts 3-bit layers (quant ``nf3``), which a v2 reader rejects, so
the version tells an older planner to upgrade instead of failing on a layer.
v3 -> v4: nothing to convert. v4 accepts GGUF block formats as a layer's ``quant`` (``q8_0``,
``q4_k``, ...: ``bits`` the width in the name, which may be 6; ``block_size`` the format's block;
``bits_per_weight`` fractional, e.g. 4.5), which a v3 reader rejects.
v4 -> v5: the plan gains ``init`` (how materialize initialises the adapters: InitRecord); a v4 plan
was made and is built with plain LoftQ (``{"method": "loftq"}``). A plan with plain LoftQ is still
*written* as a v4 document (no ``init``), byte for byte what the v4 code wrote, because every
planner reads it right; only a data-aware plan, which a v4 reader would build with the wrong
initialisation, is written as v5, so an older planner refuses it with one line.
v6 (no bump): ``init`` may carry ``imatrix`` and ``imatrix_sha256`` (the data-aware norm's diagonal
from a llama.cpp importance matrix); absent, a v6 plan means what it meant before, so older v6 files
load unchanged.
"""
from __future__ import annotations

from typing import Any, Callable

from planner.artifact.checks import obj


def _v1_to_v2(d: dict[str, Any]) -> dict[str, Any]:
    from planner.artifact.records import ProxyRecord, SearchRecord
    from planner.settings import RunSettings

    d = dict(d)
    layers = d.get("layers")
    if isinstance(layers, list):
        d["layers"] = [_v1_layer(entry) for entry in layers]
    estimate = d.get("estimate")
    if isinstance(estimate, dict) and isinstance(estimate.get("breakdown"), dict):
        estimate = dict(estimate)
        parts = estimate["breakdown"].values()
        if "allocated_bytes" not in estimate and all(isinstance(v, int) for v in parts):
            estimate["allocated_bytes"] = sum(parts)
        if "reserve_bytes" not in estimate and isinstance(estimate.get("total_bytes"), int) \
                and isinstance(estimate.get("allocated_bytes"), int):
            estimate["reserve_bytes"] = estimate["total_bytes"] - estimate["allocated_bytes"]
        d["estimate"] = estimate
    run = d.get("run")
    if isinstance(run, dict):
        run = {"mode": d.get("mode"), **run} if "mode" not in run and d.get("mode") is not None else dict(run)
        try:
            d["run"] = RunSettings.from_dict(run).to_dict()
        except (TypeError, ValueError):
            d["run"] = run  # the v2 check reports it
    search = d.get("search")
    if isinstance(search, dict):
        known = {f for f in SearchRecord.__dataclass_fields__} - {"extra"}
        record = {k: v for k, v in search.items() if k in known}
        record.setdefault("mode", "unknown")
        extra = {k: v for k, v in search.items() if k not in known}
        if isinstance(record.get("proxy"), dict):
            proxy_known = set(ProxyRecord.__dataclass_fields__)
            proxy = record["proxy"]
            record["proxy"] = {k: v for k, v in proxy.items() if k in proxy_known}
            if set(proxy) - proxy_known:
                extra["proxy"] = {k: v for k, v in proxy.items() if k not in proxy_known}
        d["search"] = {**record, **({"extra": extra} if extra else {})}
    d["schema_version"] = 2
    return d


def _v1_layer(entry: Any) -> Any:
    """Add bits_per_weight (computed by LayerPlan from its quantizer: None means 'derive it')."""
    if not isinstance(entry, dict) or "bits_per_weight" in entry:
        return entry  # the v2 check reports it
    return {**entry, "bits_per_weight": None}


def _v2_to_v3(d: dict[str, Any]) -> dict[str, Any]:
    return {**d, "schema_version": 3}


def _v3_to_v4(d: dict[str, Any]) -> dict[str, Any]:
    return {**d, "schema_version": 4}


def _v4_to_v5(d: dict[str, Any]) -> dict[str, Any]:
    if "init" in d:
        raise ValueError("plan has unknown field(s) init (a schema v4 plan has none; init came with v5)")
    return {**d, "schema_version": 5, "init": {"method": "loftq"}}


def _v5_to_v6(d: dict[str, Any]) -> dict[str, Any]:
    run, init = d.get("run"), d.get("init")
    if isinstance(run, dict) and ("engine" in run or "ubatch" in run):
        raise ValueError("plan run has unknown field(s) engine/ubatch (a schema v5 plan has none; they came with v6)")
    for name in ("rounding", "imatrix", "imatrix_sha256"):
        if isinstance(init, dict) and name in init:
            raise ValueError(f"plan init has unknown field(s) {name} (a schema v5 plan has none; it came with v6)")
    return {**d, "schema_version": 6}


READERS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4,
                                                                 4: _v4_to_v5, 5: _v5_to_v6}


def upgrade(d: dict[str, Any], version: int, current: int) -> dict[str, Any]:
    """``d`` (a plan document of schema ``version``) as a ``current``-schema document."""
    d = obj("plan", d)
    while version < current:
        d = READERS[version](d)
        version += 1
    return d

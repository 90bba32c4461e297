"""A plan grouped by transformer block, for compact tables (``plan`` and ``show`` reports)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from loftq.formats import menu_key
from search_spaces.widths import WidthKey

from planner.artifact.plan import Plan


@dataclass(frozen=True)
class BlockRow:
    """One transformer block of :func:`summary_by_block`: ``cells`` maps a column (module type, as
    short as stays unambiguous) to (width, rank) (width ``4`` or ``4dq``, see search_spaces.widths, or
    a GGUF type's name such as ``q4_k``);
    ``block`` is None for layers outside the blocks."""

    block: int | None
    cells: dict[str, tuple[WidthKey | str, int]]
    params: int
    bytes: int

    bit_params: float = 0.0  # sum of stored bits per weight x numel, for the weighted mean

    @property
    def bits_per_weight(self) -> float:
        """Parameter-weighted mean of the layers' stored bits per weight, quantization constants
        included (adapters not included)."""
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
        kind = menu_key(layer.spec, layer.shape) if layer.spec is not None else layer.bits  # 4, 4dq, q4_k (q4_k and iq4_nl are both 4)
        row["cells"][short[path]] = (kind, layer.rank)
        row["params"] += layer.numel
        row["bytes"] += layer.bytes
        row["bits"] += layer.bits_per_weight * layer.numel  # what is stored: NF8 at block 64 is 8.5
    order = sorted(rows, key=lambda b: (b is None, b if b is not None else 0))
    return BlockSummary(
        columns=tuple(dict.fromkeys(short[p] for p in paths)),
        rows=tuple(BlockRow(b, rows[b]["cells"], rows[b]["params"], rows[b]["bytes"], rows[b]["bits"])
                   for b in order))

"""The additive objective the exact solver minimises, and the shaping Optuna searches over.

Per layer l and option (bits b, rank r):
    est[l, b, r] = fisher_err[l, b] * (res[l, b, r] / res[l, b, 0])^2        (estimated loss rise)
    mixed        = (1 - mix) * est + mix * c * ||W_l||^2 * res[l, b, r]^2   (c matches the scales)
    shaped       = mixed * type_weight[type(l)] * exp(depth_slope * (1/2 - depth(l)))
                   - capacity * unit_l * log2(1 + r / 8)
``unit_l`` is layer l's estimated loss at 4 bits (plain if offered, else 4dq), rank 0 (so ``capacity`` is dimensionless): the
capacity term is the value of trainable adapter parameters that no step-0 number shows. Options
with r < rank_floor are dropped. Everything is a per-layer sum, so the exact knapsack applies.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from search_spaces.facts import TargetLayer
from search_spaces.widths import WidthKey, is_double_quant, is_rotated, width_bits

from planner.scoring.tables import ResidualTables


@dataclass(frozen=True)
class Shaping:
    """One point of the objective's shaping; the neutral point is the plain Fisher estimate."""

    type_weights: dict[str, float] = field(default_factory=dict)
    depth_slope: float = 0.0
    mix: float = 0.0
    capacity: float = 0.0
    rank_floor: int = 0
    rotated: bool = True  # False: no rotated width (the plan a menu without rotation gives)

    def __post_init__(self) -> None:
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {self.mix!r}")
        if self.capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {self.capacity!r}")
        if self.rank_floor < 0:
            raise ValueError(f"rank_floor must be >= 0, got {self.rank_floor!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OptionTable:
    """Per layer: candidate (width, rank) options and their estimated loss rise (unshaped). A width's
    row of the tables and of ``fisher_err`` is its own: a double-quantized width is scored by the
    residual and Fisher error of the weights it stores, not assumed equal to the plain width's."""

    targets: list[TargetLayer]
    options: list[tuple[WidthKey, int]]
    est: torch.Tensor  # [n_layers, n_options] estimated loss increase (Fisher)
    frob: torch.Tensor  # [n_layers, n_options] ||W||^2 * res^2 (absolute squared residual)
    n_blocks: int

    @classmethod
    def build(cls, targets: Sequence[TargetLayer], tables: ResidualTables, fisher_err: torch.Tensor,
              options: Sequence[tuple[WidthKey, int]]) -> "OptionTable":
        """fisher_err: [n_layers, len(tables.settings.bits)] in the order of ``targets``."""
        bits, ranks = tables.settings.bits, tables.settings.ranks
        n = len(targets)
        est = torch.zeros(n, len(options), dtype=torch.float64)
        frob = torch.zeros_like(est)
        for i, t in enumerate(targets):
            row = tables.of(t.name).double()
            sq = tables.sq_norm[tables.names.index(t.name)]
            for k, (b, r) in enumerate(options):
                if b >= 16:
                    continue
                j, rr = bits.index(b), ranks.index(r)
                ratio = (row[j, rr] / row[j, 0].clamp(min=1e-30)) ** 2
                est[i, k] = fisher_err[i, j] * ratio
                frob[i, k] = sq * row[j, rr] ** 2
        n_blocks = max((t.block for t in targets), default=0) + 1
        return cls(list(targets), list(options), est, frob, n_blocks)

    def shaped(self, s: Shaping) -> torch.Tensor:
        """[n_layers, n_options] shaped objective; dropped options are +inf."""
        est = self.est
        if s.mix > 0:
            scale = self.est.sum() / self.frob.sum().clamp(min=1e-30)
            est = (1 - s.mix) * est + s.mix * scale * self.frob
        depth = torch.tensor([max(t.block, 0) / max(self.n_blocks - 1, 1) for t in self.targets], dtype=torch.float64)
        mult = torch.exp(s.depth_slope * (0.5 - depth))
        mult = mult * torch.tensor([s.type_weights.get(t.module_type, 1.0) for t in self.targets], dtype=torch.float64)
        out = est * mult.unsqueeze(1)
        if s.capacity > 0:
            ref = [k for k, (b, r) in enumerate(self.options) if r == 0 and width_bits(b) == 4] or [0]
            unit = est[:, ref[0]].clamp(min=0) * mult
            bonus = torch.tensor([math.log2(1 + r / 8) for _, r in self.options], dtype=torch.float64)
            out = out - s.capacity * unit.unsqueeze(1) * bonus.unsqueeze(0)
        if s.rank_floor > 0:
            drop = torch.tensor([r < s.rank_floor for _, r in self.options])
            if not bool(drop.all()):
                out[:, drop] = math.inf
        if not s.rotated and self.rotation_choice:
            out[:, torch.tensor([is_rotated(b) for b, _ in self.options])] = math.inf
        return out

    @property
    def rotation_choice(self) -> bool:
        """Whether the menu offers a width both plain and rotated (``--rotation search``): then a
        shaping may forbid the rotated ones, and the guided search compares the two plans."""
        def kind(b: WidthKey) -> tuple[int, bool]:
            return width_bits(b), is_double_quant(b)

        rotated = {kind(b) for b, _ in self.options if is_rotated(b)}
        return bool(rotated & {kind(b) for b, _ in self.options if not is_rotated(b)})

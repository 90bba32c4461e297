"""The exact memory / objective Pareto front: a budget sweep of the exact knapsack, its JSON file
and its plot (``--pareto PATH`` writes PATH.json and PATH.png)."""
from __future__ import annotations

import json
import os
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from planner.files.atomic import atomic_write
from planner.search.allocate import InfeasibleBudget, Knapsack, Option


class ParetoPoint(NamedTuple):
    bytes: int
    objective: float


def pareto_front(groups: Sequence[Sequence[Option]], budgets: Sequence[int] | None = None, n: int = 30, *,
                 fixed_bytes: int = 0, time_limit: float | None = None) -> list[ParetoPoint]:
    """Exact (bytes, objective) optima over a budget sweep, dominated points removed.

    ``budgets`` default: ``n`` evenly spaced budgets from the cheapest plan to the cheapest plan
    where the budget stops binding. Budgets below the minimum are skipped (all below: raises
    :class:`InfeasibleBudget`). Points are sorted by bytes with strictly decreasing objective.
    """
    problem = Knapsack(groups, fixed_bytes)
    if budgets is None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n!r}")
        budgets = np.linspace(problem.min_cost, problem.free_cost, n).round().astype(np.int64).tolist()
    feasible = sorted({int(b) for b in budgets if b >= problem.min_cost})
    if not feasible:
        raise InfeasibleBudget(problem.min_cost, int(max(budgets)) if len(budgets) else None)
    points = []
    for budget in feasible:
        alloc = problem.solve(budget, time_limit)
        points.append(ParetoPoint(alloc.total_cost, alloc.objective))
    front: list[ParetoPoint] = []
    for point in sorted(points):
        if not front or point.objective < front[-1].objective:  # equal bytes: the better came first
            front.append(point)
    return front


def save_pareto(points: Sequence[ParetoPoint], path: str | os.PathLike,
                extra_points: Mapping[str, tuple[int, float]] | None = None) -> None:
    """Write the front (and labelled extra points) as JSON, atomically."""
    doc = {"schema_version": 1, "points": [{"bytes": int(b), "objective": float(o)} for b, o in points],
           "extra": {k: {"bytes": int(b), "objective": float(o)} for k, (b, o) in (extra_points or {}).items()}}
    atomic_write(path, lambda fh: fh.write((json.dumps(doc, indent=1, allow_nan=False) + "\n").encode()))


def plot_pareto(points: Sequence[ParetoPoint], path_png: str | os.PathLike,
                extra_points: Mapping[str, tuple[int, float]] | None = None, *,
                title: str = "exact memory / objective front", ylabel: str = "objective") -> None:
    """Step plot of the front (x in GB) with labelled extra points, written atomically as PNG.

    Uses matplotlib's object API with the Agg canvas: no pyplot, no global backend change."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if points:
        xs = [b / 1e9 for b, _ in points]
        ys = [o for _, o in points]
        ax.step(xs, ys, where="post", color="tab:blue", lw=1.2)
        ax.plot(xs, ys, "o", color="tab:blue", ms=3, label="exact optimum")
    for i, (label, (b, o)) in enumerate((extra_points or {}).items()):
        ax.plot([b / 1e9], [o], marker="s^Dvp*"[i % 6], ls="none", ms=7, label=label)
    ys_all = [o for _, o in points] + [o for _, o in (extra_points or {}).values()]
    if ys_all and min(ys_all) > 0 and max(ys_all) / min(ys_all) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("memory (GB = 1e9 bytes)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path_png, lambda fh: fig.savefig(fh, format="png"))

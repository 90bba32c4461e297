"""The exact Pareto front: every point is the exact optimum at its bytes, the sweep is monotone, and
the JSON file and the PNG plot are written (atomically, nothing else left beside them)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from planner.search.allocate import InfeasibleBudget, solve_mckp
from planner.search.pareto import pareto_front, plot_pareto, save_pareto

Groups = list[list[tuple[int, float]]]


def random_groups(rng: np.random.Generator, n_groups: int, max_options: int, cost_hi: int) -> Groups:
    groups = []
    for _ in range(n_groups):
        n = int(rng.integers(1, max_options + 1))
        groups.append([(int(c), float(o)) for c, o in zip(rng.integers(0, cost_hi, n), rng.random(n))])
    return groups


def bounds_of(groups: Groups) -> tuple[int, int]:
    return sum(min(c for c, _ in g) for g in groups), sum(max(c for c, _ in g) for g in groups)


def test_pareto_front_is_exact_and_monotone(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    groups = random_groups(rng, 25, 8, cost_hi=10**6)
    fixed = 123_456
    points = pareto_front(groups, n=20, fixed_bytes=fixed)
    assert len(points) >= 5
    assert all(a.bytes < b.bytes and a.objective > b.objective for a, b in zip(points, points[1:]))
    lo = bounds_of(groups)[0] + fixed
    assert points[0].bytes >= lo and points[0].objective == pytest.approx(solve_mckp(groups, lo, fixed_bytes=fixed).objective)
    free = sum(min(o for _, o in g) for g in groups)
    assert points[-1].objective == pytest.approx(free, rel=1e-12)
    for point in points:  # each point is the exact optimum at its own byte count
        assert solve_mckp(groups, point.bytes, fixed_bytes=fixed).objective == pytest.approx(point.objective, rel=1e-12)
    chosen = pareto_front(groups, budgets=[lo - 1, lo, (lo + points[-1].bytes) // 2], fixed_bytes=fixed)
    assert 1 <= len(chosen) <= 2  # the infeasible budget is skipped
    with pytest.raises(InfeasibleBudget):
        pareto_front(groups, budgets=[lo - 1], fixed_bytes=fixed)

    png, js = tmp_path / "front.png", tmp_path / "front.json"
    plot_pareto(points, png, extra_points={"uniform 4-bit": (points[len(points) // 2].bytes, points[0].objective)})
    save_pareto(points, js, extra_points={"uniform 4-bit": (1, 2.0)})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    doc = json.loads(js.read_text())
    assert doc["schema_version"] == 1 and len(doc["points"]) == len(points) and doc["extra"]["uniform 4-bit"]["bytes"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["front.json", "front.png"]

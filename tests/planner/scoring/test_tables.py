"""Residual tables of the planner: the CPU split across threads gives the single-thread numbers."""
from __future__ import annotations

import torch

from planner import progress
from planner.scoring.tables import TableSettings, compute_tables, on_threads
from search_spaces.facts import TargetLayer


def test_on_threads_splits_the_stack_and_restores_the_thread_count() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: list[tuple[int, int]] = []

        def fn(x: torch.Tensor) -> torch.Tensor:
            seen.append((x.shape[0], torch.get_num_threads()))
            return x * 2

        x = torch.arange(5.0).view(5, 1)
        assert torch.equal(on_threads(fn, x), x * 2)
        assert sorted(n for n, _ in seen) == [2, 3] and all(t == 1 for _, t in seen)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_tables_on_two_threads_equal_one_thread(smollm2_linears) -> None:
    names = [f"model.layers.{b}.mlp.up_proj" for b in (0, 10, 20, 29)]
    layers = [(TargetLayer(n, tuple(smollm2_linears[n].shape), "up_proj", 0), smollm2_linears[n]) for n in names]
    before = torch.get_num_threads()
    progress.set_enabled(False)
    try:
        tables = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            tables.append(compute_tables(iter(layers), len(layers), TableSettings(), torch.device("cpu")))
    finally:
        torch.set_num_threads(before)
        progress.set_enabled(True)
    assert tables[0].names == tables[1].names == names
    assert torch.allclose(tables[0].table, tables[1].table, rtol=1e-4)
    assert torch.equal(tables[0].sq_norm, tables[1].sq_norm)

"""Residual tables of the planner: bounded stacking of same-shape weights, and the CPU split across threads giving the single-thread numbers."""
from __future__ import annotations

import torch

from planner import progress
from planner.scoring import tables
from planner.scoring.tables import TableSettings, compute_tables, on_threads
from search_spaces.facts import TargetLayer


def test_batches_bound_the_waiting_weights_whatever_the_depth(monkeypatch) -> None:
    monkeypatch.setattr(tables, "BATCH_BYTES", 4 * 64 * 64 * 5)  # five 64x64 fp32 weights
    shapes = [(64, 64), (64, 32), (128, 64), (64, 128)]
    stream = [(TargetLayer(f"model.layers.{d}.m{k}", shape, f"m{k}", d), torch.full(shape, float(d * 10 + k)))
              for d in range(12) for k, shape in enumerate(shapes)]
    seen, peak = [], 0

    def counted():
        nonlocal peak
        for i, item in enumerate(stream):
            # bytes read so far minus those already handed out in stacks: what _batches holds
            peak = max(peak, sum(w.numel() * 4 for _, w in stream[:i + 1]) - sum(w.numel() * 4 for _, w in seen))
            yield item

    for targets, stack in tables._batches(counted()):
        assert len({tuple(t.shape) for t in targets}) == 1 and stack.shape[0] == len(targets)
        for t, w in zip(targets, stack):
            assert torch.equal(w, dict((tt.name, ww) for tt, ww in stream)[t.name])
        seen.extend(zip(targets, stack))
    assert sorted(t.name for t, _ in seen) == sorted(t.name for t, _ in stream)
    assert peak <= tables.BATCH_BYTES + 4 * 128 * 64  # under the cap plus the one weight that crossed it


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


def tables_on_1_and_2_threads(layers, settings: TableSettings, **kwargs) -> list:
    """compute_tables over ``layers`` [(TargetLayer, weight)] with torch on 1 thread, then on 2
    (the thread count and the progress bars restored after)."""
    before = torch.get_num_threads()
    progress.set_enabled(False)
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(compute_tables(iter(layers), len(layers), settings, torch.device("cpu"), **kwargs))
    finally:
        torch.set_num_threads(before)
        progress.set_enabled(True)
    return results


def test_tables_on_two_threads_equal_one_thread(smollm2_linears) -> None:
    names = [f"model.layers.{b}.mlp.up_proj" for b in (0, 10, 20, 29)]
    layers = [(TargetLayer(n, tuple(smollm2_linears[n].shape), "up_proj", 0), smollm2_linears[n]) for n in names]
    results = tables_on_1_and_2_threads(layers, TableSettings())
    assert results[0].names == results[1].names == names
    assert torch.allclose(results[0].table, results[1].table, rtol=1e-4)
    assert torch.equal(results[0].sq_norm, results[1].sq_norm)

"""The residual tables' stacking: every layer once, same shapes together, bounded waiting memory."""
from __future__ import annotations

import torch

from planner.scoring import tables
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

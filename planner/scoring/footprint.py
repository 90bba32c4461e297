"""What planning itself needs: the planner's own peak memory, before a weight is read.

Scoring streams one transformer block at a time (:mod:`planner.scoring.stream`), so the peak is the
resident frame (embeddings, final norm and head, in fp32) plus the largest of the stages' working
sets, each bounded by one block or one layer, never by the depth:

- ``tables``: one layer's weight, its quantized copy and the Gram/SVD work of the residual table;
- ``sensitivity``: one block's weights, the gradients and squared-gradient sums of its target layers,
  one sequence's activations through it, and the head's logits and their gradient;
- ``zero-step proxy``: the reference log-probabilities of the held-out sequences and a trial's own,
  one block, and one layer's dequantized candidate;
- ``fine-tune proxy``: the candidate being trained, which is one of the plans and so fits the
  budget by construction (the largest plan of the space is counted).

What grows with depth lives on disk: the hidden states at every block boundary for the block-wise
backward (a memory-mapped file, ``boundary_file_bytes``) and the quantized copies of the weight
bank (``bank_disk_bytes``). The numbers are estimates in the sense of ``--dry-run``'s run estimate;
``bench/scale.py`` measures them (README "Planning at scale").
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from search_spaces.discovery import block_path
from search_spaces.widths import width_bits

FP32 = 4
RUNTIME_BYTES = 600 * 2**20  # Python, torch and transformers loaded, measured RSS before any weight


@dataclass(frozen=True)
class PlannerPeak:
    """Bytes: ``host`` (CPU scoring: everything; CUDA scoring: runtime and read buffers), ``device``
    (CUDA scoring only, else 0), ``stages`` (each stage's working set, the frame included where it is
    resident: the tables run before it is built), and what lies on disk."""

    host_bytes: int
    device_bytes: int
    frame_bytes: int
    stages: dict[str, int]
    boundary_file_bytes: int
    bank_disk_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def planner_peak(facts: Any, targets: Sequence[Any], non_target: Sequence[Any], *, bits: Sequence[int],
                 max_rank: int, calib_seqs: int, proxy_seqs: int, seq_len: int, trials: int, proxy_top: int,
                 candidate_bytes: int, on_gpu: bool) -> PlannerPeak:
    """The planner's peak for this model and these settings (see the module docstring)."""
    def numel(shape: Sequence[int]) -> int:
        n = 1
        for d in shape:
            n *= int(d)
        return n

    frame = FP32 * sum(numel(p.shape) for p in non_target if block_path(p.name) is None)
    per_block: dict[str, int] = {}
    for t in targets:
        key = block_path(t.name) or t.name
        per_block[key] = per_block.get(key, 0) + numel(t.shape)
    inside = FP32 * sum(numel(p.shape) for p in non_target if block_path(p.name) is not None)
    block_w = FP32 * max(per_block.values()) + inside // max(len(per_block), 1)
    block_t = FP32 * max(per_block.values())
    layer = FP32 * max(numel(t.shape) for t in targets)
    rows = max(min(t.shape) for t in targets)
    h, seq, vocab = facts.hidden, seq_len, facts.vocab if facts.is_decoder else facts.hidden
    acts = FP32 * seq * (14 * h + 5 * facts.intermediate) + FP32 * 3 * facts.heads * seq * seq
    head = 3 * FP32 * seq * vocab
    from planner.scoring.tables import BATCH_BYTES

    by_shape: dict[tuple[int, ...], int] = {}
    for t in targets:
        by_shape[tuple(t.shape)] = by_shape.get(tuple(t.shape), 0) + FP32 * numel(t.shape)
    stack = max(min(sum(by_shape.values()), BATCH_BYTES), layer)
    # the tables run before the frame exists: the weights waiting to be stacked by shape stay under
    # BATCH_BYTES, and one stack's quantizer and spectrum work is a few times its size (measured ~6x)
    tables = stack + 6 * stack + FP32 * rows * rows * 2
    stages = {"sensitivity": block_w + 2 * block_t + 4 * layer + acts + head}
    if trials > 0:
        logp = FP32 * proxy_seqs * seq * vocab
        stages["zero-step proxy"] = 2 * logp + 2 * head + block_w + 3 * layer + FP32 * max_rank * rows * 2
    if proxy_top > 0:
        stages["fine-tune proxy"] = int(candidate_bytes)
    stages = {k: frame + v for k, v in stages.items()}
    stages["tables"] = tables
    work = max(stages.values())
    widths = [b for b in bits if b < 16]
    n_weights = sum(numel(t.shape) for t in targets)
    bank = sum(n_weights * width_bits(b) // 8 + n_weights // 64 * FP32 for b in widths) if trials > 0 else 0
    bank += FP32 * max_rank * sum(sum(t.shape) for t in targets) * len(widths) if trials > 0 else 0
    boundary = FP32 * (facts.layers + 1) * calib_seqs * seq * h
    return PlannerPeak(host_bytes=RUNTIME_BYTES + (2 * layer if on_gpu else work), device_bytes=work if on_gpu else 0,
                       frame_bytes=frame, stages=stages, boundary_file_bytes=boundary, bank_disk_bytes=bank)

"""What a run needs beyond the model's own training step: the trainer's buffers and CUDA's reserve.

Part of the memory model (:mod:`planner.memory` imports these and is still the one function that
counts a run's bytes); kept apart because these terms come from outside the model: a trainer's loss
implementation (measured with :mod:`planner.verify.oracle`) and the CUDA driver, cuBLAS and PyTorch's
caching allocator (their sources are named at each constant).
"""
from __future__ import annotations

import math

from search_spaces.facts import ModelFacts

from planner.settings import RunSettings

# TRL's SFTTrainer (trl 1.13, loss_type "chunked_nll", its default) never builds the [T, V] logits:
# it gathers the hidden states of the valid tokens ([T, H], compute dtype, + int64 order and labels)
# and runs the LM head and the loss over chunks of 256 tokens under checkpointing.
TRL_CHUNK = 256  # trl.trainer.sft_trainer._CHUNKED_LM_HEAD_CHUNK_SIZE
# Peak bytes per [chunk, V] entry while one chunk runs backward: fp32 logits, log-softmax, its exp
# and their product, and their gradients (measured with planner.verify.oracle: 16.0 at V = 32k and 128k).
TRL_CHUNK_BYTES_PER_ENTRY = 16
# Unknown trainers: the step's peak is not measured; a margin on the allocated bytes (the
# differences measured between the known trainers were up to the size of the full logits, which
# this does not always cover: measure your trainer with planner.verify.oracle.measure_step).
OTHER_TRAINER_MARGIN = 0.10


def trainer_logits_bytes(facts: ModelFacts, run: RunSettings) -> tuple[int, int] | None:
    """(kept, transient) of the LM head and loss when the trainer computes them itself instead of the
    model (TRL's chunked loss); None when the model's own loss runs (:func:`logits_bytes`)."""
    if run.trainer != "trl" or not facts.is_decoder or not run.finetune:
        return None
    t, h, c = run.tokens, facts.hidden, run.compute_bytes
    chunk = min(TRL_CHUNK, t)
    kept = t * h * c + 2 * t * 8  # gathered hidden states, int64 order and labels
    return kept, chunk * facts.vocab * TRL_CHUNK_BYTES_PER_ENTRY + t * h * c  # + the gathered states' gradient


def trainer_margin_bytes(allocated: int, run: RunSettings) -> int:
    """Margin for a trainer whose step was never measured (``trainer="other"``)."""
    return math.ceil(allocated * OTHER_TRAINER_MARGIN) if run.trainer == "other" and run.finetune else 0


# ---------------------------------------------------------------- CUDA terms (the reserve)
# cuBLAS workspace: PyTorch sets CUBLAS_WORKSPACE_CONFIG=:4096:8 (8 x 4 MiB) on Hopper and newer and
# :4096:2:16:8 (2 x 4 MiB + 8 x 16 KiB) before; one per handle (device x stream). It comes from the
# caching allocator, so max_memory_allocated sees it too. The larger size is counted.
CUBLAS_WORKSPACE_BYTES = 8 * 4096 * 1024
# The caching allocator (PyTorch "CUDA memory management" notes, c10/cuda/CUDACachingAllocator.cpp):
# every block is rounded up to 512 B; requests <= 1 MiB are cut from 2 MiB segments, requests up to
# 10 MiB from 20 MiB segments, larger ones get a segment rounded up to 2 MiB; cached segments are
# split and reused. Counted: one partly used segment of each pool (2 + 20 MiB). The 512-byte
# rounding (< 512 B per live tensor, a few thousand tensors: ~1 MiB) and the waste of reused,
# split segments are what fragmentation measures.
SMALL_SEGMENT, LARGE_SEGMENT = 2 * 2**20, 20 * 2**20


def reserve_breakdown(allocated: int, run: RunSettings) -> dict[str, int]:
    """What a GPU needs beyond ``allocated`` (the model's peak live bytes), by source.

    ``cuda_context``: the driver's context and kernel images, outside torch's allocator (the run
    setting ``reserve_context_bytes``; 300-600 MiB on recent drivers with lazy module loading).
    ``cublas_workspace`` and ``allocator_rounding``: see the constants above. ``fragmentation``:
    cached blocks the allocator cannot reuse, ``reserve_fraction`` x allocated; the default 5% is a
    DEFAULT, NOT A MEASUREMENT: bench/gpu_check.sh measures max_memory_reserved / max_memory_allocated
    on phi-2- and Llama-3-shaped models. ``trainer_margin``: :data:`OTHER_TRAINER_MARGIN` for an
    unmeasured trainer. A CPU run has none of these.
    """
    if run.device != "cuda":
        return {"trainer_margin": trainer_margin_bytes(allocated, run)}
    rounding = SMALL_SEGMENT + LARGE_SEGMENT
    return {"cuda_context": run.reserve_context_bytes, "cublas_workspace": CUBLAS_WORKSPACE_BYTES,
            "allocator_rounding": rounding, "fragmentation": math.ceil(allocated * run.reserve_fraction),
            "trainer_margin": trainer_margin_bytes(allocated, run)}


def reserve_bytes(allocated: int, run: RunSettings) -> int:
    """CUDA context, workspaces, allocator rounding and slack on top of ``allocated`` (see
    :func:`reserve_breakdown`)."""
    return sum(reserve_breakdown(allocated, run).values())


def allocatable_bytes(budget: int, run: RunSettings) -> int:
    """The largest allocated byte count whose total (with reserve) fits ``budget``; -1 if none.

    ``k + reserve_bytes(k)`` never decreases as k grows, so bisection over whole bytes finds the
    exact answer in ~log2(budget) steps whatever the budget's size (a float first guess walked down
    one byte at a time took minutes for a budget of 1e30 GB)."""
    budget = int(budget)
    if reserve_bytes(0, run) > budget:
        return -1
    lo, hi = 0, budget + 1  # fits(lo) holds; fits(hi) does not (the reserve is never negative)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid + reserve_bytes(mid, run) <= budget:
            lo = mid
        else:
            hi = mid
    return lo

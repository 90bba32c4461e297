"""How far a model's next-token distribution is from a reference's on the same blocks: per-token KL
divergence KL(P_ref || P) and the candidate's negative log-likelihood, in one pass.

Used by every quality bench (candidate vs the unquantized model, or vs the fine-tuned 16-bit LoRA).
Memory-light: the models run batch by batch, and the fp64 log-softmax is taken ``rows`` tokens at a
time, so no [tokens, vocab] tensor of the whole text is ever held; what is kept is one float per
token (the per-token KL, for its 99th percentile). fp64 because the KL of two close models is a
small difference of large log-probabilities (~1e-4 next to ~10).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from planner.train.loop import _check_blocks, model_device

KLD_ROWS = 64  # tokens per fp64 log-softmax slab: 64 x 49152 vocab x 8 bytes = 25 MB per temporary
P99 = 0.99


def token_kld(ref_logits: torch.Tensor, logits: torch.Tensor, rows: int = KLD_ROWS) -> torch.Tensor:
    """Per-token KL(P_ref || P) = Σ_v p_ref(v) (log p_ref(v) − log p(v)) in nats, fp64.

    ``ref_logits``, ``logits``: [..., vocab] (same shape, any float dtype, any device) -> [...] fp64
    on that device. Each side goes through log_softmax in fp64; tiny negative rounding is clamped to 0
    (the divergence is >= 0; a model against itself gives exactly 0)."""
    if ref_logits.shape != logits.shape or ref_logits.dim() < 1:
        raise ValueError(f"ref_logits and logits must have one shape [..., vocab], got {tuple(ref_logits.shape)} "
                         f"and {tuple(logits.shape)}")
    ref2, cand2 = ref_logits.reshape(-1, ref_logits.shape[-1]), logits.reshape(-1, logits.shape[-1])
    out = torch.empty(ref2.shape[0], dtype=torch.float64, device=ref2.device)
    for i in range(0, ref2.shape[0], rows):
        ref = F.log_softmax(ref2[i:i + rows].double(), dim=-1)
        cand = F.log_softmax(cand2[i:i + rows].to(ref2.device).double(), dim=-1)
        out[i:i + rows] = (ref.exp() * (ref - cand)).sum(-1).clamp_min(0.0)
    return out.view(ref_logits.shape[:-1])


def token_nll(logits: torch.Tensor, labels: torch.Tensor, rows: int = KLD_ROWS) -> torch.Tensor:
    """Per-token −log p(label) in nats, fp64: ``logits`` [..., vocab], ``labels`` [...] -> [...]."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match logits {tuple(logits.shape)} without vocab")
    flat, lab = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device)
    out = torch.empty(flat.shape[0], dtype=torch.float64, device=flat.device)
    for i in range(0, flat.shape[0], rows):
        logp = F.log_softmax(flat[i:i + rows].double(), dim=-1)
        out[i:i + rows] = -logp.gather(-1, lab[i:i + rows, None]).squeeze(-1)
    return out.view(labels.shape)


@dataclass(frozen=True)
class KLDSummary:
    """Per-token KL over a text: ``mean``, ``p99`` (99th percentile, linear interpolation as
    numpy.percentile's default), ``tokens`` (how many predicted tokens)."""

    mean: float
    p99: float
    tokens: int

    @classmethod
    def of(cls, values: torch.Tensor) -> "KLDSummary":
        """From per-token values (any shape, >= 1 element)."""
        v = values.detach().reshape(-1).double().cpu()
        if v.numel() == 0:
            raise ValueError("no tokens to summarise")
        return cls(float(v.mean()), float(torch.quantile(v, P99)), int(v.numel()))

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "p99": self.p99, "tokens": self.tokens}


@dataclass(frozen=True)
class TextScore:
    """A model on one text's blocks: mean next-token NLL (nats) over ``tokens`` predicted tokens, and
    the per-token KL to each named reference."""

    nll: float
    tokens: int
    kld: Mapping[str, KLDSummary] = field(default_factory=dict)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


@torch.no_grad()
def score_blocks(model: nn.Module, blocks: torch.Tensor, references: Mapping[str, nn.Module] | None = None,
                 batch_size: int = 1) -> TextScore:
    """``model``'s NLL on ``blocks`` [n, seq_len] (each block predicts seq_len − 1 tokens, as in
    :func:`planner.train.loop.eval_loss`) and its per-token KL(P_ref || P) to every reference (the
    same token positions); one forward pass of each model per batch of ``batch_size`` blocks. Every
    model runs on its own device in eval mode; training modes are restored."""
    blocks = _check_blocks(blocks, "blocks")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    refs = dict(references or {})
    models = [model, *refs.values()]
    modes = [m.training for m in models]
    nll_sum, count = 0.0, 0
    per_token: dict[str, list[torch.Tensor]] = {name: [] for name in refs}
    try:
        for m in models:
            m.eval()
        for i in range(0, blocks.shape[0], batch_size):
            ids = blocks[i:i + batch_size]
            logits = model(input_ids=ids.to(model_device(model))).logits[:, :-1]
            nll_sum += float(token_nll(logits, ids[:, 1:]).sum())
            count += ids.shape[0] * (ids.shape[1] - 1)
            for name, ref in refs.items():
                ref_logits = ref(input_ids=ids.to(model_device(ref))).logits[:, :-1]
                per_token[name].append(token_kld(ref_logits, logits.to(ref_logits.device)).cpu())
                del ref_logits
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return TextScore(nll_sum / count, count, {name: KLDSummary.of(torch.cat(v)) for name, v in per_token.items()})

"""Zero-step proxy: how far the quantized model (Q + BA at each layer's choice) is from the original.

Reference log-probabilities of the full-precision model are computed once; a candidate is scored by
the mean per-token KL(p_full || p_candidate) and its own cross-entropy on the same held-out tokens.
Weights are swapped in place (each target module's ``weight.data`` points at the candidate's
tensor) and always restored to the very tensors the model had, so no copy of the originals is kept.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from search_spaces.discovery import weight_out_in

from planner.scoring.bank import WeightBank
from planner.scoring.sensitivity import is_causal_lm, pooled_embedding, target_modules


@dataclass(frozen=True)
class ProxyScore:
    """Causal LMs: ``kl`` = mean KL(full || candidate) per token (nats), ``loss`` = the candidate's
    next-token cross-entropy, ``ref_loss`` = the full model's. Encoders: ``kl`` = mean 1 - cos between
    the full and the candidate's mean-pooled embeddings, ``loss`` = the same, ``ref_loss`` = 0."""

    kl: float
    loss: float
    ref_loss: float


def zero_step_kind(causal: bool) -> str:
    return "zero-step KL(full || Q+BA) on held-out text" if causal else \
        "zero-step 1 - cos(full, Q+BA) of mean-pooled embeddings on held-out text"


class ZeroStepProxy:
    """Scores assignments {layer name: (bits, rank)} on fixed held-out blocks [n, seq_len]."""

    def __init__(self, model: nn.Module, bank: WeightBank, blocks: torch.Tensor, chunk: int = 2,
                 causal: bool | None = None) -> None:
        self.model, self.bank, self.blocks, self.chunk = model, bank, blocks, chunk
        self.mods = target_modules(model, bank.names)
        self._originals = {n: m.weight.data for n, m in self.mods.items()}  # restored after every trial
        self.causal = is_causal_lm(model) if causal is None else causal
        if self.causal:
            self.ref_logp = [lp for lp in self._logprobs()]
            self.ref_loss = self._ce(self.ref_logp)
        else:
            self.ref_emb = self._embeddings()
            self.ref_loss = 0.0

    @torch.no_grad()
    def _embeddings(self) -> torch.Tensor:
        return torch.cat([pooled_embedding(self.model, self.blocks[i:i + self.chunk])
                          for i in range(0, len(self.blocks), self.chunk)])

    @torch.no_grad()
    def _logprobs(self) -> list[torch.Tensor]:
        out = []
        for i in range(0, len(self.blocks), self.chunk):
            logits = self.model(input_ids=self.blocks[i:i + self.chunk]).logits[:, :-1].float()
            out.append(F.log_softmax(logits, dim=-1))
        return out

    def _ce(self, logps: list[torch.Tensor]) -> float:
        total, count = 0.0, 0
        for j, lp in enumerate(logps):
            labels = self.blocks[j * self.chunk:(j + 1) * self.chunk, 1:]
            total += float(-lp.gather(-1, labels.unsqueeze(-1)).sum())
            count += labels.numel()
        return total / count

    def _set(self, name: str, weight: torch.Tensor) -> None:
        mod = self.mods[name]
        w = weight_out_in(mod, weight)
        mod.weight.data = w.to(mod.weight.dtype)

    @contextlib.contextmanager
    def _swapped(self, assignment: Mapping[str, tuple[int, int]]) -> Iterator[None]:
        """The model runs with each layer's deq(Q) + BA inside; the originals are always restored."""
        try:
            for name, (bits, rank) in assignment.items():
                self._set(name, self.bank.weight(name, bits, rank))
            yield
        finally:
            for name, w in self._originals.items():
                self.mods[name].weight.data = w

    @torch.no_grad()
    def cosine_distances(self, assignment: Mapping[str, tuple[int, int]]) -> torch.Tensor:
        """Encoders: [n_blocks] 1 - cos(full, candidate) of each block's pooled embedding."""
        if self.causal:
            raise ValueError("cosine_distances is for encoders; causal LMs are scored by KL")
        with self._swapped(assignment):
            return 1 - F.cosine_similarity(self.ref_emb, self._embeddings(), dim=-1)

    @torch.no_grad()
    def score(self, assignment: Mapping[str, tuple[int, int]]) -> ProxyScore:
        if not self.causal:
            dist = float(self.cosine_distances(assignment).mean())
            return ProxyScore(dist, dist, 0.0)
        with self._swapped(assignment):
            logps = self._logprobs()
        kl, count = 0.0, 0
        for ref, lp in zip(self.ref_logp, logps):
            kl += float((ref.exp() * (ref - lp)).sum())
            count += ref.shape[0] * ref.shape[1]
        return ProxyScore(kl / count, self._ce(logps), self.ref_loss)

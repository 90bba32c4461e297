"""Zero-step proxy: how far the quantized model (Q + BA at each layer's choice) is from the original.

Reference log-probabilities of the full-precision model are computed once; a candidate is scored by
the mean per-token KL(p_full || p_candidate) and its own cross-entropy on the same held-out tokens.
Weights are swapped in place (each target module's ``weight.data`` points at the candidate's
tensor) and always restored to the very tensors the model had, so no copy of the originals is kept.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

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


@dataclass
class ZeroStepReference:
    """The unquantized model's outputs on the held-out blocks, which every candidate is scored against:
    causal LMs, per chunk of blocks, log-probabilities [b, seq - 1, vocab] and the cross-entropy;
    encoders, the pooled embeddings [n, hidden]. Stored as tensors (the planner caches it)."""

    causal: bool
    logp: list[torch.Tensor] | None = None
    emb: torch.Tensor | None = None
    loss: float = 0.0

    def to_tensors(self) -> dict[str, torch.Tensor]:
        if self.causal:
            return {**{f"logp.{i}": t for i, t in enumerate(self.logp)},
                    "loss": torch.tensor([self.loss], dtype=torch.float64)}
        return {"emb": self.emb}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> "ZeroStepReference":
        if "emb" in tensors:
            return cls(False, emb=tensors["emb"])
        chunks = sorted((int(k.split(".")[1]), t) for k, t in tensors.items() if k.startswith("logp."))
        return cls(True, logp=[t for _, t in chunks], loss=float(tensors["loss"][0]))


def zero_step_kind(causal: bool) -> str:
    return "zero-step KL(full || Q+BA) on held-out text" if causal else \
        "zero-step 1 - cos(full, Q+BA) of mean-pooled embeddings on held-out text"


class ZeroStepProxy:
    """Scores assignments {layer name: (bits, rank)} on fixed held-out blocks [n, seq_len].

    This one runs a full model with the candidate's weights swapped in; :class:`StreamedZeroStepProxy`
    runs the same computation one transformer block at a time. Both score with :meth:`score`."""

    def __init__(self, model: nn.Module, bank: WeightBank, blocks: torch.Tensor, chunk: int = 2,
                 causal: bool | None = None, reference: ZeroStepReference | None = None) -> None:
        self.model, self.bank, self.blocks, self.chunk = model, bank, blocks, chunk
        self.mods = target_modules(model, bank.names)
        self._originals = {n: m.weight.data for n, m in self.mods.items()}  # restored after every trial
        self.causal = is_causal_lm(model) if causal is None else causal
        self._reference(reference)

    def _reference(self, reference: ZeroStepReference | None) -> None:
        """The unquantized model's outputs: ``reference`` (computed before, e.g. cached), or run now."""
        if reference is not None and reference.causal == self.causal:
            self.ref_logp, self.ref_emb, self.ref_loss = reference.logp, reference.emb, reference.loss
        elif self.causal:
            self.ref_logp = self._run(None)
            self.ref_loss = self._ce(self.ref_logp)
        else:
            self.ref_emb = self._run(None)
            self.ref_loss = 0.0

    def reference(self) -> ZeroStepReference:
        if self.causal:
            return ZeroStepReference(True, logp=self.ref_logp, loss=self.ref_loss)
        return ZeroStepReference(False, emb=self.ref_emb)

    def _chunks(self) -> Iterator[torch.Tensor]:
        for i in range(0, len(self.blocks), self.chunk):
            yield self.blocks[i:i + self.chunk]

    @torch.no_grad()
    def _run(self, assignment: Mapping[str, tuple[int, int]] | None) -> Any:
        """Causal LMs: per chunk, log-probabilities [b, seq - 1, vocab]; encoders: pooled embeddings
        [n, hidden]; of the model with ``assignment``'s weights (None: the full-precision model)."""
        with self._swapped(assignment or {}):
            if not self.causal:
                return torch.cat([pooled_embedding(self.model, ids) for ids in self._chunks()])
            return [F.log_softmax(self.model(input_ids=ids).logits[:, :-1].float(), dim=-1) for ids in self._chunks()]

    def _ce(self, logps: list[torch.Tensor]) -> float:
        total, count = 0.0, 0
        for lp, ids in zip(logps, self._chunks()):
            labels = ids[:, 1:].to(lp.device)
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
        return 1 - F.cosine_similarity(self.ref_emb, self._run(assignment), dim=-1)

    @torch.no_grad()
    def score(self, assignment: Mapping[str, tuple[int, int]]) -> ProxyScore:
        if not self.causal:
            dist = float(self.cosine_distances(assignment).mean())
            return ProxyScore(dist, dist, 0.0)
        logps = self._run(assignment)
        kl, count = 0.0, 0
        for ref, lp in zip(self.ref_logp, logps):
            kl += float((ref.exp() * (ref - lp)).sum())
            count += ref.shape[0] * ref.shape[1]
        return ProxyScore(kl / count, self._ce(logps), self.ref_loss)


class StreamedZeroStepProxy(ZeroStepProxy):
    """:class:`ZeroStepProxy` one transformer block at a time (a :class:`planner.scoring.stream.BlockStream`):
    the reference runs the checkpoint's blocks once; a candidate runs each block with its layers'
    deq(Q) + BA from the bank, and the rest of the block from the checkpoint. Only the held-out
    blocks' hidden states (a few MB) and the reference outputs persist between blocks."""

    def __init__(self, stream: Any, bank: WeightBank, blocks: torch.Tensor, chunk: int = 2,
                 causal: bool = True, reference: ZeroStepReference | None = None) -> None:
        self.stream, self.bank, self.blocks, self.chunk, self.causal = stream, bank, blocks, chunk, causal
        self.inputs = [stream.capture(ids) for ids in self._chunks()]
        self._reference(reference)

    @torch.no_grad()
    def _run(self, assignment: Mapping[str, tuple[int, int]] | None) -> Any:
        st = self.stream
        hidden = [inp.hidden for inp in self.inputs]
        for i in range(len(st)):
            weights = {n: self.bank.weight(n, *assignment[n], device=st.device) for n in st.block_targets[i]
                       if assignment and n in assignment}
            with st.block(i, weights) as blk:
                hidden = [st.run(blk, h, inp) for h, inp in zip(hidden, self.inputs)]
        outs = []
        for h, ids in zip(hidden, self._chunks()):
            ids = ids.to(st.device)
            if self.causal:
                logits = st.head(h, lambda m: m(input_ids=ids, **st._call_kwargs()).logits)
                outs.append(F.log_softmax(logits[:, :-1].float(), dim=-1))
            else:
                outs.append(st.head(h, lambda m: pooled_embedding(m, ids)))
        return outs if self.causal else torch.cat(outs)

"""Model-level sensitivity: what a layer's quantization error costs the model's loss.

Second-order estimate: a perturbation E of weight W raises the loss by about
    dL ~= 1/2 * sum_ij F_ij * E_ij^2,   F = empirical Fisher (mean squared per-sequence gradient).
For each target layer and bit width we store ``fisher_err[l, b] = 1/2 sum F * (W - deq q_b(W))^2``.
A rank-r LoftQ adapter removes part of E; we scale by the residual table's
(res[l, b, r] / res[l, b, 0])^2 (assumes F is not aligned with the removed directions).

The quantized candidates themselves (Q + BA per layer) come from :mod:`planner.scoring.bank`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from loftq import dequantize
from search_spaces.discovery import weight_out_in
from search_spaces.widths import quantize_width

from planner import progress


def target_modules(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    mods = dict(model.named_modules())
    missing = [n for n in names if n not in mods]
    if missing:
        raise KeyError(f"model has no module(s) {missing[:3]}")
    return {n: mods[n] for n in names}


def module_weight(module: nn.Module) -> torch.Tensor:
    """[out, in] view of a Linear's weight, or of a gpt2 Conv1D's (stored [in, out])."""
    w = module.weight
    return weight_out_in(module, w)


def is_causal_lm(model: nn.Module) -> bool:
    """True for models with a vocabulary head (next-token loss); False for bare encoders."""
    return model.get_output_embeddings() is not None and bool(getattr(model.config, "is_decoder", False)
                                                                or getattr(model.config, "is_encoder_decoder", False)
                                                                or "CausalLM" in type(model).__name__)


def pooled_embedding(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[batch, hidden] mean-pooled last hidden state: a sentence embedding (blocks have no padding)."""
    return model(input_ids=ids).last_hidden_state.float().mean(dim=1)


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def encoder_probe_loss(model: nn.Module, ids: torch.Tensor, seed: int) -> torch.Tensor:
    """r . f(x) with r ~ N(0, I) fixed by ``seed``: its squared gradient is an unbiased estimate of
    diag(J^T J), the Gauss-Newton curvature of 1/2 ||f(W + E) - f(W)||^2 for the pooled embedding f,
    so the same 1/2 sum F E^2 estimates how far a perturbation moves the embeddings."""
    emb = pooled_embedding(model, ids)
    r = torch.randn(emb.shape, generator=torch.Generator().manual_seed(seed)).to(emb.device)
    return (emb * r).sum()


def empirical_fisher(model: nn.Module, names: Sequence[str], blocks: torch.Tensor,
                     causal: bool | None = None, seed_offset: int = 0) -> dict[str, torch.Tensor]:
    """Mean over sequences of the squared gradient of each target weight ([out, in], fp32).

    blocks: LongTensor [n_seq, seq_len] of token ids; one backward pass per sequence. Causal LMs use
    the next-token loss; encoders the random-probe loss (:func:`encoder_probe_loss`), so F then is the
    Gauss-Newton curvature of the embedding distance instead of the loss's. ``causal``: the
    architecture facts' answer (planning passes it); None asks the loaded model. Sequence ``i`` of an
    encoder gets the probe seed ``seed_offset + i``.
    """
    causal = is_causal_lm(model) if causal is None else causal
    mods = target_modules(model, names)
    params = {n: m.weight for n, m in mods.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    try:
        with progress.task("Fisher sensitivity", len(blocks)) as advance:
            for i, seq in enumerate(blocks):
                model.zero_grad(set_to_none=True)
                ids = seq.unsqueeze(0)
                (lm_loss(model, ids) if causal else encoder_probe_loss(model, ids, seed=seed_offset + i)).backward()
                for n, p in params.items():
                    fisher[n].add_(p.grad.float().pow(2))
                advance(1)
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    for n, m in mods.items():
        f = fisher[n] / len(blocks)
        fisher[n] = weight_out_in(m, f)
    return fisher


def fisher_total(rows: torch.Tensor) -> torch.Tensor:
    """fisher_err [n_layers, len(bits)] from per-sequence rows [n_seqs, n_layers, len(bits)]: their
    sum in sequence order over the number of sequences (the same float64 operations however the
    sequences were computed: in one pass, or one per worker)."""
    return rows.sum(0) / rows.shape[0]


def _squared_errors(name: str, w: torch.Tensor, bits: Sequence, method: str, block_size: int,
                    bank=None) -> list[torch.Tensor | None]:
    """(W - deq q_b(W))^2 [out, in] fp32 per width (None for a 16-bit keep), Q from ``bank`` if given."""
    out: list[torch.Tensor | None] = []
    for b in bits:
        if b >= 16:
            out.append(None)
            continue
        deq = bank.deq(name, b).float() if bank is not None else \
            dequantize(quantize_width(w, b, method, block_size), torch.float32)
        out.append((w.float() - deq.to(w.device)).square_())
    return out


def _row(g2: torch.Tensor, errs: Sequence[torch.Tensor | None]) -> list[float]:
    """One sequence's 1/2 sum g^2 (W - Q_b)^2 per width (0 for a keep)."""
    return [0.0 if e is None else 0.5 * float((g2 * e).sum()) for e in errs]


def fisher_rows(model: nn.Module, names: Sequence[str], blocks: torch.Tensor, bits: Sequence, method: str = "nf",
                block_size: int = 64, causal: bool | None = None, *, bank=None, seed_offset: int = 0) -> torch.Tensor:
    """[n_seqs, n_layers, len(bits)] float64: per calibration sequence s, 1/2 sum g_s^2 (W - deq q_b(W))^2
    with g_s that sequence's gradient (whole model in memory); :func:`fisher_total` of the rows is the
    Fisher-weighted error of :mod:`this module <planner.scoring.sensitivity>`. ``bank``: Q from this
    :class:`planner.scoring.bank.WeightBank` (e.g. its feedback-rounded Q)."""
    mods = target_modules(model, names)
    rows = torch.zeros(len(blocks), len(names), len(bits), dtype=torch.float64)
    for s in range(len(blocks)):
        g2 = empirical_fisher(model, names, blocks[s:s + 1], causal=causal, seed_offset=seed_offset + s)
        for i, name in enumerate(names):
            w = module_weight(mods[name]).detach().float()
            rows[s, i] = torch.tensor(_row(g2[name], _squared_errors(name, w, bits, method, block_size, bank)),
                                      dtype=torch.float64)
    return rows


DD_CACHE_BYTES = 1 << 30  # (W - Q_b)^2 of a block's layers kept for all its sequences up to this size


def streamed_fisher_rows(stream, blocks: torch.Tensor, bits: Sequence, method: str = "nf", block_size: int = 64,
                         causal: bool = True, *, bank=None, folder=None, seed_offset: int = 0) -> torch.Tensor:
    """:func:`fisher_rows`, one transformer block at a time.

    ``stream``: a :class:`planner.scoring.stream.BlockStream`; rows in the order of ``stream.targets``.
    Forward: every sequence through block 0, 1, ..., keeping each block's inputs (``folder``: in a
    memory-mapped file there). Backward: the head's gradient with respect to the last hidden states,
    then the blocks in reverse, each recomputed from its kept inputs with its target weights requiring
    grad; each sequence's squared gradients are turned into that sequence's per-width scalars at
    once. (W - Q_b)^2 is computed once per block for all its sequences (up to DD_CACHE_BYTES, else once
    per sequence: the same numbers). Nothing weight-sized outlives its block. Encoders use the probe
    loss with seed ``seed_offset + s`` for sequence s (as :func:`empirical_fisher` does for s).
    """
    from planner.scoring.stream import Boundaries

    n, nb = len(blocks), len(stream)
    row = {name: i for i, name in enumerate(stream.targets)}
    out = torch.zeros(n, len(row), len(bits), dtype=torch.float64)
    inputs = [stream.capture(blocks[s:s + 1]) for s in range(n)]
    first = inputs[0].hidden
    bounds = Boundaries((nb + 1, n) + tuple(first.shape[1:]), torch.float32, folder)
    for s, inp in enumerate(inputs):
        bounds[0][s] = inp.hidden[0]
    with progress.task("Fisher sensitivity: forward", nb) as advance, torch.no_grad():
        for i in range(nb):
            with stream.block(i) as blk:
                for s, inp in enumerate(inputs):
                    bounds[i + 1][s] = stream.run(blk, bounds[i][s:s + 1].to(stream.device, stream.dtype), inp)[0]
            advance(1)
    grads = torch.empty_like(bounds[nb], device=stream.device)
    for s in range(n):
        h = bounds[nb][s:s + 1].to(stream.device, stream.dtype).requires_grad_(True)
        ids = blocks[s:s + 1].to(stream.device)
        loss = stream.head(h, (lambda m: lm_loss(m, ids)) if causal else
                           (lambda m: encoder_probe_loss(m, ids, seed=seed_offset + s)))
        loss.backward()
        grads[s] = h.grad[0]
    n_widths = sum(1 for b in bits if b < 16)
    with progress.task("Fisher sensitivity: backward", nb) as advance:
        for i in reversed(range(nb)):
            names = stream.block_targets[i]
            with stream.block(i, grad=names) as blk:
                mods = {name: blk.get_submodule(name[len(f"{stream.path}.{i}."):]) for name in names}
                weights = {name: weight_out_in(m).detach().float() for name, m in mods.items()}
                keep = sum(w.numel() for w in weights.values()) * n_widths * 4 <= DD_CACHE_BYTES
                errs = {name: _squared_errors(name, w, bits, method, block_size, bank) for name, w in weights.items()} \
                    if keep else {}
                for s, inp in enumerate(inputs):
                    h = bounds[i][s:s + 1].to(stream.device, stream.dtype).requires_grad_(True)
                    stream.run(blk, h, inp).backward(grads[s:s + 1])
                    grads[s] = h.grad[0]
                    for name, m in mods.items():
                        g2 = weight_out_in(m, m.weight.grad.float().pow(2))
                        m.weight.grad = None
                        e = errs[name] if keep else _squared_errors(name, weights[name], bits, method, block_size, bank)
                        out[s, row[name]] = torch.tensor(_row(g2, e), dtype=torch.float64)
            advance(1)
    return out

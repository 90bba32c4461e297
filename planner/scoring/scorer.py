"""What planning scores with: the model one block at a time, or (where it cannot stream) whole.

:func:`open_scorer` gives a :class:`Scorer` over a :class:`planner.sources.ModelSource` and its
target layers. Streamed (the default for every architecture :mod:`planner.scoring.stream` can run:
decoder LMs and encoders), nothing holds the model in full precision: target weights are read from
safetensors when a layer needs them, the sensitivity and the zero-step proxy run block by block,
and the fine-tune proxy's candidates are built on a *shell* (every non-target parameter from the
checkpoint, the target layers filled by the candidate's packed weights). Otherwise (encoder-decoders,
mixed block kinds) the full fp32 model is loaded, as before, and the same methods use it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TYPE_CHECKING

import torch
from torch import nn

from planner.errors import PlannerError

if TYPE_CHECKING:  # annotations only
    from planner.sources import ModelSource

log = logging.getLogger(__name__)


class SourceWeights(Mapping[str, torch.Tensor]):
    """Target name -> fp32 [out, in] weight, read from the checkpoint on every lookup (no copy kept)."""

    def __init__(self, source: ModelSource, targets: Sequence[Any]) -> None:
        self.source = source
        self._targets = {t.name: t for t in targets}

    def __getitem__(self, name: str) -> torch.Tensor:
        target = self._targets[name]
        return next(iter(self.source.iter_weights([target])))[1]

    def shape_of(self, name: str) -> tuple[int, ...]:
        """[out, in] without reading the weight."""
        return tuple(self._targets[name].shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)


def shell_model(source: ModelSource, targets: Sequence[str], dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model with every parameter except the target weights read from the checkpoint (in
    ``dtype``); the target weights stay on the meta device, for :func:`planner.runtime.layers.swap_linears`
    to replace. Costs the embeddings, norms and biases, not the model."""
    from planner.runtime.load import parameters_on_meta
    from planner.sources import model_class

    cls = model_class(source.config, source.trust_remote_code)
    build = getattr(cls, "_from_config", None) or cls.from_config
    with parameters_on_meta():
        model = build(source.config)
    skip = {id(model.get_submodule(name).weight) for name in targets}
    state = {name: source.read_tensor(name).to(dtype) for name, p in model.named_parameters() if id(p) not in skip}
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class Scorer:
    """Sensitivity, zero-step proxy and fine-tune base for one model; see the module docstring."""

    def __init__(self, source: ModelSource, targets: Sequence[Any], causal: bool, device: torch.device | str = "cpu",
                 scratch: Path | None = None, stream: bool = True) -> None:
        from planner.scoring.stream import stream_or_none

        self.source, self.targets, self.causal = source, list(targets), causal
        self.names = [t.name for t in self.targets]
        self.device, self.scratch = torch.device(device), scratch
        self.stream, why = stream_or_none(source, self.names, torch.float32, self.device) if stream else (None, "asked")
        self.model: nn.Module | None = None
        if self.stream is not None:
            check_causal(self.stream.frame, causal, source.reference)
            check_non_targets(source, self.names)
        else:
            log.info("%s: scoring with the whole model in memory (%s)", source.reference, why)
            self.model = load_full_model(source, causal)

    @property
    def streamed(self) -> bool:
        return self.stream is not None

    def weights(self) -> Mapping[str, torch.Tensor]:
        """The target weights ([out, in]) for a :class:`planner.scoring.bank.WeightBank`."""
        from planner.scoring.bank import ModelWeights

        return SourceWeights(self.source, self.targets) if self.streamed else ModelWeights(self.model, self.names)

    def fisher_rows(self, blocks: torch.Tensor, bits: Sequence, method: str, block_size: int, *,
                    bank: Any = None, seed_offset: int = 0) -> torch.Tensor:
        """[n_seqs, n_targets, len(bits)]: per calibration sequence, 1/2 sum g^2 (W - deq q_b(W))^2
        (:func:`planner.scoring.sensitivity.fisher_total` of them is the Fisher-weighted error);
        sequence s of ``blocks`` is sequence ``seed_offset + s`` of the calibration set (its encoder
        probe seed)."""
        from planner.scoring.sensitivity import fisher_rows, streamed_fisher_rows

        if self.streamed:
            return streamed_fisher_rows(self.stream, blocks, bits, method, block_size, self.causal, bank=bank,
                                        folder=self.scratch, seed_offset=seed_offset)
        return fisher_rows(self.model, self.names, blocks, bits, method, block_size, self.causal, bank=bank,
                           seed_offset=seed_offset)

    def zero_step(self, bank: Any, blocks: torch.Tensor, reference: Any = None) -> Any:
        """The zero-step proxy over ``bank`` on the held-out ``blocks``; ``reference``: the
        unquantized model's outputs there (a :class:`planner.scoring.proxy.ZeroStepReference`), else run now."""
        from planner.scoring.proxy import StreamedZeroStepProxy, ZeroStepProxy

        if self.streamed:
            return StreamedZeroStepProxy(self.stream, bank, blocks, causal=self.causal, reference=reference)
        return ZeroStepProxy(self.model, bank, blocks, causal=self.causal, reference=reference)

    def candidate_base(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """What the fine-tune proxy's candidates are built on (never modified)."""
        if self.model is not None:
            return self.model
        return shell_model(self.source, self.names, dtype)

    def candidate_builder(self, bank: Any, method: str, block_size: int, max_rank: int, run: Any) -> Any:
        """The fine-tune proxy's :class:`planner.scoring.ftproxy.CandidateBuilder` on the score device.
        On the CPU it computes in fp32 (as the proxy always has); on a GPU in the run's compute and
        adapter dtypes, so the candidate weighs what the plan's estimate counts."""
        from planner.runtime.load import adapter_dtype_for, compute_dtype_for
        from planner.scoring.ftproxy import CandidateBuilder

        compute = torch.float32 if self.device.type == "cpu" else compute_dtype_for(run, self.device)
        adapter = torch.float32 if self.device.type == "cpu" else adapter_dtype_for(run, compute)
        base = self.candidate_base(torch.float32 if self.model is not None else compute)
        return CandidateBuilder(base, method, block_size, max_rank=max_rank, bank=bank, compute_dtype=compute,
                                adapter_dtype=adapter, device=self.device)


def check_non_targets(source: ModelSource, targets: Sequence[str]) -> None:
    """Read every parameter that is not a target weight (norms, biases, embeddings: small) once, so
    a non-finite value anywhere fails now, in one line naming it, as loading the whole model did;
    the target weights are checked as the tables stream them."""
    skeleton = source.skeleton
    skip = {id(skeleton.get_submodule(name).weight) for name in targets}
    for name, p in skeleton.named_parameters():
        if id(p) not in skip:
            source.read_tensor(name)


def load_full_model(source: ModelSource, causal: bool) -> nn.Module:
    """The full fp32 model, checked against the config's facts (the fallback for non-streaming models)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = source.load_model(torch.float32)
    check_causal(model, causal, source.reference)
    return model


def check_causal(model: nn.Module, causal: bool, reference: str) -> None:
    """The facts decide memory and labels; the model the scores come from must agree."""
    from planner.scoring.sensitivity import is_causal_lm

    if is_causal_lm(model) != causal:
        raise PlannerError(f"{reference}: the config says {'a causal LM' if causal else 'an encoder'} "
                           f"but {type(model).__name__} {'has no' if causal else 'has a'} "
                           "language-model head; cannot score plans for it")

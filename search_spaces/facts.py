"""Shape facts of a model and of its target layers: what memory estimates need before any download."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ModelFacts:
    """Architecture numbers of a transformer, enough for the memory model.

    Every number the memory model reads is a field here (no free-form dict), filled from the config
    by :func:`search_spaces.discovery.facts_from_config`. ``kv_heads`` < ``heads`` means
    grouped-query attention. ``tied_embeddings``: the output head shares the input embedding
    (counted once). ``hidden_act``: the MLP's activation as the config names it (None: unknown).
    ``resid_dropout``: dropout probability on the residual branches (phi's ``resid_pdrop``, BERT's
    ``hidden_dropout_prob``); > 0 makes every such dropout keep a mask in training.
    ``partial_rotary_factor``: share of each head's dimensions that get rotary embeddings.
    Encoder-decoder models (t5/bart) set ``layers`` to encoder + decoder blocks and keep both
    counts in ``encoder_layers`` / ``decoder_layers`` (None for single-stack models).
    """

    architecture: str  # model_type as transformers names it: "llama", "phi", "bert", ...
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    max_positions: int = 2048
    head_dim: int | None = None  # None: hidden // heads
    gated_mlp: bool = True  # llama-style gate/up/down (3 matrices) vs fc1/fc2 (2 matrices)
    is_decoder: bool = True  # causal LM (has a vocab head) vs encoder (no LM head at train time)
    hidden_act: str | None = None
    resid_dropout: float = 0.0
    partial_rotary_factor: float = 1.0
    encoder_layers: int | None = None
    decoder_layers: int | None = None

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelFacts.{name} must be a positive int, got {value!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.hidden_act is not None and (not isinstance(self.hidden_act, str) or not self.hidden_act):
            raise ValueError(f"ModelFacts.hidden_act must be a non-empty string or None, got {self.hidden_act!r}")
        if not _number(self.resid_dropout) or not 0.0 <= self.resid_dropout < 1.0:
            raise ValueError(f"ModelFacts.resid_dropout must be in [0, 1), got {self.resid_dropout!r}")
        if not _number(self.partial_rotary_factor) or not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"ModelFacts.partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}")
        for name in ("encoder_layers", "decoder_layers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"ModelFacts.{name} must be a positive int or None, got {value!r}")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.dim_per_head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelFacts":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown model fact(s) {', '.join(unknown)}")
        return cls(**d)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TargetLayer:
    """One quantizable linear layer: ``shape`` is (out_features, in_features) as nn.Linear stores it.

    ``module_type`` is the leaf name ("q_proj", "fc1", ...); ``block`` the transformer block index
    (or -1 when the layer sits outside the blocks). ``transposed``: stored as (in, out) on disk
    (gpt2's Conv1D); streamed weights are always returned as (out, in).
    """

    name: str
    shape: tuple[int, int]
    module_type: str
    block: int
    has_bias: bool = False
    transposed: bool = False

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

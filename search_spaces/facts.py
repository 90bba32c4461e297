"""Shape facts of a model and of its target layers: what memory estimates need before any download."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelFacts:
    """Architecture numbers of a transformer, enough for the memory model.

    ``kv_heads`` < ``heads`` means grouped-query attention. ``tied_embeddings``: the output head
    shares the input embedding (counted once). Encoder-decoder models (t5/bart) set ``layers`` to
    encoder + decoder blocks and keep both counts in ``extra["encoder_layers"]`` /
    ``extra["decoder_layers"]``.
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
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelFacts.{name} must be a positive int, got {value!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

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
        return cls(**d)


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

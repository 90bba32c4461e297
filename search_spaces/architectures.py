"""Per-architecture target rules, keyed by ``config.model_type`` (one registry, generic fallback).

A rule names the leaf modules that are the quantizable linear layers of one transformer block
(read off each architecture's Hugging Face modelling code) and what to leave out by default
(poolers, task heads). An architecture without a rule uses ``generic``: every ``nn.Linear`` /
``Conv1D`` except the output head; embeddings are never linear layers, so they never appear.
"""
from __future__ import annotations

from dataclasses import dataclass

from loftq.registry import Registry


@dataclass(frozen=True)
class ArchRule:
    """How to find the target layers of one architecture.

    ``targets``: leaf module names that are targets (None: every linear layer, the generic rule).
    ``exclude``: regexes (``re.search`` on the full module name) of linear layers left out by
    default, e.g. BERT's pooler. ``gated_mlp``: gate/up/down MLP (three matrices) rather than
    fc1/fc2; None means "read it from the config" (T5's ``is_gated_act``). ``encoder_only``: no
    language-model head at training time (BERT-like encoders).
    """

    targets: tuple[str, ...] | None
    exclude: tuple[str, ...] = ()
    gated_mlp: bool | None = False
    encoder_only: bool = False

    def __post_init__(self) -> None:
        if self.targets is not None and (not self.targets or not all(isinstance(t, str) and t for t in self.targets)):
            raise ValueError(f"ArchRule.targets must be None or non-empty leaf names, got {self.targets!r}")


ARCHITECTURES: Registry[ArchRule] = Registry("architecture rule")

# Llama family: q/k/v/o attention projections and a gated MLP (gate/up/down).
_LLAMA = ArchRule(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), gated_mlp=True)
for _name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite", "smollm3"):
    ARCHITECTURES.add(_name, _LLAMA)
# Phi-1/1.5/2: separate q/k/v, "dense" output projection, fc1/fc2 MLP.
ARCHITECTURES.add("phi", ArchRule(("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")))
# Phi-3: fused qkv_proj and gate_up_proj.
ARCHITECTURES.add("phi3", ArchRule(("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), gated_mlp=True))
# GPT-2: Conv1D layers stored transposed as (in, out); c_proj appears in attention and MLP.
ARCHITECTURES.add("gpt2", ArchRule(("c_attn", "c_proj", "c_fc")))
# BERT-like encoders: "dense" also names the pooler and the MLM head's transform, left out.
_BERT = ArchRule(("query", "key", "value", "dense"), exclude=(r"(^|\.)pooler\.", r"(^|\.)cls\.", r"(^|\.)lm_head\."),
                 encoder_only=True)
for _name in ("bert", "roberta", "xlm-roberta", "electra"):
    ARCHITECTURES.add(_name, _BERT)
# T5: q/k/v/o in self- and cross-attention, wi/wo MLP (wi_0/wi_1 when gated).
ARCHITECTURES.add("t5", ArchRule(("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"), gated_mlp=None))
# BART-like encoder-decoders: q/k/v/out_proj in self- and cross-attention, fc1/fc2.
_BART = ArchRule(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), exclude=(r"(^|\.)classification_head\.",))
for _name in ("bart", "mbart"):
    ARCHITECTURES.add(_name, _BART)
ARCHITECTURES.add("generic", ArchRule(None))


def rule_for(model_type: str | None) -> ArchRule:
    """The rule registered for ``model_type``, or the generic rule."""
    return ARCHITECTURES.get(model_type) if model_type in ARCHITECTURES else ARCHITECTURES.get("generic")

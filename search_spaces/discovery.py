"""Target-layer discovery on a model (real or a meta-device skeleton) and shape facts from a config.

``find_targets`` walks ``model.named_modules()`` once and reports every quantizable linear layer as
a :class:`TargetLayer` with ``shape = (out_features, in_features)``; it never touches weight values,
so it works on a skeleton built on the meta device. Names are the model's own module paths
(``model.layers.3.mlp.up_proj``), the names PEFT's ``target_modules`` and plan files use.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .architectures import ArchRule, rule_for
from .facts import ModelFacts, TargetLayer

log = logging.getLogger(__name__)

# The first all-digit path component marks a block: "model.layers.3.mlp" -> stack "model.layers", 3.
_BLOCK = re.compile(r"^(?P<stack>(?:[^.]+\.)*?[^.]+)\.(?P<index>\d+)(?=\.|$)")
_PLAIN = re.compile(r"[A-Za-z0-9_.]+")  # a leaf name or dotted suffix, not a regex
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for pure-torch models
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (gpt2 and kin): a linear layer whose weight is stored (in, out)."""
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a transformers ``Conv1D``: the layers a plan can target."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_out_in(module: nn.Module, weight: "torch.Tensor | None" = None) -> "torch.Tensor":
    """The module's weight (or ``weight``, a tensor of the stored layout) as a (out, in) view."""
    w = module.weight if weight is None else weight
    return w.t() if is_conv1d(module) else w


def block_path(name: str) -> str | None:
    """``"model.layers.3"`` for ``"model.layers.3.mlp.up_proj"``; None outside numbered blocks."""
    m = _BLOCK.match(name)
    return f"{m['stack']}.{m['index']}" if m else None


def type_path(name: str) -> str:
    """The module's place inside its block, block index starred: ``"model.layers.*.mlp.up_proj"``.

    Distinguishes what a leaf name alone cannot (gpt2's attention vs MLP ``c_proj``, BERT's three
    ``dense`` layers, T5's encoder vs decoder ``q``).
    """
    m = _BLOCK.match(name)
    return name if m is None else f"{m['stack']}.*{name[m.end():]}"


def linear_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, tuple[int, int], bool]]:
    """Every ``nn.Linear`` / transformers ``Conv1D``: (name, module, (out, in), transposed)."""
    conv1d = _conv1d_type()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            yield name, module, (int(module.out_features), int(module.in_features)), False
        elif conv1d is not None and isinstance(module, conv1d):
            fan_in, fan_out = module.weight.shape  # Conv1D stores (in, out)
            yield name, module, (int(fan_out), int(fan_in)), True


def _output_head_names(model: nn.Module) -> set[str]:
    """Module names of the LM head (``get_output_embeddings``), also under tied aliases."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    return {name for name, module in model.named_modules(remove_duplicate=False) if module is head}


def _block_offsets(model: nn.Module) -> dict[str, int]:
    """Global block number of each stack's block 0: encoder blocks first, then decoder blocks."""
    sizes: dict[str, int] = {}
    for name, _ in model.named_modules():
        m = _BLOCK.match(name)
        if m:
            sizes[m["stack"]] = max(sizes.get(m["stack"], 0), int(m["index"]) + 1)
    offsets, total = {}, 0
    for stack, size in sizes.items():
        offsets[stack], total = total, total + size
    return offsets


def _block_number(name: str, offsets: dict[str, int]) -> int:
    m = _BLOCK.match(name)
    return -1 if m is None else offsets[m["stack"]] + int(m["index"])


def _override_matches(entry: str, name: str, pattern: re.Pattern[str] | None) -> bool:
    if pattern is None:
        return name == entry or name.endswith("." + entry)
    return pattern.fullmatch(name) is not None


def _shown(entry: str) -> str:
    """A target as the user knows it: a layer name the planner escaped into a regex, unescaped."""
    plain = re.sub(r"\\(.)", r"\1", entry)
    return plain if re.escape(plain) == entry else entry


def _select_override(names: list[str], target_modules: Sequence[str]) -> set[str]:
    """Names matched by the user's leaf names / dotted suffixes / regexes; ValueError on a miss."""
    chosen: set[str] = set()
    for entry in target_modules:
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"target_modules entries must be non-empty strings, got {entry!r}")
        pattern = None
        if not _PLAIN.fullmatch(entry):
            try:
                pattern = re.compile(entry)
            except re.error as err:
                raise ValueError(f"target_modules entry {entry!r} is not a valid regex: {err}") from None
        hits = {n for n in names if _override_matches(entry, n, pattern)}
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise ValueError(f"target module {_shown(entry)!r} matches no linear layer; available leaf names: "
                             f"{', '.join(leaves)}")
        chosen |= hits
    return chosen


def _select_rule(names: list[str], rule: ArchRule) -> set[str]:
    excluded = [re.compile(p) for p in rule.exclude]
    return {n for n in names
            if (rule.targets is None or n.rsplit(".", 1)[-1] in rule.targets)
            and not any(p.search(n) for p in excluded)}


def find_targets(model: nn.Module, *, target_modules: Sequence[str] | None = None,
                 include_head: bool = False) -> list[TargetLayer]:
    """The quantizable linear layers of ``model`` in module order.

    Default: the rule of ``model.config.model_type`` (see :mod:`search_spaces.architectures`), or
    every linear layer but the output head. ``target_modules`` overrides the rule: leaf names
    (``"q_proj"``), dotted suffixes (``"attention.output.dense"``) or regexes fully matching the
    module path; an entry that matches nothing raises ``ValueError`` listing the leaf names. The
    output head is a candidate only with ``include_head=True`` (tied heads share the embedding).
    Each layer's ``shape`` is (out_features, in_features); gpt2's ``Conv1D`` (stored (in, out)) is
    reported the same way with ``transposed=True``.
    """
    heads = set() if include_head else _output_head_names(model)
    found = [item for item in linear_modules(model) if item[0] not in heads]
    names = [name for name, *_ in found]
    if target_modules:
        chosen = _select_override(names, target_modules)
    else:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        rule = rule_for(model_type)
        chosen = _select_rule(names, rule)
        if not chosen and rule.targets is not None:
            log.warning("no %s layers found by the %r rule; using every linear layer", model_type, model_type)
            chosen = set(names)
        if include_head:
            chosen |= {n for n in names if n in _output_head_names(model)}
    offsets = _block_offsets(model)
    return [TargetLayer(name=name, shape=shape, module_type=name.rsplit(".", 1)[-1],
                        block=_block_number(name, offsets), has_bias=getattr(module, "bias", None) is not None,
                        transposed=transposed)
            for name, module, shape, transposed in found if name in chosen]


def _first(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _is_decoder(config: Any, rule: ArchRule) -> bool:
    """True when the model produces vocabulary logits at training time (causal or seq2seq LM)."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith(_CAUSAL_SUFFIXES) for a in archs)
    return bool(getattr(config, "is_encoder_decoder", False)) or not rule.encoder_only


def _gated(config: Any, rule: ArchRule, act: str | None) -> bool:
    if rule.gated_mlp is not None:
        return rule.gated_mlp
    gated = getattr(config, "is_gated_act", None)
    if gated is not None:
        return bool(gated)
    return act in ("silu", "swish")  # unknown architectures: SiLU MLPs are Llama-style SwiGLU


# Config keys of the dropout on the residual branches, by family: phi/gpt2, bert, falcon-style, t5.
_RESID_DROPOUT_KEYS = ("resid_pdrop", "hidden_dropout_prob", "hidden_dropout", "dropout_rate")


def _partial_rotary(config: Any) -> float:
    """Share of each head's dimensions that rotate (transformers 5 moves it into rope_parameters)."""
    rope = getattr(config, "rope_parameters", None)
    rope = rope if isinstance(rope, dict) else {}
    return float(_first(config, "partial_rotary_factor", default=rope.get("partial_rotary_factor", 1.0)))


def facts_from_config(config: Any) -> ModelFacts:
    """Shape facts of a transformers ``PretrainedConfig`` (text part of multimodal configs).

    Encoder-decoder models report ``layers`` = encoder + decoder blocks and keep both counts in
    ``encoder_layers`` / ``decoder_layers``. Absent dropout keys mean no dropout.
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    rule = rule_for(getattr(config, "model_type", None))
    hidden = int(_first(config, "hidden_size", "n_embd", "d_model"))
    heads = int(_first(config, "num_attention_heads", "n_head", "num_heads"))
    act = _first(config, "hidden_act", "activation_function", "dense_act_fn")
    layers = int(_first(config, "num_hidden_layers", "n_layer", "num_layers"))
    enc = dec = None
    if getattr(config, "is_encoder_decoder", False):
        enc = int(_first(config, "encoder_layers", "num_layers", default=layers))
        dec = int(_first(config, "decoder_layers", "num_decoder_layers", default=enc))
        layers = enc + dec
    head_dim = _first(config, "head_dim", "d_kv")
    return ModelFacts(
        architecture=str(getattr(config, "model_type", "generic") or "generic"),
        hidden=hidden,
        intermediate=int(_first(config, "intermediate_size", "n_inner", "d_ff", "encoder_ffn_dim", "ffn_dim",
                                default=4 * hidden)),
        layers=layers,
        heads=heads,
        kv_heads=int(_first(config, "num_key_value_heads", default=heads)),
        vocab=int(config.vocab_size),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        max_positions=int(_first(config, "max_position_embeddings", "n_positions", default=2048)),
        head_dim=int(head_dim) if head_dim is not None else None,
        gated_mlp=_gated(config, rule, act),
        is_decoder=_is_decoder(config, rule),
        hidden_act=str(act) if act else None,
        resid_dropout=float(_first(config, *_RESID_DROPOUT_KEYS, default=0.0)),
        partial_rotary_factor=_partial_rotary(config),
        encoder_layers=enc,
        decoder_layers=dec,
    )

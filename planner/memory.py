"""The memory model: model shapes x per-layer choices x run settings -> bytes, with a breakdown.

One pure function, :func:`estimate`, is the only source of memory numbers (search, materialize,
verify). It is the exact sum of a choice-independent part (:func:`fixed_breakdown`) and one term
per target layer (:func:`layer_breakdown`), so an exact knapsack can add up per-layer costs.

What is counted (T = batch x seq tokens, c = compute-dtype bytes, a = adapter-dtype bytes):
- backbone: what every target's format stores (``loftq.formats.Spec.nbytes``), 16-bit keeps at 2 B/weight;
- non-target parameters (embeddings, untied head, norms, biases) in the compute dtype;
- adapters r(in + out) x a, and when fine-tuning their gradients and optimizer states;
- what autograd saves per block (the frozen quantized layers save nothing: they re-dequantize in
  backward): norm inputs, q/k/v/output kept by SDPA (eager: q, k, v and the seq x seq scores in
  fp32 + their compute-dtype copy), the MLP's activation-function tensors at the intermediate size;
  per adapted layer PEFT's input (its own copy when the adapter dtype differs from the compute
  dtype or with dropout, plus the dropout mask) and the rank-sized A output; with checkpointing
  the block inputs plus one recomputed block;
- logits: the fp32 log-softmax autograd keeps (4 B per vocab entry per token) plus the transient
  peak around it (compute-dtype logits, their fp32 upcast, the fp32 gradient: about 10-12 B/entry);
- inference: the KV cache;
- a reserve (CUDA context, cuBLAS workspace, allocator segments, fragmentation, a margin for an
  unmeasured trainer: :func:`reserve_breakdown`), reported apart from the allocated bytes;
- the trainer's own loss when it replaces the model's (TRL's chunked loss: :func:`trainer_logits_bytes`).
Measured against autograd's saved tensors and a CPU allocation profile in tests/planner/test_memory.py
(llama and phi blocks; other architectures use the llama profile unverified).

Simplifications that keep the per-layer terms additive, all on the safe side: gradients are
assumed to flow through every block (not so if the first blocks have no adapter at all); a normed
input shared by adapters in the compute dtype is counted once per block even if none reads it;
with checkpointing the recomputed block's adapter inputs are spread evenly over the blocks (exact
when every block has the same adapted modules); adapter gradients are counted at the peak.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from loftq import Registry
from search_spaces.facts import ModelFacts, TargetLayer

from planner.overheads import reserve_bytes, trainer_logits_bytes
from planner.settings import LayerChoice, RunSettings

DEQUANT_PEAK_BYTES = 13  # peak bytes per weight inside loftq.dequantize (uint8 codes, int64 index, fp32 values)
DEQUANT_CHUNK = 1 << 22  # weights per dequantization step (planner.runtime.layers.CHUNK)
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit optimizer states below this many elements
BNB_BLOCK = 256


@dataclass(frozen=True)
class BlockProfile:
    """How a transformer block of one architecture keeps activations (read off its HF code).

    ``norm``: "rms" upcasts its input to fp32 and saves it; "layer" saves its input in the compute
    dtype plus fp32 mean and rstd per token. ``act``: activation used when the facts do not say.
    ``block_input``: module types reading the block's normed input(s), by group. ``attn_output``:
    module types reading the attention output. ``out_copy_sdpa``: SDPA's output is laid out
    [batch, heads, seq, dim] (q built by a concatenation: partial rotary), so the projection after it
    reads a fresh contiguous copy; eager attention always copies.
    """

    norm: str
    norms_per_block: int
    act: str
    block_input: Mapping[str, str]
    attn_output: tuple[str, ...]
    out_copy_sdpa: bool = False
    resid_dropouts: int = 0  # dropouts on the residual branches (active when facts.resid_dropout > 0)


# Tensors of [tokens, intermediate] an activation function saves (gated MLPs add act out and up).
ACT_SAVED = {"silu": 1, "swish": 1, "gelu": 1, "gelu_pytorch_tanh": 1, "relu": 1, "gelu_new": 4,
             "gelu_fast": 4, "quick_gelu": 2}

PROFILES: Registry[BlockProfile] = Registry("architecture profile")
_LLAMA = BlockProfile("rms", 2, "silu", {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn",
                                         "gate_proj": "mlp", "up_proj": "mlp"}, ("o_proj",))
for _arch in ("llama", "mistral", "qwen2", "qwen3", "gemma", "generic"):
    PROFILES.add(_arch, _LLAMA)
PROFILES.add("phi", BlockProfile("layer", 1, "gelu_new", {"q_proj": "block", "k_proj": "block", "v_proj": "block",
                                                          "fc1": "block"}, ("dense",), out_copy_sdpa=True,
                                        resid_dropouts=2))
# Unverified: gpt2's default attention dropout (0.1) sends SDPA to its math kernel, which keeps
# seq x seq probabilities and masks that this profile does not count.
PROFILES.add("gpt2", BlockProfile("layer", 2, "gelu_new", {"c_attn": "attn", "c_fc": "mlp"}, ("c_proj",),
                                  resid_dropouts=2))


def profile_for(facts: ModelFacts) -> BlockProfile:
    return PROFILES.get(facts.architecture) if facts.architecture in PROFILES else PROFILES.get("generic")


@dataclass(frozen=True)
class MemoryEstimate:
    """``allocated_bytes`` = sum of ``breakdown`` (what torch.cuda.max_memory_allocated sees);
    ``reserve_bytes`` = CUDA context + allocator slack; ``total_bytes`` = both. Validated on
    construction (non-negative integers that add up), so a plan's recorded estimate is too."""

    total_bytes: int
    allocated_bytes: int
    reserve_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("total_bytes", "allocated_bytes", "reserve_bytes"):
            _whole(f"estimate.{name}", getattr(self, name))
        if not isinstance(self.breakdown, Mapping) or not all(isinstance(k, str) for k in self.breakdown):
            raise ValueError(f"estimate.breakdown must map names to byte counts, got {self.breakdown!r}")
        for key, value in self.breakdown.items():
            _whole(f"estimate.breakdown.{key}", value)
        object.__setattr__(self, "breakdown", dict(self.breakdown))
        if sum(self.breakdown.values()) != self.allocated_bytes:
            raise ValueError(f"estimate.breakdown sums to {sum(self.breakdown.values())}, "
                             f"not allocated_bytes {self.allocated_bytes}")
        if self.allocated_bytes + self.reserve_bytes != self.total_bytes:
            raise ValueError(f"estimate.total_bytes {self.total_bytes} is not allocated_bytes + reserve_bytes "
                             f"({self.allocated_bytes} + {self.reserve_bytes})")

    def to_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "allocated_bytes": self.allocated_bytes,
                "reserve_bytes": self.reserve_bytes, "breakdown": dict(self.breakdown)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "MemoryEstimate":
        if not isinstance(d, Mapping):
            raise ValueError(f"estimate must be a JSON object, got {type(d).__name__}")
        missing = [k for k in cls.__dataclass_fields__ if k not in d]
        if missing or set(d) - set(cls.__dataclass_fields__):
            raise ValueError(f"estimate is missing field(s) {', '.join(missing)}" if missing else
                             f"estimate has unknown field(s) {', '.join(sorted(set(d) - set(cls.__dataclass_fields__)))}")
        return cls(**d)


def _whole(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


# ---------------------------------------------------------------- per-layer terms
def backbone_bytes(target: TargetLayer, choice: LayerChoice) -> int:
    """Stored bytes of one frozen weight: exactly what its format stores (``Spec.nbytes``: codes and
    constants, or a GGUF type's tensor data), 2 per weight for a 16-bit keep."""
    spec = choice.spec
    return 2 * target.numel if spec is None else spec.nbytes(tuple(target.shape))


def optimizer_state_bytes(numel: int, run: RunSettings) -> int:
    """State bytes the optimizer keeps for one adapter tensor of ``numel`` elements."""
    if run.optimizer == "sgd":
        return 0
    if run.optimizer == "adamw" or numel < BNB_MIN_8BIT_SIZE:
        return 2 * numel * (run.adapter_bytes if run.optimizer == "adamw" else 4)
    return 2 * (numel + 4 * -(-numel // BNB_BLOCK))  # two uint8 states + fp32 absmax per 256


def _input_kind(facts: ModelFacts, target: TargetLayer) -> str:
    """'shared' (a normed block input several layers read), 'attn' (SDPA's output) or 'private'."""
    prof = profile_for(facts)
    if target.module_type in prof.block_input:
        return "shared"
    if target.module_type in prof.attn_output and target.shape[1] == facts.heads * facts.dim_per_head:
        return "attn"
    return "private"


def _reads_first_input(facts: ModelFacts, target: TargetLayer) -> bool:
    """Block 0's layers that read the embedding output: it needs no grad, so dropout keeps no mask."""
    prof = profile_for(facts)
    first = next(iter(prof.block_input.values()), None)
    return target.block == 0 and prof.block_input.get(target.module_type) == first


def lora_activation_bytes(facts: ModelFacts, target: TargetLayer, rank: int, run: RunSettings) -> int:
    """Bytes autograd keeps for one adapter: its input (own copy or not) and the [T, r] A output."""
    if rank == 0 or not run.finetune:
        return 0
    t, c, a = run.tokens, run.compute_bytes, run.adapter_bytes
    n_in = target.shape[1]
    own = t * rank * a  # lora_B saves lora_A's output
    kind = _input_kind(facts, target)
    if run.lora_dropout > 0:  # dropout output in the adapter dtype + its mask (bool on CUDA, dtype on CPU)
        mask = 1 if run.device == "cuda" else a
        own += t * n_in * a + (0 if _reads_first_input(facts, target) else t * n_in * mask)
    elif a != c:  # PEFT casts x to the adapter dtype: one copy per adapted layer
        own += t * n_in * a
    elif kind == "private" or (kind == "attn" and _attn_out_copied(facts, run)):
        own += t * n_in * c  # a fresh tensor no other op keeps
    # kind 'shared' in the compute dtype: counted once per block in fixed_breakdown
    if run.gradient_checkpointing:  # one block at a time is recomputed: spread its adapters over the blocks
        return own // facts.layers
    return own


def layer_param_breakdown(target: TargetLayer, choice: LayerChoice, run: RunSettings) -> dict[str, int]:
    """The bytes of this layer's choice that need no model facts: its stored weight, its adapter and,
    when fine-tuning, the adapter's gradients and optimizer states (plan validation checks these)."""
    r = choice.rank
    n_a, n_b = r * target.shape[1], target.shape[0] * r
    out = {"backbone": backbone_bytes(target, choice), "adapters": (n_a + n_b) * run.adapter_bytes}
    if run.finetune:
        out["adapter_grads"] = out["adapters"]
        out["optimizer"] = optimizer_state_bytes(n_a, run) + optimizer_state_bytes(n_b, run) if r else 0
    return out


def layer_breakdown(target: TargetLayer, choice: LayerChoice, run: RunSettings, facts: ModelFacts) -> dict[str, int]:
    """The bytes that depend on this layer's choice, by breakdown key."""
    out = layer_param_breakdown(target, choice, run)
    if run.finetune:
        out["activations"] = lora_activation_bytes(facts, target, choice.rank, run)
    return out


def layer_bytes(target: TargetLayer, choice: LayerChoice, run: RunSettings, facts: ModelFacts) -> int:
    """Allocated bytes that depend on this layer's choice: backbone + adapter terms.

    ``estimate(...).allocated_bytes == fixed_bytes(...) + sum(layer_bytes(...))`` exactly.
    """
    return sum(layer_breakdown(target, choice, run, facts).values())


# ---------------------------------------------------------------- choice-independent terms
def _attn_out_copied(facts: ModelFacts, run: RunSettings) -> bool:
    return run.attn_implementation == "eager" or profile_for(facts).out_copy_sdpa


def _act_saved(facts: ModelFacts) -> int:
    """[T, intermediate] tensors the activation function keeps (unknown ones: 4, as composite gelu)."""
    return ACT_SAVED.get(facts.hidden_act or profile_for(facts).act, 4)


def _norm_bytes(prof: BlockProfile, t: int, h: int, c: int) -> int:
    return t * h * 4 + t * 4 if prof.norm == "rms" else t * h * c + 2 * t * 4


def block_activation_bytes(facts: ModelFacts, run: RunSettings) -> int:
    """What autograd keeps for one block without its adapters' own tensors (see module docstring)."""
    prof = profile_for(facts)
    t, c, b, s = run.tokens, run.compute_bytes, run.batch_size, run.seq_len
    h, inter, heads = facts.hidden, facts.intermediate, facts.heads
    qd, kvd = heads * facts.dim_per_head, facts.kv_dim
    total = prof.norms_per_block * _norm_bytes(prof, t, h, c)
    if run.attn_implementation == "sdpa":  # q, k, v, output + fp32 logsumexp per head and token
        total += t * (2 * qd + 2 * kvd) * c + b * heads * s * 4
    else:  # q, k and v repeated to all heads, fp32 softmax output (+ its compute-dtype copy)
        kv_seen = qd if kvd != qd else kvd
        total += t * (qd + 2 * kv_seen) * c + b * heads * s * s * (4 + (c if c != 4 else 0))
    total += t * inter * c * (_act_saved(facts) + (2 if facts.gated_mlp else 0))
    if facts.resid_dropout > 0:  # one mask per residual-branch dropout
        total += prof.resid_dropouts * t * h * (1 if run.device == "cuda" else c)
    if run.adapter_bytes == run.compute_bytes and run.lora_dropout == 0:
        total += len(set(prof.block_input.values())) * t * h * c  # normed inputs the adapters share
    return total


def rope_bytes(facts: ModelFacts, run: RunSettings) -> int:
    """cos and sin [seq, rotary dim], shared by every block and kept by the rotary multiplications."""
    if facts.architecture == "gpt2":
        return 0  # learned positions, no rotary embedding
    rot = int(facts.dim_per_head * facts.partial_rotary_factor)
    return 2 * run.seq_len * rot * run.compute_bytes


def activation_fixed_bytes(facts: ModelFacts, run: RunSettings) -> int:
    """Saved activations that do not depend on the choices: all blocks (with checkpointing their
    inputs only; the recomputed block is a transient) and the final norm."""
    prof = profile_for(facts)
    t, c, h = run.tokens, run.compute_bytes, facts.hidden
    final_norm = _norm_bytes(prof, t, h, c) + rope_bytes(facts, run)
    if run.gradient_checkpointing:
        return facts.layers * t * h * c + final_norm
    first_norm_input = _norm_bytes(prof, t, h, c)  # block 0 normalises the embeddings: no grad, not kept
    return facts.layers * block_activation_bytes(facts, run) - first_norm_input + final_norm


def logits_bytes(facts: ModelFacts, run: RunSettings) -> tuple[int, int]:
    """(kept for backward, transient peak on top) for the LM head and loss.

    Kept: fp32 log-softmax [T, V] and int64 labels. Peak: in backward the fp32 gradient of the
    log-softmax and that of its input exist together with it (8 B more per entry); in forward the
    compute-dtype logits and their fp32 upcast (c + 4). Encoders without a vocab head: nothing.
    """
    if not facts.is_decoder or not run.finetune:
        return 0, 0
    t, v, c = run.tokens, facts.vocab, run.compute_bytes
    forward_extra = t * v * (c + (4 if c != 4 else 0))
    backward_extra = t * v * 8
    return t * v * 4 + t * 8, max(forward_extra, backward_extra)


def transient_bytes(facts: ModelFacts, run: RunSettings, logits_peak: int, logits_kept: int, workspace: int) -> int:
    """Peak on top of what is kept: the larger of the loss's transient (start of backward) and the
    last block's backward, once the loss's and the final norm's tensors are freed. There the MLP
    input gradient comes from the frozen path and from the adapter (2 x [T, intermediate]), or one
    of them meets a dequantized weight; eager attention's softmax backward holds two fp32
    [batch, heads, seq, seq] gradients once the block's MLP half is freed (its adapters' inputs are
    freed too but not subtracted: they depend on the choices). With checkpointing
    the block's recomputed activations come on top."""
    prof = profile_for(facts)
    t, c = run.tokens, run.compute_bytes
    t_inter = t * facts.intermediate * c
    block = max(2 * t_inter, t_inter + workspace)
    if run.attn_implementation == "eager":  # fp32 gradient in and out, the c-byte probabilities' copy freed
        scores = run.batch_size * facts.heads * run.seq_len ** 2 * (8 - (c if c != 4 else 0))
        mlp_half = t_inter * (_act_saved(facts) + (2 if facts.gated_mlp else 0)) + _norm_bytes(prof, t, facts.hidden, c)
        block = max(block, scores - mlp_half)
    block -= logits_kept + _norm_bytes(prof, t, facts.hidden, c)
    if run.gradient_checkpointing:
        block += block_activation_bytes(facts, run)
    return max(logits_peak, block)


def dequant_workspace_bytes(targets: Sequence[TargetLayer], run: RunSettings) -> int:
    """Peak of rebuilding the largest weight with the torch dequantizer: ~13 B per weight in one
    go, or the compute-dtype weight plus one chunk's temporaries when it is chunked (measured)."""
    numel = max((tl.numel for tl in targets), default=0)
    if numel <= DEQUANT_CHUNK:
        return numel * DEQUANT_PEAK_BYTES
    return numel * run.compute_bytes + DEQUANT_CHUNK * DEQUANT_PEAK_BYTES


def default_non_target_params(facts: ModelFacts, targets: Sequence[TargetLayer]) -> int:
    """Parameters outside the target weights when the source cannot count them: embeddings, an
    untied head, norm weights (+ LayerNorm biases), target biases."""
    prof = profile_for(facts)
    per_norm = 2 if prof.norm == "layer" else 1
    n = facts.vocab * facts.hidden * (1 if facts.tied_embeddings else 2)
    n += (facts.layers * prof.norms_per_block + 1) * per_norm * facts.hidden
    n += sum(tl.shape[0] for tl in targets if tl.has_bias)
    if facts.architecture == "gpt2":
        n += facts.max_positions * facts.hidden
    return n


def fixed_breakdown(facts: ModelFacts, targets: Sequence[TargetLayer], run: RunSettings,
                    non_target_params: int | Sequence[int] | None = None) -> dict[str, int]:
    """The allocated bytes that no layer's choice changes, by breakdown key."""
    if non_target_params is None:
        n_params = default_non_target_params(facts, targets)
    elif isinstance(non_target_params, int):
        n_params = non_target_params
    else:
        n_params = sum(int(n) for n in non_target_params)
    out = {"non_target": n_params * run.compute_bytes}
    kept, peak = trainer_logits_bytes(facts, run) or logits_bytes(facts, run)
    workspace = dequant_workspace_bytes(targets, run)
    if run.finetune:
        out["activations"] = activation_fixed_bytes(facts, run)
        out["logits"] = kept
        out["transient"] = transient_bytes(facts, run, peak, kept, workspace)
    elif run.llamacpp:
        out.update(llamacpp_breakdown(facts, run, n_params))
    else:
        if facts.is_decoder:  # generation keeps keys and values; an encoder keeps nothing between layers
            out["kv_cache"] = run.tokens * facts.layers * 2 * facts.kv_dim * run.compute_bytes
        # prefill: one MLP's intermediate tensors, last-token logits in fp32 (decoders), one dense weight
        out["transient"] = workspace + run.tokens * facts.intermediate * 3 * run.compute_bytes \
            + (run.batch_size * facts.vocab * 4 if facts.is_decoder else 0)
    return out


LLAMACPP_CTX_PAD = 256  # llama.cpp rounds the context up to a multiple of this


def llamacpp_compute_bytes(facts: ModelFacts, run: RunSettings) -> int:
    """llama.cpp's compute buffer for one physical batch (``ubatch`` tokens, at most the context)
    against a full context (``seq_len`` x ``batch_size``: its ``-c`` for that many parallel
    sequences, one unified KV cache), flash attention off (its largest case; on, the scores are never built):
    the larger of the head's phase (fp32 logits [ubatch, vocab] and ~3 hidden states) and the
    attention's (fp32 scores [heads, ctx, ubatch] plus the mask, and ~2 MLP intermediates and a
    hidden state per token). Fitted to the sizes llama.cpp 0.3.36 logs for SmolLM2 (CPU backend,
    contexts 512-16384, ubatch 128/512): never under, at most 1.2 % over (tests/planner/test_memory_llamacpp.py)."""
    ctx = -(-run.tokens // LLAMACPP_CTX_PAD) * LLAMACPP_CTX_PAD  # -c: every sequence's context together
    ub = min(run.ubatch, run.tokens)
    head = (facts.vocab * ub + 3 * facts.hidden * ub) * 4 if facts.is_decoder else 0
    attention = ((facts.heads + 1) * ctx * ub + (2 * facts.intermediate + facts.hidden) * ub) * 4
    return max(head, attention)


def llamacpp_breakdown(facts: ModelFacts, run: RunSettings, non_target_params: int) -> dict[str, int]:
    """The fixed device bytes of a llama.cpp server with every layer offloaded (``-ngl 99``): the
    non-target weights less the token embedding, which llama.cpp keeps in host memory (a tied head
    is a device copy of it, so then it counts), counted at 2 bytes (f16; a base GGUF with smaller
    types needs less); its f16 KV cache for ``batch_size`` sequences of ``seq_len`` (its default
    ``-ctk/-ctv f16``); the compute buffer (:func:`llamacpp_compute_bytes`) and the fp32 output buffer
    (last-token logits per sequence)."""
    host = 0 if facts.tied_embeddings else facts.vocab * facts.hidden
    return {"non_target": max(non_target_params - host, 0) * 2,
            "kv_cache": run.tokens * facts.layers * 2 * facts.kv_dim * 2,
            "compute_buffer": llamacpp_compute_bytes(facts, run),
            "output_buffer": run.batch_size * facts.vocab * 4 if facts.is_decoder else 0}


def fixed_bytes(facts: ModelFacts, targets: Sequence[TargetLayer], run: RunSettings,
                non_target_params: int | Sequence[int] | None = None) -> int:
    return sum(fixed_breakdown(facts, targets, run, non_target_params).values())


def unread_shared_input_bytes(facts: ModelFacts, targets: Sequence[TargetLayer], choices: Mapping[str, LayerChoice],
                              run: RunSettings) -> int:
    """How much :func:`estimate` over-counts on purpose: the normed block inputs that adapters share
    are counted in every block (so per-layer costs stay additive for the knapsack), but autograd
    keeps one only where some adapter of its group has a rank. Used by verify to compare exactly."""
    prof = profile_for(facts)
    if not run.finetune or run.gradient_checkpointing or run.adapter_bytes != run.compute_bytes \
            or run.lora_dropout != 0:
        return 0
    read: set[tuple[int, str]] = set()
    for t in targets:
        group = prof.block_input.get(t.module_type)
        if group is not None and choices[t.name].rank > 0:
            read.add((t.block, group))
    groups = set(prof.block_input.values())
    unread = sum(1 for b in range(facts.layers) for g in groups if (b, g) not in read)
    return unread * run.tokens * facts.hidden * run.compute_bytes


def estimate(facts: ModelFacts, targets: Sequence[TargetLayer], choices: Mapping[str, LayerChoice],
             run: RunSettings, non_target_params: int | Sequence[int] | None = None) -> MemoryEstimate:
    """Bytes a run of the planned model needs. ``choices[name]`` for every target (KeyError names a
    missing one); ``non_target_params``: parameter count outside the target weights (int or list of
    counts; default: derived from the facts)."""
    breakdown = fixed_breakdown(facts, targets, run, non_target_params)
    for tl in targets:
        try:
            choice = choices[tl.name]
        except KeyError:
            raise KeyError(f"no choice for target layer {tl.name!r}") from None
        for key, value in layer_breakdown(tl, choice, run, facts).items():
            breakdown[key] = breakdown.get(key, 0) + value
    allocated = sum(breakdown.values())
    reserve = reserve_bytes(allocated, run)
    return MemoryEstimate(allocated + reserve, allocated, reserve, breakdown)

"""RunSettings: how the planned model will be run (fine-tune or serve), recorded in every plan.

Every field carries its default and help once (PEFT ``LoraConfig`` style), so the CLI builds its
options from :func:`run_fields` and the memory model reads the same object.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from loftq.formats import Spec, spec_from_fields
from search_spaces.facts import ModelFacts
from search_spaces.widths import KEEP_BITS, WidthKey, resolve

from planner.options import option as _opt

MODES = ("finetune", "inference")
DTYPES = ("auto", "bf16", "fp16", "fp32")
ADAPTER_DTYPES = ("fp32", "bf16", "fp16", "compute")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "sgd")
ATTENTION = ("sdpa", "eager")
DEVICES = ("auto", "cuda", "cpu")  # auto: resolved at construction to this machine's
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
TRAINERS = ("finetune", "hf", "trl", "other")
ENGINES = ("auto", "torch", "llama.cpp")  # what serves an inference plan (auto: llama.cpp for --quant gguf)
INITS = ("loftq", "loftq-data")
MAX_TOKENS = 1 << 24  # tokens per sequence or batch: beyond every model's positions, and keeps products exact  # LoftQ in the plain norm, or in the layer-output norm on calibration data


@dataclass(frozen=True)
class RunSettings:
    """One run of the planned model. ``auto`` compute dtype means bf16 on a GPU that has it, fp16 on
    one that does not (2 bytes either way), fp32 on CPU.

    Gradient checkpointing is off by default: it is off by default in transformers' Trainer, so the
    estimate describes the run a user gets without extra flags, and the LoftQ slides' figures
    (phi-2 < 11 GB, Mistral-7B < 16 GB at 4 bits, input 1024, batch 1) are reproduced with it off
    (with it on both would need less than half); turning it on trades about a third more compute
    for most of the activation memory. Adapters default to the compute dtype: with fp32 adapters
    PEFT keeps an fp32 copy of every adapted layer's input and Mistral-7B no longer fits 16 GB.
    """

    mode: str = _opt("finetune", "what the model is planned for", choices=MODES)
    device: str = _opt("auto", "where the planned run happens: auto = this machine's (cuda when a GPU is visible, "
                       "else cpu; planning on a CPU box for a GPU run, pass --device cuda); cuda counts the CUDA "
                       "context's reserve; cpu: auto compute dtype is fp32 and dropout masks are kept in the input "
                       "dtype instead of bool", choices=DEVICES)
    seq_len: int = _opt(1024, "tokens per sequence")
    batch_size: int = _opt(1, "sequences per step (micro-batch)")
    compute_dtype: str = _opt("auto", "dtype of activations and dequantized weights (auto: bf16 on a GPU with "
                              "bf16, fp16 on one without, fp32 on CPU)", choices=DTYPES)
    adapter_dtype: str = _opt("compute", "dtype of the LoRA weights and their optimizer states (compute = the "
                              "compute dtype, as QLoRA; fp32 makes PEFT keep an fp32 copy of every adapted "
                              "layer's input)", choices=ADAPTER_DTYPES)
    optimizer: str = _opt("adamw", "optimizer of the adapters: AdamW (2 states in the adapter dtype), 8-bit "
                          "AdamW (bitsandbytes), paged 8-bit AdamW, or plain SGD (no state)", choices=OPTIMIZERS)
    gradient_checkpointing: bool = _opt(False, "recompute each block in backward: keep only block inputs")
    attn_implementation: str = _opt("sdpa", "attention kernel: sdpa keeps no seq x seq scores, eager does",
                                    choices=ATTENTION)
    lora_dropout: float = _opt(0.0, "dropout on the LoRA input (> 0 makes PEFT keep a copy and a mask per "
                               "adapted layer)")
    trainer: str = _opt("finetune", "the trainer that runs the fine-tune: the planner's own loop (finetune), "
                        "transformers' Trainer (hf), TRL's SFTTrainer (trl: its default chunked loss never "
                        "builds the full logits), or another one (other: a margin on the step's peak)",
                        choices=TRAINERS)
    engine: str = _opt("auto", "inference mode: what serves the model: torch (planner.load / transformers) or "
                       "llama.cpp (its f16 KV cache at --seq-len context, its compute and output buffers; the "
                       "token embedding stays in host memory); auto: llama.cpp for --quant gguf, else torch",
                       choices=ENGINES)
    ubatch: int = _opt(512, "llama.cpp's physical batch (-ub): its compute buffer grows with it")
    reserve_context_bytes: int = _opt(512 * 2**20, "the CUDA context and kernel images, outside torch's "
                                      "allocator (not seen by torch.cuda.max_memory_reserved)")
    reserve_fraction: float = _opt(0.05, "caching-allocator fragmentation (reserved but unusable) as a fraction of the "
                                   "allocated bytes")

    def __post_init__(self) -> None:
        if self.device == "auto":  # recorded as what it resolved to: a plan says where its run happens
            import torch

            object.__setattr__(self, "device", "cuda" if torch.cuda.is_available() else "cpu")
        for name, allowed in (("mode", MODES), ("compute_dtype", DTYPES), ("adapter_dtype", ADAPTER_DTYPES),
                              ("optimizer", OPTIMIZERS), ("attn_implementation", ATTENTION),
                              ("device", DEVICES), ("trainer", TRAINERS), ("engine", ENGINES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name in ("seq_len", "batch_size", "ubatch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_TOKENS:
                raise ValueError(f"{name} must be an integer in [1, {MAX_TOKENS}], got {value!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be a bool, got {self.gradient_checkpointing!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.reserve_context_bytes, int) or self.reserve_context_bytes < 0:
            raise ValueError(f"reserve_context_bytes must be a non-negative integer, got {self.reserve_context_bytes!r}")
        if not 0.0 <= self.reserve_fraction < 1.0:
            raise ValueError(f"reserve_fraction must be in [0, 1), got {self.reserve_fraction!r}")

    def check_model(self, facts: ModelFacts, model: str = "the model") -> None:
        """ValueError when the run cannot happen on this model: ``seq_len`` beyond its positions."""
        if self.seq_len > facts.max_positions:
            raise ValueError(f"run.seq_len {self.seq_len} exceeds the {facts.max_positions} positions of {model}")

    @property
    def tokens(self) -> int:
        return self.seq_len * self.batch_size

    @property
    def finetune(self) -> bool:
        return self.mode == "finetune"

    @property
    def compute_bytes(self) -> int:
        """Bytes per activation element (auto: 2 on a GPU, 4 on CPU)."""
        if self.compute_dtype == "auto":
            return 2 if self.device == "cuda" else 4
        return DTYPE_BYTES[self.compute_dtype]

    @property
    def adapter_bytes(self) -> int:
        if self.adapter_dtype == "compute":
            return self.compute_bytes
        return DTYPE_BYTES[self.adapter_dtype]

    @property
    def llamacpp(self) -> bool:
        """Served by llama.cpp (an inference plan with ``engine`` llama.cpp)."""
        return self.engine == "llama.cpp" and not self.finetune

    def to_dict(self) -> dict[str, Any]:
        """The fields; ``engine``/``ubatch`` only when the engine is not ``auto`` (a torch run's dict,
        and so every earlier plan's, is what it was)."""
        d = asdict(self)
        if self.engine == "auto":
            del d["engine"], d["ubatch"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown run setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)


def resolve_engine(run: RunSettings, quant: str) -> RunSettings:
    """``engine`` made definite for a plan of quantizer family ``quant``: auto is llama.cpp for a GGUF
    inference plan and stays auto (torch) for everything else; torch there is auto too, so only a
    GGUF inference plan served by torch on purpose records ``engine`` torch. ValueError for llama.cpp with codebook (NF) widths,
    which it cannot read, or for a fine-tune (llama.cpp does not train here)."""
    gguf_serving = quant == "gguf" and not run.finetune
    if run.engine == "llama.cpp" and not gguf_serving:
        raise ValueError("--engine llama.cpp serves GGUF types: it needs --quant gguf and --mode inference")
    if run.engine == "auto" and gguf_serving:
        return replace(run, engine="llama.cpp")
    if run.engine == "torch" and not gguf_serving:
        return replace(run, engine="auto")  # the same run: torch is what auto means here (and what a plan omits)
    return run


def run_fields() -> list:
    """The dataclass fields of :class:`RunSettings` (name, default, metadata help/choices) for the CLI."""
    return list(fields(RunSettings))


@dataclass(frozen=True)
class LayerChoice:
    """What one target layer gets: ``bits`` (the code width; 16 = kept in a 16-bit dtype) stored by
    ``method`` (a codebook method, ``nf``, whose constants ``double_quant`` double-quantizes, or a
    quantizer type that names itself, e.g. ``q4_k``) at ``block_size``, and a LoRA ``rank`` (0 = no
    adapter). :attr:`spec` is the format's spec (:mod:`loftq.formats`) those fields name."""

    bits: int
    rank: int = 0
    method: str = "nf"
    block_size: int = 64
    double_quant: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise ValueError(f"rank must be a non-negative integer, got {self.rank!r}")
        self.spec  # noqa: B018 — the format validates (method, bits, block_size, double_quant)

    @property
    def spec(self) -> Spec | None:
        """How the weight is stored (None for a 16-bit keep)."""
        if self.bits == KEEP_BITS:
            return None
        return spec_from_fields(self.method, self.bits, self.block_size, self.double_quant)

    @property
    def quant(self) -> str:
        """What the layer stores, by name: ``nf4``, ``q4_k``, ``bf16`` (a 16-bit keep)."""
        spec = self.spec
        return spec.name if spec is not None else "bf16"

    @classmethod
    def from_spec(cls, spec: Spec | None, rank: int = 0, keep_block_size: int = 64) -> "LayerChoice":
        """The choice storing ``spec`` (None: a 16-bit keep, which records ``keep_block_size``)."""
        if spec is None:
            return cls(KEEP_BITS, rank, "nf", keep_block_size)
        return cls(spec.bits, rank, spec.method, spec.block_size, spec.double_quant)

    @classmethod
    def of(cls, w: WidthKey, rank: int, method: str = "nf", block_size: int = 64,
           shape: tuple[int, ...] = (4096, 4096)) -> "LayerChoice":
        """The choice of a search option (width, rank) for a layer of ``shape`` (a width may store
        another type on rows it cannot hold: :func:`search_spaces.widths.resolve`; the default shape
        is one every registered width holds as itself)."""
        return cls.from_spec(resolve(w, tuple(shape), method, block_size), rank, block_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerChoice":
        return cls(**d)

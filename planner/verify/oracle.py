"""The peak oracle: the most bytes of live tensors during one real training step, measured on CPU.

A ``TorchDispatchMode`` sees every tensor an operator returns, forward, backward (the autograd
engine runs the same dispatcher) and optimizer alike. Each new storage is counted while it lives
(a ``weakref.finalize`` on the storage, whose Python object lives exactly as long as the storage)
and the running sum's maximum is the step's peak above its start. What already lives when the step
starts (parameters, buffers, optimizer states, the trainer's own tensors) is found by walking the
garbage collector's tensors, deduplicated by storage. Start + peak is the CPU analogue of
``torch.cuda.max_memory_allocated`` without the caching allocator's 512-byte rounding.

Run the model in bf16 so every tensor has the size it has on a GPU. One step is tracked after a
warm-up step (the optimizer creates its states in the first step, and lazy buffers appear there).
This replaces torch's ``MemTracker`` (``torch.distributed._tools.mem_tracker``), which in torch 2.13
registers gradient hooks on frozen parameters and refuses a module called twice in one context
(gradient checkpointing recomputes every block): the dispatch mode needs neither.

The step runs through the trainer the user launches (:data:`TRAINERS`): the planner's own loop
(``planner.train.loop.train_lora``), transformers' ``Trainer`` or TRL's ``SFTTrainer``; each is
driven for two steps and tracked from the end of the first to the end of the second.
"""
from __future__ import annotations

import gc
import tempfile
import warnings
import weakref
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

TRAINERS = ("finetune", "hf", "trl")


def live_storage_bytes() -> int:
    """Bytes of every distinct CPU/GPU storage reachable from a Python tensor right now."""
    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance() on some module objects trips deprecation warnings
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        if not obj.is_meta:
            try:
                st = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
                continue
            seen[st.data_ptr() or id(st)] = st.nbytes()
    return sum(seen.values())


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created while active, as long as they live; keeps the maximum.

    Outputs that share an input's storage (views, in-place and ``out=`` ops) allocate nothing and
    are skipped; so are storages already counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in inputs or key in self._live or t.is_meta:
            return
        self._live[key] = st.nbytes()
        self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(a.untyped_storage()) for a in tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor) and not a.is_meta}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out


class ShapesOnly(TorchDispatchMode):
    """Skips the arithmetic of the heavy operators (matrix products, softmax, log-softmax and the
    loss, forward and backward): each returns new zero-filled tensors of the shapes, strides and
    dtypes the real kernel returns (worked out on meta tensors), so every allocation a step makes is
    the same and only the numbers are not computed. For the peak oracle's long cases (a 128k-token
    vocabulary on a 2-core CPU: a step's bf16 products over the vocabulary take minutes);
    ``measure_step(..., compute=False)``. Zeros, not uninitialised memory: the loss stays finite (the
    planner's loop stops on a non-finite loss, and garbage bytes can read as NaN). Tests check that
    the peak equals the computed step's, byte for byte, through every trainer."""

    HEAVY = frozenset(getattr(torch.ops.aten, name).default for name in (
        "mm", "addmm", "bmm", "baddbmm", "_log_softmax", "_log_softmax_backward_data", "_softmax",
        "_softmax_backward_data", "nll_loss_forward", "nll_loss_backward"))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func not in self.HEAVY:
            return func(*args, **kwargs)
        device = next(a.device for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor))
        meta = tree_map(lambda a: a.to("meta") if isinstance(a, torch.Tensor) else a, (args, kwargs))
        shaped = func(*meta[0], **meta[1])
        return tree_map(lambda m: torch.empty_strided(m.shape, m.stride(), dtype=m.dtype, device=device).zero_()
                        if isinstance(m, torch.Tensor) else m, shaped)


@dataclass(frozen=True)
class StepPeak:
    """``start_bytes``: live storages when the tracked step began; ``step_peak_bytes``: the most
    bytes allocated on top of them during the step; ``peak_bytes``: both."""

    start_bytes: int
    step_peak_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.start_bytes + self.step_peak_bytes

    def to_dict(self) -> dict[str, int]:
        return {"start_bytes": self.start_bytes, "step_peak_bytes": self.step_peak_bytes, "peak_bytes": self.peak_bytes}


class StepTracker:
    """Start and stop from callbacks of any trainer: ``on_step(n)`` starts tracking after step
    ``warmup`` and stops after step ``warmup + 1``; ``result`` then holds the peak."""

    def __init__(self, warmup: int = 1) -> None:
        self.warmup = warmup
        self.result: StepPeak | None = None
        self._mode: LiveBytes | None = None
        self._start = 0

    def on_step(self, step: int) -> None:
        if step == self.warmup:
            gc.collect()
            self._start = live_storage_bytes()
            self._mode = LiveBytes()
            self._mode.__enter__()
        elif step == self.warmup + 1 and self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.result = StepPeak(self._start, self._mode.peak)
            self._mode = None


# ---------------------------------------------------------------- driving each trainer for two steps
def _run_finetune(model: nn.Module, ids: torch.Tensor, run: Any, tracker: StepTracker) -> None:
    from planner.train.loop import train_lora

    train_lora(model, ids, steps=tracker.warmup + 1, batch_size=ids.shape[0], optimizer=run.optimizer,
               on_step=lambda step, loss: tracker.on_step(step), show_progress=False)


def _trainer_args(cls: type, out: str, ids: torch.Tensor, run: Any, **extra: Any) -> Any:
    """Arguments that make the trainer run the plan's step: its batch, optimizer and checkpointing
    (TRL turns checkpointing on by default: here the run decides), no autocast (the model is
    already in its compute dtype), no saving, no logging, no worker processes."""
    optim = {"adamw": "adamw_torch", "sgd": "sgd", "adamw8bit": "adamw_bnb_8bit",
             "paged_adamw8bit": "paged_adamw_8bit"}[run.optimizer]
    # transformers 5 renamed gradient_checkpointing* to activation_checkpointing*; older ones have only the former
    ckpt = "activation_checkpointing" if "activation_checkpointing" in {f.name for f in fields(cls)} \
        else "gradient_checkpointing"
    return cls(output_dir=out, max_steps=2, per_device_train_batch_size=ids.shape[0], learning_rate=1e-4,
               optim=optim, weight_decay=0.0, save_strategy="no", report_to="none", logging_steps=1000,
               use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, bf16=False, fp16=False,
               **{ckpt: run.gradient_checkpointing, f"{ckpt}_kwargs": {"use_reentrant": False}}, **extra)


def _callback(tracker: StepTracker) -> Any:
    from transformers import TrainerCallback

    class _Track(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 — transformers' signature
            tracker.on_step(state.global_step)

    return _Track()


def _run_hf(model: nn.Module, ids: torch.Tensor, run: Any, tracker: StepTracker) -> None:
    from transformers import Trainer, TrainingArguments

    rows = [{"input_ids": r, "labels": r} for r in ids]
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model=model, args=_trainer_args(TrainingArguments, out, ids, run), train_dataset=rows,
                          callbacks=[_callback(tracker)])
        trainer.train()


def _word_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer whose only job is to name a pad and an end token (ids 0 and 1)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    tok = Tokenizer(WordLevel(words, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _run_trl(model: nn.Module, ids: torch.Tensor, run: Any, tracker: StepTracker) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_dict({"input_ids": [r.tolist() for r in ids]})
    with tempfile.TemporaryDirectory() as out:
        args = _trainer_args(SFTConfig, out, ids, run, max_length=ids.shape[1], packing=False,
                             dataset_num_proc=None)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data,
                             processing_class=_word_tokenizer(int(ids.max()) + 1), callbacks=[_callback(tracker)])
        trainer.train()


RUNNERS: dict[str, Callable[[nn.Module, torch.Tensor, Any, StepTracker], None]] = {
    "finetune": _run_finetune, "hf": _run_hf, "trl": _run_trl}


def measure_step(model: nn.Module, ids: torch.Tensor, run: Any, *, trainer: str = "finetune",
                 compute: bool = True) -> StepPeak:
    """Peak live bytes of the second of two training steps of ``model`` on ``ids`` [batch, seq]
    (labels = inputs) through ``trainer`` with ``run``'s optimizer and checkpointing (a
    :class:`planner.settings.RunSettings`). The model is trained in place (two optimizer steps).
    ``compute=False``: the steps allocate as they do but skip the heavy arithmetic (:class:`ShapesOnly`;
    what they do to the trainable weights is then meaningless)."""
    if trainer not in RUNNERS:
        raise ValueError(f"trainer must be one of {', '.join(RUNNERS)}; got {trainer!r}")
    gc.collect()
    own = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
           for t in list(model.parameters()) + list(model.buffers())}
    other = live_storage_bytes() - sum(own.values())  # whatever else the process holds: not the run's
    tracker = StepTracker()
    if compute:
        RUNNERS[trainer](model, ids, run, tracker)
    else:
        with ShapesOnly():
            RUNNERS[trainer](model, ids, run, tracker)
    if tracker.result is None:
        raise RuntimeError(f"trainer {trainer!r} ran fewer than two steps: nothing was tracked")
    return StepPeak(tracker.result.start_bytes - other, tracker.result.step_peak_bytes)


# ---------------------------------------------------------------- tiny cases
def tiny_case(arch: str, run: Any, *, vocab: int = 320, hidden: int = 64, intermediate: int = 160, layers: int = 2,
              heads: int = 4, kv_heads: int = 2, rank: int = 8, bits: int = 4, seed: int = 0) -> tuple[Any, ...]:
    """A random ``arch`` model (llama or phi) at tiny sizes, every target NF``bits`` with a rank-``rank``
    adapter, configured for ``run`` in its compute dtype. Returns (peft model, facts, targets,
    choices, non-target parameter count) for :func:`planner.memory.estimate`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, PhiConfig

    from planner.runtime.layers import add_lora, configure_run, quantize_model, resolve_compute_dtype
    from planner.settings import LayerChoice
    from search_spaces.discovery import facts_from_config, find_targets

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position_embeddings=max(run.seq_len, 256), tie_word_embeddings=False)
    if arch == "llama":
        cfg = LlamaConfig(num_key_value_heads=kv_heads, **common)
    elif arch == "phi":
        cfg = PhiConfig(**common)
    else:
        raise ValueError(f"tiny_case builds llama or phi, got {arch!r}")
    torch.manual_seed(seed)
    dtype = resolve_compute_dtype(run.compute_dtype, "cpu" if run.device == "cpu" else None)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    facts, targets = facts_from_config(model.config), find_targets(model)
    weights = {t.name + ".weight" for t in targets}
    non_target = sum(p.numel() for n, p in model.named_parameters() if n not in weights)
    choices = {t.name: LayerChoice(bits, rank) for t in targets}
    quantize_model(model, choices, compute_dtype=dtype)
    adapter = dtype if run.adapter_dtype == "compute" else resolve_compute_dtype(run.adapter_dtype)
    pm = add_lora(model, {n: c.rank for n, c in choices.items()}, dropout=run.lora_dropout, adapter_dtype=adapter)
    configure_run(pm, run)
    return pm, facts, targets, choices, non_target

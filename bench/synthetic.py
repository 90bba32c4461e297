"""Random-weight checkpoints of real shapes, written shard by shard (used by ``bench.scale``).

A checkpoint is a plain Hugging Face folder: config.json, bf16 safetensors shards with
``model.safetensors.index.json``, and the SmolLM2 tokenizer (from the packaged model's converted
folder, :data:`planner.sources.packaged.PACKAGED`; its vocabulary has 49152 entries). The tensor
names and shapes come from the model built on the meta device, so nothing of the model is ever
allocated; each shard's tensors are drawn in bf16 (never fp32), written, and dropped: building
holds one shard at most (two blocks, or the embedding when that is larger). Weights ~ N(0, std²),
norm weights 1, other vectors (biases) 0: a forward pass stays finite at any depth.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from planner.files.atomic import atomic_dir, atomic_save_tensors, atomic_write_bytes
from planner.artifact.layout import CONFIG_FILES

SHIPPED = Path(__file__).resolve().parents[1] / "planner" / "shipped" / "models"
WRITER = "w1"  # bump when the tensors or the folder layout this module writes change
# TinyLlama-1.1B's block at the width: 32 heads of 64, 4 key-value heads
LLAMA_WIDTH = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4)


@dataclass(frozen=True)
class Spec:
    """One synthetic checkpoint: ``kind`` "llama" (the depth series) or "phi-2" (the shipped facts),
    ``layers`` blocks; ``hidden``/``intermediate`` override the width (heads follow at a fixed head size)."""

    kind: str
    layers: int
    hidden: int | None = None
    intermediate: int | None = None
    std: float = 0.02
    seed: int = 0

    @property
    def name(self) -> str:
        cfg = self.config(vocab=0)
        return (f"{self.kind}-h{cfg.hidden_size}-i{cfg.intermediate_size}-L{self.layers}-std{self.std:g}"
                f"-seed{self.seed}-{WRITER}")

    def config(self, vocab: int, special: dict[str, int] | None = None):
        """The transformers config (bf16, untied head) for a vocabulary of ``vocab`` entries."""
        from transformers import AutoConfig, LlamaConfig

        if self.kind == "llama":
            cfg = LlamaConfig(**LLAMA_WIDTH, num_hidden_layers=self.layers, vocab_size=vocab or 49152,
                              max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False)
            head, kv_ratio = 64, 8
        elif self.kind == "phi-2":
            d = json.loads((SHIPPED / "phi-2.json").read_text())["config"]
            cfg = AutoConfig.for_model(d.pop("model_type"), **{**d, "num_hidden_layers": self.layers})
            head, kv_ratio = 32, 1  # at an overridden width: 0.4 x 32 gives an even rotary size
        else:
            raise ValueError(f"unknown synthetic kind {self.kind!r}; known: llama, phi-2")
        if self.hidden is not None:
            if self.hidden % head:
                raise ValueError(f"hidden {self.hidden} is not a multiple of the head size {head} ({self.kind})")
            heads = self.hidden // head
            cfg.hidden_size, cfg.num_attention_heads = self.hidden, heads
            cfg.num_key_value_heads = max(1, heads // kv_ratio)
            if hasattr(cfg, "head_dim"):
                cfg.head_dim = head
        if self.intermediate is not None:
            cfg.intermediate_size = self.intermediate
        cfg.architectures = ["LlamaForCausalLM" if self.kind == "llama" else "PhiForCausalLM"]
        cfg.dtype = torch.bfloat16
        for key, value in (special or {}).items():
            setattr(cfg, key, value)
        if cfg.tie_word_embeddings:
            raise ValueError("synthetic checkpoints are untied: the writer draws every tensor it names")
        return cfg


def tokenizer_folder() -> Path:
    """The packaged SmolLM2's converted HF folder (converted once into the planner's cache), or
    ``$SCALE_TOKENIZER_DIR`` (a folder holding its tokenizer files: the GPU machine has no package)."""
    import os

    if os.environ.get("SCALE_TOKENIZER_DIR"):
        return Path(os.environ["SCALE_TOKENIZER_DIR"])
    from planner.files.cache import default_cache_dir
    from planner.sources.packaged import PACKAGED

    return PACKAGED.get("smollm2-135m").folder(default_cache_dir())


def _draw(name: str, shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16) if re.search(r"norm.*\.weight$", name) else \
            torch.zeros(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, std, generator=gen)


def _shards(entries: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive groups of at most ``shard_bytes`` (bf16), a larger tensor alone."""
    out: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in entries:
        n = 2 * torch.Size(shape).numel()
        if out[-1] and size + n > shard_bytes:
            out.append([])
            size = 0
        out[-1].append((name, shape))
        size += n
    return out


def _write(spec: Spec, tok: Path, tmp: Path, shard_bytes: int | None) -> None:
    from transformers import AutoModelForCausalLM

    src = json.loads((tok / "config.json").read_text())
    special = {k: src[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if src.get(k) is not None}
    cfg = spec.config(src["vocab_size"], special)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    entries = [(n, tuple(t.shape)) for n, t in skeleton.state_dict().items()]
    del skeleton
    block = sum(2 * torch.Size(s).numel() for n, s in entries if ".layers.0." in n)
    groups = _shards(entries, shard_bytes or 2 * block)
    gen = torch.Generator().manual_seed(spec.seed)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: _draw(name, shape, spec.std, gen) for name, shape in group}
        atomic_save_tensors(tmp / fname, tensors, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({name: fname for name in tensors})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_bytes(tmp / "model.safetensors.index.json", (json.dumps(index, indent=1) + "\n").encode())
    cfg.save_pretrained(tmp)
    for name in CONFIG_FILES:  # the tokenizer files (and chat template); config.json is ours
        if name not in ("config.json", "generation_config.json") and (tok / name).is_file():
            shutil.copy(tok / name, tmp / name)


def build(spec: Spec, work: Path, shard_bytes: int | None = None) -> Path:
    """The checkpoint folder of ``spec`` under ``work/checkpoints``, written once (atomically) and
    reused by later runs. ``shard_bytes`` None: two blocks per shard."""
    final = work / "checkpoints" / spec.name
    if final.is_dir():
        return final
    tok = tokenizer_folder()
    return atomic_dir(final, lambda tmp: _write(spec, tok, tmp, shard_bytes))


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of the weights (from the shard index)."""
    return int(json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"])

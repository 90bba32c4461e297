"""The materialized artifact on disk, and ``planner.load(DIR)`` -> a trainable PeftModel.

Layout written by :mod:`planner.build.materialize`::

    DIR/plan.json                    the plan, with the residuals and iterations actually reached
    DIR/backbone/config.json         the model's config (+ generation config, tokenizer files)
    DIR/backbone/quantization.json   BackboneMeta: per target layer bits, method, block size,
                                     double quant, shape, dtype, bytes, file
    DIR/backbone/layers/NAME.safetensors   one file per target layer: NAME.qweight (packed uint8
                                     codes, a GGUF type's tensor data uint8 [out, row bytes], or
                                     the 16-bit weight [out, in]) and the constants
                                     NAME.absmax / .absmax_codes / .absmax_scale / .absmax_offset,
                                     exactly the buffers of a :class:`planner.runtime.layers.QuantLinear`
    DIR/backbone/non_target.safetensors    every other parameter (embeddings, norms, untied head,
                                     target biases) in 16 bits (bf16 by default)
    DIR/adapter/                     a PEFT LoRA folder (absent when no layer has a rank)

The backbone is not a stock transformers checkpoint (transformers has no 2/8-bit NF layers);
``--format hf-bnb`` adds one for all-NF4 plans (see :mod:`planner.build.materialize`).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from loftq.formats import Quantized, Spec, spec_from_fields

from planner.files.atomic import atomic_save_tensors, atomic_write_bytes
from planner.files.paths import check_links, contained, one_line
from planner.files.tensors import load_tensors
from planner.artifact.plan import Plan, load_plan
from planner.errors import PlannerError
from planner.settings import RunSettings

log = logging.getLogger(__name__)

FORMAT = "loftq-planner/packed"
# 2: layers may hold 3-bit codes (NF3: 8 codes in 3 bytes, loftq.packing); 1 is read as it is
# 3: layers may hold GGUF block data (method = the type's name, e.g. q4_k); 1 and 2 are read as they are
FORMAT_VERSION = 3
BACKBONE, ADAPTER, PLAN_FILE = "backbone", "adapter", "plan.json"
GGUF_DIR, HF_BNB = "gguf", "hf-bnb"  # materialize --format gguf / hf-bnb
MEMBERS = (PLAN_FILE, BACKBONE, ADAPTER, GGUF_DIR, HF_BNB)  # what a materialized folder is made of
QUANT_META, NON_TARGET_FILE, LAYER_DIR = "quantization.json", "non_target.safetensors", "layers"
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "tokenizer.model", "special_tokens_map.json", "vocab.json", "vocab.txt", "merges.txt",
                "added_tokens.json", "chat_template.jinja", "chat_template.json")


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def peft_key(name: str) -> str:
    """PEFT's prefix for a module of the wrapped model (``base_model.model.`` + its name)."""
    return f"base_model.model.{name}"


@dataclass(frozen=True)
class LayerMeta:
    """One stored target layer. ``bits`` 16: ``qweight`` is the 16-bit weight (``dtype``), no
    constants. Otherwise ``method``, ``bits``, ``block_size`` and ``double_quant`` name the format's
    spec (:mod:`loftq.formats`: ``nf`` codes with their constants, or a GGUF type's tensor data, uint8
    [out, in / block * type_size]); ``dtype`` is the weight's dtype before quantization and ``block``
    the effective block length (the row length for row-wise int8)."""

    name: str
    file: str
    bits: int
    method: str
    block_size: int
    double_quant: bool
    block: int
    shape: tuple[int, int]
    dtype: str
    nbytes: int

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"{self.name}: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ValueError(f"{self.name}: shape must be [out, in], got {self.shape!r}")
        if "/" in self.file or self.file.startswith("."):
            raise ValueError(f"{self.name}: file must be a plain file name, got {self.file!r}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        try:
            spec = self.spec
            if spec is not None:
                spec.check_shape(self.shape)
        except (ValueError, KeyError) as err:
            raise ValueError(f"{self.name}: {err}") from None
        if self.nbytes != self.expected_nbytes:  # an edited width, block or shape no longer describes the codes
            raise ValueError(f"{self.name}: nbytes {self.nbytes!r} is not what {self.method} at {self.bits} bits "
                             f"(block {self.block_size}) stores for shape {list(self.shape)}: {self.expected_nbytes}")

    @property
    def spec(self) -> Spec | None:
        """The format spec of the stored codes (None for a 16-bit keep)."""
        if self.bits == 16:
            return None
        return spec_from_fields(self.method, self.bits, self.block_size, self.double_quant)

    @property
    def expected_nbytes(self) -> int:
        """Bytes the layer's codes take, from its format, shape and block (the spec's exact count)."""
        spec = self.spec
        if spec is None:
            return self.shape[0] * self.shape[1] * DTYPES[self.dtype].itemsize
        return spec.nbytes(self.shape)

    @classmethod
    def of(cls, name: str, weight: Quantized | torch.Tensor, keep_block_size: int = 64) -> "LayerMeta":
        """The entry of one layer stored as ``weight`` (a format's tensor, or a kept 16-bit weight,
        which records ``keep_block_size``: the plan's, unused)."""
        if isinstance(weight, torch.Tensor):  # a 16-bit keep
            return cls(name, f"{name}.safetensors", 16, "none", keep_block_size, False, 0, tuple(weight.shape),
                       dtype_name(weight.dtype), weight.numel() * weight.element_size())
        spec = weight.spec
        block = getattr(weight, "block", spec.block_size)
        return cls(name, f"{name}.safetensors", spec.bits, spec.method, spec.block_size, spec.double_quant, block,
                   tuple(weight.shape), dtype_name(weight.dtype), weight.nbytes)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "shape": list(self.shape)}


@dataclass(frozen=True)
class BackboneMeta:
    """``quantization.json``: how to rebuild every target layer and where the rest lives."""

    layers: tuple[LayerMeta, ...]
    non_target_dtype: str = "bf16"
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise ValueError(f"format must be {FORMAT!r}, got {self.format!r}")
        if not isinstance(self.format_version, int) or not 1 <= self.format_version <= FORMAT_VERSION:
            raise ValueError(f"format_version {self.format_version!r} is not supported (this planner reads "
                             f"<= {FORMAT_VERSION}); upgrade loftq-planner")
        if self.non_target_dtype not in DTYPES:
            raise ValueError(f"non_target_dtype must be one of {', '.join(DTYPES)}, got {self.non_target_dtype!r}")

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "format_version": self.format_version,
                "non_target": {"file": NON_TARGET_FILE, "dtype": self.non_target_dtype},
                "layers": [layer.to_dict() for layer in self.layers]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BackboneMeta":
        return cls(layers=tuple(LayerMeta(**entry) for entry in d["layers"]),
                   non_target_dtype=d["non_target"]["dtype"], format=d["format"],
                   format_version=d["format_version"])


# ---------------------------------------------------------------- reading files the user may have altered
def layer_tensors(name: str, weight: Quantized | torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors stored for one layer, under ``NAME.<QuantLinear buffer name>``: the format's own
    (``qweight`` and its constants), or ``qweight`` = the kept 16-bit weight."""
    own = {"qweight": weight} if isinstance(weight, torch.Tensor) else weight.tensors()
    return {f"{name}.{k}": v.detach().contiguous().cpu() for k, v in own.items()}


def read_layer(folder: Path, meta: LayerMeta, device: torch.device | str = "cpu") -> Quantized | torch.Tensor:
    """Rebuild one stored layer from ``backbone/layers/``: its format's tensor (checked against the
    bytes its spec stores for the shape), or the 16-bit weight [out, in]."""
    path = folder / LAYER_DIR / meta.file
    tensors = load_tensors(path, str(device))
    prefix = meta.name + "."
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if "qweight" not in own:
        raise PlannerError(f"{path}: no tensor {meta.name}.qweight")
    spec = meta.spec
    if spec is None:
        weight = own["qweight"]
        if tuple(weight.shape) != meta.shape or weight.dtype != DTYPES[meta.dtype] or len(own) != 1:
            raise PlannerError(f"{path}: holds {weight.dtype} {list(weight.shape)} for {meta.name}, "
                               f"quantization.json says {meta.dtype} {list(meta.shape)}")
        return weight
    try:
        stored = spec.restore(own, meta.shape, DTYPES[meta.dtype])
    except (TypeError, ValueError, RuntimeError) as err:
        raise PlannerError(f"{path}: does not hold layer {meta.name} as {spec.name} ({one_line(err)})") from None
    if stored.nbytes != meta.nbytes:
        raise PlannerError(f"{meta.name}: stored {stored.nbytes} bytes, quantization.json says {meta.nbytes}")
    return stored


@dataclass(frozen=True)
class Artifact:
    """A materialized folder, read and validated (no tensors loaded)."""

    path: Path
    plan: Plan
    meta: BackboneMeta

    @property
    def backbone(self) -> Path:
        return self.path / BACKBONE

    @property
    def adapter(self) -> Path | None:
        folder = self.path / ADAPTER
        return folder if (folder / ADAPTER_CONFIG).is_file() else None

    @property
    def run(self) -> RunSettings:
        return self.plan.run

    def ranks(self) -> dict[str, int]:
        return {layer.name: layer.rank for layer in self.plan.layers if layer.rank}

    def alphas(self) -> dict[str, float]:
        return {layer.name: float(layer.alpha) for layer in self.plan.layers if layer.rank}


def read_artifact(path: str | Path) -> Artifact:
    """Read DIR/plan.json and DIR/backbone/quantization.json; PlannerError (one line) if unusable."""
    path = Path(path)
    if not (path / BACKBONE / QUANT_META).is_file():
        raise PlannerError(f"{path}: not a materialized model (no {BACKBONE}/{QUANT_META}); "
                           "run `python -m planner materialize PLAN --out DIR` first")
    check_links(path)  # materialize writes no links: one pointing out of DIR was put there by someone else
    plan = load_plan(path / PLAN_FILE)
    try:
        meta = BackboneMeta.from_dict(json.loads((path / BACKBONE / QUANT_META).read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise PlannerError(f"{path / BACKBONE / QUANT_META}: invalid: {err}") from None
    planned = {layer.name for layer in plan.layers}
    stored = {layer.name for layer in meta.layers}
    if planned != stored:
        diff = sorted(planned ^ stored)[:3]
        raise PlannerError(f"{path}: plan.json and {QUANT_META} disagree on the target layers ({', '.join(diff)})")
    return Artifact(path, plan, meta)


def check_adapter_config(folder: Path, ranks: Mapping[str, int], alphas: Mapping[str, float]) -> None:
    """The adapter folder's r / alpha per module must be the plan's (wrong types: one PlannerError line)."""
    path = folder / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PlannerError(f"{path}: unreadable ({one_line(err)})") from None
    if not isinstance(cfg, dict):
        raise PlannerError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    for key, value in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(value, dict):
            raise PlannerError(f"{path}: {key} must be an object (module -> number), got {value!r:.60}")
    for name, r in ranks.items():
        key = re.escape(name)
        got_r, got_a = rank_pattern.get(key, cfg.get("r")), alpha_pattern.get(key, cfg.get("lora_alpha"))
        if not _is_number(got_r) or not _is_number(got_a):
            raise PlannerError(f"{path}: {name} has r={got_r!r:.40}, lora_alpha={got_a!r:.40}; both must be numbers")
        if got_r != r or float(got_a) != float(alphas[name]):
            raise PlannerError(f"{folder}: {name} has r={got_r}, alpha={got_a}; the plan says r={r}, "
                               f"alpha={alphas[name]}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------- writing (materialize)
def copy_config_files(src: Path, dst: Path, warn: bool = True, roots: Sequence[Path] | None = None) -> None:
    """Config (without any quantization_config of the source), generation config, tokenizer files.
    Each must lie inside ``roots`` (default: ``src``) once its symlinks are resolved."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        if not (src / name).is_file():
            continue
        real = contained(src / name, roots or (src,))
        if name == "config.json":
            try:
                cfg = json.loads(real.read_text())
                cfg.pop("quantization_config", None)
            except (OSError, ValueError, AttributeError) as err:
                raise PlannerError(f"{src / name}: not a JSON config object ({one_line(err)})") from None
            atomic_write_bytes(dst / name, json.dumps(cfg, indent=2).encode())
        else:
            atomic_write_bytes(dst / name, real.read_bytes())
    if warn and not any((dst / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")):
        log.warning("%s has no tokenizer files; the materialized model has none either", src)


def write_adapter(folder: Path, plan: Plan, adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]], base: str) -> None:
    """A PEFT LoRA folder: adapter_config.json (per-module r and alpha as rank_pattern / alpha_pattern,
    the same config :func:`planner.runtime.layers.add_lora` builds) and adapter_model.safetensors holding
    ``adapters[name]`` = PEFT's (lora_A [r, in], lora_B [out, r]) (:func:`planner.runtime.build.peft_pair`:
    PEFT's B·A·alpha/r is LoftQ's B·A)."""
    from peft import LoraConfig

    layers = {layer.name: layer for layer in plan.layers}
    ranks = {n: layers[n].rank for n in adapters}
    alphas = {n: float(layers[n].alpha) for n in adapters}
    top = max(ranks.values())
    config = LoraConfig(target_modules=sorted(ranks), r=top, lora_alpha=top,
                        rank_pattern={re.escape(n): r for n, r in ranks.items()},
                        alpha_pattern={re.escape(n): a for n, a in alphas.items()},
                        lora_dropout=plan.run.lora_dropout, bias="none",
                        base_model_name_or_path=base, task_type=_task_type(plan))
    # PEFT's save_pretrained writes target_modules from a set, in an order that changes with the
    # process's hash seed: write its dict ourselves with every set sorted (byte-reproducible output)
    cfg = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.to_dict().items()}
    atomic_write_bytes(folder / ADAPTER_CONFIG, json.dumps(cfg, indent=2, sort_keys=True).encode())
    tensors = {}
    for name, (lora_a, lora_b) in adapters.items():
        tensors[f"{peft_key(name)}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"{peft_key(name)}.lora_B.weight"] = lora_b.contiguous()
    atomic_save_tensors(folder / ADAPTER_WEIGHTS, tensors, {"format": "pt"})


def _task_type(plan: Plan) -> str | None:
    """PEFT task type: causal LM for decoders, seq2seq for t5/bart, none for encoders."""
    arch = plan.model.get("architecture")
    return None if arch == "bert" else "SEQ_2_SEQ_LM" if arch in ("t5", "bart") else "CAUSAL_LM"

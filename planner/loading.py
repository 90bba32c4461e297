"""The materialized artifact on disk, and ``planner.load(DIR)`` -> a trainable PeftModel.

Layout written by :mod:`planner.materialize`::

    DIR/plan.json                    the plan, with the residuals and iterations actually reached
    DIR/backbone/config.json         the model's config (+ generation config, tokenizer files)
    DIR/backbone/quantization.json   BackboneMeta: per target layer bits, method, block size,
                                     double quant, shape, dtype, bytes, file
    DIR/backbone/layers/NAME.safetensors   one file per target layer: NAME.qweight (packed uint8
                                     codes, or the 16-bit weight [out, in]) and the constants
                                     NAME.absmax / .absmax_codes / .absmax_scale / .absmax_offset,
                                     exactly the buffers of a :class:`planner.runtime.QuantLinear`
    DIR/backbone/non_target.safetensors    every other parameter (embeddings, norms, untied head,
                                     target biases) in 16 bits (bf16 by default)
    DIR/adapter/                     a PEFT LoRA folder (absent when no layer has a rank)

The backbone is not a stock transformers checkpoint (transformers has no 2/8-bit NF layers);
``--format hf-bnb`` adds one for all-NF4 plans (see :mod:`planner.materialize`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loftq import QuantConfig, QuantizedTensor

from .errors import PlannerError
from .plan import Plan, atomic_write, load_plan
from .runtime import QuantLinear, add_lora, backbone_nbytes, resolve_compute_dtype
from .settings import RunSettings

log = logging.getLogger(__name__)

FORMAT = "loftq-planner/packed"
FORMAT_VERSION = 1
BACKBONE, ADAPTER, PLAN_FILE = "backbone", "adapter", "plan.json"
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
    constants. Otherwise ``dtype`` is the weight's dtype before quantization and ``block`` the
    effective block length (row length for row-wise int8)."""

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
        if self.bits not in (2, 4, 8, 16):
            raise ValueError(f"{self.name}: bits must be 2, 4, 8 or 16, got {self.bits!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"{self.name}: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ValueError(f"{self.name}: shape must be [out, in], got {self.shape!r}")
        if "/" in self.file or self.file.startswith("."):
            raise ValueError(f"{self.name}: file must be a plain file name, got {self.file!r}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.bits < 16:
            self.config  # noqa: B018 - QuantConfig validates (method, bits, block_size)

    @property
    def config(self) -> QuantConfig | None:
        return None if self.bits == 16 else QuantConfig(self.bits, self.method, self.block_size, self.double_quant)

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


def layer_tensors(name: str, weight: QuantizedTensor | torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors stored for one layer, under ``NAME.<QuantLinear buffer name>``."""
    if isinstance(weight, QuantizedTensor):
        out = {f"{name}.qweight": weight.packed}
        out.update({f"{name}.{k}": v for k, v in weight.constants().items()})
    else:
        out = {f"{name}.qweight": weight}
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def read_layer(folder: Path, meta: LayerMeta, device: torch.device | str = "cpu") -> QuantizedTensor | torch.Tensor:
    """Rebuild one stored layer from ``backbone/layers/``: a QuantizedTensor, or the 16-bit weight [out, in]."""
    tensors = load_file(str(folder / LAYER_DIR / meta.file), device=str(device))
    prefix = meta.name + "."
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if "qweight" not in own:
        raise PlannerError(f"{folder / LAYER_DIR / meta.file}: no tensor {meta.name}.qweight")
    if meta.bits == 16:
        return own["qweight"]
    qt = QuantizedTensor(own.pop("qweight"), meta.shape, DTYPES[meta.dtype], meta.config, block=meta.block, **own)
    if qt.nbytes != meta.nbytes:
        raise PlannerError(f"{meta.name}: stored {qt.nbytes} bytes, quantization.json says {meta.nbytes}")
    return qt


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
        return RunSettings.from_dict(self.plan.run)

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


# ---------------------------------------------------------------- building the model
@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every nn.Parameter on the meta device while buffers (rotary tables, position ids) get
    their real values: the skeleton costs no weight memory and needs no re-initialisation."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _skeleton(folder: Path) -> nn.Module:
    from transformers import AutoConfig

    from .sources import model_class

    config = AutoConfig.from_pretrained(str(folder))
    cls = model_class(config)
    build = getattr(cls, "_from_config", None) or cls.from_config
    with _parameters_on_meta():
        return build(config)


def _install(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, layer)


def load_backbone(path: str | Path, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> nn.Module:
    """The bare quantized model (no LoRA): QuantLinear target layers, non-target weights in ``dtype``
    (default: the plan's compute dtype on ``device``; ``device`` default: CUDA when present)."""
    art = read_artifact(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or compute_dtype_for(art.run, device)
    model = _skeleton(art.backbone)
    state = {k: v.to(dtype) for k, v in load_file(str(art.backbone / NON_TARGET_FILE), device=str(device)).items()}
    for meta in art.meta.layers:
        weight = read_layer(art.backbone, meta, device)
        mod = model.get_submodule(meta.name)
        out_in = (mod.weight.shape[1], mod.weight.shape[0]) if type(mod).__name__ == "Conv1D" else tuple(mod.weight.shape)
        if tuple(out_in) != meta.shape:
            raise PlannerError(f"{meta.name}: stored shape {meta.shape} does not match the model's {tuple(out_in)}")
        _install(model, meta.name, QuantLinear(weight, state.pop(f"{meta.name}.bias", None), dtype))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise PlannerError(f"{art.backbone / NON_TARGET_FILE}: tensors the model does not have: {unexpected[:3]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise PlannerError(f"{art.path}: no stored value for {', '.join(left[:3])}")
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device)
    if backbone_nbytes(model) != art.meta.nbytes:
        raise PlannerError(f"{art.path}: resident backbone {backbone_nbytes(model)} B != stored {art.meta.nbytes} B")
    model.set_attn_implementation(art.run.attn_implementation)
    return model.eval()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype_for(run: RunSettings, device: torch.device) -> torch.dtype:
    return resolve_compute_dtype(run.compute_dtype, device)


def adapter_dtype_for(run: RunSettings, compute: torch.dtype) -> torch.dtype:
    return compute if run.adapter_dtype == "compute" else DTYPES[run.adapter_dtype]


def load(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
         adapter: str | Path | None = None) -> nn.Module:
    """A materialized folder as a trainable PeftModel on :class:`QuantLinear` layers.

    ``device``: default CUDA when present, else CPU. ``dtype``: compute dtype (default: the plan's,
    ``auto`` = bf16/fp16 on a GPU, fp32 on CPU). ``adapter``: another PEFT folder of the same plan
    (e.g. written by ``finetune``) instead of DIR/adapter. Only the adapters are trainable; every
    module's r and alpha are the plan's (checked). A plan without ranks gives the bare backbone.
    ``with model.disable_adapter():`` runs the bare quantized backbone.
    """
    art = read_artifact(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or compute_dtype_for(art.run, device)
    model = load_backbone(path, device, dtype)
    ranks, alphas = art.ranks(), art.alphas()
    if not ranks:
        return model
    folder = Path(adapter) if adapter is not None else art.adapter
    if folder is None or not (folder / ADAPTER_WEIGHTS).is_file():
        raise PlannerError(f"{path}: the plan has ranks but no adapter folder {folder or art.path / ADAPTER}")
    check_adapter_config(folder, ranks, alphas)
    model = add_lora(model, ranks, alphas, dropout=art.run.lora_dropout,
                     adapter_dtype=adapter_dtype_for(art.run, dtype))
    load_adapter_weights(model, folder)
    check_ranks(model, ranks, alphas)
    return model.to(device)


def check_adapter_config(folder: Path, ranks: Mapping[str, int], alphas: Mapping[str, float]) -> None:
    """The adapter folder's r / alpha per module must be the plan's."""
    try:
        cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise PlannerError(f"{folder / ADAPTER_CONFIG}: unreadable ({err})") from None
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    for name, r in ranks.items():
        key = re.escape(name)
        got_r, got_a = rank_pattern.get(key, cfg.get("r")), alpha_pattern.get(key, cfg.get("lora_alpha"))
        if got_r != r or float(got_a) != float(alphas[name]):
            raise PlannerError(f"{folder}: {name} has r={got_r}, alpha={got_a}; the plan says r={r}, "
                               f"alpha={alphas[name]}")


def load_adapter_weights(model: nn.Module, folder: Path) -> None:
    """Copy ``adapter_model.safetensors`` into the PeftModel's default adapter (every tensor must land)."""
    from peft import set_peft_model_state_dict

    state = load_file(str(folder / ADAPTER_WEIGHTS))
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise PlannerError(f"{folder / ADAPTER_WEIGHTS}: tensors for modules the plan has no adapter on: {unexpected[:3]}")
    missing = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k]
    if missing:
        raise PlannerError(f"{folder / ADAPTER_WEIGHTS}: no values for {missing[:3]}")


def check_ranks(model: nn.Module, ranks: Mapping[str, int], alphas: Mapping[str, float]) -> None:
    """Every adapted module of the PeftModel has the plan's r and alpha, and no other module is adapted."""
    seen = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "r", {}):
            seen[name.removeprefix("base_model.model.")] = (mod.r["default"], float(mod.lora_alpha["default"]))
    want = {n: (r, float(alphas[n])) for n, r in ranks.items()}
    if seen != want:
        bad = sorted(n for n in set(seen) | set(want) if seen.get(n) != want.get(n))[:3]
        raise PlannerError(f"adapters differ from the plan at {', '.join(bad)}: "
                           f"{[seen.get(n) for n in bad]} vs {[want.get(n) for n in bad]}")


# ---------------------------------------------------------------- writing (materialize)
def save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file written to a temp name beside ``path``, then renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def copy_config_files(src: Path, dst: Path, warn: bool = True) -> None:
    """Config (without any quantization_config of the source), generation config, tokenizer files."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        if not (src / name).is_file():
            continue
        if name == "config.json":
            cfg = json.loads((src / name).read_text())
            cfg.pop("quantization_config", None)
            atomic_write(dst / name, lambda fh: fh.write(json.dumps(cfg, indent=2).encode()))
        else:
            shutil.copyfile(src / name, dst / name)
    if warn and not any((dst / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")):
        log.warning("%s has no tokenizer files; the materialized model has none either", src)


def write_adapter(folder: Path, plan: Plan, adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]], base: str) -> None:
    """A PEFT LoRA folder: adapter_config.json (per-module r and alpha as rank_pattern / alpha_pattern,
    the same config :func:`planner.runtime.add_lora` builds) and adapter_model.safetensors holding
    lora_A = A / (alpha / r) [r, in] and lora_B = B [out, r], so that PEFT's B·A·alpha/r is LoftQ's B·A."""
    from peft import LoraConfig

    layers = {layer.name: layer for layer in plan.layers}
    ranks = {n: layers[n].rank for n in adapters}
    alphas = {n: float(layers[n].alpha) for n in adapters}
    top = max(ranks.values())
    config = LoraConfig(target_modules=sorted(ranks), r=top, lora_alpha=top,
                        rank_pattern={re.escape(n): r for n, r in ranks.items()},
                        alpha_pattern={re.escape(n): a for n, a in alphas.items()},
                        lora_dropout=float(plan.run.get("lora_dropout", 0.0)), bias="none",
                        base_model_name_or_path=base, task_type=_task_type(plan))
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    tensors = {}
    for name, (a, b) in adapters.items():
        tensors[f"{peft_key(name)}.lora_A.weight"] = (a / (alphas[name] / ranks[name])).contiguous()
        tensors[f"{peft_key(name)}.lora_B.weight"] = b.contiguous()
    save_atomic(folder / ADAPTER_WEIGHTS, tensors, {"format": "pt"})


def _task_type(plan: Plan) -> str | None:
    """PEFT task type: causal LM for decoders, seq2seq for t5/bart, none for encoders."""
    arch = plan.model.get("architecture")
    return None if arch == "bert" else "SEQ_2_SEQ_LM" if arch in ("t5", "bart") else "CAUSAL_LM"

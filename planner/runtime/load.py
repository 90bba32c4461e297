"""``planner.load(DIR)``: a materialized folder as a trainable PeftModel on QuantLinear layers.

Reads the artifact with :mod:`planner.artifact.layout` (formats and file names live there), builds
the model skeleton with parameters on the meta device, installs one :class:`QuantLinear` per target
layer and the PEFT adapters, and checks every rank and alpha against the plan.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from search_spaces.discovery import weight_out_in

from planner.artifact.layout import (ADAPTER, ADAPTER_WEIGHTS, DTYPES, NON_TARGET_FILE, Artifact,
                                     check_adapter_config, read_artifact, read_layer)
from planner.devices import default_device
from planner.errors import PlannerError
from planner.files.paths import check_links, one_line
from planner.files.tensors import load_tensors
from planner.runtime.build import LayerBuild, assemble
from planner.runtime.layers import backbone_nbytes, resolve_compute_dtype
from planner.settings import RunSettings

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- building the model
@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
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

    from planner.sources import model_class

    try:
        config = AutoConfig.from_pretrained(str(folder))
        cls = model_class(config)
        build = getattr(cls, "_from_config", None) or cls.from_config
        with parameters_on_meta():
            return build(config)
    except Exception as err:  # an edited or corrupt config.json: one line
        raise PlannerError(f"{folder / 'config.json'}: cannot build the model from it "
                           f"({type(err).__name__}: {one_line(err)})") from None


def install_module(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, layer)


def _model_with_non_targets(art: Artifact, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The skeleton with every non-target parameter (embeddings, norms, target biases) loaded in
    ``dtype``; the target weights stay on the meta device until their layers are installed."""
    model = _skeleton(art.backbone)
    path = art.backbone / NON_TARGET_FILE
    state = {k: v.to(dtype) for k, v in finite(load_tensors(path, str(device)), path).items()}
    try:
        _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # edited tensors of the wrong shape
        raise PlannerError(f"{path}: does not fit the model ({one_line(err)})") from None
    if unexpected:
        raise PlannerError(f"{path}: tensors the model does not have: {unexpected[:3]}")
    return model


def _stored_layers(art: Artifact, model: nn.Module, device: torch.device) -> dict[str, LayerBuild]:
    layers = {}
    for meta in art.meta.layers:
        weight = read_layer(art.backbone, meta, device)
        out_in = tuple(weight_out_in(model.get_submodule(meta.name)).shape)
        if out_in != meta.shape:
            raise PlannerError(f"{meta.name}: stored shape {meta.shape} does not match the model's {out_in}")
        layers[meta.name] = LayerBuild(weight, None)
    return layers


def _finish(model: nn.Module, art: Artifact, device: torch.device) -> nn.Module:
    """Tie weights, check nothing is left on meta and the resident backbone is what was stored."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "tie_weights"):
        base.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise PlannerError(f"{art.path}: no stored value for {', '.join(left[:3])}")
    model.to(device)
    if backbone_nbytes(model) != art.meta.nbytes:
        raise PlannerError(f"{art.path}: resident backbone {backbone_nbytes(model)} B != stored {art.meta.nbytes} B")
    base.set_attn_implementation(art.run.attn_implementation)
    return model.eval()


def load_backbone(path: str | Path, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> nn.Module:
    """The bare quantized model (no LoRA): QuantLinear target layers, non-target weights in ``dtype``
    (default: the plan's compute dtype on ``device``; ``device`` default: CUDA when present)."""
    art = read_artifact(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or compute_dtype_for(art.run, device)
    model = _model_with_non_targets(art, device, dtype)
    model = assemble(model, _stored_layers(art, model, device), compute_dtype=dtype)
    return _finish(model, art, device)


def compute_dtype_for(run: RunSettings, device: torch.device) -> torch.dtype:
    return resolve_compute_dtype(run.compute_dtype, device)


def adapter_dtype_for(run: RunSettings, compute: torch.dtype) -> torch.dtype:
    return compute if run.adapter_dtype == "compute" else DTYPES[run.adapter_dtype]


def load(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
         adapter: str | Path | None = None) -> nn.Module:
    """A materialized folder as a trainable PeftModel on :class:`QuantLinear` layers, assembled by the
    one builder (:func:`planner.runtime.build.assemble`) from the stored layers and adapter.

    ``device``: default CUDA when present, else CPU. ``dtype``: compute dtype (default: the plan's,
    ``auto`` = bf16/fp16 on a GPU, fp32 on CPU). ``adapter``: another PEFT folder of the same plan
    (e.g. written by ``finetune``) instead of DIR/adapter. Only the adapters are trainable; every
    module's r and alpha are the plan's (checked). A plan without ranks gives the bare quantized
    model (every parameter frozen: nothing to train), with a warning.
    ``with model.disable_adapter():`` runs the bare quantized backbone.
    """
    art = read_artifact(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or compute_dtype_for(art.run, device)
    ranks, alphas = art.ranks(), art.alphas()
    if not ranks:
        log.warning("%s: the plan gives no layer an adapter, so the model has nothing to train (a plain frozen "
                    "model, not a PeftModel)", path)
        return load_backbone(path, device, dtype)
    folder = Path(adapter) if adapter is not None else art.adapter
    if folder is None or not (folder / ADAPTER_WEIGHTS).is_file():
        raise PlannerError(f"{path}: the plan has ranks but no adapter folder {folder or art.path / ADAPTER}")
    check_links(folder)
    check_adapter_config(folder, ranks, alphas)
    model = _model_with_non_targets(art, device, dtype)
    layers = _stored_layers(art, model, device)
    for name, pair in adapter_pairs(folder, layers, ranks).items():
        layers[name].lora = pair
    model = assemble(model, layers, alphas, compute_dtype=dtype, adapter_dtype=adapter_dtype_for(art.run, dtype),
                     dropout=art.run.lora_dropout)
    check_ranks(model, ranks, alphas)
    return _finish(model, art, device)


def adapter_pairs(folder: Path, layers: Mapping[str, LayerBuild], ranks: Mapping[str, int]
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's (lora_A [r, in], lora_B [out, r]) per adapted layer from ``adapter_model.safetensors``;
    every tensor must belong to a planned adapter, every planned adapter must be there, with its shapes."""
    path = folder / ADAPTER_WEIGHTS
    state = finite(load_tensors(path), path)
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    want = {f"base_model.model.{n}.lora_{ab}.weight": (n, ab) for n in ranks for ab in "AB"}
    unexpected = sorted(k for k in state if k not in want)
    if unexpected:
        raise PlannerError(f"{path}: tensors for modules the plan has no adapter on: {unexpected[:3]}")
    missing = sorted(k for k in want if k not in state)
    if missing:
        raise PlannerError(f"{path}: no values for {missing[:3]}")
    for name, r in ranks.items():
        out_f, in_f = layers[name].stored.shape
        a, b = state[f"base_model.model.{name}.lora_A.weight"], state[f"base_model.model.{name}.lora_B.weight"]
        if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            raise PlannerError(f"{path}: does not fit the plan's adapters ({name}: lora_A {list(a.shape)}, lora_B "
                               f"{list(b.shape)}; rank {r} of a {out_f} x {in_f} layer needs [{r}, {in_f}] and "
                               f"[{out_f}, {r}])")
        pairs[name] = (a, b)
    return pairs


def finite(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """``state`` when every tensor is finite; else PlannerError naming the first bad one (a corrupt or
    diverged file: training on it would only report a NaN loss)."""
    for key, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PlannerError(f"{path}: {key} holds non-finite values (NaN or Inf); the file is corrupt, or a "
                               "fine-tune that wrote it diverged")
    return state


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



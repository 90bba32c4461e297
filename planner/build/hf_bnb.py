"""``materialize --format hf-bnb``: an all-NF4 plan's backbone as a stock transformers checkpoint.

transformers serializes a prequantized bitsandbytes ``Linear4bit`` as its packed codes
(``NAME.weight``, uint8 [n/2, 1]) plus bitsandbytes' QuantState tensors (absmax, quant_map, the
``nested_*`` constants of double quantization, the packed JSON state). NF4 codes made by loftq are
bitsandbytes' codes bit for bit, so the layers are written as they are; 16-bit layers and every
other linear layer (the output head) are plain weights named in ``llm_int8_skip_modules``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, TYPE_CHECKING

import torch

from loftq.bnb import bnb_quant_state
from search_spaces.discovery import is_conv1d, is_linear_like

from planner.artifact.layout import HF_BNB, NON_TARGET_FILE, copy_config_files, read_artifact, read_layer
from planner.errors import PlannerError
from planner.files.atomic import atomic_save_tensors, atomic_write_bytes
from planner.files.tensors import load_tensors

if TYPE_CHECKING:  # annotations only
    from planner.sources import ModelSource

log = logging.getLogger(__name__)


def write_hf_bnb(artifact: Path, source: ModelSource) -> Path:
    """``artifact/hf-bnb``, loadable with ``AutoModelForCausalLM.from_pretrained(DIR/hf-bnb)`` and
    then ``PeftModel.from_pretrained(model, DIR/adapter)``. The whole state is built in memory (about
    the backbone's size) before it is written. The plan was checked to hold only NF4 and 16-bit
    layers before any LoftQ work (:func:`planner.build.materialize.check_nf4_only`)."""
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes.functional  # noqa: F401  (fail early, not half-way)
    except Exception:
        raise PlannerError("--format hf-bnb needs bitsandbytes: pip install bitsandbytes") from None
    art = read_artifact(artifact)
    if any(is_conv1d(source.skeleton.get_submodule(m.name)) for m in art.meta.layers):
        raise PlannerError("--format hf-bnb does not support Conv1D models (gpt2); use the packed format")
    state = load_tensors(art.backbone / NON_TARGET_FILE)
    quantized: set[str] = set()
    skip: list[str] = []
    for meta in art.meta.layers:
        weight = read_layer(art.backbone, meta)
        if meta.bits == 16:
            state[f"{meta.name}.weight"] = weight
            skip.append(meta.name)
            continue
        quantized.add(meta.name)
        if meta.shape[1] % meta.block_size:
            log.warning("%s: in_features %d is not a multiple of the block size %d: bitsandbytes' CPU kernel "
                        "cannot run this layer (its CUDA kernel can)", meta.name, meta.shape[1], meta.block_size)
        state[f"{meta.name}.weight"] = weight.packed.view(-1, 1)
        for key, value in bnb_quant_state(weight, torch.bfloat16).as_dict(packed=True).items():
            state[f"{meta.name}.weight.{key}"] = value.contiguous()
    skip += [n for n, m in source.skeleton.named_modules()
             if is_linear_like(m) and n not in quantized and n not in skip]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=any(m.double_quant for m in art.meta.layers),
                               llm_int8_skip_modules=sorted(skip))
    folder = artifact / HF_BNB
    copy_config_files(art.backbone, folder, warn=False)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = quant.to_dict()
    atomic_write_bytes(folder / "config.json", json.dumps(cfg, indent=2).encode())
    atomic_save_tensors(folder / "model.safetensors", state, {"format": "pt"})
    return folder

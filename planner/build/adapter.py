"""``finetune``'s output: the trained adapter as a PEFT folder (and as llama.cpp's adapter.gguf when
the materialized folder has a GGUF export)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Mapping

import torch

from planner.artifact.layout import ADAPTER, ADAPTER_CONFIG, ADAPTER_WEIGHTS, GGUF_DIR, read_artifact
from planner.build.gguf_export import ADAPTER_GGUF, DEFAULT_ADAPTER_DTYPE, MODEL_GGUF, Base, write_adapter_gguf
from planner.files.atomic import atomic_dir, atomic_save_tensors


def write_trained_adapter(artifact: Path, state: Mapping[str, torch.Tensor], out: Path,
                          gguf_adapter_dtype: str | None = None) -> Path:
    """A PEFT folder with ``artifact``'s adapter config and the trained weights ``state``, built in a
    temp folder and renamed to ``out`` (an existing folder there is replaced: the caller checked
    --force, and that ``out`` is not one of the command's inputs). An artifact with a llama.cpp
    export (``materialize --format gguf``) also gets ``out/adapter.gguf`` for its ``gguf/model.gguf``
    (tensors in ``gguf_adapter_dtype``, default f16)."""
    model_gguf = artifact / GGUF_DIR / MODEL_GGUF

    def build(tmp: Path) -> None:
        shutil.copyfile(artifact / ADAPTER / ADAPTER_CONFIG, tmp / ADAPTER_CONFIG)
        atomic_save_tensors(tmp / ADAPTER_WEIGHTS, dict(state), {"format": "pt"})
        if model_gguf.is_file():
            art = read_artifact(artifact)
            write_adapter_gguf(tmp / ADAPTER_GGUF, Base(model_gguf), state, art.ranks(), art.alphas(),
                               gguf_adapter_dtype or DEFAULT_ADAPTER_DTYPE)

    return atomic_dir(out, build, replace=True)

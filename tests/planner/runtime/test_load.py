"""``planner.load`` / ``verify`` on a materialized folder someone altered: truncated or corrupt files,
wrongly typed adapter_config.json, links out of the folder. One PlannerError line, exit 2."""
from __future__ import annotations

import json
import re
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

import planner.cli.build_cmd  # noqa: F401  registers the commands
from planner import load, progress
from planner.artifact.layout import (ADAPTER, ADAPTER_CONFIG, ADAPTER_WEIGHTS, BACKBONE, LAYER_DIR,
                                     NON_TARGET_FILE)
from planner.build.materialize import materialize
from planner.artifact.plan import save_plan
from planner.cli.app import main
from planner.errors import PlannerError
from planner.settings import LayerChoice, RunSettings
from planner.sources import resolve
from planner.build.manual import plan_from_choices
from tests.tiny_models import save_tiny_checkpoint


@pytest.fixture(autouse=True)
def _quiet() -> None:
    progress.set_enabled(False)
    yield
    progress.set_enabled(True)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama materialized once: 2/4/8/16 bits, ranks 0/8 (the tests alter copies of it)."""
    root = tmp_path_factory.mktemp("artifact")
    source = resolve(str(save_tiny_checkpoint("llama", root / "ckpt")))
    choices = {t.name: LayerChoice((2, 4, 8, 16)[i % 4], (0, 8)[i % 2]) for i, t in enumerate(source.targets())}
    plan = save_plan(plan_from_choices(source, choices, RunSettings(device="cpu", seq_len=32)), root / "plan.json")
    materialize(plan, root / "out")
    return root / "out"


def _layer_file(folder: Path) -> Path:
    return sorted((folder / BACKBONE / LAYER_DIR).iterdir())[5]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-16])


def _edit_adapter_config(**changes) -> Callable[[Path], Path]:
    def edit(folder: Path) -> Path:
        path = folder / ADAPTER / ADAPTER_CONFIG
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
        return path
    return edit


def _truncated(pick: Callable[[Path], Path]) -> Callable[[Path], Path]:
    def fault(folder: Path) -> Path:
        _truncate(pick(folder))
        return pick(folder)
    return fault


def _link_out(folder: Path) -> Path:
    """A layer file replaced by a link to an (identical) copy outside the folder."""
    layer = _layer_file(folder)
    outside = folder.parent / "outside.safetensors"
    shutil.copyfile(layer, outside)
    layer.unlink()
    layer.symlink_to(outside)
    return layer


def _json_list(folder: Path) -> Path:
    path = folder / ADAPTER / ADAPTER_CONFIG
    path.write_text("[1, 2, 3]")
    return path


def _backbone_config(folder: Path) -> Path:
    path = folder / BACKBONE / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_attention_heads": "four"}))
    return path


FAULTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "truncated layer file": (_truncated(_layer_file), "not a readable safetensors file"),
    "truncated non-target file": (_truncated(lambda f: f / BACKBONE / NON_TARGET_FILE), "not a readable safetensors"),
    "truncated adapter weights": (_truncated(lambda f: f / ADAPTER / ADAPTER_WEIGHTS), "not a readable safetensors"),
    "adapter config is a list": (_json_list, "expected a JSON object"),
    "rank_pattern is a list": (_edit_adapter_config(rank_pattern=["x"]), "rank_pattern must be an object"),
    "r is a string": (_edit_adapter_config(r="eight", rank_pattern={}), "must be numbers"),
    "alpha is null": (_edit_adapter_config(lora_alpha=None, alpha_pattern={}), "must be numbers"),
    "backbone config.json": (_backbone_config, "cannot build the model|config.json: unreadable"),  # transformers 5 validates at read
    "layer file links out": (_link_out, "points outside"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_altered_artifact_is_one_line(artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                      fault: str) -> None:
    folder = tmp_path / "out"
    shutil.copytree(artifact, folder)
    alter, message = FAULTS[fault]
    path = alter(folder)
    with pytest.raises(PlannerError, match=message) as err:
        load(folder, "cpu")
    assert "\n" not in str(err.value) and (path.name in str(err.value) or path.parent.name in str(err.value))
    assert main(["verify", str(folder), "--steps", "1", "--seq-len", "16", "--device", "cpu"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and line.startswith("error: ") and re.search(message, line), line


def test_the_unaltered_copy_loads(artifact: Path, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    shutil.copytree(artifact, folder)
    os.symlink(folder / BACKBONE / "config.json", folder / "config-link.json")  # a link inside DIR is harmless
    model = load(folder, "cpu")
    assert sum(1 for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n) == 10  # 21 layers, odd ones

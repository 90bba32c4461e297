"""Cache keys carry the versions of the code that produced the cached numbers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import loftq
import planner.scoring.tables as tables_mod
import planner.sources.gguf_convert as gguf_convert
from planner.files.cache import cache_key, code_version, load_cached, save_cached
from planner.scoring.tables import TableSettings, tables_key
from search_spaces.facts import TargetLayer

TARGETS = [TargetLayer("model.layers.0.mlp.up_proj", (160, 64), "up_proj", 0)]


def test_key_changes_with_producer_and_loftq_version(monkeypatch: pytest.MonkeyPatch) -> None:
    payload = {"weights": "ab" * 32, "settings": [2, 4]}
    base = cache_key("residual-tables/1", payload)
    assert cache_key("residual-tables/1", dict(payload)) == base
    assert cache_key("residual-tables/2", payload) != base
    assert code_version("x/1") == {"producer": "x/1", "loftq": loftq.__version__}
    monkeypatch.setattr(loftq, "__version__", loftq.__version__ + ".next")
    assert cache_key("residual-tables/1", payload) != base
    with pytest.raises(ValueError, match="producer must be a non-empty version string, got ''"):
        cache_key("", payload)


def test_tables_key_follows_the_tables_producer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = TableSettings()
    before = tables_key("cd" * 32, TARGETS, settings)
    path = tmp_path / f"{before}.safetensors"
    save_cached(path, before, {"table": torch.ones(1, 3, 5)})
    monkeypatch.setattr(tables_mod, "PRODUCER", "residual-tables/999")
    after = tables_key("cd" * 32, TARGETS, settings)
    assert after != before
    assert load_cached(path, after) is None  # a file written by the old code is not reused
    assert load_cached(path, before) is not None


def test_gguf_conversion_key_follows_the_converter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    before = gguf_convert.conversion_key(gguf)
    with monkeypatch.context() as m:
        m.setattr(loftq, "__version__", "other")  # loftq takes no part in a conversion
        assert gguf_convert.conversion_key(gguf) == before
    monkeypatch.setattr(gguf_convert, "GGUF_CONVERSION", "gguf-v999")
    assert gguf_convert.conversion_key(gguf) != before
    gguf.write_bytes(b"GGUF" + bytes(61))
    monkeypatch.undo()
    assert gguf_convert.conversion_key(gguf) != before  # another file

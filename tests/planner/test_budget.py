"""Budget strings: decimal and binary units, bytes, auto; one-line PlannerError otherwise."""
from __future__ import annotations

import pytest
import torch

from planner.budget import format_bytes, parse_budget
from planner.errors import PlannerError


@pytest.mark.parametrize("text, nbytes", [
    ("11GB", 11_000_000_000), ("11GiB", 11 * 2**30), ("11gb", 11_000_000_000), ("11 GB", 11_000_000_000),
    ("900MB", 900_000_000), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("2.3GB", 2_300_000_000),
    ("64KB", 64_000), ("1KiB", 1024), ("2TB", 2 * 10**12), ("1TiB", 2**40), ("123", 123), ("123B", 123),
    ("1e9", 10**9), (" 16GB ", 16 * 10**9), (4096, 4096), (1.5e9, 1_500_000_000),
])
def test_parse(text: str | int | float, nbytes: int) -> None:
    assert parse_budget(text) == nbytes


@pytest.mark.parametrize("text, words", [
    ("0", "positive"), ("0GB", "positive"), ("-1GB", "positive"), ("abc", "cannot read"), ("", "cannot read"),
    ("GB", "cannot read"), ("11XB", "unknown unit"), ("11 G B", "cannot read"), ("0.1B", "less than one byte"),
    (float("nan"), "positive"), (float("inf"), "positive"), (-5, "positive"), (True, "size"),
])
def test_bad_budgets_raise_one_line(text: object, words: str) -> None:
    with pytest.raises(PlannerError, match=words) as info:
        parse_budget(text)  # type: ignore[arg-type]
    assert "\n" not in str(info.value) and info.value.exit_code == 2


def test_auto_reads_free_gpu_memory() -> None:
    if torch.cuda.is_available():
        assert 0 < parse_budget("auto") <= torch.cuda.mem_get_info()[1]
    else:
        with pytest.raises(PlannerError, match="CUDA"):
            parse_budget("AUTO")


def test_format_bytes() -> None:
    assert format_bytes(11_000_000_000) == "11.00 GB"
    assert format_bytes(11 * 2**30, binary=True) == "11.00 GiB"
    assert format_bytes(999) == "999 B" and format_bytes(1500) == "1.50 kB" and format_bytes(0) == "0 B"

"""``make demo``'s one line on why the plan is what it is, read off a real plan of a tiny llama."""
from __future__ import annotations

from pathlib import Path

from planner.cli.demo import why
from planner.settings import LayerChoice, RunSettings
from planner.sources import resolve
from planner.build.manual import plan_from_choices
from tests.tiny_models import save_tiny_checkpoint


def test_why_names_the_widths_and_adapters_of_the_plan(tmp_path: Path) -> None:
    source = resolve(str(save_tiny_checkpoint("llama", tmp_path / "ckpt")))
    targets = source.targets()
    choices = {t.name: (LayerChoice(8, 16) if i % 3 == 0 else LayerChoice(4, 0) if i % 3 == 1
                        else LayerChoice(3, 8, double_quant=True)) for i, t in enumerate(targets)}
    plan = plan_from_choices(source, choices, RunSettings(device="cpu", seq_len=32))
    n8, n4, n3 = (sum(1 for i in range(len(targets)) if i % 3 == k) for k in range(3))
    line = why(plan)
    assert line.startswith(f"why this plan: {len(targets)} layers, ")
    for n, w in ((n8, "8-bit"), (n4, "4-bit"), (n3, "3-bit+dq")):
        assert f"{n} at {w}" in line
    assert f"{n8 + n3} adapters (rank 8-16)" in line
    assert "\n" not in line


def test_plan_report_suggests_nf3_only_when_2_bit_layers_came_from_a_menu_without_it(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from rich.console import Console

    from planner.cli.plan_cmd import low_bit_note
    from search_spaces.widths import Width

    source = resolve(str(save_tiny_checkpoint("llama", tmp_path / "ckpt")))
    targets = source.targets()
    choices = {t.name: LayerChoice(2 if i < 3 else 4, 0) for i, t in enumerate(targets)}
    plan = plan_from_choices(source, choices, RunSettings(device="cpu", seq_len=32))
    for options, expected in ((((2, 0), (4, 0), (8, 0)), "3 layers are at 2 bits"),
                              (((2, 0), (Width(3), 0), (4, 0)), None),
                              (((2, 0), (3, 0), (4, 0)), None)):
        console = Console(record=True, width=200)
        low_bit_note(SimpleNamespace(plan=plan, problem=SimpleNamespace(table=SimpleNamespace(options=options))),
                     console)
        text = console.export_text()
        assert (expected in text) if expected else text == ""


def test_why_names_gguf_types(tmp_path: Path) -> None:
    source = resolve(str(save_tiny_checkpoint("llama", tmp_path / "ckpt")))
    targets = source.targets()
    choices = {t.name: LayerChoice(8, 4, "q8_0", 32) if i % 2 else LayerChoice(4, 0, "iq4_nl", 32)
               for i, t in enumerate(targets)}
    plan = plan_from_choices(source, choices, RunSettings(mode="inference", engine="llama.cpp", seq_len=32))
    line = why(plan)
    assert f"{len(targets) // 2} at q8_0" in line and f"{len(targets) - len(targets) // 2} at iq4_nl" in line

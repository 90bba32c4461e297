"""Choice sets (bits x ranks, opt-in 16-bit keep) and granularity groups."""
from __future__ import annotations

import json

import pytest

from search_spaces import (SEARCH_SPACES, SearchSpace, TargetLayer, Width, find_targets, group_targets, is_double_quant,
                           width, width_bits)
from tests.tiny_models import build_tiny


def test_default_choices() -> None:
    space = SearchSpace()
    choices = space.choices()
    assert len(choices) == 3 * 5 and choices[0] == (2, 0) and choices[-1] == (8, 64)
    assert all(b != 16 for b, _ in choices)


def test_keep16_is_opt_in() -> None:
    space = SearchSpace(keep16=True)
    assert space.all_bits == (2, 4, 8, 16)
    assert [c for c in space.choices() if c[0] == 16] == [(16, r) for r in space.ranks]
    assert SearchSpace(bits=(4, 16)).all_bits == (4, 16)


def test_widths_plain_ints_and_double_quantized_variants() -> None:
    """A plain width is its int; 4dq is Width(4): ordered between 4 and 8, never equal to an int,
    compared with ints like one (so `w >= 16` and sorting work), its own key and config."""
    from loftq import QuantConfig
    from search_spaces.choices import menu
    from search_spaces.widths import resolve, sort_key

    w = Width(4)
    assert str(w) == "4dq" and f"{w}-bit" == "4dq-bit" and width(4, True) == w and width(4) == 4
    assert type(width(4)) is int and w != 4 and len({4, w, Width(4)}) == 2 and hash(w) != hash(4)
    assert 4 < w < 8 and not w >= 16 and w < 16 and 16 > w and sorted([8, w, 16, 4, 2]) == [2, 4, w, 8, 16]
    assert (width_bits(w), width_bits(3), is_double_quant(w), is_double_quant(4)) == (4, 3, True, False)
    assert sorted([Width(8), 3, Width(3)], key=sort_key) == [3, Width(3), Width(8)]
    assert resolve(w, (64, 64)) == QuantConfig(4, "nf", 64, True) and resolve(16, (64, 64)) is None
    assert resolve(3, (64, 256), block_size=128) == QuantConfig(3, "nf", 128, False)
    assert menu((2, 3, 16), "search") == (2, Width(2), 3, Width(3), 16)
    assert menu((4, 2), "on") == (Width(2), Width(4)) and menu((4, 2)) == (2, 4)
    assert SearchSpace(bits=(3, 4), double_quant="on", ranks=(0, 8)).choices() == \
        [(Width(3), 0), (Width(3), 8), (Width(4), 0), (Width(4), 8)]
    assert SearchSpace().widths == (2, 4, 8) and SearchSpace(keep16=True, double_quant="on").widths[-1] == 16
    for bad in (16, 1, True):
        with pytest.raises(ValueError, match="quantized bits"):
            Width(bad)
    with pytest.raises(ValueError, match="a plain width is its int"):
        Width(4, double_quant=False)
    with pytest.raises(ValueError, match="double_quant must be one of off, on, search"):
        menu((4,), "yes")
    assert SearchSpace.from_dict(json.loads(json.dumps(SearchSpace(double_quant="search").to_dict()))).double_quant \
        == "search"


def test_choices_for_small_layer() -> None:
    tiny = TargetLayer("x", (24, 48), "q_proj", 0)
    assert SearchSpace(ranks=(0, 8, 16)).choices_for(tiny) == SearchSpace(ranks=(0, 8, 16)).choices()
    with pytest.raises(ValueError, match=r"rank 64 exceeds layer x \(24, 48\)"):  # the largest rank that does not fit
        SearchSpace().choices_for(tiny)


@pytest.mark.parametrize("kwargs,word", [
    (dict(bits=(5,)), "bits"), (dict(bits=()), "bits"), (dict(double_quant="yes"), "'yes'"), (dict(bits=(8, 4)), "sorted"), (dict(bits=[2, 4]), "tuple"),
    (dict(ranks=(-8, 0)), "non-negative"), (dict(ranks=(8, 8)), "unique"), (dict(ranks=(0, 8.0)), "ints"),
    (dict(block_size=48), "power of two"), (dict(block_size=0), "block_size"), (dict(granularity="layer"), "'layer'"),
    (dict(keep16=1), "keep16"),
])
def test_validation_names_the_value(kwargs: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        SearchSpace(**kwargs)


def test_round_trip_and_registry() -> None:
    space = SearchSpace(bits=(2, 4), ranks=(0, 16), keep16=True, block_size=128, granularity="type")
    assert SearchSpace.from_dict(space.to_dict()) == space
    assert space.to_dict()["schema_version"] == 1
    assert SEARCH_SPACES.get("default") == SearchSpace() and SEARCH_SPACES.get("keep16").keep16
    with pytest.raises(KeyError, match="known: "):
        SEARCH_SPACES.get("huge")


@pytest.mark.parametrize("arch,module,block,type_", [
    ("llama", 21, 3, 7), ("phi", 18, 3, 6), ("gpt2", 12, 3, 4), ("bert", 18, 3, 6),
    ("t5", 32, 4, 6 + 10), ("bart", 32, 4, 6 + 10),
])
def test_group_counts(arch: str, module: int, block: int, type_: int) -> None:
    targets = find_targets(build_tiny(arch))
    counts = {g: len(group_targets(targets, g)) for g in ("module", "block", "type")}
    assert counts == {"module": module, "block": block, "type": type_}
    for granularity in ("module", "block", "type"):
        members = [t for group in group_targets(targets, granularity).values() for t in group]
        assert sorted(t.name for t in members) == sorted(t.name for t in targets)  # a partition


def test_group_keys() -> None:
    targets = find_targets(build_tiny("llama"), include_head=True)
    by_block = group_targets(targets, "block")
    assert list(by_block)[:3] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert [t.name for t in by_block["lm_head"]] == ["lm_head"]  # outside blocks: its own group
    by_type = group_targets(targets, "type")
    up = [f"model.layers.{i}.mlp.up_proj" for i in range(3)]
    assert [t.name for t in by_type["model.layers.*.mlp.up_proj"]] == up
    gpt2 = group_targets(find_targets(build_tiny("gpt2")), "type")
    assert {"transformer.h.*.attn.c_proj", "transformer.h.*.mlp.c_proj"} <= set(gpt2)  # same leaf, two types
    with pytest.raises(ValueError, match="granularity"):
        group_targets(targets, "layer")


def test_a_rank_above_a_layer_is_refused_by_the_space_and_the_dry_run_like_the_real_plan(
        tmp_path, capsys: pytest.CaptureFixture) -> None:
    """k_proj of the tiny llama is 32 x 64: rank 64 cannot be a low-rank factor of it. The dry run
    said the space fits while the real plan refused it; both now refuse with the same line."""
    import planner.cli.plan_cmd  # noqa: F401  registers the plan command
    from planner.cli.app import main
    from tests.tiny_models import save_tiny_checkpoint

    k_proj = TargetLayer("model.layers.0.self_attn.k_proj", (32, 64), "k_proj", 0)
    with pytest.raises(ValueError, match=r"rank 64 exceeds layer model.layers.0.self_attn.k_proj \(32, 64\)"):
        SearchSpace().choices_for(k_proj)
    assert SearchSpace(ranks=(0, 8, 32)).choices_for(k_proj) == SearchSpace(ranks=(0, 8, 32)).choices()
    folder = save_tiny_checkpoint("llama", tmp_path / "ckpt")
    common = ["--model", str(folder), "--budget", "1GB", "--cache-dir", str(tmp_path / "cache"),
              "--out", str(tmp_path / "plan.json")]
    lines = []
    for extra in (["--dry-run"], ["--trials", "1"]):  # ranks the user chose: refused alike, saying what fits
        assert main(common + extra + ["--ranks", "0,8,64"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "rank 64 exceeds layer model.layers.0.self_attn.k_proj" in err, err
        assert "at most 32" in err
        lines.append(err)
    assert lines[0] == lines[1] and not (tmp_path / "plan.json").exists()
    assert main(common + ["--dry-run", "--json"]) == 0  # the default ranks lose 64 on this model (issue 25)
    assert json.loads(capsys.readouterr().out)["max"]["plan"]["ranks"] == [32]
    assert main(common + ["--dry-run", "--json", "--ranks", "0,8,32"]) == 0
    report = json.loads(capsys.readouterr().out)
    # every width double-quantized by default: 8dq the largest, 2dq the smallest
    assert report["max"]["plan"] == {"bits": [8], "ranks": [32], "double_quant": True}
    assert report["min"]["plan"] == {"bits": [2], "ranks": [0], "double_quant": True}

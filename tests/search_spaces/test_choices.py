"""Choice sets (bits x ranks, opt-in 16-bit keep) and granularity groups."""
from __future__ import annotations

import pytest

from search_spaces import SEARCH_SPACES, SearchSpace, TargetLayer, find_targets, group_targets
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


def test_choices_for_small_layer() -> None:
    tiny = TargetLayer("x", (24, 48), "q_proj", 0)
    assert max(r for _, r in SearchSpace().choices_for(tiny)) == 16


@pytest.mark.parametrize("kwargs,word", [
    (dict(bits=(3,)), "bits"), (dict(bits=()), "bits"), (dict(bits=(8, 4)), "sorted"), (dict(bits=[2, 4]), "tuple"),
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

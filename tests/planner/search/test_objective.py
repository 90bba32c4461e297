"""The additive objective: OptionTable's estimate and Shaping's terms against numbers worked by hand.

Two layers (a q_proj in block 0, an up_proj in block 1), widths 2 and 4 at ranks 0 and 8, plus a
16-bit keep. The tables list the layers in the other order than the targets, so every lookup goes
by name.
"""
from __future__ import annotations

import math

import pytest
import torch

from search_spaces.facts import TargetLayer

from planner.scoring.tables import ResidualTables, TableSettings
from planner.search.objective import OptionTable, Shaping

OPTIONS = [(2, 0), (2, 8), (4, 0), (4, 8), (16, 0)]
# relative residuals res[bits, rank] per layer, and ||W||^2
RES = {"q": [[0.4, 0.2], [0.1, 0.05]], "up": [[0.5, 0.25], [0.2, 0.1]]}
SQ = {"q": 4.0, "up": 9.0}
FISHER = [[3.0, 0.5], [6.0, 1.0]]  # fisher_err[layer, bits] in the targets' order (q, up)
# est = fisher_err[b] * (res[b, r] / res[b, 0])^2, worked by hand; 16 bits costs nothing
EST = [[3.0, 0.75, 0.5, 0.125, 0.0],
       [6.0, 1.5, 1.0, 0.25, 0.0]]
# frob = ||W||^2 * res[b, r]^2
FROB = [[0.64, 0.16, 0.04, 0.01, 0.0],
        [2.25, 0.5625, 0.36, 0.09, 0.0]]


@pytest.fixture
def table() -> OptionTable:
    targets = [TargetLayer("model.layers.0.self_attn.q_proj", (64, 64), "q_proj", 0),
               TargetLayer("model.layers.1.mlp.up_proj", (160, 64), "up_proj", 1)]
    tables = ResidualTables(names=[targets[1].name, targets[0].name], settings=TableSettings(bits=(2, 4), ranks=(0, 8)),
                            table=torch.tensor([RES["up"], RES["q"]]), sq_norm=torch.tensor([SQ["up"], SQ["q"]],
                                                                                             dtype=torch.float64))
    return OptionTable.build(targets, tables, torch.tensor(FISHER, dtype=torch.float64), OPTIONS)


def _close(got: torch.Tensor, want: list[list[float]]) -> None:
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-12)


def test_table_is_the_fisher_estimate_scaled_by_the_residual_ratio(table: OptionTable) -> None:
    _close(table.est, EST)
    _close(table.frob, FROB)
    assert table.n_blocks == 2 and table.options == OPTIONS


def test_neutral_shaping_is_the_plain_estimate(table: OptionTable) -> None:
    _close(table.shaped(Shaping()), EST)


def test_type_weight_and_depth_slope_multiply_each_row(table: OptionTable) -> None:
    # depth 0 (block 0 of 2) -> exp(2 * (1/2 - 0)) = e; depth 1 -> exp(2 * (1/2 - 1)) = 1/e
    shaped = table.shaped(Shaping(type_weights={"q_proj": 3.0}, depth_slope=2.0))
    _close(shaped, [[v * 3.0 * math.e for v in EST[0]], [v / math.e for v in EST[1]]])


def test_mix_blends_in_the_absolute_residual_at_the_estimates_scale(table: OptionTable) -> None:
    scale = 13.125 / 4.1125  # sum(EST) / sum(FROB)
    shaped = table.shaped(Shaping(mix=0.5))
    _close(shaped, [[0.5 * e + 0.5 * scale * f for e, f in zip(EST[i], FROB[i])] for i in range(2)])
    assert float(shaped[0, 0]) == pytest.approx(1.5 + 0.5 * scale * 0.64)  # 2.5213


def test_capacity_rewards_rank_in_units_of_the_4bit_rank0_estimate(table: OptionTable) -> None:
    # unit = est at (4, 0): 0.5 and 1.0; bonus log2(1 + r / 8): 0 at rank 0, 1 at rank 8
    _close(table.shaped(Shaping(capacity=0.2)), [[3.0, 0.65, 0.5, 0.025, 0.0], [6.0, 1.3, 1.0, 0.05, 0.0]])
    # with a depth slope the unit carries the layer's multiplier too
    shaped = table.shaped(Shaping(capacity=0.2, depth_slope=2.0))
    assert float(shaped[0, 1]) == pytest.approx(0.75 * math.e - 0.2 * 0.5 * math.e)
    assert float(shaped[1, 3]) == pytest.approx(0.25 / math.e - 0.2 * 1.0 / math.e)


def test_rank_floor_drops_options_below_it_unless_it_drops_all(table: OptionTable) -> None:
    inf = math.inf
    _close(table.shaped(Shaping(rank_floor=8)), [[inf, 0.75, inf, 0.125, inf], [inf, 1.5, inf, 0.25, inf]])
    _close(table.shaped(Shaping(rank_floor=16)), EST)  # nothing would be left: the floor is ignored


@pytest.mark.parametrize("kwargs, word", [({"mix": 1.5}, "mix"), ({"capacity": -0.1}, "capacity"),
                                          ({"rank_floor": -1}, "rank_floor")])
def test_shaping_validation_names_the_value(kwargs: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        Shaping(**kwargs)


def test_a_shaping_without_rotation_drops_the_rotated_widths_where_the_menu_has_both() -> None:
    """``--rotation search`` offers 3 and 3r: a shaping with rotated=False leaves the plan of the
    menu without rotation (the guided search seeds it, so the zero-step proxy compares both plans);
    ``--rotation on`` (3r only) has no such choice and the flag changes nothing."""
    from search_spaces.widths import Width

    targets = [TargetLayer("model.layers.0.self_attn.q_proj", (64, 64), "q_proj", 0)]
    rot = Width(3, False, True)
    tables = ResidualTables(names=[targets[0].name], settings=TableSettings(bits=(3, rot), ranks=(0,)),
                            table=torch.tensor([[[0.2], [0.1]]]), sq_norm=torch.tensor([1.0], dtype=torch.float64))
    fisher = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    both = OptionTable.build(targets, tables, fisher, [(3, 0), (rot, 0), (16, 0)])
    assert both.rotation_choice
    _close(both.shaped(Shaping()), [[2.0, 1.0, 0.0]])
    _close(both.shaped(Shaping(rotated=False)), [[2.0, math.inf, 0.0]])
    only = OptionTable.build(targets, ResidualTables(names=[targets[0].name], settings=TableSettings(bits=(rot,), ranks=(0,)),
                                                     table=torch.tensor([[[0.1]]]), sq_norm=torch.tensor([1.0], dtype=torch.float64)),
                             fisher[:, 1:], [(rot, 0), (16, 0)])
    assert not only.rotation_choice
    _close(only.shaped(Shaping(rotated=False)), [[1.0, 0.0]])

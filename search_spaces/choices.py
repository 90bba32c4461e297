"""What the planner may choose per layer (width x LoRA rank) and how layers share a choice.

A width is a number of code bits (``int``) or a variant of one (``search_spaces.widths.Width``:
double quantization, ``4dq``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

from loftq.registry import Registry

from .discovery import block_path, type_path
from .facts import TargetLayer
from loftq.formats import FAMILIES

from .widths import KEEP_BITS, WidthKey, menu as family_menu, resolve

QUANTS = tuple(FAMILIES)  # the families registered at import (loftq.formats): nf (NormalFloat codebooks), gguf


def family_bits(quant: str) -> tuple[int, ...]:
    """The ``--bits`` a family offers, and 16 (keep the weight in 16 bits, no quantization)."""
    return tuple(FAMILIES.get(quant).bits) + (KEEP_BITS,)


BITS = family_bits("nf")  # (2, 3, 4, 8, 16)
GGUF_BITS = family_bits("gguf")
GRANULARITIES = ("module", "block", "type")
DQ_MODES = ("off", "on", "search")  # double quantization: never, on every quantized width, or both offered
SCHEMA_VERSION = 1


def _sorted_unique_ints(name: str, values: Any, allowed: Iterable[int] | None = None) -> None:
    if not isinstance(values, tuple) or not values:
        raise ValueError(f"SearchSpace.{name} must be a non-empty tuple, got {values!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"SearchSpace.{name} must hold ints, got {values!r}")
    if list(values) != sorted(set(values)):
        raise ValueError(f"SearchSpace.{name} must be sorted and unique, got {values!r}")
    if allowed is not None and not set(values) <= set(allowed):
        raise ValueError(f"SearchSpace.{name} must be a subset of {tuple(allowed)}, got {values!r}")


def menu(bits: Iterable[int], double_quant: str = "off", quant: str = "nf", rotation: str = "off") -> tuple[WidthKey, ...]:
    """Widths offered for ``bits``: the family's (:mod:`loftq.formats`) under ``double_quant``
    (plain ``off``, double-quantized ``on``, or both ``search``) and ``rotation`` (the same three,
    for the low codebook widths), 16 as it is; in menu order."""
    if double_quant not in DQ_MODES:
        raise ValueError(f"double_quant must be one of {', '.join(DQ_MODES)}, got {double_quant!r}")
    if quant not in FAMILIES:
        raise ValueError(f"quant must be one of {', '.join(FAMILIES)}, got {quant!r}")
    if rotation not in DQ_MODES:
        raise ValueError(f"rotation must be one of {', '.join(DQ_MODES)}, got {rotation!r}")
    return family_menu(bits, double_quant, quant, rotation)


@dataclass(frozen=True)
class SearchSpace:
    """Choice set of one plan: every layer (or group) picks one (width, rank) from ``choices()``.

    ``bits``: quantization widths; ``keep16`` adds the opt-in 16-bit "keep" choice (bits = 16,
    the weight is stored unquantized). ``ranks``: LoRA ranks, 0 = no adapter. ``block_size``:
    weights per quantization block (a power of two). ``granularity``: one choice per ``module``,
    per transformer ``block``, or per module ``type`` (the same module in every block).
    ``double_quant``: ``off`` (plain widths), ``on`` (every quantized width double-quantized) or
    ``search`` (both, per layer). ``quant``: the family (:mod:`loftq.formats`): ``nf`` (NormalFloat
    codebooks) or ``gguf`` (llama.cpp's block types of those widths; ``block_size`` does not apply).
    ``rotation``: ``off``, ``on`` (the low codebook widths quantized in a randomized Hadamard basis:
    :mod:`loftq.formats.rotated`) or ``search`` (both, per layer); codebook families only.
    """

    bits: tuple[int, ...] = (2, 4, 8)
    ranks: tuple[int, ...] = (0, 8, 16, 32, 64)
    keep16: bool = False
    block_size: int = 64
    granularity: str = "module"
    double_quant: str = "off"
    quant: str = "nf"
    rotation: str = "off"

    def __post_init__(self) -> None:
        if self.quant not in FAMILIES:
            raise ValueError(f"SearchSpace.quant must be one of {', '.join(FAMILIES)}, got {self.quant!r}")
        _sorted_unique_ints("bits", self.bits, family_bits(self.quant))
        if not FAMILIES.get(self.quant).double_quant and self.double_quant != "off":
            raise ValueError(f"SearchSpace.double_quant must be off with quant {self.quant} (its types keep their own "
                             "constants)")
        _sorted_unique_ints("ranks", self.ranks)
        if self.ranks[0] < 0:
            raise ValueError(f"SearchSpace.ranks must be non-negative, got {self.ranks!r}")
        if not isinstance(self.keep16, bool):
            raise ValueError(f"SearchSpace.keep16 must be a bool, got {self.keep16!r}")
        bs = self.block_size
        if not isinstance(bs, int) or isinstance(bs, bool) or bs < 2 or bs & (bs - 1) or bs > 4096:
            raise ValueError(f"SearchSpace.block_size must be a power of two in [2, 4096], got {bs!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"SearchSpace.granularity must be one of {', '.join(GRANULARITIES)}, "
                             f"got {self.granularity!r}")
        if self.double_quant not in DQ_MODES:
            raise ValueError(f"SearchSpace.double_quant must be one of {', '.join(DQ_MODES)}, "
                             f"got {self.double_quant!r}")
        if self.rotation not in DQ_MODES:
            raise ValueError(f"SearchSpace.rotation must be one of {', '.join(DQ_MODES)}, got {self.rotation!r}")
        if not FAMILIES.get(self.quant).rotation and self.rotation != "off":
            raise ValueError(f"SearchSpace.rotation must be off with quant {self.quant} (its types cannot be rotated)")

    @property
    def all_bits(self) -> tuple[int, ...]:
        """``bits`` plus 16 when ``keep16`` is on."""
        return tuple(sorted(set(self.bits) | ({KEEP_BITS} if self.keep16 else set())))

    @property
    def widths(self) -> tuple[WidthKey, ...]:
        """The menu of :attr:`all_bits` under ``double_quant`` and ``rotation`` (:func:`menu`)."""
        return menu(self.all_bits, self.double_quant, self.quant, self.rotation)

    def choices(self) -> list[tuple[WidthKey, int]]:
        """Every (width, rank) pair, width-major: [(2, 0), (2, 8), ..., (8, 64)]."""
        return [(w, r) for w in self.widths for r in self.ranks]

    def choices_for(self, target: TargetLayer) -> list[tuple[WidthKey, int]]:
        """The pairs for ``target``: all of :meth:`choices`. A rank above min(out, in) cannot be a
        low-rank factor, and the planner refuses such a space rather than dropping the rank for some
        layers only: ValueError naming the largest such rank and the layer (a dry run reports the
        space the real plan searches, so both refuse it alike)."""
        too_big = [r for r in self.ranks if r > min(target.shape)]
        if too_big:
            raise ValueError(f"rank {max(too_big)} exceeds layer {target.name} {tuple(target.shape)}; "
                             "choose smaller --ranks")
        for w in self.widths:  # a width the rows cannot hold may fall back (GGUF); none at all is refused
            try:
                resolve(w, tuple(target.shape), block_size=self.block_size)
            except ValueError as err:
                raise ValueError(f"layer {target.name}: {err}") from None
        return self.choices()

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchSpace":
        d = dict(d)
        version = d.pop("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ValueError(f"SearchSpace schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
        for key in ("bits", "ranks"):
            if key in d and isinstance(d[key], list):
                d[key] = tuple(d[key])
        return cls(**d)


SEARCH_SPACES: Registry[SearchSpace] = Registry("search space")
SEARCH_SPACES.add("default", SearchSpace())
SEARCH_SPACES.add("keep16", SearchSpace(keep16=True))
SEARCH_SPACES.add("low-bit", SearchSpace(bits=(2, 4), ranks=(0, 16, 32, 64)))
SEARCH_SPACES.add("per-type", SearchSpace(granularity="type"))


def group_key(target: TargetLayer, granularity: str) -> str:
    """The group a target belongs to: its own name, its block path, or its type path.

    Layers outside numbered blocks form their own group at every granularity.
    """
    if granularity == "module":
        return target.name
    if granularity == "block":
        return block_path(target.name) or target.name
    if granularity == "type":
        return type_path(target.name)
    raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")


def group_targets(targets: Sequence[TargetLayer], granularity: str) -> dict[str, list[TargetLayer]]:
    """Targets grouped so that a group shares one choice, groups and members in target order.

    ``module``: one group per layer (key = layer name); ``block``: one per transformer block
    (key ``"model.layers.3"``; T5's encoder and decoder blocks stay apart); ``type``: one per
    module position in the block (key ``"model.layers.*.mlp.up_proj"``).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    groups: dict[str, list[TargetLayer]] = {}
    for target in targets:
        groups.setdefault(group_key(target, granularity), []).append(target)
    return groups


def has_adapter(candidate: Any, options: Sequence[tuple[WidthKey, int]]) -> bool:
    """Whether a candidate (anything with ``choice``: one option index per layer into ``options``,
    a list of (width, rank)) gives any layer an adapter."""
    return any(options[k][1] > 0 for k in candidate.choice)

"""The one weight bank: per (layer, bits) the quantized weight and the top factors of what it misses.

For a target weight W [out, in] and a width b, an entry holds Q = q_b(W) (packed), deq(Q) [out, in]
and the top ``max_rank`` singular factors of the residual W - deq(Q) in PEFT's convention:
B [out, r] = U sqrt(S), A [r, in] = sqrt(S) V^T, so W ~= deq(Q) + B @ A. With LoftQ iters = 1, Q
does not depend on the rank and every rank's adapter is a truncation of one SVD (ARCHITECTURE.md),
so one entry per (layer, bits) serves every (bits, rank) a search tries: the zero-step proxy reads
dense weights deq(Q) + B_r A_r, the fine-tune proxy reads Q and the factors (B_r, A_r).

Entries are computed on first lookup and kept in a :class:`BankStore` (get / put by layer name and
bits). :class:`MemoryStore` keeps them in RAM. A store that keeps them on disk (one safetensors file
per transformer block, memory-mapped, in the cache) fits the same two methods, and the original
weights come from any ``Mapping`` (a lazy one can read a checkpoint tensor by tensor), so the
callers of the bank do not change when it stops living in RAM.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Protocol, Sequence

import torch
from torch import nn

from loftq.formats import Quantized, Spec, quantize_many, spec_from_fields
from loftq.rounding import check_rounding, inverse_factor
from search_spaces.widths import WidthKey, resolve

from planner import progress
from planner.runtime.build import LayerBuild, default_lora, peft_pair
from planner.runtime.layers import linear_weight

SVD_KINDS = ("randomized", "exact")


@dataclass(frozen=True)
class BankSettings:
    """What a bank computes: widths ``bits`` (< 16) quantized with ``method`` at ``block_size``,
    factors up to ``max_rank`` stored in ``dtype``, from a randomized (fixed seed) or exact SVD."""

    bits: tuple[int, ...]
    max_rank: int
    method: str = "nf"
    block_size: int = 64
    dtype: torch.dtype = torch.float32
    svd: str = "randomized"

    def __post_init__(self) -> None:
        if not isinstance(self.max_rank, int) or isinstance(self.max_rank, bool) or self.max_rank < 0:
            raise ValueError(f"max_rank must be a non-negative integer, got {self.max_rank!r}")
        if self.svd not in SVD_KINDS:
            raise ValueError(f"svd must be one of {', '.join(SVD_KINDS)}; got {self.svd!r}")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch dtype, got {self.dtype!r}")
        for b in self.bits:
            if b < 16:  # the format refuses an unsupported (method, bits, block_size) now, not at first use
                resolve(b, (256, 4096), self.method, self.block_size)

    def spec(self, bits: WidthKey, shape: tuple[int, ...]) -> Spec:
        """What a layer of ``shape`` is stored as at width ``bits`` (:func:`search_spaces.widths.resolve`)."""
        return resolve(bits, shape, self.method, self.block_size)


def entry_key(spec: Spec) -> str:
    """What a bank stores an entry under: its spec's name, and its block where that is not the menu's
    64 (a row-scaled width's row, a GGUF type's 32 or 256), so ``nf3-rot`` at 64 and at 576 are two
    entries; two widths that store one spec (a GGUF type and its fallback on a narrow row, a
    row-scaled width on a row no longer than a block) share one."""
    block = spec.block_size
    return spec.name + ("dq" if spec.double_quant else "") + (f"-b{block}" if block != 64 else "")


class LowRank(NamedTuple):
    """Adapter factors in PEFT's convention: the update is ``b @ a``."""

    b: torch.Tensor  # [out, r]
    a: torch.Tensor  # [r, in]


@dataclass(frozen=True)
class BankEntry:
    """One (layer, bits): Q, deq(Q) [out, in] and the top ``rank`` factors of W - deq(Q) (None until
    a lookup needs them: a width the search only ever uses at rank 0 never pays for an SVD)."""

    quantized: Quantized
    deq: torch.Tensor | None  # [out, in], bank dtype; None: dequantized on use (an on-disk store keeps Q only)
    b: torch.Tensor | None  # [out, rank], bank dtype
    a: torch.Tensor | None  # [rank, in], bank dtype
    svd: str

    @property
    def rank(self) -> int:
        return int(self.a.shape[0]) if self.a is not None else 0


class BankStore(Protocol):
    """Where entries live; keyed by (layer name, :func:`entry_key` of its spec)."""

    def get(self, name: str, key: str) -> BankEntry | None: ...

    def put(self, name: str, key: str, entry: BankEntry) -> None: ...


class MemoryStore:
    """Entries in a dict. One store may back several banks over the same weights and settings (e.g.
    one planning run per budget in one process): each entry is then computed once."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], BankEntry] = {}

    def get(self, name: str, key: str) -> BankEntry | None:
        return self._entries.get((name, key))

    def put(self, name: str, key: str, entry: BankEntry) -> None:
        self._entries[(name, key)] = entry

    def __len__(self) -> int:
        return len(self._entries)


class DiskStore:
    """Entries in the cache, one safetensors file per (layer, spec) under ``folder``: the stored
    tensors of Q (its format's own) and the factors, not deq(Q) (dequantized on use, which is cheap).
    Nothing stays in RAM, and an interrupted plan finds the entries it already computed. ``key``:
    what the entries were computed from (weights, settings, code version); a file with another key
    is recomputed."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder, self.key = Path(folder), key

    def _path(self, name: str, key: str) -> Path:
        return self.folder / f"{name}.{key}.safetensors"

    def get(self, name: str, key: str) -> BankEntry | None:
        from planner.files.cache import load_cached

        t = load_cached(self._path(name, key), f"{self.key}/{name}/{key}")
        if t is None:
            return None
        from safetensors import safe_open

        with safe_open(str(self._path(name, key)), framework="pt") as f:
            meta = f.metadata()
        spec = spec_from_fields(meta["method"], int(meta["bits"]), int(meta["block_size"]), meta["double_quant"] == "1")
        factors = {k: t.pop(k) for k in ("b", "a") if k in t}
        qt = spec.restore(t, tuple(json.loads(meta["shape"])), getattr(torch, meta["dtype"]))
        return BankEntry(qt, None, factors.get("b"), factors.get("a"), meta["svd"])

    def put(self, name: str, key: str, entry: BankEntry) -> None:
        from planner.files.cache import save_cached

        qt = entry.quantized
        spec = qt.spec
        factors = {"b": entry.b, "a": entry.a} if entry.b is not None else {}
        meta = {"method": spec.method, "bits": str(spec.bits), "block_size": str(spec.block_size),
                "double_quant": "1" if spec.double_quant else "0", "shape": json.dumps(list(qt.shape)),
                "dtype": str(qt.dtype).removeprefix("torch."), "svd": entry.svd}
        save_cached(self._path(name, key), f"{self.key}/{name}/{key}", {**qt.tensors(), **factors}, meta)


class ModelWeights(Mapping[str, torch.Tensor]):
    """The [out, in] weights of a model's Linear (or gpt2 Conv1D) modules, read on lookup (no copy).
    ``names``: the layers it lists (default: every module with a 2-D weight)."""

    def __init__(self, model: nn.Module, names: Sequence[str] | None = None) -> None:
        self.model = model
        self._names = list(names) if names is not None else [
            n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 2 and not isinstance(m, nn.Embedding)]
        self._listed = set(self._names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._listed:
            raise KeyError(name)
        return linear_weight(self.model.get_submodule(name))

    def __contains__(self, name: object) -> bool:
        return name in self._listed

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def top_factors(residual: torch.Tensor, rank: int, svd: str = "randomized") -> LowRank:
    """B [out, r] = U sqrt(S), A [r, in] = sqrt(S) V^T of the top-r singular triplets of ``residual``
    (fp32 [out, in]); the same split of S as ``loftq.solver``.

    ``randomized``: torch.svd_lowrank (4 power iterations, seed 0, the caller's RNG untouched) when r
    is small against the matrix, exact otherwise; ``exact``: a full thin SVD (what LoftQ runs).
    """
    if rank == 0:
        return LowRank(residual.new_zeros(residual.shape[0], 0), residual.new_zeros(0, residual.shape[1]))
    if svd == "randomized" and 4 * rank < min(residual.shape):
        with torch.random.fork_rng(devices=[residual.device] if residual.device.type == "cuda" else []):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(residual, q=rank + 16, niter=4)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = s[:rank].sqrt()
    return LowRank((u[:, :rank] * root).contiguous(), (root.unsqueeze(1) * vh[:rank]).contiguous())


class WeightBank:
    """Lookups by (layer name, bits) over ``weights`` (name -> [out, in] original weight).

    Entries are computed on first use and kept in ``store`` (default: a fresh :class:`MemoryStore`);
    :meth:`fill` quantizes every layer at every width up front, and an entry's factors are computed
    the first time a lookup asks for a rank above 0 (the SVD is most of an entry's cost). bits >= 16
    means the original weight, kept as it is.
    ``moments`` (name -> input second moment H, :mod:`planner.scoring.moments`): the factors are
    the data-aware initialisation's, the top-r of (W - deq Q) L mapped back by L^{-1} (L L^T = H +
    ``damp``), so every rank's truncation is that rank's best fit in the weighted norm; their
    entries are marked ``SVD/data``. ``rounding="feedback"`` (needs ``moments``): Q itself is
    :func:`loftq.quantize_feedback` of W under H (same format and bytes, codes chosen to lower
    ||(W - deq Q) L||), marked ``SVD/data/feedback`` so that a store never mixes the two roundings.
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], bits: Sequence[int], max_rank: int,
                 method: str = "nf", block_size: int = 64, dtype: torch.dtype = torch.float32, *,
                 svd: str = "randomized", store: BankStore | None = None,
                 device: torch.device | str | None = None, moments: Mapping[str, torch.Tensor] | None = None,
                 damp: float = 0.01, rounding: str = "nearest") -> None:
        check_rounding(rounding)
        if rounding == "feedback" and moments is None:
            raise ValueError("rounding='feedback' needs the layers' input moments (moments=...)")
        self.weights, self.moments, self.damp, self.rounding = weights, moments, damp, rounding
        self.label = svd if moments is None else f"{svd}/data"  # what an entry's ``svd`` must say
        if rounding != "nearest":
            self.label += f"/{rounding}"
        self.settings = BankSettings(tuple(bits), max_rank, method, block_size, dtype, svd)
        self.store: BankStore = store if store is not None else MemoryStore()
        self.device = torch.device(device) if device is not None else None  # where entries are computed
        self._upper_of: tuple[str | None, torch.Tensor | None] = (None, None)

    @property
    def names(self) -> list[str]:
        return list(self.weights)

    def original(self, name: str) -> torch.Tensor:
        """[out, in] original weight in the bank dtype (the mapping's tensor itself when it has that dtype)."""
        return self.weights[name].detach().to(self.settings.dtype)

    def entry(self, name: str, bits: WidthKey, factors: bool = True) -> BankEntry:
        """The entry of (name, width), computed and stored on first lookup; ``factors``: with its
        factors (computed and stored now if the stored entry has none yet)."""
        spec = self._spec(name, bits)
        entry = self._stored(name, spec, factors)
        if entry is None:
            entry = self._compute(name, spec, factors)
            self.store.put(name, entry_key(spec), entry)
        return entry

    def _spec(self, name: str, bits: WidthKey) -> Spec:
        s = self.settings
        if bits not in s.bits or bits >= 16:
            raise ValueError(f"bits {bits!r} is not a quantized width of this bank ({s.bits})")
        return s.spec(bits, self._shape(name))

    def _stored(self, name: str, spec: Spec, factors: bool) -> BankEntry | None:
        """The store's entry at ``spec`` (None when it has none), checked against this bank's
        settings; with its factors added (and stored) when ``factors`` asks and it has none."""
        s = self.settings
        key = entry_key(spec)
        entry = self.store.get(name, key)
        if entry is None:
            return None
        if (entry.quantized.spec != spec or entry.svd != self.label
                or (entry.b is not None and (entry.b.dtype != s.dtype or entry.rank < min(s.max_rank, *entry.quantized.shape)))):
            raise ValueError(f"the bank's store holds {name} at {entry.quantized.spec.name} built with other settings "
                             f"({entry.quantized.spec}, {entry.svd} SVD, rank {entry.rank}) than this bank's {s}")
        if factors and entry.b is None:
            entry = self._with_factors(name, entry)
            self.store.put(name, key, entry)
        return entry

    def _shape(self, name: str) -> tuple[int, ...]:
        shape_of = getattr(self.weights, "shape_of", None)  # a streamed source knows shapes without reading
        return tuple(shape_of(name)) if shape_of is not None else tuple(self.weights[name].shape)

    def _source(self, name: str) -> tuple[torch.Tensor, torch.device]:
        original = self.weights[name].detach()
        home = original.device  # entries live where W does (the CPU for a streamed source)
        return (original.to(self.device) if self.device is not None else original).float(), home

    def _compute(self, name: str, spec: Spec, factors: bool) -> BankEntry:
        """Q at ``spec`` (as :meth:`_compute_many` encodes it), with its factors when ``factors`` asks."""
        w, home = self._source(name)
        (qt,) = self._encode(name, [spec], w)
        deq = qt.dequantize(torch.float32)
        entry = BankEntry(qt.to(home), deq.to(home, self.settings.dtype), None, None, self.label)
        return self._with_factors(name, entry, w, deq) if factors else entry

    def _compute_many(self, name: str, specs: Sequence[Spec]) -> list[BankEntry]:
        """Q at each of ``specs``, no factors: the widths encoded together (:meth:`_encode`)."""
        w, home = self._source(name)
        return [BankEntry(qt.to(home), qt.dequantize(torch.float32).to(home, self.settings.dtype), None, None,
                          self.label) for qt in self._encode(name, specs, w)]

    def _encode(self, name: str, specs: Sequence[Spec], w: torch.Tensor) -> list[Quantized]:
        """Q at each of ``specs``: by error feedback under the layer's moment where
        the bank rounds so and the format can (elsewhere to nearest, as materialize builds it). The
        widths are encoded together (:func:`loftq.formats.quantize_many`: one feedback column loop for
        a layer's codebook widths); each Q is what encoding its width alone gives, code for code."""
        shape = tuple(w.shape)
        moment = self.moments[name].to(w.device) if self.moments is not None else None
        upper = self._upper(name, moment) if self.rounding == "feedback" and any(
            spec.feedback_applies(shape) for spec in specs) else None
        return quantize_many(w, specs, rounding=self.rounding, moment=moment, upper=upper, damp=self.damp)

    def _upper(self, name: str, moment: torch.Tensor) -> torch.Tensor:
        """The layer's inverse factor for feedback rounding, computed once for all its widths."""
        if self._upper_of[0] != name:
            self._upper_of = (name, inverse_factor(moment, self.damp))
        return self._upper_of[1]

    def _with_factors(self, name: str, e: BankEntry, w: torch.Tensor | None = None,
                      deq: torch.Tensor | None = None) -> BankEntry:
        s = self.settings
        if w is None:
            w, _ = self._source(name)
        home = e.quantized.device
        if deq is None:
            deq = e.quantized.to(w.device).dequantize(torch.float32)
        if self.moments is None:
            f = top_factors(w - deq, min(s.max_rank, *w.shape), s.svd)
        else:
            from loftq.solver import calibration_factor

            factor = calibration_factor(self.moments[name].to(w.device), self.damp)
            f = top_factors((w - deq) @ factor, min(s.max_rank, *w.shape), s.svd)
            f = LowRank(f.b, torch.linalg.solve_triangular(factor, f.a, upper=False, left=False))
        return BankEntry(e.quantized, e.deq, f.b.to(home, s.dtype), f.a.to(home, s.dtype), self.label)

    def quantized(self, name: str, bits: WidthKey) -> Quantized:
        return self.entry(name, bits, factors=False).quantized

    def deq(self, name: str, bits: int) -> torch.Tensor:
        """[out, in] deq(Q) in the bank dtype (kept by an in-memory store, dequantized on use otherwise)."""
        e = self.entry(name, bits, factors=False)
        return e.deq if e.deq is not None else e.quantized.dequantize(self.settings.dtype)

    def factors(self, name: str, bits: int, rank: int) -> LowRank:
        """(B [out, rank], A [rank, in]); zero-padded past the layer's own rank (min(out, in))."""
        return self._factors(self.entry(name, bits), rank)

    def _factors(self, e: BankEntry, rank: int) -> LowRank:
        if not 0 <= rank <= self.settings.max_rank:
            raise ValueError(f"rank {rank!r} exceeds the bank's max_rank {self.settings.max_rank}")
        b, a = e.b[:, :rank], e.a[:rank]
        if rank > e.rank:  # singular values past min(out, in) are zero
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - e.rank)], dim=1)
            a = torch.cat([a, a.new_zeros(rank - e.rank, a.shape[1])])
        return LowRank(b, a)

    def weight(self, name: str, bits: int, rank: int, device: torch.device | None = None) -> torch.Tensor:
        """[out, in] deq(Q) + B_r A_r for (bits, rank) at iters = 1; bits >= 16: the original weight.
        ``device``: compute it there (a GPU dequantizes the packed codes; only they travel)."""
        if bits >= 16:
            w = self.original(name)
            return w if device is None else w.to(device)
        e = self.entry(name, bits, factors=rank > 0)  # one store lookup (an on-disk store reads a file)
        if e.deq is not None:
            deq = e.deq if device is None else e.deq.to(device)
        else:
            deq = (e.quantized if device is None else e.quantized.to(device)).dequantize(self.settings.dtype)
        if rank == 0:
            return deq
        b, a = self._factors(e, rank)
        return torch.addmm(deq, b.to(deq.device), a.to(deq.device))

    def layer(self, name: str, bits: WidthKey, rank: int, *, alpha: float | None = None, init: str = "loftq",
              keep_dtype: torch.dtype = torch.bfloat16) -> LayerBuild:
        """The layer a build at (``bits``, ``rank``) gives, from this bank (iters = 1): Q as stored and
        PEFT's (lora_A, lora_B) from the entry's top factors; bits >= 16: the original weight in
        ``keep_dtype``, its adapter PEFT's default init seeded by the layer's name (as materialize
        builds it). ``init="default"``: every adapter keeps PEFT's own initialisation, drawn from
        torch's RNG (QLoRA's recipe)."""
        if init not in ("loftq", "default"):
            raise ValueError(f"init must be 'loftq' or 'default', got {init!r}")
        if bits >= 16:  # a kept layer's adapter: PEFT's default init, seeded by name as materialize builds it
            lora = None
            if rank and init == "loftq":
                w = self.original(name)
                lora = peft_pair(*default_lora(name, tuple(w.shape), rank), rank, float(rank if alpha is None else alpha))
            return LayerBuild(self.original(name).to(keep_dtype), lora, rank=rank)
        stored = self.quantized(name, bits)
        if not rank or init == "default":
            return LayerBuild(stored, None, rank=rank)
        f = self.factors(name, bits, rank)
        return LayerBuild(stored, peft_pair(f.a.float(), f.b.float(), rank, float(rank if alpha is None else alpha)))

    def fill(self, names: Sequence[str] | None = None, label: str = "quantized weight bank") -> None:
        """Quantize every (layer, width) now, with a progress bar (factors come on first use); the
        widths a layer's store lacks are encoded together (:meth:`_compute_many`)."""
        names = list(names) if names is not None else self.names
        widths = [b for b in self.settings.bits if b < 16]
        with progress.task(label, len(names)) as advance:
            for name in names:
                specs = [self._spec(name, b) for b in widths]
                missing = [spec for spec in specs if self._stored(name, spec, factors=False) is None]
                for spec, entry in zip(missing, self._compute_many(name, missing) if missing else []):
                    self.store.put(name, entry_key(spec), entry)
                advance(1)

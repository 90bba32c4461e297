"""Residual tables for every target layer of a model, batched by shape, cached on disk.

table[name]: [len(bits), len(ranks)] relative LoftQ residuals ||W - Q - BA|| / ||W|| (one row per
width, double-quantized widths computed as they are stored), plus
``sq_norm[name]`` = ||W||^2 and ``quant_err`` helpers used by the objective.

With input moments (the data-aware initialisation, :mod:`planner.scoring.moments`) the residuals
are in the norm that initialisation optimises: ||(W - Q - BA) L|| / ||W L||, L L^T = H + damp, with
each layer's own H: same-shape layers are stacked as before, each with its own factor (one Cholesky
per moment in the stack: k/v and gate/up share one), and the threads split stack and factors alike.
With ``rounding="feedback"`` as well, Q is the error-feedback rounding under the same H
(:func:`loftq.rounding.quantize_feedback`), the Q that ``plan/materialize --rounding feedback`` build.
"""
from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from loftq import residual_table
from loftq.rounding import check_rounding, inverse_factor
from loftq.solver import calibration_factor
from loftq.quant import squared_norm
from search_spaces.facts import TargetLayer
from search_spaces.widths import WidthKey, resolve

from planner import progress
from planner.devices import resolve_device
from planner.files.cache import cache_key, default_cache_dir, load_cached, non_negative, save_cached

BATCH_BYTES = 256 * 2**20  # stack same-shape weights up to this many fp32 bytes per call
PRODUCER = "residual-tables/3"  # bump when compute_tables' numbers change for the same loftq (2: Krylov spectra; 3: rows by spec)


@dataclass(frozen=True)
class TableSettings:
    """``bits``: the widths of the table's rows (menu widths of any family: ``4``, ``Width(4)`` =
    4dq, a GGUF type), each computed as a layer of its shape stores it
    (:func:`search_spaces.widths.resolve`)."""

    bits: tuple[WidthKey, ...] = (2, 4, 8)
    ranks: tuple[int, ...] = (0, 8, 16, 32, 64)
    iters: int = 1
    method: str = "nf"  # the codebook method of plain int widths: "nf" = NF2 / NF4 / NF8
    block_size: int = 64


@dataclass
class ResidualTables:
    names: list[str]
    settings: TableSettings
    table: torch.Tensor  # [n_layers, len(bits), len(ranks)] relative residuals
    sq_norm: torch.Tensor  # [n_layers] ||W||_F^2

    def of(self, name: str) -> torch.Tensor:
        return self.table[self.names.index(name)]

    def cell(self, name: str, bits: WidthKey, rank: int) -> float:
        i = self.names.index(name)
        return float(self.table[i, self.settings.bits.index(bits), self.settings.ranks.index(rank)])


def _batches(stream: Iterable[tuple[TargetLayer, torch.Tensor]]) -> Iterator[tuple[list[TargetLayer], torch.Tensor]]:
    """Group streamed weights by shape into stacks; the weights waiting, all shapes together, stay
    under BATCH_BYTES (the largest group goes as soon as they would not), so the stage's memory
    does not grow with the model's depth."""
    pending: dict[tuple, list[tuple[TargetLayer, torch.Tensor]]] = defaultdict(list)
    waiting = 0
    for target, weight in stream:
        shape = tuple(weight.shape)
        pending[shape].append((target, weight))
        waiting += weight.numel() * 4
        while waiting >= BATCH_BYTES:
            shape = max(pending, key=lambda s: len(pending[s]) * pending[s][0][1].numel())
            group = pending.pop(shape)
            waiting -= sum(w.numel() * 4 for _, w in group)
            yield [t for t, _ in group], torch.stack([w for _, w in group])
    for group in pending.values():
        yield [t for t, _ in group], torch.stack([w for _, w in group])


def _specs(settings: TableSettings, shape: Sequence[int]) -> tuple[list, list]:
    """The spec each width stores at ``shape`` [out, in], and those specs without repeats (widths
    that store one spec, a GGUF type and its fallback, are computed once)."""
    specs = [resolve(w, tuple(shape), settings.method, settings.block_size) for w in settings.bits]
    return specs, list(dict.fromkeys(specs))


def _residuals(stack: torch.Tensor, settings: TableSettings, factor: torch.Tensor | None = None,
               uppers: torch.Tensor | None = None, *given: torch.Tensor) -> torch.Tensor:
    """[L, len(bits), len(ranks)] for a stack [L, out, in]: one ``residual_table`` call over the
    specs the widths store at this shape; ``factor``: the stack's calibration factor L (data-aware
    norm), None for the plain norm; ``uppers``: the stack's inverse factors, Q by error-feedback
    rounding; ``given``: deq(Q) [L, out, in] of each distinct spec already computed (a weight bank's),
    nothing quantized here."""
    specs, unique = _specs(settings, stack.shape[1:])
    tab = residual_table(stack, bits=unique, ranks=settings.ranks, iters=settings.iters, factor=factor,
                         rounding="nearest" if uppers is None or given else "feedback",
                         uppers=None if given else uppers, dequantized=list(given) or None)
    return tab[:, [unique.index(s) for s in specs]]


def on_threads(fn: Callable[..., torch.Tensor], stack: torch.Tensor, *aligned: torch.Tensor) -> torch.Tensor:
    """``fn(stack, *aligned)`` on a CPU with the stack [L, ...] split across this process's torch
    threads, each part computed on one thread (``fn`` must treat the rows of ``stack`` independently;
    ``aligned``: tensors [L, ...] split alike, e.g. one calibration factor per matrix).

    Measured on 2 cores (SmolLM2 tables): 2.7 s against 3.8 s with the threads inside each op: the
    Krylov step's small LAPACK calls and the quantizer's cache-sized chunks gain little from
    intra-op threads, and each of their many parallel regions stalls when another process holds a core."""
    workers = min(torch.get_num_threads(), stack.shape[0])
    if stack.device.type != "cpu" or workers < 2:
        return fn(stack, *aligned)

    def part(args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        torch.set_num_threads(1)  # OpenMP's thread count is per calling thread
        return fn(*args)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            splits = zip(*(t.tensor_split(workers) for t in (stack, *aligned)))
            return torch.cat(list(pool.map(part, splits)))
    finally:
        torch.set_num_threads(before)


def _factors(moments: Any, names: Sequence[str], device: torch.device, damp: float,
             of: Callable[[torch.Tensor, float], torch.Tensor] = calibration_factor) -> torch.Tensor:
    """[L, in, in]: each layer's calibration factor (or ``of`` its moment, e.g. the inverse factor
    of feedback rounding), one factorisation per distinct moment."""
    done: dict[str, torch.Tensor] = {}
    for name in names:
        if moments.group(name) not in done:
            done[moments.group(name)] = of(moments[name].to(device), damp)
    return torch.stack([done[moments.group(name)] for name in names])


def compute_tables(stream: Iterable[tuple[TargetLayer, torch.Tensor]], n_layers: int, settings: TableSettings,
                   device: torch.device, moments: Any = None, damp: float = 0.01,
                   rounding: str = "nearest", bank: Any = None) -> ResidualTables:
    """``moments``: a :class:`planner.scoring.moments.MomentStore` (name -> H, with ``group``) for the
    data-aware norm; None: the plain norm, exactly as before. ``rounding="feedback"`` (needs
    ``moments``): Q by error feedback under each layer's H. ``bank``: a
    :class:`planner.scoring.bank.WeightBank` whose Q the residuals are taken from (quantized once,
    there: the feedback-rounded Q of the plan); None: quantized here (round to nearest: the fused pass)."""
    check_rounding(rounding)
    if rounding == "feedback" and moments is None:
        raise ValueError("rounding='feedback' needs the layers' input moments")
    rows: dict[str, torch.Tensor] = {}
    norms: dict[str, float] = {}
    with progress.task(f"residual tables ({device.type})", n_layers) as advance:
        for targets, stack in _batches(stream):
            stack = stack.to(device)
            names = [t.name for t in targets]
            given: list[torch.Tensor] = []
            if bank is not None:  # Q as the bank quantized it (once): deq of each distinct spec
                specs, unique = _specs(settings, stack.shape[1:])
                width_of = {s: w for w, s in reversed(list(zip(settings.bits, specs)))}
                given = [torch.stack([bank.deq(n, width_of[s]).to(device, torch.float32) for n in names])
                         for s in unique]
            if moments is None:
                tab = on_threads(lambda part, *g: _residuals(part, settings, None, None, *g), stack, *given).cpu()
            else:
                factors = _factors(moments, names, device, damp)
                # feedback where every width can round this shape; elsewhere it is built (and scored) to nearest
                if given:
                    tab = on_threads(lambda part, f, *g: _residuals(part, settings, f, None, *g), stack, factors, *given)
                elif rounding == "feedback" and all(resolve(w, tuple(stack.shape[1:]), settings.method, settings.block_size)
                                                    .feedback_applies(tuple(stack.shape[1:])) for w in settings.bits):
                    uppers = _factors(moments, names, device, damp, of=inverse_factor)
                    tab = on_threads(lambda part, f, u: _residuals(part, settings, f, u), stack, factors, uppers)
                else:
                    tab = on_threads(lambda part, f: _residuals(part, settings, f), stack, factors)
                tab = tab.cpu()
            sq = squared_norm(stack).cpu()
            for i, t in enumerate(targets):
                rows[t.name], norms[t.name] = tab[i], float(sq[i])
            advance(len(targets))
    names = list(rows)
    return ResidualTables(names, settings, torch.stack([rows[n] for n in names]),
                          torch.tensor([norms[n] for n in names], dtype=torch.float64))


def tables_key(weights_sha: str, targets: Sequence[TargetLayer], settings: TableSettings,
               moments: str | None = None, damp: float = 0.01, rounding: str = "nearest") -> str:
    """Cache key of a table set: weights, targets, settings and the code versions (planner.files.cache);
    data-aware tables add their moments' key and damp, feedback-rounded ones the rounding (the
    keys of the others are unchanged)."""
    extra = {"moments": moments, "damp": damp} if moments is not None else {}
    if rounding != "nearest":
        extra["rounding"] = rounding
    return cache_key(PRODUCER, {"weights": weights_sha, "targets": [(t.name, t.shape) for t in targets],
                                "settings": asdict(settings), **extra})


def valid_tables(tensors: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with cached tables, or None: relative residuals and squared norms are >= 0, and
    residuals do not rise with the rank (iters = 1: each rank's fit holds the smaller ones')."""
    problem = non_negative("table", "sq_norm")(tensors)
    if problem is not None:
        return problem
    table = tensors["table"]
    if table.ndim != 3 or bool((table[..., 1:] > table[..., :-1] * (1 + 1e-4) + 1e-6).any()):
        return "residuals rise with the rank"
    return None


def residual_tables(source, targets: Sequence[TargetLayer], settings: TableSettings, *,
                    cache_dir: Path | None = None, device: str | None = None, moments: Any = None,
                    damp: float = 0.01, rounding: str = "nearest") -> ResidualTables:
    """Tables for ``targets`` of ``source`` (a planner.sources.ModelSource), from cache when valid;
    ``moments``: a :class:`planner.scoring.moments.MomentStore` for the data-aware norm;
    ``rounding``: "feedback" for Q by error feedback under those moments."""
    key = tables_key(source.weights_sha256(), targets, settings, moments.key if moments is not None else None, damp,
                     rounding)
    path = (cache_dir or default_cache_dir()) / "tables" / f"{key}.safetensors"
    cached = load_cached(path, key, valid_tables)
    names = [t.name for t in targets]
    want = (len(names), len(settings.bits), len(settings.ranks))
    if cached is not None and tuple(cached.get("table", torch.empty(0)).shape) == want:
        return ResidualTables(names, settings, cached["table"], cached["sq_norm"])
    result = compute_tables(source.iter_weights(targets), len(targets), settings, resolve_device(device), moments,
                            damp, rounding)
    order = [result.names.index(n) for n in names]
    result = ResidualTables(names, settings, result.table[order], result.sq_norm[order])
    save_cached(path, key, {"table": result.table, "sq_norm": result.sq_norm})
    return result

"""``python -m planner --model M --budget B --dry-run [--json]``: the memory range of the search space.

Reads no weights: prints the memory breakdown of the smallest and the largest plan of the search
space and whether each fits the budget. It takes the same :class:`~planner.search.config.PlanConfig` and
:class:`~planner.settings.RunSettings` as a real run (so it validates the same options, and checks a
local ``--data`` file with the real run's corpus loader), and derives what it needs from them.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Mapping, Sequence, TYPE_CHECKING

from planner.budget import format_bytes, parse_budget
from planner.search.config import PlanConfig
from planner.errors import PlannerError
from planner.memory import MemoryEstimate, estimate, layer_bytes
from planner.settings import LayerChoice, RunSettings, resolve_engine

if TYPE_CHECKING:  # annotations only
    from planner.sources import ModelSource

DRY_RUN_METHOD = "nf"  # NF2 / NF3 / NF4 / NF8, as the planning flow plans them


def extreme_choices(targets: Sequence, space: Any, run: RunSettings, facts: Any) -> tuple[dict, dict]:
    """Per group of layers sharing a choice, the option with the fewest and the most bytes: since
    bytes add up per layer, these are the smallest and the largest plan of the space."""
    from search_spaces.choices import group_targets

    low: dict[str, LayerChoice] = {}
    high: dict[str, LayerChoice] = {}
    for members in group_targets(targets, space.granularity).values():
        try:  # every layer has the whole space, or the space is refused as the real plan refuses it
            for t in members:
                space.choices_for(t)
        except ValueError as err:
            raise PlannerError(str(err)) from None
        options = space.choices()

        def choice(t: Any, k: int) -> LayerChoice:  # a GGUF width resolves per layer shape
            return LayerChoice.of(*options[k], DRY_RUN_METHOD, space.block_size, shape=tuple(t.shape))

        costs = [sum(layer_bytes(t, choice(t, k), run, facts) for t in members) for k in range(len(options))]
        lo, hi = costs.index(min(costs)), costs.index(max(costs))
        for t in members:
            low[t.name], high[t.name] = choice(t, lo), choice(t, hi)
    return low, high


def _summary(choices: Mapping[str, LayerChoice]) -> dict[str, Any]:
    bits = sorted({c.bits for c in choices.values()})
    ranks = sorted({c.rank for c in choices.values()})
    dq = any(c.double_quant for c in choices.values())
    return {"bits": bits, "ranks": ranks, **({"double_quant": True} if dq else {})}


def _check_data(cfg: PlanConfig) -> None:
    """A local ``--data`` file is read by the real run's loader (hub datasets are not fetched)."""
    if not cfg.data or cfg.data.startswith("hf:"):
        return
    from planner.cli.flags import user_config
    from planner.train.data import CorpusConfig, load_corpus

    load_corpus(user_config(CorpusConfig, source=cfg.data, seed=0))


def dry_run(cfg: PlanConfig, run: RunSettings, as_json: bool = False) -> int:
    """Print the smallest and largest plan's memory (table, or JSON with ``as_json``); returns 0."""
    from planner.sources import resolve

    _check_data(cfg)
    try:
        run = resolve_engine(run, cfg.quant)
    except ValueError as err:
        raise PlannerError(str(err)) from None
    space = cfg.search_space
    budget = parse_budget(cfg.budget) if cfg.budget else None
    source = resolve(cfg.model, allow_download=False)  # shape facts suffice: never download for a dry run
    try:
        targets = source.targets(cfg.target_list)
    except ValueError as err:  # --target-modules that match nothing: the discovery names them
        raise PlannerError(str(err)) from None
    if not targets:
        raise PlannerError(f"{cfg.model}: no target layers found")
    cfg = cfg.fitted_to(targets)  # as the real plan does: default ranks clipped, chosen ones checked
    space = cfg.search_space
    non_target = source.non_target_params(targets)
    low, high = extreme_choices(targets, space, run, source.facts)
    est_min = estimate(source.facts, targets, low, run, non_target)
    est_max = estimate(source.facts, targets, high, run, non_target)
    report = {
        "model": cfg.model, "architecture": source.facts.architecture, "target_layers": len(targets),
        "budget_bytes": budget, "run": run.to_dict(), "search_space": space.to_dict(),
        "min_bytes": est_min.total_bytes, "max_bytes": est_max.total_bytes,
        "min": {**est_min.to_dict(), "plan": _summary(low)}, "max": {**est_max.to_dict(), "plan": _summary(high)},
        "fits_min": None if budget is None else est_min.total_bytes <= budget,
        "fits_max": None if budget is None else est_max.total_bytes <= budget,
    }
    peak = _planner_peak(cfg, source, targets, non_target, est_max)
    report["planner"] = peak.to_dict()
    from planner.cli.fit import fit_lines, fit_space  # longest context / largest batch per uniform plan

    fits = fit_space(budget, source.facts, targets, space, run, non_target, DRY_RUN_METHOD) if budget else []
    report["fit"] = [f.to_dict() for f in fits]
    sys.stdout.write(json.dumps(report, indent=1) + "\n" if as_json else _table(report, est_min, est_max)
                     + "".join(line + "\n" for line in (fit_lines(fits, run, budget) if fits else []))
                     + _peak_line(peak))
    return 0


def _planner_peak(cfg: PlanConfig, source: ModelSource, targets: Sequence, non_target: Sequence, est_max: MemoryEstimate):
    from planner.devices import resolve_device
    from planner.scoring.footprint import planner_peak

    try:
        on_gpu = resolve_device(cfg.score_device).type == "cuda"
    except PlannerError:
        on_gpu = False
    return planner_peak(source.facts, targets, non_target, bits=cfg.bits, max_rank=max(cfg.ranks),
                        calib_seqs=cfg.calib_seqs, proxy_seqs=cfg.proxy_seqs, seq_len=cfg.calib_seq_len,
                        trials=cfg.trials if cfg.search != "exact" else 0, proxy_top=cfg.proxy_top,
                        candidate_bytes=est_max.allocated_bytes, on_gpu=on_gpu)


def _peak_line(peak: Any) -> str:
    stage = max(peak.stages, key=peak.stages.get)
    where = (f"{format_bytes(peak.device_bytes)} on the GPU and {format_bytes(peak.host_bytes)} host memory"
             if peak.device_bytes else f"{format_bytes(peak.host_bytes)} host memory")
    return (f"planning itself needs about {where} at its peak ({stage}, one block at a time; the frame of "
            f"embeddings and head {format_bytes(peak.frame_bytes)}), and on disk "
            f"{format_bytes(peak.boundary_file_bytes)} of block-boundary states + {format_bytes(peak.bank_disk_bytes)} "
            "of weight bank in the cache\n")


def _table(report: dict[str, Any], lo: MemoryEstimate, hi: MemoryEstimate) -> str:
    keys = list(dict.fromkeys(list(lo.breakdown) + list(hi.breakdown)))
    rows = [(k, lo.breakdown.get(k, 0), hi.breakdown.get(k, 0)) for k in keys]
    rows += [("= allocated", lo.allocated_bytes, hi.allocated_bytes), ("+ reserve", lo.reserve_bytes, hi.reserve_bytes),
             ("= total", lo.total_bytes, hi.total_bytes)]
    plans = [f"bits {report[k]['plan']['bits']}{' dq' if report[k]['plan'].get('double_quant') else ''} "
             f"ranks {report[k]['plan']['ranks']}" for k in ("min", "max")]
    lines = [f"{report['model']} ({report['architecture']}, {report['target_layers']} target layers), "
             f"{report['run']['mode']} seq {report['run']['seq_len']} x batch {report['run']['batch_size']}",
             f"{'':14}{'smallest plan':>26}{'largest plan':>26}", f"{'':14}{plans[0]:>26}{plans[1]:>26}"]
    lines += [f"{name:14}{format_bytes(a):>26}{format_bytes(b):>26}" for name, a, b in rows]
    if report["budget_bytes"] is not None:
        fits = lambda ok: "fits" if ok else "does not fit"  # noqa: E731
        lines.append(f"budget {format_bytes(report['budget_bytes'])} ({report['budget_bytes']} B): smallest plan "
                     f"{fits(report['fits_min'])}, largest plan {fits(report['fits_max'])}")
    return "\n".join(lines) + "\n"

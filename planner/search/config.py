"""PlanConfig: the options of ``python -m planner`` (the plan command), each with its default and help
defined once (:func:`planner.options.option`)."""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

from search_spaces.facts import TargetLayer
from loftq.formats import FAMILIES
from search_spaces.choices import DQ_MODES, GRANULARITIES, QUANTS, SearchSpace, family_bits

from planner.artifact.records import DEFAULT_CALIB_SEQ_LEN, DEFAULT_CALIB_SEQS
from planner.errors import ConfigError
from planner.options import int_tuple, option as _opt
from planner.settings import INITS

log = logging.getLogger(__name__)
SEARCHES = ("guided", "exact")
STRONG_BITS = {"nf": (2, 3, 4, 8), "gguf": (2, 3, 4, 5, 6, 8)}  # the default menus (README "Defaults")
QUICK_BITS = (2, 4, 8)  # --quick: the first planner's menu
STRONG_ROTATION = "off"  # the default --rotation for families that rotate (README "Defaults")
STRONG_DOUBLE_QUANT = "on"  # the default --double-quant for families with it (README "Defaults")
_SPACE = SearchSpace()  # the search-space defaults live there, once


@dataclass(frozen=True)
class PlanConfig:
    model: str = _opt("smollm2-135m", "model id, alias (see `models`), local Hugging Face folder (safetensors only), "
                      "or a .gguf file")
    budget: str = _opt("", "memory budget: 11GB (=11e9 B), 11GiB, 900MB, bytes, or auto (free GPU memory)")
    bits: tuple[int, ...] | None = _opt(None, "bit widths to choose from; add 16 to allow keeping a layer in 16 bits "
                                       "(default: the family's strongest menu, nf 2,3,4,8; gguf 2,3,4,5,6,8; with "
                                       "--quick 2,4,8)", type=int_tuple)
    ranks: tuple[int, ...] = _opt(_SPACE.ranks, "LoRA ranks to choose from (0 = no adapter)")
    block_size: int = _opt(_SPACE.block_size, "quantization block size")
    granularity: str = _opt(_SPACE.granularity, "one choice per module, per block, or per module type",
                            choices=GRANULARITIES)
    double_quant: str | None = _opt(None, "double quantization of the blocks' absmax constants (QLoRA: 8-bit, blocks "
                                    "of 256; NF4 4.5 -> 4.127 bits/weight): on for every quantized width (the default for "
                                    "nf: measured plans chose it for all but 0-2 of 210 layers), search (both offered, "
                                    "the planner chooses per layer), or off (with --quick and for families with their "
                                    "own constants)", choices=DQ_MODES)
    quant: str = _opt("nf", "quantizer family: nf (NormalFloat codebooks, for planner.load and bitsandbytes) or "
                      "gguf (llama.cpp's block types, for `materialize --format gguf`: --bits 2 = q2_k, 3 = q3_k, "
                      "4 = q4_0/iq4_nl/q4_k/iq4_xs, 5 = q5_0/q5_1/q5_k, 6 = q6_k, 8 = q8_0; a type on rows it cannot "
                      "hold falls back as llama.cpp's quantizer does: q2_k/q3_k -> q4_0, q4_k -> q5_0, q5_k -> q5_1, "
                      "q6_k -> q8_0, iq4_xs -> iq4_nl)", choices=QUANTS)
    rotation: str | None = _opt(None, "quantize the 2-4-bit codebook widths in a randomized Hadamard basis (QuIP#'s "
                                "incoherence processing; the adapter stays an ordinary one): off, on for every such "
                                "width (also row-scaled: one searched scale per row, e.g. 3rdq-row), or search (the "
                                "planner chooses per layer; the guided search also scores the plan without rotation). "
                                "Layers without a Hadamard order store the plain width; GGUF and bitsandbytes exports "
                                "refuse rotated layers: plan with off for them. Default: off (README \"Defaults\": it costs "
                                "planning time); search pays below 4 bits/weight (SmolLM2 at 3.0: perplexity "
                                "56.9 -> 30.6)",
                                choices=DQ_MODES)
    init: str | None = _opt(None, "adapter initialisation, recorded in the plan: loftq fits B A to W - Q in the plain "
                            "norm; loftq-data (the default; loftq with --quick) fits the layer's output on the "
                            "calibration sequences (--data, --calib-seqs, --calib-seq-len), and the planner's "
                            "residuals use that norm too", choices=INITS)
    rounding: str | None = _opt(None, "how Q's codes are chosen, recorded in the plan: nearest, or feedback (error "
                                "feedback under the data-aware initialisation's moments: the same format and bytes, a "
                                "lower output error; the default for nf, nearest with --quick or --init loftq and for "
                                "other families). The residual tables, the Fisher errors and the search's candidates "
                                "all score that Q, and materialize builds it", choices=("nearest", "feedback"))
    imatrix: str | None = _opt(None, "a llama.cpp importance matrix (what llama-imatrix writes: GGUF, or the legacy "
                               ".dat) whose per-column importance replaces the calibration moments' diagonal: the GGUF "
                               "encoders' importance and the data-aware norm (then diagonal) in the tables, the bank, "
                               "the Fisher errors and the candidates. Needs --init loftq-data and --rounding nearest "
                               "(feedback rounding needs the full moments); every target must have an entry. The plan "
                               "records the file's sha256: materialize needs --imatrix with the same file")
    quick: bool = _opt(False, "the quick plan of the first planner: the 2/4/8 menu without double quantization, plain "
                       "LoftQ, round to nearest (1.8x faster to plan on SmolLM2, and worse at tight budgets: README "
                       "\"Defaults\")")
    target_modules: str | None = _opt(None, "override target modules: comma-separated leaf names or regexes")
    search: str = _opt("guided", "guided (the default): Optuna shapes the exact solver's objective, its first trial the "
                       "solver's own optimum, and the zero-step proxy keeps the best; exact: the solver alone",
                       choices=SEARCHES)
    trials: int = _opt(12, "Optuna trials")
    timeout: float | None = _opt(None, "stop the search after this many seconds", type=float)
    seed: int = _opt(0, "random seed (sampler, data order)")
    storage: str | None = _opt(None, "Optuna storage URL (default: SQLite in the cache dir)")
    study_name: str | None = _opt(None, "Optuna study name (default: derived from model, settings, budget)")
    data: str | None = _opt(None, "calibration text: a .txt or .jsonl file (default: Python's pydoc topics)")
    calib_seqs: int = _opt(DEFAULT_CALIB_SEQS, "calibration sequences (the Fisher sensitivity and the input moments)")
    proxy_seqs: int = _opt(4, "held-out sequences for the zero-step proxy")
    calib_seq_len: int = _opt(DEFAULT_CALIB_SEQ_LEN, "tokens per calibration / proxy sequence")
    proxy_top: int = _opt(0, "re-score this many diverse candidates by a short LoRA fine-tune each and keep the "
                          "lowest held-out loss (0 = zero-step proxy only)")
    proxy_steps: int = _opt(20, "LoRA steps per fine-tune proxy candidate")
    proxy_lr: float = _opt(3e-4, "learning rate of the fine-tune proxy")
    adapter_margin: float = _opt(0.1, "fine-tune mode, zero-step choice: prefer the best plan with adapters "
                                 "over a better plan without any when its proxy (KL, nats) is at most this "
                                 "much higher: the loss a short fine-tune is expected to win back")
    score_device: str | None = _opt(None, "device for residual tables and scoring (default: cuda if available)")
    out: str = _opt("plan.json", "where to write the plan")
    cache_dir: str | None = _opt(None, "cache folder (default: $LOFTQ_PLANNER_CACHE or ~/.cache/loftq-planner)")
    pareto: str | None = _opt(None, "also write the exact memory/objective Pareto front: PATH.json + PATH.png")
    trust_remote_code: bool = _opt(False, "allow model code from the hub (off by default)")
    offline: bool = _opt(False, "never download model weights (hub models are downloaded, safetensors only, "
                         "unless this is set or HF_HUB_OFFLINE=1)")

    def __post_init__(self) -> None:
        try:
            self._defaults()
            self._validate()
        except ConfigError:
            raise
        except ValueError as err:  # SearchSpace's own message: one line, the config's error type
            raise ConfigError(str(err)) from None

    def _defaults(self) -> None:
        """Fill the levers left at None: the family's strongest configuration, or with ``quick`` the
        first planner's. A lever set by hand stays as it is (``quick`` with it: only the others)."""
        if self.quant not in FAMILIES:
            raise ConfigError(f"quant must be one of {', '.join(FAMILIES)}; got {self.quant!r}")
        family = FAMILIES.get(self.quant)
        quick = bool(self.quick)
        if self.bits is None:
            bits = QUICK_BITS if quick else STRONG_BITS.get(self.quant, family.bits)
            object.__setattr__(self, "bits", tuple(b for b in bits if b in family.bits) or family.bits)
        if self.double_quant is None:
            object.__setattr__(self, "double_quant", STRONG_DOUBLE_QUANT if family.double_quant and not quick else "off")
        if self.rotation is None:
            object.__setattr__(self, "rotation", STRONG_ROTATION if family.rotation and not quick else "off")
        if self.init is None:
            object.__setattr__(self, "init", "loftq" if quick else "loftq-data")
        if self.rounding is None:
            feedback = self.init == "loftq-data" and self.quant == "nf" and not quick
            object.__setattr__(self, "rounding", "feedback" if feedback else "nearest")

    def _validate(self) -> None:
        if self.quant not in FAMILIES:  # a family registered after import (a plugin's) counts too
            raise ConfigError(f"quant must be one of {', '.join(FAMILIES)}; got {self.quant!r}")
        for name in ("bits", "ranks"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                               for v in value):
                raise ConfigError(f"{name} must be a tuple of integers, e.g. (2, 4, 8); got {value!r}")
            object.__setattr__(self, name, tuple(sorted(set(value))))  # the menu's order, as the CLI gives it
        allowed = family_bits(self.quant)
        bad_bits = [b for b in self.bits if b not in allowed]
        if not self.bits or bad_bits:
            others = [f for f in FAMILIES if f != self.quant and set(bad_bits) <= set(family_bits(f))]
            hint = f" ({','.join(map(str, bad_bits))} bits: --quant {others[0]})" if others and bad_bits else ""
            raise ConfigError(f"bits must be a non-empty subset of {','.join(map(str, allowed))}; "
                              f"got {','.join(map(str, self.bits))}{hint}")
        if not FAMILIES.get(self.quant).double_quant and self.double_quant != "off":
            raise ConfigError(f"--double-quant is for families with codebook constants (nf): {self.quant} types keep "
                              "their own block constants")
        if not FAMILIES.get(self.quant).rotation and self.rotation != "off":
            raise ConfigError(f"--rotation is for codebook families (nf): {self.quant} types cannot be rotated "
                              "(llama.cpp multiplies in the stored basis)")
        if not self.ranks or any(r < 0 or r > 4096 for r in self.ranks):
            raise ConfigError(f"ranks must be integers in [0, 4096]; got {','.join(map(str, self.ranks))}")
        self.search_space  # noqa: B018 — SearchSpace validates, naming the value
        for name, allowed_values in (("granularity", GRANULARITIES), ("init", INITS),
                                     ("rounding", ("nearest", "feedback")), ("search", SEARCHES)):
            if getattr(self, name) not in allowed_values:
                raise ConfigError(f"{name} must be one of {', '.join(allowed_values)}; got {getattr(self, name)!r}")
        if self.rounding == "feedback" and (self.init != "loftq-data" or self.quant != "nf"):
            raise ConfigError("--rounding feedback rounds under the calibration moments of codebook widths: it needs "
                              "--init loftq-data and --quant nf")
        if self.imatrix is not None:
            self._check_imatrix()
        for name, low in (("trials", 0), ("proxy_top", 0), ("seed", 0), ("calib_seqs", 1), ("proxy_seqs", 1),
                          ("calib_seq_len", 2), ("proxy_steps", 1), ("block_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        # finite, in range: an infinite margin or rate would run the whole search and fail at the end
        for name, low, strict in (("adapter_margin", 0.0, False), ("proxy_lr", 0.0, True)):
            value = getattr(self, name)
            if not _real(value) or value < low or (strict and value == low):
                raise ConfigError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, "
                                  f"got {value!r}")
        if self.timeout is not None and (not _real(self.timeout) or self.timeout <= 0):
            raise ConfigError(f"timeout must be a finite number of seconds > 0, got {self.timeout!r}")

    def _check_imatrix(self) -> None:
        """--imatrix stands in for the data-aware moments, of which it holds the diagonal only."""
        if not isinstance(self.imatrix, str) or not self.imatrix:
            raise ConfigError(f"imatrix must be a file path, got {self.imatrix!r}")
        if self.init != "loftq-data":
            raise ConfigError("--imatrix gives the data-aware norm's moments (their diagonal): it needs --init "
                              "loftq-data (the default; with --quick, pass --init loftq-data)")
        if self.rounding == "feedback":
            raise ConfigError("--imatrix holds only the diagonal of the input moments, and --rounding feedback (the "
                              "default for --quant nf) needs the full moments: pass --rounding nearest with --imatrix")

    def fitted_to(self, targets: Sequence[TargetLayer]) -> "PlanConfig":
        """This config for a model's ``targets``: the default ``ranks`` lose the ranks above the
        smallest layer's smaller side (a small model, logged); ranks the user chose that do not fit
        are refused (ConfigError naming the layer and the ranks that fit every layer)."""
        side = min(min(t.shape) for t in targets)
        too_big = [r for r in self.ranks if r > side]
        if not too_big:
            return self
        fit = tuple(r for r in self.ranks if r <= side)
        if self.ranks == _SPACE.ranks and fit:
            log.warning("the default ranks %s include %s, above the smallest layer side (%d): planning with ranks %s",
                        ",".join(map(str, self.ranks)), ",".join(map(str, too_big)), side, ",".join(map(str, fit)))
            return dataclasses.replace(self, ranks=fit)
        small = min(targets, key=lambda t: min(t.shape))
        raise ConfigError(f"rank {max(too_big)} exceeds layer {small.name} {tuple(small.shape)}; the ranks that fit "
                          f"every layer are at most {side}: choose --ranks from those (e.g. "
                          f"{','.join(map(str, fit or (0,)))})")

    @property
    def search_space(self) -> SearchSpace:
        """The space these options describe: 16 in ``bits`` means "may keep a layer in 16 bits"."""
        return SearchSpace(bits=tuple(b for b in self.bits if b < 16) or (4,), ranks=self.ranks,
                           keep16=16 in self.bits, block_size=self.block_size, granularity=self.granularity,
                           double_quant=self.double_quant, quant=self.quant, rotation=self.rotation)

    @property
    def cache_path(self) -> Path | None:
        return Path(self.cache_dir) if self.cache_dir else None

    @property
    def target_list(self) -> list[str] | None:
        return [m.strip() for m in self.target_modules.split(",") if m.strip()] if self.target_modules else None


def _real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def config_fields() -> list:
    return list(fields(PlanConfig))

"""Materialize a plan: LoftQ per layer -> packed backbone + PEFT adapter folder (+ a stock NF4 checkpoint).

Streaming: target weights are read one layer at a time (:meth:`ModelSource.iter_weights`), LoftQ
runs on ``device`` (CUDA when present) and each finished layer is written at once. Peak memory is
one fp32 layer with its SVD workspace, then at the end the non-target weights (embeddings, norms)
and every layer's A and B (r(in + out) fp32 numbers each) — never the whole model.

Resuming: the work lives in ``DIR.partial/``; ``job.json`` there identifies plan, weights and
settings. A layer counts as done once its commit file ``work/NAME.safetensors`` (A, B, residual,
layer metadata) exists, written after the layer's codes. An interrupted run (Ctrl-C, kill, crash,
error) leaves ``DIR.partial/`` and no ``DIR``; the next run of the same job computes only the
remaining layers. The artifact is assembled in ``DIR.partial/artifact/`` and renamed to ``DIR`` in
one step. Layout: :mod:`planner.artifact.layout`.

The low-rank step: ``--svd randomized`` (default) runs loftq's block Krylov truncated SVD where it
was tested within 1% of the exact residual (ranks <= 64, layers wider than 192), ``--svd exact`` a
full thin SVD per layer (for phi-2's 10240 x 2560 layers the difference is measured in README).

The initialisation: the plan's ``init`` by default (``--init`` overrides it). ``loftq`` fits B A to
W - Q in the plain norm, exactly as before; ``loftq-data`` fits it in the layer-output norm
||(W - Q - BA) L||, L L^T = H + damp, with H the layer's input second moment over the plan's
calibration sequences (``init.data``, ``init.seqs``, ``init.seq_len``). The moments come from the
planner's cache when the plan was made on this machine; otherwise they are recomputed from those
settings (one block-by-block forward over the calibration text; the text must still have the
fingerprint the plan recorded, else PlannerError). The data-aware low-rank step takes the top
factors of (W - Q) L (``--svd`` applies as for plain LoftQ). This module cannot compute moments itself (it
may not import :mod:`planner.scoring`): callers pass ``moments``, as :func:`planner.materialize` and
the CLI do.

T, the LoftQ iterations: by default each layer's ``iters`` from the plan (the planner writes 1, the
setting its residuals were computed at); ``--iters T`` runs T alternating steps on every layer and
keeps the best iterate (the error can rise at some settings). T > 1 costs T quantizations and T
SVDs per layer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TYPE_CHECKING

import torch
from safetensors import safe_open

from loftq import __version__ as LOFTQ_VERSION
from loftq.quant import METHODS
from loftq.rounding import ROUNDINGS
from loftq.solver import SVD_METHODS
from search_spaces.discovery import is_conv1d, is_linear_like

from planner import progress
from planner.build.gguf_export import ADAPTER_DTYPES, adapter_dtype_option, export_gguf, gguf_base as _gguf_base
from planner.artifact.layout import (ADAPTER, BACKBONE, DTYPES, HF_BNB, LAYER_DIR, NON_TARGET_FILE, PLAN_FILE, QUANT_META,
                                     BackboneMeta, LayerMeta, copy_config_files, dtype_name, layer_tensors,
                                     write_adapter)
from planner.artifact.plan import MAX_ITERS, LayerPlan, Plan, created_with, load_plan, save_plan
from planner.artifact.records import DEFAULT_CALIB_SEQ_LEN, DEFAULT_CALIB_SEQS, DEFAULT_DAMP, InitRecord
from planner.devices import default_device, resolve_device
from planner.errors import PlannerError
from planner.files.atomic import (atomic_save_tensors, atomic_write_bytes, check_dir_target, check_writable, rename_dir,
                                   storage_errors, sweep_temps)
from planner.files.paths import Input, Output, check_input_file, check_links, check_outputs
from planner.files.tensors import open_safetensors
from planner.options import option as _opt
from planner.runtime.build import build_layer
from planner.settings import INITS, LayerChoice

if TYPE_CHECKING:  # annotations only
    from planner.sources import ModelSource

log = logging.getLogger(__name__)

FORMATS = ("packed", "hf-bnb", "gguf")
JOB_VERSION = 2  # 2: work files hold PEFT's (lora_A, lora_B), built by planner.runtime.build


@dataclass(frozen=True)
class MaterializeConfig:
    """Options of ``python -m planner materialize PLAN --out DIR`` (defaults and help defined once)."""

    iters: int | None = _opt(None, "LoftQ alternating steps per layer, best iterate kept (default: the plan's "
                             "per-layer iters; the planner writes 1)", type=int)
    force: bool = _opt(False, "replace an existing --out folder, and discard a DIR.partial of another job")
    device: str | None = _opt(None, "where LoftQ runs (default: cuda if available, else cpu)")
    format: str = _opt("packed", "packed: backbone + adapter (always written); hf-bnb: also a stock transformers "
                       "NF4 checkpoint in DIR/hf-bnb (plans with only NF4 and 16-bit layers); gguf: also "
                       "DIR/gguf/model.gguf + adapter.gguf for llama.cpp (plans with only GGUF-type and 16-bit "
                       "layers; metadata, tokenizer and other tensors from the model's GGUF: --model FILE.gguf, "
                       "a .gguf plan model, or the packaged smollm2-135m)", choices=FORMATS)
    gguf_adapter_dtype: str = adapter_dtype_option()
    non_target_dtype: str = _opt("bf16", "dtype of the non-target weights (embeddings, norms, biases)",
                                 choices=tuple(DTYPES))
    model: str | None = _opt(None, "model to read the weights from (default: the plan's model.id)")
    offline: bool = _opt(False, "never download model weights (a hub id in the plan is downloaded, safetensors "
                         "only, unless this is set or HF_HUB_OFFLINE=1), as for the plan command")
    svd: str = _opt("randomized", "LoftQ's low-rank step: randomized = a block Krylov truncated SVD, used at "
                    "ranks <= 64 on codebook layers wider than 192 (tested within 1 percent of the exact residual on "
                    "SmolLM2), a full SVD elsewhere; exact = a full thin SVD everywhere", choices=SVD_METHODS)
    init: str | None = _opt(None, "adapter initialisation (default: the plan's init): loftq = plain norm; "
                            "loftq-data = the layer-output norm on the plan's calibration sequences (their input "
                            "moments come from the planner's cache, or are recomputed)", choices=INITS)
    rounding: str | None = _opt(None, "how Q's codes are chosen (default: the plan's init.rounding, else nearest): "
                         "nearest = round to nearest; feedback = error feedback "
                         "under the layers' input moments (loftq.rounding: the same format and bytes, a lower output "
                         "error; needs the data-aware initialisation's moments, i.e. a loftq-data plan or --init "
                         "loftq-data; codebook layers whose input width is a multiple of the block size, the others "
                         "round to nearest)", choices=ROUNDINGS)
    imatrix: str | None = _opt(None, "the importance matrix a plan made with --imatrix was made with (the same "
                               "file: its sha256 must be the plan's init.imatrix_sha256)")

    def __post_init__(self) -> None:
        if self.iters is not None and (not isinstance(self.iters, int) or isinstance(self.iters, bool)
                                       or not 1 <= self.iters <= MAX_ITERS):
            raise ValueError(f"iters must be an integer in [1, {MAX_ITERS}], got {self.iters!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"svd must be one of {', '.join(SVD_METHODS)}; got {self.svd!r}")
        if self.init is not None and self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}; got {self.init!r}")
        if self.rounding is not None and self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}; got {self.rounding!r}")
        if self.gguf_adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"gguf_adapter_dtype must be one of {', '.join(ADAPTER_DTYPES)}; "
                             f"got {self.gguf_adapter_dtype!r}")
        if self.non_target_dtype not in DTYPES:
            raise ValueError(f"non_target_dtype must be one of {', '.join(DTYPES)}; got {self.non_target_dtype!r}")


@dataclass(frozen=True)
class Materialized:
    path: Path
    plan: Plan
    computed: tuple[str, ...]  # layers computed by this run (the others were resumed)
    seconds: float


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


# ---------------------------------------------------------------- the run
# (source, layer names, init, device) -> (name -> H [in, in], fingerprint of the calibration text)
MomentsFor = Callable[[Any, Sequence[str], InitRecord, torch.device], tuple[Mapping[str, torch.Tensor], str]]


def materialize(plan_path: str | Path, out: str | Path, config: MaterializeConfig = MaterializeConfig(), *,
                on_layer: Callable[[str], None] | None = None, moments: MomentsFor | None = None) -> Materialized:
    """Build DIR from a plan; see the module docstring. ``on_layer(name)`` runs after each layer is
    committed. ``moments(source, layer names, init, device)``: (name -> input second moment H, the
    calibration text's fingerprint) for the data-aware initialisation (:func:`planner.scoring.moments.plan_moments`). Bad input
    (existing DIR without force, weights that are not the plan's, non-finite weights, hf-bnb on a
    non-NF4 plan) raises PlannerError and leaves DIR untouched."""
    t0 = time.perf_counter()
    out = preflight(out, config.force)
    with storage_errors(out):  # a disk that fills (or turns read-only) mid-way: one line, the work kept
        return _materialize(plan_path, out, config, t0, on_layer, moments)


def _materialize(plan_path: str | Path, out: Path, config: MaterializeConfig, t0: float,
                 on_layer: Callable[[str], None] | None, moments: MomentsFor | None) -> Materialized:
    plan = load_plan(plan_path)
    if config.format == "hf-bnb":
        check_nf4_only(plan)
    base = _gguf_base(plan, config.model) if config.format == "gguf" else None
    check_io(out, plan_path, config.model, base, imatrix=config.imatrix)  # before a GGUF model is converted
    init = with_imatrix(init_of(plan, config), config.imatrix)
    source = _source(plan, config)
    check_io(out, plan_path, config.model, base, source.folder, imatrix=config.imatrix)
    try:
        plan.run.check_model(source.facts, source.reference)
    except ValueError as err:
        raise PlannerError(f"{plan_path}: {err}") from None
    targets = _targets(source, plan)
    iters = {layer.name: config.iters or max(1, layer.iters) for layer in plan.layers}
    device = resolve_device(config.device)
    h: Mapping[str, torch.Tensor] = {}
    rounding = config.rounding or init.rounding or "nearest"
    if rounding == "feedback":
        if not init.data_aware:
            raise PlannerError("--rounding feedback rounds under the layers' input moments: use it with a loftq-data "
                               "plan or add --init loftq-data")
        if init.imatrix is not None:
            raise PlannerError("--rounding feedback needs the full input moments; this plan's are an importance "
                               "matrix's diagonal: drop --rounding feedback")
        if not any(layer.spec is not None and layer.spec.feedback_applies(layer.shape) for layer in plan.layers):
            raise PlannerError("--rounding feedback rounds codebook layers (NF) whose blocks are runs of input "
                               "columns; this plan has none")
    if init.data_aware:
        if moments is None:
            raise PlannerError("the data-aware initialisation needs the layers' input moments: run it through "
                               "planner.materialize or the CLI")
        h, corpus = moments(source, [layer.name for layer in plan.layers], init, device)  # the plan's key
        # the folder's plan.json says how its Q was rounded
        init = dataclasses.replace(init, corpus=corpus, rounding=None if rounding == "nearest" else rounding)
    plan = dataclasses.replace(plan, init=init)
    key = job_key(plan, source.weights_sha256(), iters, config.svd, rounding)
    partial = partial_dir(out)
    with _job(partial, key, config.force):
        names = [t.name for t in targets]
        todo = [t for t in targets if not _committed(partial, t.name, key)]
        if len(todo) < len(names):
            log.info("%s: resuming, %d of %d layers already done", partial, len(names) - len(todo), len(names))
        layers = {layer.name: layer for layer in plan.layers}
        with progress.task(f"LoftQ on {device} ({len(names) - len(todo)} resumed)", len(todo)) as advance:
            for target, weight in source.iter_weights(todo):
                _compute_layer(partial, layers[target.name], weight, iters[target.name], device, key, config.svd,
                               h.get(target.name) if init.data_aware else None, init.damp, rounding)
                advance(1)
                if on_layer is not None:
                    on_layer(target.name)
        artifact = partial / "artifact"
        final_plan = _finalize(artifact, partial, plan, source, targets, iters, config)
        if base is not None:
            export_gguf(artifact, base, config.gguf_adapter_dtype)
        _swap_into_place(artifact, out, config.force)
    shutil.rmtree(partial, ignore_errors=True)
    return Materialized(out, final_plan, tuple(t.name for t in todo), time.perf_counter() - t0)


def preflight(out: str | Path, force: bool) -> Path:
    """Before any work: ``out`` and ``out.partial`` are absent or real folders (a symlink, file, FIFO
    or device is refused even with force), ``out`` is absent unless force, and its folder is writable."""
    out = check_dir_target(out)
    check_dir_target(partial_dir(out))
    if out.exists() and not force:
        raise PlannerError(f"{out} already exists; pass --force (MaterializeConfig(force=True) in Python) to replace it")
    check_writable(out.parent)
    return out


def check_io(out: Path, plan_path: str | Path, model: str | None, base: Path | None,
             folder: Path | None = None, imatrix: str | None = None) -> None:
    """``--out`` (and its ``.partial``) is not, does not hold and does not replace the plan, the model
    (``--model`` given as a path, and the folder its weights are read from), the base GGUF or the
    ``--imatrix`` file (a regular file)."""
    inputs = [Input(Path(plan_path), "plan")]
    if imatrix:
        inputs.append(Input(check_input_file(imatrix, "imatrix"), "importance matrix (--imatrix)"))
    if model and os.path.lexists(Path(model).expanduser()):
        inputs.append(Input(Path(model).expanduser(), "model (--model)"))
    inputs += [Input(p, what) for p, what in ((folder, "model folder"), (base, "base GGUF")) if p is not None]
    check_outputs([Output(out, "--out"), Output(partial_dir(out), "--out (its .partial work folder)")], inputs)


def check_nf4_only(plan: Plan) -> None:
    bad = [layer for layer in plan.layers if layer.spec is not None and not layer.spec.bnb_4bit]
    if bad:
        note = getattr(bad[0].spec, "export_note", "")
        raise PlannerError(f"--format hf-bnb needs a plan with only NF4 and 16-bit layers (what bitsandbytes' "
                           f"Linear4bit reads); {bad[0].name} is {bad[0].quant} ({len(bad)} such layers)"
                           f"{'; ' + note if note else ''}")


def _source(plan: Plan, config: MaterializeConfig) -> Any:
    from planner.sources import check_weights, downloads_allowed, resolve

    allowed = not config.offline and downloads_allowed()
    source = resolve(config.model or plan.model["id"], allow_download=allowed)
    if source.folder is None:
        why = "--offline" if config.offline else "HF_HUB_OFFLINE=1"
        raise PlannerError(f"{source.reference}: its weights are not in the local hub cache and downloads are off "
                           f"({why}); download them without it, or pass --model FOLDER")
    check_weights(source, plan.model)
    return source


def _targets(source: ModelSource, plan: Plan) -> list[Any]:
    """The plan's layers as TargetLayers of the source, in module order; shapes must agree."""
    try:
        targets = source.targets([re.escape(layer.name) for layer in plan.layers], include_head=True)
    except ValueError as err:
        raise PlannerError(f"the plan names a layer {source.reference} does not have: {err}") from None
    found = {t.name: t for t in targets}
    for layer in plan.layers:
        t = found.get(layer.name)
        if t is None:
            raise PlannerError(f"{layer.name} of the plan is not a linear layer of {source.reference}")
        if tuple(t.shape) != tuple(layer.shape):
            raise PlannerError(f"{layer.name}: the plan says shape {layer.shape}, the model has {t.shape}")
    _refuse_tied(source.skeleton, [layer.name for layer in plan.layers])
    return targets


def _refuse_tied(skeleton: torch.nn.Module, names: Sequence[str]) -> None:
    """A target whose weight is shared with another parameter (a tied lm_head is the embedding)
    cannot be replaced by packed codes: the other user would lose its value and ``load`` could not
    rebuild the model. Refuse before any work."""
    aliases: dict[int, list[str]] = {}
    for alias, param in skeleton.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(alias)
    for name in names:
        weight = getattr(skeleton.get_submodule(name), "weight", None)
        others = [a for a in aliases.get(id(weight), []) if a != f"{name}.weight"]
        if others:
            raise PlannerError(f"{name}: its weight is tied to {others[0]} (tie_word_embeddings), so it cannot be "
                               f"quantized on its own; remove {name} from the plan")


def init_of(plan: Plan, config: MaterializeConfig) -> InitRecord:
    """The initialisation to build with: the plan's, or ``--init``'s; a data-aware one asked of a
    plain plan takes the plan command's default calibration (pydoc, 16 x 256 tokens)."""
    if config.init is None or config.init == plan.init.method:
        return plan.init
    if config.init == "loftq":
        return InitRecord()
    return InitRecord("loftq-data", data=None, seqs=DEFAULT_CALIB_SEQS, seq_len=DEFAULT_CALIB_SEQ_LEN, damp=DEFAULT_DAMP)


def with_imatrix(init: InitRecord, given: str | None) -> InitRecord:
    """``init`` with ``init.imatrix`` the file the user gave, which must have the plan's sha256: a plan
    made with an importance matrix builds with that matrix, one made without builds without."""
    from planner.sources.imatrix import file_sha256

    if init.imatrix_sha256 is None:
        if given:
            raise PlannerError("--imatrix: this plan (as built: init " + init.method + ") uses no importance matrix; "
                               "drop --imatrix")
        return init
    if not given:
        raise PlannerError(f"this plan was made with the importance matrix {init.imatrix} (sha256 "
                           f"{init.imatrix_sha256[:12]}...): pass --imatrix {init.imatrix}")
    digest = file_sha256(given)
    if digest != init.imatrix_sha256:
        raise PlannerError(f"--imatrix {given} has sha256 {digest[:12]}..., not the plan's "
                           f"{init.imatrix_sha256[:12]}... ({init.imatrix}): pass that file, or re-plan with this one")
    return dataclasses.replace(init, imatrix=str(given))


def job_key(plan: Plan, weights_sha: str, iters: Mapping[str, int], svd: str = "randomized",
            rounding: str = "nearest") -> str:
    """What a partial run's layers depend on: each layer's choice and T, the SVD method, the
    initialisation (when data-aware), the rounding (when not nearest), the weights and the version of
    loftq's numbers."""
    spec = [[layer.name, list(layer.shape), layer.bits, layer.quant, layer.block_size, layer.double_quant,
             layer.rank, float(layer.alpha), iters[layer.name]] for layer in plan.layers]
    # the imatrix by its digest, not by the path it was given under
    extra = {"init": {k: v for k, v in plan.init.to_dict().items() if k != "imatrix"}} if plan.init.data_aware else {}
    if rounding != "nearest":
        extra["rounding"] = rounding
    # a build resumed across a change of the quantizers' numbers would mix two encodings: loftq's version
    blob = json.dumps({"v": JOB_VERSION, "loftq": LOFTQ_VERSION, "weights": weights_sha, "layers": spec, "svd": svd,
                       **extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@contextlib.contextmanager
def _job(partial: Path, key: str, force: bool) -> Iterator[None]:
    """Open DIR.partial for job ``key`` under an exclusive lock (on the folder itself, so a second
    run cannot clear it meanwhile): resume it if it holds this job, else start it afresh (another
    job's work is discarded only with ``force``). DIR.partial must be a real folder holding no link
    out of it (its files become the artifact; ``force`` empties it). A run that fails before its
    first layer is committed removes the DIR.partial it created."""
    if partial.is_symlink() or (partial.exists() and not partial.is_dir()):
        raise PlannerError(f"{partial} is a symbolic link or not a folder; materialize keeps its work in a real "
                           "folder there: remove it")
    created = not partial.exists()
    if not created:
        check_links(partial)
    partial.mkdir(parents=True, exist_ok=True)
    fd = os.open(partial, os.O_RDONLY)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError:
            raise PlannerError(f"{partial} is in use by another materialize run") from None
        job_file = partial / "job.json"
        try:
            old = json.loads(job_file.read_text()).get("key")
        except (OSError, ValueError, AttributeError):
            old = None  # no job written yet: nothing was committed
        if old not in (None, key) and not force:
            raise PlannerError(f"{partial} holds an unfinished run of another plan, model or settings; "
                               "remove it or pass --force (MaterializeConfig(force=True) in Python) to discard it")
        sweep_temps(partial, all_temps=True)  # a killed run's half-written files: this run holds the lock
        if old != key:
            for child in partial.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            atomic_write_bytes(job_file, json.dumps({"key": key, "version": JOB_VERSION}).encode())
        (partial / "work").mkdir(exist_ok=True)
        (partial / "artifact" / BACKBONE / LAYER_DIR).mkdir(parents=True, exist_ok=True)
        try:
            yield
        except BaseException:
            if created and not any((partial / "work").iterdir()):
                shutil.rmtree(partial, ignore_errors=True)  # nothing to resume: leave nothing behind
            raise
    finally:
        os.close(fd)


def _work_file(partial: Path, name: str) -> Path:
    return partial / "work" / f"{name}.safetensors"


def _committed(partial: Path, name: str, key: str) -> bool:
    path = _work_file(partial, name)
    if not path.is_file() or not (partial / "artifact" / BACKBONE / LAYER_DIR / f"{name}.safetensors").is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("job") == key
    except Exception:  # a torn or foreign file: compute the layer again
        return False


def _compute_layer(partial: Path, layer: LayerPlan, weight: torch.Tensor, iters: int, device: torch.device,
                   key: str, svd: str, moment: torch.Tensor | None = None, damp: float | None = None,
                   rounding: str = "nearest") -> None:
    """Build one layer [out, in] (:func:`planner.runtime.build.build_layer`) and commit it: its stored
    tensors to artifact/backbone/layers, PEFT's (lora_A, lora_B) to work/. (``weight`` is finite: the
    source's reader checks every tensor.) ``moment``: the layer's input second moment H [in, in] for
    the data-aware initialisation (its residual is then the weighted one)."""
    choice = LayerChoice.from_spec(layer.spec, layer.rank, layer.block_size)
    built = build_layer(layer.name, weight, choice, alpha=layer.alpha, iters=iters, svd=svd, moment=moment,
                        damp=damp if damp is not None else DEFAULT_DAMP, rounding=rounding, device=device,
                        keep_dtype=DTYPES.get(layer.quant, torch.bfloat16))
    meta = LayerMeta.of(layer.name, built.stored, layer.block_size)
    atomic_save_tensors(partial / "artifact" / BACKBONE / LAYER_DIR / meta.file, layer_tensors(layer.name, built.stored))
    info = {"job": key, "residual": repr(built.residual), "best_iter": str(built.best_iter),
            "errors": json.dumps(built.errors), "meta": json.dumps(meta.to_dict())}
    lora = {"lora_A": built.lora[0], "lora_B": built.lora[1]} if built.lora is not None else {}
    atomic_save_tensors(_work_file(partial, layer.name), lora, info)


# ---------------------------------------------------------------- assembling the artifact
def _read_work(partial: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with open_safetensors(_work_file(partial, name)) as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})


def _finalize(artifact: Path, partial: Path, plan: Plan, source: ModelSource, targets: Sequence[Any],
              iters: Mapping[str, int], config: MaterializeConfig) -> Plan:
    """Write everything but the layer codes into ``artifact`` and return the updated plan."""
    results = {t.name: _read_work(partial, t.name) for t in targets}
    backbone = artifact / BACKBONE
    metas = [LayerMeta(**json.loads(results[t.name][1]["meta"])) for t in targets]
    meta = BackboneMeta(tuple(metas), non_target_dtype=config.non_target_dtype)
    atomic_save_tensors(backbone / NON_TARGET_FILE, non_target_state(source, targets, DTYPES[config.non_target_dtype]))
    atomic_write_bytes(backbone / QUANT_META, json.dumps(meta.to_dict(), indent=1).encode())
    copy_config_files(source.folder, backbone, roots=source.roots)
    layers = {layer.name: layer for layer in plan.layers}
    adapters = {n: (t["lora_A"], t["lora_B"]) for n, (t, _) in results.items() if layers[n].rank}  # PEFT's
    if adapters:
        write_adapter(artifact / ADAPTER, plan, adapters, base=str(source.reference))
    new_layers = tuple(dataclasses.replace(layer, residual=round(float(results[layer.name][1]["residual"]), 6),
                                           iters=iters[layer.name]) for layer in plan.layers)
    planned_backbone = plan.estimate.breakdown.get("backbone")
    if planned_backbone is not None and planned_backbone != meta.nbytes:
        log.warning("stored backbone is %d B, the plan's estimate says %d B", meta.nbytes, planned_backbone)
    # no timings here: the same plan and weights give a byte-identical folder (the CLI prints the time)
    info = {"iters": config.iters, "svd": config.svd, "device": config.device or str(default_device()),
            "format": config.format,
            "non_target_dtype": config.non_target_dtype, "backbone_bytes": meta.nbytes,
            "best_iters": {n: int(m["best_iter"]) for n, (_, m) in results.items()}, "versions": created_with()}
    new_plan = dataclasses.replace(plan, layers=new_layers, created_with={**plan.created_with, "materialize": info})
    save_plan(new_plan, artifact / PLAN_FILE)
    if config.format == "hf-bnb":
        from planner.build.hf_bnb import write_hf_bnb

        write_hf_bnb(artifact, source)
    return new_plan


def non_target_state(source: ModelSource, targets: Sequence[Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every parameter that is not a target weight, streamed from the checkpoint, under the model's
    parameter names, in ``dtype`` (non-finite values: PlannerError, from the reader)."""
    index = source.index
    prefix = getattr(source.skeleton, "base_model_prefix", "") or ""
    aliases: dict[int, list[str]] = {}
    for alias, p in source.skeleton.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(alias)
    params = dict(source.skeleton.named_parameters())
    out = {}
    for info in source.non_target_params(targets):
        names = [info.name] + [a for a in aliases.get(id(params[info.name]), []) if a != info.name]
        candidates = names + [n[len(prefix) + 1:] for n in names if prefix and n.startswith(prefix + ".")] \
            + [f"{prefix}.{n}" for n in names if prefix and not n.startswith(prefix + ".")]
        key = next((c for c in candidates if c in index), None)
        if key is None:
            raise PlannerError(f"{source.reference}: no checkpoint tensor for {info.name}")
        out[info.name] = index.read(key).to(dtype).contiguous()
    return out


def _swap_into_place(artifact: Path, out: Path, force: bool) -> None:
    """Rename the finished artifact to ``out``; an existing ``out`` (force) is replaced only now, by
    the atomic writer's folder swap (a symlink or file there is refused, never followed)."""
    if os.path.lexists(out) and not force:
        raise PlannerError(f"{out} already exists; pass --force (MaterializeConfig(force=True) in Python) to replace it")
    sweep_temps(artifact, all_temps=True)  # no temp file is ever published
    rename_dir(artifact, out, replace=True)

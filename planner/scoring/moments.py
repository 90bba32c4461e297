"""Per-layer input second moments H = X^T X / n for the data-aware LoftQ initialisation.

For every target Linear, X [n, in] is what the layer receives on the planner's calibration
sequences (the Fisher's train blocks), so ||(W - Q - BA) L||_F with L L^T = H + damp is the
layer's output error on that data (:func:`loftq.solver.calibration_factor`).

Collected block by block on a :class:`planner.scoring.stream.BlockStream`: one forward of every
sequence through block i with pre-hooks on its target layers, X^T X summed in fp32, then the
block's outputs go on to block i + 1. Layers that receive the same tensor (q/k/v, gate/up: found
by identity on the first sequence) share one moment. Each block's moments go to one safetensors
file in the cache (``moments/KEY/block-NNNN.safetensors``) before the next block loads, so RAM
holds one block's moments at most (phi-2's fc2: 10240^2 fp32 = 419 MB), never all layers'.
:class:`MomentStore` reads them back memory-mapped, one layer at a time.

``--imatrix FILE``: :class:`DiagonalMoments` is the same mapping with H = diag(importance) from a
llama.cpp importance matrix (:mod:`planner.sources.imatrix`), so every consumer of a moment (the
GGUF encoders' per-column importance, which is diag H; the data-aware norm, L = diag(sqrt(imp +
damp mean(imp)))) takes it where it took the calibration moment, and every cache key that holds the
moments' key holds the file's sha256. :func:`calibration_importance` goes the other way: the diagonal
of the planner's own moments, what ``python -m planner imatrix`` writes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TYPE_CHECKING

import numpy as np
import torch

from planner import progress
from planner.files.atomic import sweep_temps
from planner.files.cache import cache_key, default_cache_dir
from planner.errors import PlannerError

if TYPE_CHECKING:  # annotations only
    from planner.sources import ModelSource
    from planner.scoring.scorer import Scorer

log = logging.getLogger(__name__)
PRODUCER = "input-moments/1"  # bump when the moments change for the same weights and data
IMATRIX_PRODUCER = "imatrix-moments/1"  # diag(importance) of an imatrix file, keyed by its sha256
DONE = "done.json"


def moments_key(weights_sha: str, targets: Sequence[str], corpus_sha: str, shape: Sequence[int]) -> str:
    """Cache key: weights, target names, calibration text and [n_seqs, seq_len], code versions."""
    return cache_key(PRODUCER, {"weights": weights_sha, "targets": sorted(targets), "corpus": corpus_sha,
                                "blocks": list(shape)})


def _mapped(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A safetensors file's metadata and its fp32 tensors, memory-mapped (copy-on-write: nothing is
    read until used, and the pages can be dropped again)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    meta = header.pop("__metadata__", {}) or {}
    out = {}
    for name, info in header.items():
        if info["dtype"] != "F32":
            raise ValueError(f"{name} is {info['dtype']}, not F32")
        start, end = info["data_offsets"]
        arr = np.memmap(path, dtype=np.float32, mode="c", offset=8 + n + start, shape=((end - start) // 4,))
        out[name] = torch.from_numpy(arr).view(info["shape"])
    return meta, out


class MomentStore(Mapping[str, torch.Tensor]):
    """Layer name -> H [in, in] (fp32), memory-mapped from the block files under ``folder``.

    Trusted as the cache trusts a file (:mod:`planner.files.cache`): ``done.json`` and every block file
    parse and carry ``key``; anything else (a torn, foreign or garbage file) leaves the store
    incomplete, so :func:`input_moments` computes it again. Finiteness is checked per moment on
    read (checking a phi-2 set up front would read 16 GB)."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder, self.key = Path(folder), key
        self._where: dict[str, tuple[Path, str]] = {}
        self._complete = False
        try:
            if json.loads((self.folder / DONE).read_text()).get("key") != key:
                return
            for path in sorted(self.folder.glob("block-*.safetensors")):
                meta, tensors = _mapped(path)
                members = json.loads(meta["members"]) if meta.get("key") == key else None
                if members is None or not set(members.values()) <= set(tensors):
                    raise ValueError(f"{path.name} was written for other settings")
                for layer, tensor in members.items():
                    self._where[layer] = (path, tensor)
            self._complete = True
        except FileNotFoundError:
            pass
        except Exception as err:  # truncated, garbage, foreign: all mean "recompute"
            log.warning("input moments in %s are unreadable (%s); recomputing", self.folder, err)
            self._where.clear()

    def complete(self) -> bool:
        return self._complete

    def __getitem__(self, name: str) -> torch.Tensor:
        path, tensor = self._where[name]
        h = _mapped(path)[1][tensor]
        if not bool(torch.isfinite(h).all()) or bool((h.diagonal() < 0).any()):
            raise PlannerError(f"{path}: the cached input moment of {name} is not finite or has a negative "
                               f"variance; remove {self.folder} and run again")
        return h

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def group(self, name: str) -> str:
        """Layers with the same group share one moment (the same input)."""
        path, tensor = self._where[name]
        return f"{path.name}/{tensor}"


class DiagonalMoments(Mapping[str, torch.Tensor]):
    """Layer name -> H = diag(importance) [in, in] fp32, from a llama.cpp importance matrix: what a
    :class:`MomentStore` gives, when only the diagonal is known. ``key``: its cache key (the file's
    sha256 and the target names); ``sha256``: the file's digest; layers with equal importance (q/k/v,
    gate/up: one input) share a :meth:`group`, as they share one moment."""

    def __init__(self, importance: Mapping[str, torch.Tensor], sha256: str, key: str) -> None:
        self.importance = {name: v.detach().to(torch.float32).contiguous() for name, v in importance.items()}
        self.sha256, self.key = sha256, key
        self._groups = {name: hashlib.sha256(v.numpy().tobytes()).hexdigest()[:16]
                        for name, v in self.importance.items()}

    def complete(self) -> bool:
        return True

    def __getitem__(self, name: str) -> torch.Tensor:
        return torch.diag(self.importance[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.importance)

    def __len__(self) -> int:
        return len(self.importance)

    def group(self, name: str) -> str:
        return self._groups[name]


def imatrix_moments(path: str | Path, targets: Sequence[str], in_features: Mapping[str, int] | None = None,
                    sha256: str | None = None) -> DiagonalMoments:
    """The diagonal moments of ``targets`` (llama-family module names) from the imatrix file at
    ``path`` (:func:`planner.sources.imatrix.read_imatrix`; ``in_features``: widths to check). Every
    target must have an entry (PlannerError naming the first that has none: no silent fallback to the
    calibration moments); ``sha256``: the digest the file must have (a plan's, or one taken before)."""
    from planner.sources.imatrix import file_sha256, gguf_tensor_name, read_imatrix

    digest = file_sha256(path)
    if sha256 is not None and digest != sha256:
        raise PlannerError(f"imatrix {path} has sha256 {digest[:12]}..., not the expected {sha256[:12]}... (the "
                           "plan's; or the file changed since it was first read)")
    names = {}
    for name in targets:
        try:
            names[name] = gguf_tensor_name(name)
        except PlannerError:
            raise PlannerError(f"--imatrix: target {name} has no llama.cpp tensor name (imatrix names map to the "
                               "llama family: model.layers.N.self_attn/mlp.*_proj)") from None
    imatrix = read_imatrix(path, in_features=in_features)
    missing = [name for name in targets if names[name] not in imatrix.importance]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise PlannerError(f"imatrix {path} has no entry for target {missing[0]} ({names[missing[0]]}){more}: it "
                           f"covers {len(targets) - len(missing)} of {len(targets)} target layers (an imatrix of "
                           "another model?)")
    importance = {name: imatrix.importance[names[name]] for name in targets}
    for name, values in importance.items():
        if not float(values.double().sum()) > 0:
            raise PlannerError(f"imatrix {path}: {names[name]} is all zero (no input column would count)")
    return DiagonalMoments(importance, digest, cache_key(IMATRIX_PRODUCER, {"imatrix": digest,
                                                                             "targets": sorted(targets)}))


def calibration_importance(source: ModelSource, targets: Sequence[str], data: str | None, seqs: int, seq_len: int, *,
                           cache_dir: Path | None = None, device: torch.device | str = "cpu"
                           ) -> tuple[dict[str, torch.Tensor], int]:
    """The planner's own per-column importance: diag H [in] fp32 of each target over the calibration
    sequences the plan command uses (``data``, ``seqs`` x ``seq_len``; moments from the cache when
    there), and the tokens behind it (``seqs * seq_len``)."""
    blocks, corpus = calibration_blocks(source, data, seqs, seq_len)
    store = input_moments(source, targets, blocks, corpus, cache_dir=cache_dir, device=device)
    return {name: store[name].diagonal().clone() for name in targets}, int(blocks.numel())


def collect_moments(stream: Any, blocks: torch.Tensor, folder: Path, key: str) -> MomentStore:
    """Compute every target layer's H over ``blocks`` [n_seqs, seq_len] (see the module docstring)
    into ``folder``, one file per transformer block, and return the store."""
    from planner.files.atomic import atomic_save_tensors, atomic_write_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(blocks)
    inputs = [stream.capture(blocks[s:s + 1]) for s in range(n)]
    hidden = [inp.hidden for inp in inputs]
    tokens = sum(int(h.shape[0] * h.shape[1]) for h in hidden)
    with progress.task("input moments", len(stream)) as advance, torch.no_grad():
        for i in range(len(stream)):
            names = stream.block_targets[i]
            prefix = f"{stream.path}.{i}."
            with stream.block(i) as blk:
                seen: dict[str, torch.Tensor] = {}
                hooks = [blk.get_submodule(name[len(prefix):]).register_forward_pre_hook(
                    lambda mod, args, kwargs, name=name: seen.__setitem__(name, args[0] if args else kwargs["input"]),
                    with_kwargs=True) for name in names]
                leader: dict[str, str] = {}
                acc: dict[str, torch.Tensor] = {}
                try:
                    for s, inp in enumerate(inputs):
                        seen.clear()
                        hidden[s] = stream.run(blk, hidden[s], inp)
                        if s == 0:  # same tensor object = same input: one moment for the group
                            for name in names:
                                leader[name] = next((m for m in leader.values() if seen[m] is seen[name]), name)
                        for name in set(leader.values()):
                            x = seen[name].reshape(-1, seen[name].shape[-1]).float()
                            if name in acc:
                                acc[name].addmm_(x.T, x)
                            else:
                                acc[name] = x.T @ x
                finally:
                    for h in hooks:
                        h.remove()
                    seen.clear()
            ids = {m: f"h{j}" for j, m in enumerate(dict.fromkeys(leader.values()))}
            tensors = {ids[m]: (acc.pop(m) / tokens).cpu().contiguous() for m in list(ids)}
            members = {name: ids[leader[name]] for name in names}
            atomic_save_tensors(folder / f"block-{i:04d}.safetensors", tensors,
                                {"key": key, "members": json.dumps(members), "tokens": str(tokens)})
            del tensors
            advance(1)
    atomic_write_bytes(folder / DONE, json.dumps({"key": key, "tokens": tokens}).encode())
    return MomentStore(folder, key)


def calibration_blocks(source: ModelSource, data: str | None, seqs: int, seq_len: int) -> tuple[torch.Tensor, str]:
    """The planner's calibration sequences (the Fisher's train blocks) and the corpus fingerprint."""
    from planner.train.data import CorpusConfig, load_corpus, token_blocks

    corpus = load_corpus(CorpusConfig(source=data or "pydoc", seed=0))
    return token_blocks(source.tokenizer(), corpus.train, seq_len, max_tokens=seq_len * seqs), corpus.fingerprint


def input_moments(source: ModelSource, targets: Sequence[str], blocks: torch.Tensor, corpus_sha: str, *,
                  cache_dir: Path | None = None, device: torch.device | str = "cpu", stream: Any = None) -> MomentStore:
    """The moments of ``targets`` over ``blocks``, from the cache when complete, else computed on
    ``stream`` (a BlockStream over the same targets; None: one is opened)."""
    from planner.scoring.stream import stream_or_none

    key = moments_key(source.weights_sha256(), targets, corpus_sha, tuple(blocks.shape))
    folder = (cache_dir or default_cache_dir()) / "moments" / key
    store = MomentStore(folder, key)
    if store.complete() and set(targets) <= set(store):
        return store
    why = "the scorer loads the whole model"
    if stream is None:
        stream, why = stream_or_none(source, list(targets), torch.float32, device)
    if stream is None:
        raise PlannerError(f"{source.reference}: the data-aware initialisation needs a model that runs block by "
                           f"block ({why}); use --init loftq")
    if folder.is_dir():
        sweep_temps(folder)  # a killed run's half-written block files
    return collect_moments(stream, blocks, folder, key)


def data_init(source: ModelSource, targets: Sequence[Any], train: torch.Tensor, corpus_sha: str, cfg: Any,
              scorer: Scorer, imatrix_sha256: str | None = None) -> tuple[Mapping[str, torch.Tensor], Any]:
    """``--init loftq-data`` in the plan command: the moments over its calibration sequences
    ``train`` (cached; on the scorer's stream), or with ``cfg.imatrix`` the imatrix's diagonal ones
    (the file must still have ``imatrix_sha256`` when given), and the plan's InitRecord (rounding
    not set). ``cfg``: the PlanConfig; ``targets``: TargetLayers."""
    from planner.artifact.records import DEFAULT_DAMP, InitRecord

    names = [t.name for t in targets]
    record = dict(data=cfg.data, seqs=cfg.calib_seqs, seq_len=cfg.calib_seq_len, corpus=corpus_sha, damp=DEFAULT_DAMP)
    if cfg.imatrix:
        moments = imatrix_moments(cfg.imatrix, names, {t.name: int(t.shape[-1]) for t in targets}, imatrix_sha256)
        return moments, InitRecord("loftq-data", **record, imatrix=cfg.imatrix, imatrix_sha256=moments.sha256)
    moments = input_moments(source, names, train, corpus_sha, cache_dir=cfg.cache_path, device=scorer.device,
                            stream=scorer.stream)
    return moments, InitRecord("loftq-data", **record)


def plan_moments(source: ModelSource, targets: Sequence[str], init: Any, device: torch.device | str = "cpu",
                 cache_dir: Path | None = None) -> tuple[Mapping[str, torch.Tensor], str | None]:
    """What materialize needs for a data-aware plan (``init``: its InitRecord): the moments over the
    plan's calibration sequences, from the cache (the plan command left them there) or recomputed,
    and the calibration text's fingerprint. The text must be the one the plan recorded. With
    ``init.imatrix`` (the file materialize was given), its diagonal moments, the file's sha256
    checked against ``init.imatrix_sha256``, and the recorded fingerprint (no text is read)."""
    if init.imatrix is not None:
        return imatrix_moments(init.imatrix, targets, sha256=init.imatrix_sha256), init.corpus
    blocks, corpus = calibration_blocks(source, init.data, init.seqs, init.seq_len)
    if init.corpus is not None and corpus != init.corpus:
        raise PlannerError(f"the calibration text {init.data or 'pydoc'} is not the one the plan was made with "
                           f"(fingerprint {corpus} vs {init.corpus}); pass that text, or re-plan")
    key = moments_key(source.weights_sha256(), targets, corpus, tuple(blocks.shape))
    if not MomentStore((cache_dir or default_cache_dir()) / "moments" / key, key).complete():
        log.info("input moments of %s are not in the cache: computing them (%d x %d tokens)",
                 source.reference, *blocks.shape)
    return input_moments(source, targets, blocks, corpus, cache_dir=cache_dir, device=device), corpus

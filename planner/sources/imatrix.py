"""llama.cpp importance matrices: read what ``llama-imatrix`` writes, write what ``llama-quantize
--imatrix`` reads (llama.cpp 0c1e57098, ``common/imatrix-loader.cpp``, ``tools/imatrix``).

The importance of input column j of a weight tensor is the mean of x_j^2 over the activation rows
(tokens) that reached it: fp32 [in], keyed by the GGUF tensor name (``blk.3.ffn_down.weight``).
:func:`hf_module_name` / :func:`gguf_tensor_name` map llama-family names to the planner's
(``model.layers.3.mlp.down_proj``). Both file formats:

GGUF (what llama-imatrix writes unless told ``--output-format dat``): metadata ``general.type = "imatrix"``, ``imatrix.datasets``
(array of strings), ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (uint32; ``llama-quantize``
refuses a GGUF imatrix lacking any of the three); per tensor ``<name>.in_sum2`` (F32, ggml dims
[in, n_mat]: the *sum* of x_j^2) and ``<name>.counts`` (F32, [1, n_mat]: the rows summed), in
the order of the sorted names; a trailing dim of 1 is not stored (a 2-D weight's are [in] and [1]).
Importance = in_sum2 / counts; a zero count means "no data" and becomes 1.0, as ``llama-quantize``
does. n_mat > 1 only for 3-D expert tensors (MoE ``*_exps``).

Legacy ``.dat`` (little-endian, no header): int32 n_entries; per entry int32 name length, the name
bytes (no NUL), int32 ncall, int32 nval, float32[nval] values; then, optionally, int32 chunk count,
int32 length and the dataset name. Values are already normalised: (sum / count) * ncall, with
ncall = ceil(count / chunk_size), so importance = value / ncall (taken as is when ncall <= 0, as
``llama-quantize`` does); the chunk size is not stored.

Not supported: 3-D expert tensors (GGUF n_mat > 1, or a ``*_exps`` name in either format): they
are skipped with a warning and listed in :attr:`Imatrix.skipped`, never merged into a 2-D entry.
Non-llama Hugging Face names: GGUF names work for every architecture, the HF mapping covers the
llama family (llama, mistral, qwen2, SmolLM2: ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``).

File I/O only. Imports numpy, torch, gguf, :mod:`planner.errors` and the one atomic writer
(:mod:`planner.files.atomic`); nothing else from planner.
"""
from __future__ import annotations

import hashlib
import logging
import math
import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from planner.files.atomic import atomic_write_path
from planner.errors import PlannerError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
KEY_TYPE, KEY_DATASETS = "general.type", "imatrix.datasets"
KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.chunk_count", "imatrix.chunk_size"
SUMS, COUNTS = ".in_sum2", ".counts"
CHUNK_SIZE = 512  # llama-imatrix's default context (-c 512): tokens per chunk
# GGUF leaf -> Hugging Face module suffix of the llama family (agrees with gguf's TensorNameMap for
# MODEL_ARCH.LLAMA; tests/planner/sources/test_imatrix.py checks it on SmolLM2's 30 layers)
LLAMA_MODULES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
_HF_LEAF = {hf: leaf for leaf, hf in LLAMA_MODULES.items()}
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(self_attn\.\w+|mlp\.\w+)")


@dataclass(frozen=True)
class Imatrix:
    """One importance-matrix file, read.

    ``importance``: GGUF tensor name -> fp32 [in], the mean of x_j^2 per input column.
    ``counts``: the same names -> GGUF: activation rows (tokens) summed; legacy: ncall (chunks).
    ``chunk_size`` is 0 when the file does not say (legacy). ``fmt``: ``gguf`` or ``dat``.
    ``skipped``: entries not read (3-D expert tensors).
    """

    importance: dict[str, torch.Tensor]
    counts: dict[str, int]
    datasets: tuple[str, ...]
    chunk_count: int
    chunk_size: int
    fmt: str
    skipped: tuple[str, ...] = field(default=())

    def by_module(self) -> dict[str, torch.Tensor]:
        """``importance`` keyed by Hugging Face module name (llama family; ``output.weight`` -> ``lm_head``)."""
        return {hf_module_name(name): values for name, values in self.importance.items()}


# -- names --------------------------------------------------------------------------------------

def hf_module_name(gguf_name: str) -> str:
    """``blk.3.ffn_down.weight`` -> ``model.layers.3.mlp.down_proj`` (llama family); else PlannerError."""
    if gguf_name == "output.weight":
        return "lm_head"
    m = _GGUF_BLOCK.fullmatch(gguf_name)
    if m is None or m.group(2) not in LLAMA_MODULES:
        raise PlannerError(f"GGUF tensor {gguf_name!r} has no llama-family Hugging Face module "
                           f"(known: blk.N.{{{','.join(LLAMA_MODULES)}}}.weight, output.weight)")
    return f"model.layers.{m.group(1)}.{LLAMA_MODULES[m.group(2)]}"


def gguf_tensor_name(name: str) -> str:
    """A GGUF weight name (any architecture: ``blk.N.<leaf>.weight``, ``output.weight``) as is, or a
    llama-family Hugging Face module name (``model.layers.3.mlp.down_proj``, ``.weight`` allowed)
    mapped to its GGUF name; else PlannerError."""
    if name == "output.weight" or _GGUF_BLOCK.fullmatch(name):
        return name
    module = name.removesuffix(".weight")
    if module == "lm_head":
        return "output.weight"
    m = _HF_BLOCK.fullmatch(module)
    if m is None or m.group(2) not in _HF_LEAF:
        raise PlannerError(f"{name!r} is neither a GGUF weight name (blk.N.<leaf>.weight) nor a llama-family "
                           f"module (model.layers.N.{{{','.join(_HF_LEAF)}}}, lm_head)")
    return f"blk.{m.group(1)}.{_HF_LEAF[m.group(2)]}.weight"


def _is_expert(name: str) -> bool:
    """A merged 3-D expert tensor (``blk.0.ffn_down_exps.weight``), not a shared expert (``_shexp``)."""
    return re.search(r"_exps?\.", name) is not None


# -- reading ------------------------------------------------------------------------------------

def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of every byte of ``path`` (what a plan records of its imatrix); PlannerError naming it
    when it cannot be read or is not a regular file."""
    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise PlannerError(f"imatrix {path} is not a regular file (a directory, device, FIFO or socket)")
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    except OSError as err:
        raise PlannerError(f"imatrix {path}: cannot read it ({err.strerror or err})") from None
    return h.hexdigest()


def read_imatrix(path: str | os.PathLike, *, in_features: Mapping[str, int] | None = None) -> Imatrix:
    """Read a GGUF or legacy ``.dat`` imatrix (told apart by the GGUF magic, as llama.cpp does).

    ``in_features``: optional layer widths (GGUF or HF names -> in); an entry of another length is
    an error. Any unreadable, truncated or corrupt file is one PlannerError naming it.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise PlannerError(f"imatrix {path}: cannot read it ({err.strerror or err})") from None
    if not stat.S_ISREG(mode):
        raise PlannerError(f"imatrix {path} is not a regular file (a directory, device, FIFO or socket)")
    try:
        with open(path, "rb") as fh:
            if fh.read(4) == GGUF_MAGIC:
                imatrix = _read_gguf(path)
            elif os.fstat(fh.fileno()).st_size == 0:
                imatrix = _read_dat(path, b"")
            else:  # mapped, not read: a large file handed here by mistake fails at its first bad length
                with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    imatrix = _read_dat(path, data)
    except OSError as err:
        raise PlannerError(f"imatrix {path}: cannot read it ({err.strerror or err})") from None
    if imatrix.skipped:
        log.warning("%s: %d 3-D expert tensor(s) skipped (not supported), e.g. %s", path, len(imatrix.skipped),
                    imatrix.skipped[0])
    if in_features is not None:
        _check_widths(path, imatrix.importance, in_features)
    return imatrix


def _check_values(path: Path, name: str, values: np.ndarray, what: str = "values") -> None:
    """Finite and non-negative (sums of squares and counts can be neither negative nor NaN)."""
    if values.size == 0:
        raise PlannerError(f"imatrix {path}: {name} has no {what}")
    if not np.isfinite(values).all():
        raise PlannerError(f"imatrix {path}: {name} has non-finite {what} (NaN or inf)")
    if (values < 0).any():
        raise PlannerError(f"imatrix {path}: {name} has negative {what} (min {float(values.min()):g})")


def _check_widths(path: Path, importance: Mapping[str, torch.Tensor], in_features: Mapping[str, int]) -> None:
    widths = {gguf_tensor_name(k): int(v) for k, v in in_features.items()}
    for name, values in importance.items():
        if name in widths and values.numel() != widths[name]:
            raise PlannerError(f"imatrix {path}: {name} has {values.numel()} values, the layer takes "
                               f"{widths[name]} inputs (an imatrix of another model?)")


def _gguf_reader(path: Path):  # noqa: ANN202 - gguf is imported lazily
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # gguf raises ValueError, IndexError, KeyError... on a bad file
        detail = " ".join(str(err).split())  # one line, whatever gguf put in its message
        raise PlannerError(f"imatrix {path}: not a readable GGUF file, truncated or corrupt "
                           f"({type(err).__name__}: {detail})") from None


def _field(path: Path, reader, key: str):  # noqa: ANN001, ANN202
    f = reader.fields.get(key)
    try:
        return None if f is None else f.contents()
    except Exception as err:
        raise PlannerError(f"imatrix {path}: metadata {key} is corrupt ({type(err).__name__})") from None


def _read_gguf(path: Path) -> Imatrix:
    """See the module docstring for the layout."""
    reader = _gguf_reader(path)
    kind = _field(path, reader, KEY_TYPE)
    if kind is not None and kind != "imatrix":
        raise PlannerError(f"imatrix {path}: a GGUF file of type {kind!r}, not an imatrix (general.type)")
    pairs: dict[str, dict[str, Any]] = {}
    for t in reader.tensors:
        for suffix in (SUMS, COUNTS):
            if t.name.endswith(suffix):
                pairs.setdefault(t.name.removesuffix(suffix), {})[suffix] = t
    if not pairs:
        raise PlannerError(f"imatrix {path}: a GGUF file without imatrix tensors (<name>{SUMS}, <name>{COUNTS})")
    importance, counts, skipped = {}, {}, []
    for name in sorted(pairs):
        entry = _gguf_entry(path, name, pairs[name])
        if entry is None:
            skipped.append(name)
        else:
            importance[name], counts[name] = entry
    return Imatrix(importance, counts, tuple(_str_list(path, reader)), int(_field(path, reader, KEY_CHUNK_COUNT) or 0),
                   int(_field(path, reader, KEY_CHUNK_SIZE) or 0), "gguf", tuple(skipped))


def _gguf_entry(path: Path, name: str, pair: Mapping[str, Any]) -> tuple[torch.Tensor, int] | None:
    """(importance fp32 [in], count) of one in_sum2/counts pair; None for a 3-D expert tensor."""
    import gguf

    if set(pair) != {SUMS, COUNTS}:
        raise PlannerError(f"imatrix {path}: {name} has no {name}{SUMS if SUMS not in pair else COUNTS} tensor")
    if {pair[SUMS].tensor_type, pair[COUNTS].tensor_type} != {gguf.GGMLQuantizationType.F32}:
        raise PlannerError(f"imatrix {path}: {name}'s sums and counts must be F32")
    # copies: nothing keeps a view of the reader's memory map
    sums = np.array(pair[SUMS].data, dtype=np.float32).reshape(-1)
    n = np.array(pair[COUNTS].data, dtype=np.float32).reshape(-1)
    _check_values(path, name + SUMS, sums)
    _check_values(path, name + COUNTS, n, "counts")
    if sums.size % n.size:
        raise PlannerError(f"imatrix {path}: {name} has {sums.size} sums for {n.size} counts (wrong length)")
    if n.size > 1 or _is_expert(name):
        return None
    count = float(np.round(n[0]))
    if count == 0:
        log.warning("%s: %s has a zero count (no data); importance 1.0, as llama-quantize uses", path, name)
        return torch.ones(sums.size), 0
    return torch.from_numpy(sums / np.float32(count)), int(count)


def _str_list(path: Path, reader) -> list[str]:  # noqa: ANN001
    value = _field(path, reader, KEY_DATASETS)
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


class _Cursor:
    """Little-endian reads from ``data``; running past its end is one 'truncated' PlannerError."""

    def __init__(self, path: Path, data: bytes | mmap.mmap) -> None:
        self.path, self.data, self.pos = path, data, 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.left:
            raise PlannerError(f"imatrix {self.path}: truncated or corrupt legacy .dat file (at byte {self.pos}: "
                               f"{what} needs {n} bytes, {self.left} left)")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]


def _read_dat(path: Path, data: bytes | mmap.mmap) -> Imatrix:
    """See the module docstring for the layout."""
    cur = _Cursor(path, data)
    n_entries = cur.i32("the entry count")
    if n_entries < 1:
        raise PlannerError(f"imatrix {path}: not an imatrix (no GGUF magic; as legacy .dat: {n_entries} entries)")
    importance, counts, skipped = {}, {}, []
    for i in range(n_entries):
        raw = cur.take(cur.i32(f"entry {i}'s name length"), f"entry {i}'s name")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PlannerError(f"imatrix {path}: corrupt legacy .dat file (entry {i}'s name is not UTF-8)") from None
        ncall, nval = cur.i32(f"{name}'s ncall"), cur.i32(f"{name}'s value count")
        if nval < 1:
            raise PlannerError(f"imatrix {path}: corrupt legacy .dat file ({name} has {nval} values)")
        values = np.frombuffer(cur.take(4 * nval, f"{name}'s {nval} values"), dtype="<f4").astype(np.float32)
        _check_values(path, name, values)
        if name in importance or name in skipped:
            raise PlannerError(f"imatrix {path}: corrupt legacy .dat file ({name} appears twice)")
        if _is_expert(name):
            skipped.append(name)
            continue
        importance[name] = torch.from_numpy(values / np.float32(ncall) if ncall > 0 else values)
        counts[name] = ncall
    chunk_count, datasets = 0, ()
    if cur.left:  # optional trailer, always written by llama-imatrix
        chunk_count = cur.i32("the chunk count")
        raw = cur.take(cur.i32("the dataset name length"), "the dataset name")
        datasets = (raw.decode("utf-8", errors="replace"),) if raw else ()
        if cur.left:
            raise PlannerError(f"imatrix {path}: corrupt legacy .dat file ({cur.left} stray bytes at the end)")
    return Imatrix(importance, counts, datasets, chunk_count, 0, "dat", tuple(skipped))


# -- writing ------------------------------------------------------------------------------------

def write_imatrix(path: str | os.PathLike, importance: Mapping[str, torch.Tensor | np.ndarray], *,
                  tokens: int | Mapping[str, int] = CHUNK_SIZE, datasets: tuple[str, ...] = ("loftq-planner",),
                  chunk_size: int = CHUNK_SIZE, chunk_count: int | None = None, fmt: str = "gguf",
                  in_features: Mapping[str, int] | None = None) -> Path:
    """Write per-column importance (name -> [in], mean of x_j^2; GGUF or llama-family HF names) as an
    imatrix ``llama-quantize --imatrix`` accepts, atomically; returns ``path``.

    ``tokens``: the activation rows behind each entry (one number or per name); GGUF stores
    sums = importance * tokens, so a power of two (the default 512) reads back bit-exact.
    ``chunk_count`` defaults to ceil(max tokens / chunk_size). ``fmt``: ``gguf`` or ``dat`` (legacy).
    """
    if fmt not in _WRITERS:
        raise ValueError(f"fmt must be one of {sorted(_WRITERS)}, got {fmt!r}")
    if not datasets or not all(isinstance(d, str) and d for d in datasets):
        raise ValueError(f"datasets must be non-empty strings (llama-quantize needs the key), got {datasets!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    path = Path(path)
    entries = _entries(path, importance, tokens)
    if in_features is not None:
        _check_widths(path, {k: torch.from_numpy(v) for k, (v, _) in entries.items()}, in_features)
    if chunk_count is None:
        chunk_count = max(1, math.ceil(max(n for _, n in entries.values()) / chunk_size))
    write = _WRITERS[fmt]
    return atomic_write_path(path, lambda tmp: write(tmp, entries, datasets, chunk_size, int(chunk_count)))


def _entries(path: Path, importance: Mapping[str, torch.Tensor | np.ndarray],
             tokens: int | Mapping[str, int]) -> dict[str, tuple[np.ndarray, int]]:
    """GGUF name -> (fp32 [in] importance, tokens), sorted by name, checked."""
    if not importance:
        raise PlannerError(f"imatrix {path}: nothing to write (no entries)")
    out: dict[str, tuple[np.ndarray, int]] = {}
    for key, values in importance.items():
        name = gguf_tensor_name(key)
        if name in out:
            raise PlannerError(f"imatrix {path}: {key!r} and another key both name {name}")
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().to(torch.float32).numpy()
        values = np.ascontiguousarray(values, dtype=np.float32)
        if values.ndim != 1:
            raise PlannerError(f"imatrix {path}: {key} has shape {list(values.shape)}; expected one value per "
                               "input column ([in]); 3-D expert tensors are not supported")
        _check_values(path, key, values)
        n = int(tokens[key] if isinstance(tokens, Mapping) else tokens)
        if not 1 <= n <= 1 << 24:  # counts are stored as float32: integers above 2^24 are not exact
            raise PlannerError(f"imatrix {path}: {key} has a token count of {n}; expected 1 .. 2^24")
        out[name] = (values, n)
    return dict(sorted(out.items()))


def _write_gguf(tmp: Path, entries: Mapping[str, tuple[np.ndarray, int]], datasets: tuple[str, ...],
                chunk_size: int, chunk_count: int) -> None:
    import gguf

    writer = gguf.GGUFWriter(tmp, arch="")  # an empty arch writes no general.architecture, as llama.cpp
    writer.add_type("imatrix")
    writer.add_array(KEY_DATASETS, list(datasets))
    writer.add_uint32(KEY_CHUNK_COUNT, chunk_count)
    writer.add_uint32(KEY_CHUNK_SIZE, chunk_size)
    for name, (values, n) in entries.items():
        # 1-D, as llama.cpp stores ggml [in, 1] and [1, 1] (GGUF drops trailing dims of 1)
        writer.add_tensor(name + SUMS, values * np.float32(n))
        writer.add_tensor(name + COUNTS, np.full(1, n, dtype=np.float32))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _write_dat(tmp: Path, entries: Mapping[str, tuple[np.ndarray, int]], datasets: tuple[str, ...],
               chunk_size: int, chunk_count: int) -> None:
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<i", len(entries)))
        for name, (values, n) in entries.items():
            raw = name.encode("utf-8")
            ncall = math.ceil(n / chunk_size)  # llama-imatrix's ceiling: never a zero ncall
            fh.write(struct.pack("<i", len(raw)) + raw)
            fh.write(struct.pack("<ii", ncall, values.size))
            fh.write((values * np.float32(ncall)).astype("<f4").tobytes())
        dataset = datasets[-1].encode("utf-8")  # one name fits; llama-imatrix writes its last
        fh.write(struct.pack("<ii", chunk_count, len(dataset)) + dataset)


_WRITERS: dict[str, Callable[..., None]] = {"gguf": _write_gguf, "dat": _write_dat}

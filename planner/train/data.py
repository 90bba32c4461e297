"""Calibration / proxy / evaluation text: one corpus, three deterministic splits, token blocks.

Sources (``CorpusConfig.source``):

- ``"pydoc"`` (default, offline): the English text of Python's own ``pydoc_data.topics`` — the
  values of the ``topics`` dict in sorted key order, joined by blank lines (~465 k chars on
  Python 3.11). The text depends on the Python version; :attr:`Corpus.sha256` records which.
- a file: ``.jsonl`` / ``.ndjson`` = one JSON object per line with a ``text`` field (records are
  joined by blank lines); anything else = UTF-8 plain text.
- ``"hf:NAME[:CONFIG[:SPLIT]]"``: a Hugging Face dataset (needs ``datasets`` and a network or its
  cache); its ``text`` column is joined like JSONL records.

Splitting. Verbatim repeats of earlier paragraphs are dropped (``dedupe``; pydoc topics repeat
~19% of their text, e.g. the special-method sections, and the copies would otherwise sit in two
splits). The text is cut into chunks of about ``chunk_chars`` characters on paragraph (blank
line) boundaries; each chunk is ranked by ``sha256(f"{seed}:{index}:{chunk}")`` and the first
``round(test·n)`` go to ``test``, the next ``round(val·n)`` to ``val``, the rest to ``train``; each
split keeps document order. So the splits are disjoint, reproducible across runs, machines and
Python hash seeds, and topically alike (a contiguous cut would give ``test`` only the
alphabetically last pydoc topics). Neighbouring chunks of one topic can land in different splits:
the texts are disjoint, not independent.

Use: ``train`` for calibration statistics and fine-tune proxies; ``val`` for proxy scores that
choose between plans; ``test`` only for the perplexities a benchmark reports — never for a choice.

Evaluation texts (:func:`load_eval_text`): files listed in a ``MANIFEST.json`` with their sha256,
read unchanged and verified, e.g. the benches' out-of-domain text in ``bench/texts/``. They are no
corpus source: nothing here or in the planner reads one unless a caller names the manifest, so the
planner never calibrates on them.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from planner.errors import PlannerError

SPLITS = ("train", "val", "test")
PYDOC = "pydoc"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
_PARAGRAPH = re.compile(r"\n[ \t]*\n+")
DEDUPE_MIN_CHARS = 32  # shorter repeats ("Example:", "Added in version 3.8.") carry no content


@dataclass(frozen=True)
class CorpusConfig:
    """Where the text comes from and how it is split (fractions: train, val, test)."""

    source: str = PYDOC
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    chunk_chars: int = 2000
    text_field: str = "text"
    dedupe: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"source must be 'pydoc', a file path or hf:NAME, got {self.source!r}")
        fr = tuple(self.fractions)
        if len(fr) != 3 or any(not isinstance(f, (int, float)) or isinstance(f, bool) or not math.isfinite(f)
                               or f < 0 for f in fr):
            raise ValueError(f"fractions must be three non-negative numbers (train, val, test), got {self.fractions!r}")
        if abs(sum(fr) - 1.0) > 1e-9 or fr[0] <= 0:
            raise ValueError(f"fractions must sum to 1 with train > 0, got {self.fractions!r}")
        object.__setattr__(self, "fractions", tuple(float(f) for f in fr))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.chunk_chars, int) or isinstance(self.chunk_chars, bool) or self.chunk_chars < 64:
            raise ValueError(f"chunk_chars must be an integer >= 64, got {self.chunk_chars!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"text_field must be a non-empty string, got {self.text_field!r}")
        if not isinstance(self.dedupe, bool):
            raise ValueError(f"dedupe must be a bool, got {self.dedupe!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fractions": list(self.fractions)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CorpusConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown corpus setting(s) {', '.join(unknown)}")
        return cls(**{**d, "fractions": tuple(d.get("fractions", cls.fractions))})


@dataclass(frozen=True)
class Split:
    """One split: its chunks in document order."""

    name: str
    chunks: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n\n".join(self.chunks)

    @property
    def n_chars(self) -> int:
        return sum(len(c) for c in self.chunks)


@dataclass(frozen=True)
class Corpus:
    """The three splits of one source; ``sha256`` identifies the source text (for cache keys)."""

    config: CorpusConfig
    sha256: str
    train: Split
    val: Split
    test: Split

    @property
    def fingerprint(self) -> str:
        """Identifies text + split settings (for cache keys and plan provenance)."""
        blob = json.dumps({"text": self.sha256, **self.config.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; known: {', '.join(SPLITS)}")
        return getattr(self, name)


# -- sources ------------------------------------------------------------------------------------

def pydoc_text() -> str:
    """The default corpus: pydoc topics in sorted key order, joined by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def load_text(source: str = PYDOC, text_field: str = "text") -> str:
    """The raw text of a source (see the module docstring); bad data raises a one-line PlannerError."""
    if source == PYDOC:
        return pydoc_text()
    if source.startswith("hf:"):
        return _dataset_text(source, text_field)
    path = Path(source)
    if not path.exists():
        raise PlannerError(f"{source}: data file not found (for a Hugging Face dataset write hf:NAME)")
    if path.is_dir():
        raise PlannerError(f"{source}: is a folder, expected a .txt or .jsonl file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise PlannerError(f"{source}: cannot read data file ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PlannerError(f"{source}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    if "\x00" in text:
        raise PlannerError(f"{source}: looks binary (NUL bytes), expected text or JSONL")
    if path.suffix.lower() in JSONL_SUFFIXES:
        text = _jsonl_text(source, text, text_field)
    if not text.strip():
        raise PlannerError(f"{source}: no text in data file")
    return text


def _jsonl_text(source: str, text: str, field: str) -> str:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PlannerError(f"{source}: line {number} is not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise PlannerError(f"{source}: line {number} has no string {field!r} field")
        if record[field].strip():
            records.append(record[field])
    if not records:
        raise PlannerError(f"{source}: no text in data file (no non-empty {field!r} fields)")
    return "\n\n".join(records)


def _dataset_text(spec: str, field: str) -> str:
    parts = spec[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 3:
        raise PlannerError(f"{spec}: expected hf:NAME[:CONFIG[:SPLIT]]")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), \
        (parts[2] if len(parts) > 2 else "train")
    try:
        import datasets
    except ImportError:
        raise PlannerError(f"{spec}: the 'datasets' package is not installed (pip install datasets), "
                           "or pass --data FILE") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, unknown name, bad config: all mean "cannot use this data"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PlannerError(f"{spec}: cannot load dataset (offline or unknown name?): {first}") from None
    if field not in ds.column_names:
        raise PlannerError(f"{spec}: dataset has no {field!r} column (columns: {', '.join(ds.column_names)})")
    text = "\n\n".join(t for t in ds[field] if isinstance(t, str) and t.strip())
    if not text:
        raise PlannerError(f"{spec}: dataset has no text")
    return text


# -- splitting ----------------------------------------------------------------------------------

def chunk_text(text: str, chunk_chars: int, dedupe: bool = True) -> list[str]:
    """Paragraphs packed greedily into chunks of >= ``chunk_chars`` (the last may be shorter).

    ``dedupe``: a paragraph of >= DEDUPE_MIN_CHARS that repeats an earlier one verbatim is dropped
    (pydoc topics repeat ~19% of their text; kept, the copies would leak across splits). A
    paragraph longer than twice the size is cut at whitespace (or hard, if it has none)."""
    pieces: list[str] = []
    seen: set[str] = set()
    for para in _PARAGRAPH.split(text):
        para = para.strip("\n").rstrip()
        if not para.strip():
            continue
        if dedupe and len(para) >= DEDUPE_MIN_CHARS:
            if para in seen:
                continue
            seen.add(para)
        while len(para) > 2 * chunk_chars:
            window = (chunk_chars // 2, chunk_chars + 1)
            cut = max(para.rfind(" ", *window), para.rfind("\n", *window))
            cut = cut if cut > 0 else chunk_chars
            pieces.append(para[:cut])
            para = para[cut:].lstrip()
        pieces.append(para)
    chunks, current = [], []
    size = 0
    for piece in pieces:
        current.append(piece)
        size += len(piece)
        if size >= chunk_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def split_chunks(chunks: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, list[int]]:
    """Chunk indices of each split (see the module docstring), each in increasing order."""
    n = len(chunks)
    counts = [0, 0, 0]
    for i in (2, 1):  # test, val: at least one chunk when asked for any
        counts[i] = max(1, round(fractions[i] * n)) if fractions[i] > 0 else 0
    counts[0] = n - counts[1] - counts[2]
    if counts[0] < 1:
        raise PlannerError(f"data too small to split: {n} chunk(s) of ~{len(chunks[0]) if chunks else 0} chars; "
                           "give more text")
    rank = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{i}:{chunks[i]}".encode()).digest())
    test, val, train = rank[:counts[2]], rank[counts[2]:counts[2] + counts[1]], rank[counts[2] + counts[1]:]
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def load_corpus(config: CorpusConfig | None = None) -> Corpus:
    """Read the source and split it; raises PlannerError (one line) on bad or too little data."""
    config = config or CorpusConfig()
    text = load_text(config.source, config.text_field)
    chunks = chunk_text(text, config.chunk_chars, config.dedupe)
    index = split_chunks(chunks, config.fractions, config.seed)
    splits = {name: Split(name, tuple(chunks[i] for i in idx)) for name, idx in index.items()}
    return Corpus(config, hashlib.sha256(text.encode()).hexdigest(), **splits)


# -- tokens -------------------------------------------------------------------------------------

def token_blocks(tokenizer: Any, split: Split | str, seq_len: int, max_tokens: int | None = None,
                 batch_chunks: int = 64) -> torch.Tensor:
    """Tokenize a split into consecutive, non-overlapping blocks: LongTensor [n_blocks, seq_len].

    ``tokenizer`` is a Hugging Face tokenizer; no special tokens are added. Chunks are tokenized
    separately (each but the last followed by the blank line that joins them), in batches, and
    tokenization stops once ``max_tokens`` are there; the leftover tail (< ``seq_len``) is dropped.
    Raises PlannerError when not even one block fits.
    """
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or max_tokens < seq_len):
        raise ValueError(f"max_tokens must be an integer >= seq_len ({seq_len}), got {max_tokens!r}")
    name, chunks = (split.name, split.chunks) if isinstance(split, Split) else ("text", (split,))
    texts = [c + "\n\n" for c in chunks[:-1]] + list(chunks[-1:])
    ids: list[int] = []
    for start in range(0, len(texts), batch_chunks):
        batch = tokenizer(texts[start:start + batch_chunks], add_special_tokens=False, verbose=False)
        for row in batch["input_ids"]:
            ids.extend(row)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    usable = len(ids) if max_tokens is None else min(len(ids), max_tokens)
    n_blocks = usable // seq_len
    if n_blocks == 0:
        raise PlannerError(f"split {name!r} has {len(ids)} tokens, fewer than one block of {seq_len}")
    return torch.tensor(ids[:n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


# -- evaluation texts ---------------------------------------------------------------------------

EVAL_TEXT_SCHEMA = 1


def load_eval_text(manifest: str | Path) -> Split:
    """The evaluation text a manifest lists: a Split named after the manifest's ``name`` whose chunks
    are its files' texts (UTF-8, unchanged) in manifest order.

    ``manifest``: a JSON file ``{"schema_version": 1, "name": ..., "files": [{"file": NAME (next to
    the manifest), "sha256": HEX, ...}, ...]}``. Every file is read and hashed; any missing file or
    sha256 mismatch raises one PlannerError naming all of them."""
    path = Path(manifest)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise PlannerError(f"{path}: cannot read evaluation-text manifest ({err.strerror or err})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PlannerError(f"{path}: evaluation-text manifest is not JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("schema_version") != EVAL_TEXT_SCHEMA:
        raise PlannerError(f"{path}: expected schema_version {EVAL_TEXT_SCHEMA} in the evaluation-text manifest")
    entries = doc.get("files")
    if (not isinstance(doc.get("name"), str) or not isinstance(entries, list) or not entries
            or any(not isinstance(e, dict) or not isinstance(e.get("file"), str) or not isinstance(e.get("sha256"), str)
                   for e in entries)):
        raise PlannerError(f"{path}: the manifest needs a name and a non-empty files list of {{file, sha256}}")
    texts, problems = [], []
    for entry in entries:
        file = path.parent / entry["file"]
        try:
            raw = file.read_bytes()
        except OSError as err:
            problems.append(f"{entry['file']}: cannot read ({err.strerror or err})")
            continue
        digest = hashlib.sha256(raw).hexdigest()
        if digest != entry["sha256"].lower():
            problems.append(f"{entry['file']}: sha256 {digest[:12]}… != manifest {entry['sha256'][:12]}…")
            continue
        texts.append(raw.decode("utf-8"))
    if problems:
        raise PlannerError(f"{path}: evaluation text does not match its manifest (changed or missing files must be "
                           f"restored, or the manifest regenerated): {'; '.join(problems)}")
    return Split(doc["name"], tuple(texts))

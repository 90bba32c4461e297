"""``python -m planner imatrix``: the planner's calibration importance written as a llama.cpp imatrix
reads back (GGUF and legacy .dat) equal, to fp32, to the diagonal of the moments the plan command
uses; its output obeys the project's output rules; a model llama.cpp's names do not cover is one line."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from planner import progress
from planner.cli.app import main
from planner.scoring.moments import calibration_blocks, input_moments
from planner.sources import resolve
from planner.sources.imatrix import gguf_tensor_name, read_imatrix
from tests.tiny_models import save_tiny_checkpoint, save_tiny_llama_with_real_tokenizer


@pytest.fixture(autouse=True)
def _quiet() -> None:
    progress.set_enabled(False)
    yield
    progress.set_enabled(True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama_with_real_tokenizer(tmp_path_factory.mktemp("tiny-llama"))


def test_round_trip_equals_the_moments_diagonal(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    common = ["--model", str(tiny_dir), "--calib-seqs", "2", "--calib-seq-len", "64", "--cache-dir", str(cache)]
    assert main(["imatrix", *common, "--out", str(tmp_path / "im.gguf")]) == 0
    assert capsys.readouterr().out.startswith("imatrix of 21 layers over 2 x 64 tokens of pydoc -> ")
    assert main(["imatrix", *common, "--out", str(tmp_path / "im.dat"), "--format", "dat"]) == 0  # moments cached
    src = resolve(str(tiny_dir))
    names = [t.name for t in src.targets()]
    blocks, corpus = calibration_blocks(src, None, 2, 64)
    assert tuple(blocks.shape) == (2, 64)
    store = input_moments(src, names, blocks, corpus, cache_dir=tmp_path / "fresh")  # computed again, not read
    gguf, dat = read_imatrix(tmp_path / "im.gguf"), read_imatrix(tmp_path / "im.dat")
    assert (gguf.fmt, gguf.chunk_count, gguf.chunk_size, gguf.datasets) == ("gguf", 2, 64, ("pydoc",))
    assert (dat.fmt, dat.chunk_count, dat.datasets) == ("dat", 2, ("pydoc",))
    assert set(gguf.importance) == set(dat.importance) == {gguf_tensor_name(n) for n in names}
    for name in names:
        want = store[name].diagonal()
        assert want.dtype == torch.float32 and float(want.min()) > 0
        assert torch.equal(gguf.by_module()[name], want), name  # 128 tokens: a power of two, bit-exact
        assert torch.equal(dat.by_module()[name], want), name
        assert gguf.counts[gguf_tensor_name(name)] == 128 and dat.counts[gguf_tensor_name(name)] == 2
    # one input, one importance: q/k/v and gate/up carry the same vector
    q, k = gguf.importance["blk.1.attn_q.weight"], gguf.importance["blk.1.attn_k.weight"]
    assert torch.equal(q, k) and not torch.equal(q, gguf.importance["blk.1.attn_output.weight"])


def test_refusals_are_one_line_and_write_nothing(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "text.txt"
    text.write_text("some calibration text. " * 400)
    common = ["--calib-seqs", "1", "--calib-seq-len", "32", "--cache-dir", str(tmp_path / "cache")]
    cases = [(["--model", str(tiny_dir), "--data", str(text), "--out", str(text)], "is the calibration text"),
             (["--model", str(tiny_dir), "--out", str(tiny_dir / "config.json")], "model"),
             (["--model", str(tiny_dir), "--out", str(tmp_path / "x.gguf"), "--format", "bin"], "invalid choice"),
             (["--model", str(save_tiny_checkpoint("gpt2", tmp_path / "gpt2")), "--out", str(tmp_path / "x.gguf")],
              "has no llama.cpp tensor name (the imatrix mapping covers the llama family)")]
    for args, says in cases:
        before = text.read_bytes()
        assert main(["imatrix", *common, *args]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and says in err, err
        assert text.read_bytes() == before
    assert not (tmp_path / "x.gguf").exists()


def test_planning_with_its_own_imatrix_builds_the_q_of_the_calibration_moments(tiny_dir: Path, tmp_path: Path,
                                                                               capsys) -> None:
    """The planner's imatrix fed back with --imatrix (gguf, round to nearest): the plan records its
    sha256, materialize (given the file) works, and each stored GGUF Q is the one the calibration
    moments' diagonal gives: the same importance, whichever way it arrives."""
    import hashlib
    import json

    from loftq.gguf_quants import gguf_quantize
    from planner.artifact.layout import read_artifact, read_layer

    cache = tmp_path / "cache"
    calib = ["--calib-seqs", "2", "--calib-seq-len", "64", "--cache-dir", str(cache)]
    im = tmp_path / "own.imatrix.gguf"
    assert main(["imatrix", "--model", str(tiny_dir), *calib, "--out", str(im)]) == 0
    plan = tmp_path / "plan.json"
    assert main(["--model", str(tiny_dir), *calib, "--proxy-seqs", "1", "--quant", "gguf", "--rounding", "nearest",
                 "--bits", "4,8", "--ranks", "0,4", "--search", "exact", "--mode", "inference", "--seq-len", "128",
                 "--device", "cpu", "--budget", "19950000", "--imatrix", str(im), "--out", str(plan), "--json"]) == 0
    init = json.loads(plan.read_text())["init"]
    assert init["imatrix"] == str(im) and init["imatrix_sha256"] == hashlib.sha256(im.read_bytes()).hexdigest()
    assert main(["materialize", str(plan), "--out", str(tmp_path / "built"), "--device", "cpu",
                 "--imatrix", str(im)]) == 0
    src = resolve(str(tiny_dir))
    names = [t.name for t in src.targets()]
    blocks, corpus = calibration_blocks(src, None, 2, 64)
    store = input_moments(src, names, blocks, corpus, cache_dir=cache)
    weights = {t.name: w.float() for t, w in src.iter_weights(src.targets())}
    art = read_artifact(tmp_path / "built")
    planned = {layer["name"]: layer["quant"] for layer in json.loads(plan.read_text())["layers"]}
    quants = set(planned.values())
    for meta in art.meta.layers:
        quant = planned[meta.name]
        want = gguf_quantize(weights[meta.name], quant, importance=store[meta.name].diagonal())
        assert torch.equal(read_layer(art.backbone, meta).data, want.data), meta.name
    assert len(quants) >= 2, quants

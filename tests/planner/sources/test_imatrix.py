"""llama.cpp importance matrices: what write_imatrix writes reads back equal (GGUF and legacy .dat),
a legacy .dat built byte by byte per llama.cpp's layout reads as llama-quantize would, every bad
file is one PlannerError naming it, and the llama names map both ways on SmolLM2's 30 layers."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from planner.errors import PlannerError
from planner.sources import ModelSource, config_from_dict, shipped_models
from planner.sources.imatrix import (Imatrix, gguf_tensor_name, hf_module_name, read_imatrix,
                                     write_imatrix)
from tests.conftest import smollm2_gguf

N_LAYERS = 30


def _importance(seed: int = 0) -> dict[str, torch.Tensor]:
    """SmolLM2-shaped entries keyed by HF name: down_proj takes 1536 inputs, q_proj 576."""
    g = torch.Generator().manual_seed(seed)
    return {"model.layers.3.mlp.down_proj": torch.rand(1536, generator=g) * 5,
            "model.layers.0.self_attn.q_proj": torch.rand(576, generator=g),
            "lm_head": torch.rand(576, generator=g) + 1e-3}


def _dat(entries: list[tuple[str, int, list[float]]], trailer: tuple[int, str] | None) -> bytes:
    """A legacy .dat per llama.cpp's save_imatrix_legacy: int32 count; per entry int32 name length,
    name, int32 ncall, int32 nval, float32 values; then int32 chunk count, int32 length, dataset."""
    out = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        raw = name.encode()
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, len(values))
        out += struct.pack(f"<{len(values)}f", *values)
    if trailer is not None:
        out += struct.pack("<ii", trailer[0], len(trailer[1])) + trailer[1].encode()
    return out


def _gguf_by_hand(path: Path, tensors: dict[str, np.ndarray], kind: str = "imatrix") -> Path:
    """A GGUF written with gguf's own writer (no write_imatrix), for layouts ours never writes."""
    writer = gguf.GGUFWriter(path, arch="")
    writer.add_type(kind)
    writer.add_array("imatrix.datasets", ["by-hand.txt"])
    writer.add_uint32("imatrix.chunk_count", 3)
    writer.add_uint32("imatrix.chunk_size", 128)
    for name, array in tensors.items():
        writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_write_then_read_is_bit_exact_with_power_of_two_tokens(tmp_path: Path, fmt: str) -> None:
    imp = _importance()
    path = write_imatrix(tmp_path / f"imatrix.{fmt}", imp, tokens=1024, datasets=("a.txt", "b.txt"), fmt=fmt)
    got = read_imatrix(path)
    assert got.fmt == fmt and got.skipped == ()
    assert sorted(got.importance) == ["blk.0.attn_q.weight", "blk.3.ffn_down.weight", "output.weight"]
    for name, values in got.by_module().items():
        assert values.dtype == torch.float32 and torch.equal(values, imp[name]), name
    assert got.chunk_count == 2  # ceil(1024 / 512)
    if fmt == "gguf":  # sums and token counts, the whole metadata
        assert got.counts == dict.fromkeys(got.importance, 1024) and got.chunk_size == 512
        assert got.datasets == ("a.txt", "b.txt")
    else:  # ncall = chunks; one dataset name fits; no chunk size in the format
        assert got.counts == dict.fromkeys(got.importance, 2) and got.chunk_size == 0
        assert got.datasets == ("b.txt",)


def test_gguf_layout_is_llama_cpp_s(tmp_path: Path) -> None:
    """The keys llama-quantize requires, and per tensor in_sum2 [in] = mean * tokens, counts [1]."""
    imp = _importance()
    path = write_imatrix(tmp_path / "i.gguf", imp, tokens={k: 100 + i for i, k in enumerate(imp)})
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "imatrix" and "general.architecture" not in reader.fields
    assert reader.fields["imatrix.datasets"].contents() == ["loftq-planner"]
    assert reader.fields["imatrix.chunk_count"].types == [gguf.GGUFValueType.UINT32]
    tensors = {t.name: t for t in reader.tensors}
    sums, counts = tensors["blk.3.ffn_down.weight.in_sum2"], tensors["blk.3.ffn_down.weight.counts"]
    assert list(sums.shape) == [1536] and list(counts.shape) == [1]  # ggml [1536, 1], [1, 1] as llama.cpp stores them
    assert sums.tensor_type == counts.tensor_type == gguf.GGMLQuantizationType.F32
    assert float(counts.data[0]) == 100
    np.testing.assert_array_equal(sums.data, imp["model.layers.3.mlp.down_proj"].numpy() * np.float32(100))
    got = read_imatrix(path)
    assert got.counts["blk.0.attn_q.weight"] == 101
    torch.testing.assert_close(got.importance["blk.3.ffn_down.weight"], imp["model.layers.3.mlp.down_proj"],
                               rtol=2e-7, atol=0)


# ---------------------------------------------------------------- reading what llama.cpp writes
def test_legacy_dat_by_hand_reads_values_over_ncall(tmp_path: Path) -> None:
    values = [0.5, 3.0, 0.0, 12.0]
    data = _dat([("blk.0.ffn_up.weight", 4, values), ("blk.1.attn_k.weight", 0, [2.0, 1.0]),
                 ("blk.0.ffn_up_exps.weight", 4, [1.0] * 8)], (7, "wiki.train.raw"))
    path = tmp_path / "imatrix.dat"
    path.write_bytes(data)
    got = read_imatrix(path)
    assert got == Imatrix(got.importance, {"blk.0.ffn_up.weight": 4, "blk.1.attn_k.weight": 0},
                          ("wiki.train.raw",), 7, 0, "dat", ("blk.0.ffn_up_exps.weight",))
    assert got.importance["blk.0.ffn_up.weight"].tolist() == [0.125, 0.75, 0.0, 3.0]  # value / ncall
    assert got.importance["blk.1.attn_k.weight"].tolist() == [2.0, 1.0]  # ncall 0: as stored (llama-quantize)
    path.write_bytes(_dat([("blk.0.ffn_up.weight", 4, values)], None))  # the trailer is optional
    assert read_imatrix(path).datasets == () and read_imatrix(path).chunk_count == 0


def test_gguf_zero_count_reads_as_ones_and_expert_tensors_are_skipped(tmp_path: Path) -> None:
    path = _gguf_by_hand(tmp_path / "moe.gguf", {
        "blk.0.attn_q.weight.in_sum2": np.zeros((1, 4)), "blk.0.attn_q.weight.counts": np.zeros((1, 1)),
        "blk.0.ffn_down_exps.weight.in_sum2": np.ones((2, 4)), "blk.0.ffn_down_exps.weight.counts": np.ones((2, 1)),
        "blk.0.ffn_up.weight.in_sum2": np.full((1, 3), 6.0), "blk.0.ffn_up.weight.counts": np.full((1, 1), 3.0)})
    got = read_imatrix(path)
    assert got.importance["blk.0.attn_q.weight"].tolist() == [1.0] * 4
    assert got.importance["blk.0.ffn_up.weight"].tolist() == [2.0] * 3
    assert got.skipped == ("blk.0.ffn_down_exps.weight",) and "blk.0.ffn_down_exps.weight" not in got.importance
    assert (got.datasets, got.chunk_count, got.chunk_size) == (("by-hand.txt",), 3, 128)


# ---------------------------------------------------------------- bad files: one line naming them
def _fails(path: Path, *words: str, **kwargs: object) -> None:
    with pytest.raises(PlannerError) as err:
        read_imatrix(path, **kwargs)
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message


def test_not_a_regular_file(tmp_path: Path) -> None:
    _fails(tmp_path, "not a regular file")
    _fails(tmp_path / "missing.gguf", "cannot read")
    os.mkfifo(tmp_path / "fifo")  # never opened: a FIFO would block the read
    _fails(tmp_path / "fifo", "not a regular file")
    _fails(Path("/dev/null"), "not a regular file")


def test_every_truncation_of_a_legacy_dat_fails(tmp_path: Path) -> None:
    entries = [("blk.0.ffn_up.weight", 2, [1.0, 2.0, 3.0]), ("blk.2.attn_v.weight", 1, [4.0])]
    data = _dat(entries, (5, "data.txt"))
    entries_end = len(_dat(entries, None))  # a file that ends right after its entries is whole
    path = tmp_path / "cut.dat"
    for n in range(len(data)):
        path.write_bytes(data[:n])
        if n == entries_end:
            assert read_imatrix(path).importance["blk.0.ffn_up.weight"].tolist() == [0.5, 1.0, 1.5]
        else:
            _fails(path, "corrupt" if n >= 4 else "")
    path.write_bytes(data + b"\0")
    _fails(path, "stray bytes")


def test_every_truncation_of_a_gguf_imatrix_fails(tmp_path: Path) -> None:
    whole = write_imatrix(tmp_path / "whole.gguf", _importance()).read_bytes()
    last = max(gguf.GGUFReader(tmp_path / "whole.gguf").tensors, key=lambda t: t.data_offset)
    data_end = last.data_offset + last.n_bytes  # only alignment padding follows
    path = tmp_path / "cut.gguf"
    for n in list(range(0, 300)) + list(range(300, data_end, 97)) + [data_end - 1]:
        path.write_bytes(whole[:n])
        _fails(path)


def test_corrupt_values_and_layouts(tmp_path: Path) -> None:
    for bad, word in ((float("nan"), "non-finite"), (float("inf"), "non-finite"), (-1.0, "negative")):
        dat = tmp_path / "bad.dat"
        dat.write_bytes(_dat([("blk.0.ffn_up.weight", 1, [1.0, bad])], None))
        _fails(dat, word, "blk.0.ffn_up.weight")
        path = _gguf_by_hand(tmp_path / "bad.gguf", {"blk.0.ffn_up.weight.in_sum2": np.array([[1.0, bad]]),
                                                     "blk.0.ffn_up.weight.counts": np.ones((1, 1))})
        _fails(path, word, "blk.0.ffn_up.weight.in_sum2")
    path = _gguf_by_hand(tmp_path / "neg.gguf", {"x.weight.in_sum2": np.ones((1, 2)), "x.weight.counts": -np.ones((1, 1))})
    _fails(path, "negative counts")
    path = _gguf_by_hand(tmp_path / "len.gguf", {"x.weight.in_sum2": np.ones((1, 10)), "x.weight.counts": np.ones((1, 3))})
    _fails(path, "wrong length")
    path = _gguf_by_hand(tmp_path / "half.gguf", {"x.weight.in_sum2": np.ones((1, 2))})
    _fails(path, "no x.weight.counts")
    path = _gguf_by_hand(tmp_path / "model.gguf", {"blk.0.attn_q.weight": np.ones((2, 2))}, kind="model")
    _fails(path, "type 'model'")
    for data, word in ((struct.pack("<i", 0), "0 entries"), (struct.pack("<i", 3) + struct.pack("<i", -5), "corrupt"),
                       (_dat([("blk.0.ffn_up.weight", 1, [])], None), "0 values"),
                       (_dat([("a", 1, [1.0]), ("a", 1, [1.0])], None), "appears twice"),
                       (struct.pack("<i", 1) + struct.pack("<i", 2) + b"\xff\xfe", "not UTF-8")):
        (tmp_path / "x.dat").write_bytes(data)
        _fails(tmp_path / "x.dat", word)


def test_a_model_gguf_is_not_an_imatrix() -> None:
    _fails(smollm2_gguf(), "of type 'model', not an imatrix")


def test_wrong_length_against_the_model(tmp_path: Path) -> None:
    path = write_imatrix(tmp_path / "i.gguf", _importance())
    assert read_imatrix(path, in_features={"model.layers.3.mlp.down_proj": 1536}).importance
    _fails(path, "has 1536 values, the layer takes 576", in_features={"blk.3.ffn_down.weight": 576})
    with pytest.raises(PlannerError, match="has 576 values, the layer takes 1536"):
        write_imatrix(tmp_path / "j.gguf", {"blk.3.ffn_down.weight": torch.ones(576)},
                      in_features={"model.layers.3.mlp.down_proj": 1536})


def test_write_refuses_bad_input_and_keeps_the_old_file(tmp_path: Path) -> None:
    target = write_imatrix(tmp_path / "keep.gguf", _importance())
    before = target.read_bytes()
    for importance, word in (({"blk.0.ffn_up.weight": torch.tensor([1.0, float("nan")])}, "non-finite"),
                             ({"blk.0.ffn_up.weight": torch.tensor([1.0, -2.0])}, "negative"),
                             ({"blk.0.ffn_up_exps.weight": torch.ones(4, 8)}, "expert tensors are not supported"),
                             ({"model.layers.0.mlp.down_proj": torch.ones(3), "blk.0.ffn_down.weight": torch.ones(3)},
                              "both name blk.0.ffn_down.weight"),
                             ({"model.embed_tokens": torch.ones(3)}, "neither a GGUF weight name"),
                             ({}, "no entries")):
        with pytest.raises(PlannerError, match=word):
            write_imatrix(target, importance)
    with pytest.raises(PlannerError, match="token count of 0"):
        write_imatrix(target, _importance(), tokens=0)
    with pytest.raises(PlannerError, match="not a regular file"):
        write_imatrix(Path("/dev/null"), _importance())
    with pytest.raises(ValueError, match="fmt must be one of"):
        write_imatrix(target, _importance(), fmt="bin")
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["keep.gguf"]


# ---------------------------------------------------------------- names on SmolLM2
def test_names_map_both_ways_on_smollm2s_30_layers(tmp_path: Path) -> None:
    """Every target of SmolLM2 (30 layers x 7) maps to a 2-D tensor of its GGUF file and back, as
    gguf's own llama map says; an imatrix of the whole model checks against the layers' widths."""
    config = config_from_dict(shipped_models()["smollm2-135m"]["config"])
    targets = ModelSource("smollm2-135m", "facts", config).targets()
    assert len(targets) == 7 * N_LAYERS
    reader = gguf.GGUFReader(smollm2_gguf())
    file_names = {t.name: [int(d) for d in t.shape] for t in reader.tensors if t.name.startswith("blk.")}
    llama_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, N_LAYERS)
    for target in targets:
        name = gguf_tensor_name(target.name)
        assert name == llama_map.get_name(f"{target.name}.weight", try_suffixes=(".weight",)), target.name
        assert file_names[name] == [target.shape[1], target.shape[0]]  # ggml dims: [in, out]
        assert hf_module_name(name) == target.name and gguf_tensor_name(f"{target.name}.weight") == name
    assert gguf_tensor_name("lm_head") == "output.weight" and hf_module_name("output.weight") == "lm_head"
    assert gguf_tensor_name("blk.7.attn_qkv.weight") == "blk.7.attn_qkv.weight"  # other archs: GGUF names
    with pytest.raises(PlannerError, match="no llama-family"):
        hf_module_name("blk.7.attn_qkv.weight")
    widths = {t.name: t.shape[1] for t in targets}
    path = write_imatrix(tmp_path / "all.gguf", {t.name: torch.full((t.shape[1],), 0.5) for t in targets},
                         in_features=widths)
    got = read_imatrix(path, in_features=widths)
    assert len(got.importance) == 7 * N_LAYERS and set(got.by_module()) == set(widths)

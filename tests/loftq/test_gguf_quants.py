"""GGUF block formats: bit-exact decoding against the gguf package, byte counts, encoder error, LoftQ.

Real weights are SmolLM2-135M tensors read straight from the packaged GGUF (they were Q4_1 before
dequantisation: real trained weights, not pristine fp16). The gguf package is the oracle for
decoding; for q8_0 and q4_0 it also has an encoder, which ours must beat on error.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from loftq import GGUF_TYPES, allowed_types, gguf_nbytes, gguf_quantize, gguf_type, loftq
from loftq.gguf_fit import OBJECTIVES
from loftq.gguf_quants import decode, encode
from tests.conftest import smollm2_gguf

gguf = pytest.importorskip("gguf")

DOWN = "blk.3.ffn_down.weight"  # [576, 1536]: rows are 6 super-blocks of 256
SMALL = ["blk.12.attn_v.weight", "blk.20.attn_output.weight"]  # [192, 576], [576, 576]
BLOCK32 = ("q8_0", "q4_0", "iq4_nl", "q5_0", "q5_1")
K_QUANTS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs")
# relative error ||W - deq(encode(W))|| / ||W|| of our encoder (each type's default objective) on
# DOWN, measured on this CPU
DOWN_ERRORS = {"q8_0": 0.00474, "q4_0": 0.0758, "iq4_nl": 0.0666, "q2_k": 0.277, "q3_k": 0.144,
               "q4_k": 0.0153, "q6_k": 0.0162, "q5_0": 0.0379, "q5_1": 0.0, "q5_k": 0.0153, "iq4_xs": 0.0672}
# (plain, w²-weighted) relative error on DOWN per objective, measured on this CPU
DOWN_OBJECTIVES = {("iq4_nl", "plain"): (0.0655, 0.0537), ("iq4_nl", "w2"): (0.0730, 0.0442),
                   ("iq4_nl", "rms_abs"): (0.0666, 0.0477), ("q4_0", "plain"): (0.0747, 0.0516),
                   ("q4_0", "w2"): (0.0828, 0.0363), ("q4_0", "rms_abs"): (0.0758, 0.0407),
                   ("q6_k", "plain"): (0.0160, 0.00867), ("q6_k", "w2"): (0.0170, 0.00744)}


def qtype(name: str):
    return gguf.GGMLQuantizationType[name.upper()]


@pytest.fixture(scope="module")
def reader():
    return {t.name: t for t in gguf.GGUFReader(smollm2_gguf()).tensors}


@pytest.fixture(scope="module")
def weights(reader) -> dict[str, torch.Tensor]:
    out = {}
    for name in [DOWN, *SMALL]:
        t = reader[name]
        out[name] = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
    return out


@pytest.fixture(scope="module")
def encoded(weights) -> dict[tuple[str, str], torch.Tensor]:
    """(tensor, type) -> our bytes, for every type a tensor's width allows."""
    return {(n, q): encode(w, q) for n, w in weights.items() for q in allowed_types(tuple(w.shape))}


def assert_bit_exact(ours: torch.Tensor, theirs: np.ndarray) -> None:
    theirs_t = torch.from_numpy(np.ascontiguousarray(theirs, dtype=np.float32))
    assert ours.shape == theirs_t.shape and ours.dtype == torch.float32
    nan = torch.isnan(theirs_t)
    assert torch.equal(torch.isnan(ours), nan)
    assert torch.equal(ours[~nan].view(torch.int32), theirs_t[~nan].view(torch.int32))


def test_byte_counts_equal_ggml_quant_sizes() -> None:
    assert GGUF_TYPES.names() == sorted(BLOCK32 + K_QUANTS)
    bpw = {"q8_0": 8.5, "q4_0": 4.5, "iq4_nl": 4.5, "q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q6_k": 6.5625,
           "q5_0": 5.5, "q5_1": 6.0, "q5_k": 5.5, "iq4_xs": 4.25}
    for name in GGUF_TYPES:
        t = gguf_type(name)
        assert (t.block_size, t.type_size) == gguf.GGML_QUANT_SIZES[qtype(name)]
        assert t.ggml_type == int(qtype(name))
        assert t.bits_per_weight == bpw[name]
        shape = (576, 1536)
        expect = gguf.quants.quant_shape_to_byte_shape(shape, qtype(name))
        assert gguf_nbytes(shape, name) == expect[0] * expect[1]
        qt = gguf_quantize(torch.randn(8, 1536) * 0.02, name)
        assert tuple(qt.data.shape) == (8, expect[1]) and qt.data.dtype == torch.uint8
        assert qt.nbytes == gguf_nbytes((8, 1536), name) and qt.bits_per_weight == bpw[name]
        assert qt.dequantize().shape == (8, 1536)
    assert gguf_nbytes((576, 1536), "q4_k") == 497664  # 576 rows x 6 super-blocks x 144 B


def test_allowed_types_and_shape_errors() -> None:
    assert allowed_types((576, 576)) == ("iq4_nl", "q4_0", "q5_0", "q5_1", "q8_0")
    assert allowed_types((576, 1536)) == tuple(sorted(BLOCK32 + K_QUANTS))
    assert allowed_types((576, 100)) == ()
    w = torch.randn(576, 576)
    with pytest.raises(ValueError, match=r"multiple of 256.*\(576, 576\)"):
        encode(w, "q4_k")
    with pytest.raises(ValueError, match=r"\(576, 576\)"):
        loftq(w, "q6_k", 16)
    with pytest.raises(ValueError, match=r"\(4, 48\)"):
        encode(torch.randn(4, 48), "q8_0")
    with pytest.raises(KeyError, match="q4_k"):
        gguf_type("q7_k")
    with pytest.raises(ValueError, match="non-finite"):
        encode(torch.full((1, 32), float("nan")), "q8_0")


def test_decode_bit_exact_on_real_weights(weights, encoded) -> None:
    for (name, q), data in encoded.items():
        theirs = gguf.quants.dequantize(data.numpy(), qtype(q))
        assert_bit_exact(decode(data, q), theirs)
    assert {q for n, q in encoded if n == DOWN} == set(BLOCK32 + K_QUANTS)


def test_decode_bit_exact_on_llama_cpp_bytes(reader) -> None:
    """The packaged file's token embedding is Q8_0 written by llama.cpp's own encoder."""
    t = reader["token_embd.weight"]
    assert t.tensor_type == qtype("q8_0")
    data = np.array(t.data[:2048])
    assert_bit_exact(decode(torch.from_numpy(data), "q8_0"), gguf.quants.dequantize(data, t.tensor_type))


def test_decode_bit_exact_on_random_bytes() -> None:
    """Every byte pattern decodes like gguf's, including fp16 scales that are inf, NaN or subnormal."""
    gen = torch.Generator().manual_seed(0)
    for name in GGUF_TYPES:
        t = gguf_type(name)
        data = torch.randint(0, 256, (64, 3 * t.type_size), dtype=torch.uint8, generator=gen)
        with np.errstate(invalid="ignore"):
            theirs = gguf.quants.dequantize(data.numpy(), qtype(name))
        assert_bit_exact(decode(data, name), theirs)


def random_weights(cols: int) -> torch.Tensor:
    """Rows of Gaussian, all zeros, tiny (fp16-subnormal scales), huge, and mixed magnitudes."""
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(8, cols, generator=gen)
    rows = [g[0] * 0.02, torch.zeros(cols), g[1] * 1e-7, g[2] * 3e4, g[3] * 1e-30,
            g[4] * torch.logspace(-6, 2, cols), torch.full((cols,), -0.5), g[5].abs() + 1.0]
    w = torch.stack(rows)
    w[0, :32] = 0.0  # an all-zero block inside a normal row
    return w


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_random_weights_round_trip_bit_exact(objective: str) -> None:
    for name in GGUF_TYPES:
        w = random_weights(512)
        data = encode(w, name, objective)
        ours = decode(data, name)
        assert_bit_exact(ours, gguf.quants.dequantize(data.numpy(), qtype(name)))
        assert torch.isfinite(ours).all()
        assert torch.equal(ours[1], torch.zeros(512)) and torch.equal(ours[0, :32], torch.zeros(32))
        for row in (0, 3, 6, 7):  # normal, huge, constant, all-positive rows are well fitted
            rel = float((w[row] - ours[row]).norm() / w[row].norm())
            assert rel < {"q2_k": 0.35, "q3_k": 0.2}.get(name, 0.1), (name, row, rel)


def rel_error(w: torch.Tensor, approx: torch.Tensor) -> float:
    return float((w - approx).norm() / w.norm())


def test_encoder_error_on_real_layer(weights, encoded) -> None:
    w = weights[DOWN]
    errors = {q: rel_error(w, decode(encoded[(DOWN, q)], q)) for q in GGUF_TYPES}
    for q, err in errors.items():
        assert err == pytest.approx(DOWN_ERRORS[q], rel=0.03), (q, err)
    assert errors["q2_k"] > errors["q3_k"] > errors["q4_0"] > errors["iq4_nl"] > errors["q8_0"]


def w2_error(w: torch.Tensor, approx: torch.Tensor) -> float:
    """Relative error with each squared error weighted by w²: sqrt(sum w² e² / sum w⁴)."""
    w, e = w.double(), (w - approx).double()
    return float((w * w * e * e).sum().sqrt() / (w ** 4).sum().sqrt())


def test_encoder_beats_gguf_package_encoder(weights, encoded) -> None:
    """Where gguf.quants can quantize (q8_0, q4_0): our least-squares scales (plain objective) lose
    less, on every layer; the default objective loses less by both the plain and the w²-weighted error."""
    for q in ("q8_0", "q4_0"):
        ratios, w2_ratios = [], []
        for name, w in weights.items():
            theirs = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype(q)), qtype(q)))
            ratios.append(rel_error(w, decode(encode(w, q, "plain"), q)) / rel_error(w, theirs))
            ours = decode(encoded[(name, q)], q)
            assert rel_error(w, ours) < rel_error(w, theirs) and w2_error(w, ours) < w2_error(w, theirs), (q, name)
            w2_ratios.append(w2_error(w, ours) / w2_error(w, theirs))
        assert max(ratios) < 0.93 and sum(ratios) / len(ratios) < 0.9, (q, ratios)
        assert max(w2_ratios) < 0.96, (q, w2_ratios)


@pytest.mark.parametrize("name,objective", sorted(DOWN_OBJECTIVES))
def test_objective_trades_plain_for_weighted_error(weights, name, objective) -> None:
    """Weighting the scale search by w² (or rms + |w|) lowers the w²-weighted error and raises the
    plain one; plain least squares is the reverse. Numbers measured on DOWN."""
    w = weights[DOWN]
    approx = decode(encode(w, name, objective), name)
    plain, weighted = DOWN_OBJECTIVES[(name, objective)]
    assert rel_error(w, approx) == pytest.approx(plain, rel=0.02)
    assert w2_error(w, approx) == pytest.approx(weighted, rel=0.02)
    if objective != "plain":
        least_squares = decode(encode(w, name, "plain"), name)
        assert rel_error(w, approx) > rel_error(w, least_squares)
        assert w2_error(w, approx) < 0.95 * w2_error(w, least_squares)


def test_objective_defaults_and_errors() -> None:
    assert {n: gguf_type(n).objective for n in GGUF_TYPES} == {
        "q8_0": "plain", "q4_0": "rms_abs", "iq4_nl": "rms_abs", "q2_k": "rms_abs", "q3_k": "plain", "q4_k": "rms_abs",
        "q6_k": "rms_abs", "q5_0": "rms_abs", "q5_1": "rms_abs", "q5_k": "rms_abs", "iq4_xs": "rms_abs"}
    w = torch.randn(4, 256)
    assert torch.equal(encode(w, "iq4_nl"), encode(w, "iq4_nl", "rms_abs"))
    assert not torch.equal(encode(w, "iq4_nl"), encode(w, "iq4_nl", "plain"))
    with pytest.raises(ValueError, match="unknown GGUF encoder objective 'w3'; known: plain, w2"):
        encode(w, "q4_0", "w3")


@pytest.mark.parametrize("name,plain,at_rank16", [("q4_k", 0.0153, 0.0114), ("q4_0", 0.0758, 0.0706),
                                                  ("q2_k", 0.277, 0.266)])
def test_loftq_with_gguf_quantizer(weights, encoded, name, plain, at_rank16) -> None:
    w = weights[DOWN]
    res = loftq(w, name, 16)
    assert res.quantized.qtype == name and res.quantized.nbytes == gguf_nbytes(tuple(w.shape), name)
    assert torch.equal(res.quantized.data, encoded[(DOWN, name)])  # T = 1: Q = q(W)
    approx = res.quantized.dequantize(torch.float32) + res.lora_b @ res.lora_a
    assert rel_error(w, approx) == pytest.approx(res.error, rel=1e-4)
    assert rel_error(w, res.quantized.dequantize()) == pytest.approx(plain, rel=0.03)
    assert res.error == pytest.approx(at_rank16, rel=0.03)
    assert res.error < 0.99 * plain


@pytest.mark.gpu
def test_cuda_matches_cpu(weights) -> None:
    w = weights[DOWN]
    for name in GGUF_TYPES:
        data = encode(w.cuda(), name)
        assert data.is_cuda
        assert torch.equal(decode(data, name).cpu(), decode(data.cpu(), name))
        cpu_err = rel_error(w, decode(encode(w, name), name))
        assert rel_error(w, decode(data, name).cpu()) == pytest.approx(cpu_err, rel=1e-3)

"""QuantLinear (resident bytes, forward/backward numbers, nothing weight-sized saved), model surgery,
PEFT LoRA with per-module ranks, dequantization backends."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import loftq.quant as quant_module
from loftq import dequantize, quantize
from loftq.quant import _decode
from planner.runtime.layers import (QuantLinear, add_lora, backbone_nbytes, quantize_model, resolve_compute_dtype,
                                    swap_linears)
from planner.settings import LayerChoice
from tests.tiny_models import build_tiny

CONFIGS = [dict(bits=2), dict(bits=4), dict(bits=8), dict(bits=4, double_quant=True), dict(bits=8, method="int8"),
           dict(bits=4, method="uniform"), dict(bits=2, block_size=128, double_quant=True), dict(bits=3),
           dict(bits=3, double_quant=True)]


def _layer(shape=(96, 160), bias=True, dtype=torch.float32, **cfg) -> tuple[QuantLinear, object, torch.Tensor]:
    torch.manual_seed(0)
    w = torch.randn(*shape) * 0.05
    b = torch.randn(shape[0]) if bias else None
    qt = quantize(w, **cfg)
    return QuantLinear(qt, b, dtype), qt, b


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_resident_bytes_equal_quantized_tensor_nbytes(cfg: dict) -> None:
    layer, qt, b = _layer(**cfg)
    assert layer.code_nbytes == qt.nbytes
    buffers = {n: t for n, t in layer.named_buffers()}
    assert sum(t.numel() * t.element_size() for n, t in buffers.items() if n != "bias") == qt.nbytes
    assert not list(layer.parameters())  # nothing trainable, no dense weight kept
    assert set(layer.state_dict()) == set(buffers)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_forward_and_input_grad_match_dense_linear(cfg: dict) -> None:
    layer, qt, b = _layer(**cfg)
    x = torch.randn(3, 7, 160, requires_grad=True)
    w = dequantize(qt, torch.float32)
    y = layer(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = F.linear(ref_x, w, b)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-5)


def test_bf16_compute_matches_within_tolerance() -> None:
    layer, qt, b = _layer(bits=4, dtype=torch.bfloat16)
    x = torch.randn(5, 160)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x, dequantize(qt, torch.float32), b)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


def _saved_shapes(fn) -> list[torch.Size]:
    shapes: list[torch.Size] = []

    def pack(t):
        shapes.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


@pytest.mark.parametrize("cfg", CONFIGS[:3] + [dict(bits=3), dict(keep16=True)], ids=str)
def test_backward_saves_no_weight_sized_tensor(cfg: dict) -> None:
    if cfg.get("keep16"):
        layer = QuantLinear(torch.randn(96, 160).to(torch.bfloat16), torch.randn(96), torch.float32)
    else:
        layer, qt, _ = _layer(**cfg)
    x = torch.randn(4, 160, requires_grad=True)
    saved = _saved_shapes(lambda: layer(x).sum())
    assert all(s.numel() < 96 * 160 for s in saved), saved
    # the naive path (dequantize, then F.linear) keeps the dense weight: what the Function avoids
    naive = _saved_shapes(lambda: F.linear(x, layer.dense_weight().requires_grad_(False) * 1.0, None).sum())
    assert any(s.numel() == 96 * 160 for s in naive)


def test_keep16_layer_stores_16_bits() -> None:
    w = torch.randn(40, 32)
    layer = QuantLinear(w.to(torch.bfloat16), None, torch.float32)
    assert layer.code_nbytes == 40 * 32 * 2 and layer.bits == 16
    torch.testing.assert_close(layer(torch.eye(32)).t(), w.to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="16-bit"):
        QuantLinear(w, None)


def test_chunked_dequantization_is_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    """The format's dequantize works in chunks of CHUNK weights: the same numbers as one pass."""
    monkeypatch.setattr(quant_module, "CHUNK", 1000)
    for cfg in CONFIGS:
        for shape in [(37, 192), (35, 33)]:  # chunks of 960 weights; a tail block and, at 3 bits, a short last byte
            qt = quantize(torch.randn(*shape), **cfg)
            assert torch.equal(qt.dequantize(torch.bfloat16), _decode(qt, torch.bfloat16))


def test_nf3_decodes_like_the_one_pass_maths() -> None:
    """NF3 (with or without double quantization) decodes by the chunked torch path on every device
    (bitsandbytes has no 3-bit kernel); the layer's dense weight is that decode."""
    for dq in (False, True):
        layer, qt, _ = _layer(bits=3, double_quant=dq)
        assert layer.bits == 3 and layer.spec == qt.spec
        assert torch.equal(layer.dense_weight(torch.float32), _decode(qt, torch.float32))


def _bnb_decode(qt, dtype: torch.dtype) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit

    from loftq.bnb import bnb_quant_state

    return dequantize_4bit(qt.packed.view(-1, 1), bnb_quant_state(qt, dtype)).view(qt.shape)


@pytest.mark.parametrize("dq", [False, True])
def test_bnb_nf4_kernel_reads_our_codes(dq: bool) -> None:
    """What NF4 on CUDA decodes with (bitsandbytes' kernel) gives our numbers: checked here on its CPU op."""
    pytest.importorskip("bitsandbytes.functional")
    qt = quantize(torch.randn(64, 256), 4, double_quant=dq)
    assert qt.spec.bnb_4bit
    assert torch.equal(_bnb_decode(qt, torch.float32), dequantize(qt, torch.float32))


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    layer, qt, b = _layer(bits=4, dtype=torch.bfloat16)
    x = torch.randn(8, 160)
    cpu = layer(x).float()
    gpu = layer.to("cuda")(x.cuda()).float().cpu()
    torch.testing.assert_close(gpu, cpu, rtol=2e-2, atol=2e-2)


def test_compute_dtype_resolution() -> None:
    assert resolve_compute_dtype("auto", "cpu") == torch.float32
    assert resolve_compute_dtype("bf16") == torch.bfloat16 and resolve_compute_dtype("fp16") == torch.float16
    with pytest.raises(ValueError, match="int4"):
        resolve_compute_dtype("int4")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_quantized_model_matches_dequantized_weights(arch: str) -> None:
    model = build_tiny(arch)
    ref = build_tiny(arch)
    names = [n for n, m in model.named_modules()
             if (isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")) or type(m).__name__ == "Conv1D"]
    layers = quantize_model(model, {n: LayerChoice(4) for n in names}, torch.float32)
    for n, layer in layers.items():  # ref gets exactly the dequantized weights, in its own layout
        mod = ref.get_submodule(n)
        w = layer.dense_weight(torch.float32)
        mod.weight.data = w.t().contiguous() if type(mod).__name__ == "Conv1D" else w
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert backbone_nbytes(model) == sum(l.code_nbytes for l in layers.values())


def test_swap_rejects_wrong_shapes_and_modules() -> None:
    model = build_tiny("llama")
    with pytest.raises(ValueError, match="does not match"):
        swap_linears(model, {"model.layers.0.self_attn.q_proj": quantize(torch.randn(8, 8), 4)})
    with pytest.raises(ValueError, match="not an nn.Linear"):
        swap_linears(model, {"model.layers.0.input_layernorm": None})


def test_lora_ranks_alphas_and_trainability() -> None:
    model = build_tiny("llama")
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    quantize_model(model, {n: LayerChoice(4) for n in names}, torch.float32)
    ranks = {n: (0 if "k_proj" in n else 4 if "mlp" in n else 8) for n in names}
    ranks["model.layers.1.self_attn.q_proj"] = 2  # the pattern must not leak to layers 11, 21, ...
    pm = add_lora(model, ranks, {"model.layers.0.mlp.up_proj": 8.0}, adapter_dtype=torch.bfloat16)
    base = pm.get_base_model()
    for n, r in ranks.items():
        mod = base.get_submodule(n)
        if r == 0:
            assert isinstance(mod, QuantLinear)
        else:
            assert mod.r["default"] == r
            assert mod.lora_A["default"].weight.shape == (r, mod.in_features)
            assert mod.lora_A["default"].weight.dtype == torch.bfloat16
    assert base.get_submodule("model.layers.0.mlp.up_proj").scaling["default"] == 2.0
    assert base.get_submodule("model.layers.0.mlp.down_proj").scaling["default"] == 1.0
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # one step changes only adapters
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=1.0)
    ids = torch.randint(0, 320, (2, 16))
    pm.train()
    pm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    with pytest.raises(NotImplementedError):
        base.get_submodule("model.layers.0.mlp.down_proj").merge()
    with pytest.raises(ValueError, match="rank > 0"):
        add_lora(build_tiny("llama"), {n: 0 for n in names})


@pytest.mark.parametrize("qtype", ["q4_k", "iq4_nl"])
def test_gguf_layer_decodes_bit_exactly_in_row_chunks(qtype: str, smollm2_linears, monkeypatch) -> None:
    """A QuantLinear on a GGUF tensor (SmolLM2's blk.3 down_proj, 576 x 1536) holds exactly its tensor
    data (code_nbytes = gguf_nbytes: 576 x 6 x 144 B for q4_k) and rebuilds the weight bit-exactly with
    loftq's decoder, also when the decode runs in row chunks (CHUNK shrunk to 5 rows' worth), in
    forward and backward."""
    from loftq import gguf_nbytes, gguf_quantize
    import loftq.gguf_quants as gguf_module
    from loftq.gguf_quants import decode

    w = smollm2_linears["model.layers.3.mlp.down_proj"]
    gt = gguf_quantize(w, qtype)
    layer = QuantLinear(gt, None, torch.float32)
    assert layer.code_nbytes == gguf_nbytes(tuple(w.shape), qtype) == gt.nbytes and layer.bits == 4
    whole = decode(gt.data, qtype)
    assert torch.equal(layer.dense_weight(), whole)
    monkeypatch.setattr(gguf_module, "CHUNK", 5 * 1536)
    assert torch.equal(layer.dense_weight(), whole)
    x = torch.randn(3, 1536, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert torch.allclose(y, x @ whole.T, rtol=1e-5, atol=1e-5)
    assert torch.allclose(x.grad, whole.sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)

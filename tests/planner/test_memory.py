"""The memory model against what a training step really holds (CPU accounting) and its own algebra.

Accounting: a tiny checkpoint is quantized (NF4), wrapped with PEFT LoRA and trained for two steps.
During the second step ``saved_tensors_hooks`` collect every tensor autograd keeps (deduplicated by
storage, parameters and buffers excluded), and the peak oracle (:mod:`planner.verify.oracle`, a dispatch
mode summing live storages: the CPU analogue of ``torch.cuda.max_memory_allocated``) gives the
peak. Parameters, buffers, gradients and optimizer states are counted after the step. One set of
constants serves every architecture and setting.
"""
from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from loftq import quantize
from planner.memory import MemoryEstimate, activation_fixed_bytes, backbone_bytes, estimate, fixed_bytes, layer_bytes
from planner.overheads import allocatable_bytes, reserve_breakdown, reserve_bytes
from planner.runtime.layers import add_lora, backbone_nbytes, configure_run, linear_weight, quantize_model
from planner.settings import LayerChoice, RunSettings
from search_spaces.discovery import facts_from_config, find_targets
from search_spaces.facts import ModelFacts, TargetLayer
from search_spaces.widths import width
from tests.tiny_models import build_tiny

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SAVED_MARGIN = 0.01  # autograd's saved bytes: measured byte-exact on llama, <0.4% on phi
PEAK_MARGIN = 0.05  # allocated estimate vs the oracle's peak (the bound; see the per-test numbers)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _oracle_peak(fn) -> int:
    """Most bytes allocated on top of what lives at the start while ``fn`` runs (planner.verify.oracle)."""
    from planner.verify.oracle import LiveBytes

    with LiveBytes() as mode:
        fn()
    return mode.peak


def account(arch: str, run: RunSettings, choose=lambda t: LayerChoice(4, 8), model=None) -> dict:
    """Two training steps of the quantized + LoRA tiny model; counts taken during/after the second.
    Facts and targets come from the same discovery the CLI uses."""
    torch.manual_seed(0)
    cdt, adt = DTYPES[run.compute_dtype], DTYPES[run.compute_dtype if run.adapter_dtype == "compute" else run.adapter_dtype]
    model = (model or build_tiny(arch)).to(cdt)
    facts, targets = facts_from_config(model.config), find_targets(model)
    weights = {t.name + ".weight" for t in targets}
    non_target = sum(p.numel() for n, p in model.named_parameters() if n not in weights)
    choices = {t.name: choose(t) for t in targets}
    quantize_model(model, choices, compute_dtype=cdt)
    pm = add_lora(model, {n: c.rank for n, c in choices.items()}, dropout=run.lora_dropout, adapter_dtype=adt)
    configure_run(pm, run)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    resident = {t.untyped_storage().data_ptr() for t in list(pm.parameters()) + list(pm.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in resident:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    _capture_checkpoint_inputs(pm, pack)
    ids = torch.randint(0, facts.vocab, (run.batch_size, run.seq_len))

    def step() -> None:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the grads to count them after the step

    step()
    opt.zero_grad(set_to_none=True)
    saved.clear()
    peak = _oracle_peak(step)
    state = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"saved": sum(saved.values()), "resident": _nbytes(pm.parameters()) + _nbytes(pm.buffers()),
            "grads": _nbytes(p.grad for p in params), "optimizer": _nbytes(state), "peak": peak,
            "estimate": estimate(facts, targets, choices, run, non_target), "facts": facts}


def _capture_checkpoint_inputs(model: torch.nn.Module, pack) -> None:
    """With checkpointing, autograd's hooks never see the block inputs the checkpoint keeps: count them."""
    for mod in model.modules():
        func = getattr(mod, "_gradient_checkpointing_func", None)
        if func is None:
            continue

        def wrapped(fn, *args, _func=func, **kwargs):
            bound = getattr(fn, "keywords", {}) or {}  # transformers binds keyword inputs with partial()
            for a in list(args) + list(kwargs.values()) + list(bound.values()):
                for t in (a if isinstance(a, (tuple, list)) else (a,)):  # position embeddings: (cos, sin)
                    if torch.is_tensor(t) and t.is_floating_point():
                        pack(t)
            return _func(fn, *args, **kwargs)

        mod._gradient_checkpointing_func = wrapped


SETTINGS = {
    "base": dict(),
    "seq128-batch1": dict(seq_len=128, batch_size=1),
    "seq512-batch1": dict(seq_len=512, batch_size=1),
    "checkpointing": dict(gradient_checkpointing=True),
    "eager": dict(attn_implementation="eager"),
    "bf16-fp32-adapters-dropout": dict(compute_dtype="bf16", adapter_dtype="fp32", lora_dropout=0.1),
}


@pytest.mark.parametrize("arch", ["llama", "phi"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_accounting_matches_the_memory_model(arch: str, setting: str) -> None:
    run = RunSettings(**{**dict(seq_len=256, batch_size=2, compute_dtype="fp32", device="cpu"), **SETTINGS[setting]})
    got = account(arch, run)
    est: MemoryEstimate = got["estimate"]
    b = est.breakdown
    assert got["grads"] == b["adapter_grads"] and got["optimizer"] == b["optimizer"]
    # resident: target codes + everything else; only rotary inv_freq buffers (<= 64 B) are not modelled
    assert 0 <= got["resident"] - (b["backbone"] + b["non_target"] + b["adapters"]) <= 64
    if run.gradient_checkpointing:  # hooks see block inputs, final norm, loss; the recomputed block is a transient
        predicted = activation_fixed_bytes(got["facts"], run) + b["logits"]
    else:
        predicted = b["activations"] + b["logits"]
    assert abs(predicted / got["saved"] - 1) <= SAVED_MARGIN, (predicted, got["saved"])
    measured = got["resident"] + got["optimizer"] + got["peak"]
    ratio = est.allocated_bytes / measured - 1
    assert abs(ratio) <= PEAK_MARGIN, f"{arch}/{setting}: estimate {ratio:+.2%} vs the oracle's peak"


def test_residual_dropout_masks_are_counted() -> None:
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import tiny_config

    cfg = tiny_config("phi")
    cfg.resid_pdrop = 0.1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    run = RunSettings(seq_len=256, batch_size=2, compute_dtype="fp32", device="cpu")
    got = account("phi", run, model=model)  # the facts read resid_pdrop from the config itself
    b = got["estimate"].breakdown
    assert abs((b["activations"] + b["logits"]) / got["saved"] - 1) <= SAVED_MARGIN
    facts = facts_from_config(cfg)
    masks = 2 * facts.layers * run.tokens * facts.hidden * run.compute_bytes  # two residual dropouts per block
    without = dataclasses.replace(facts, resid_dropout=0.0)
    assert activation_fixed_bytes(facts, run) - activation_fixed_bytes(without, run) == masks


def test_mixed_plan_with_rank_zero_and_keep16() -> None:
    """Per-layer terms follow each layer's choice (no adapter, 16-bit keep, 2/8 bits, int8)."""
    options = [LayerChoice(2, 0), LayerChoice(8, 4), LayerChoice(16, 8), LayerChoice(8, 0, "int8"),
               LayerChoice(4, 16, double_quant=True)]
    pick = lambda t: options[(t.block * 7 + len(t.module_type)) % len(options)]  # noqa: E731
    run = RunSettings(seq_len=256, batch_size=2, compute_dtype="fp32", device="cpu")
    got = account("llama", run, choose=pick)
    b = got["estimate"].breakdown
    assert got["grads"] == b["adapter_grads"] and got["optimizer"] == b["optimizer"]
    # Adapters in the compute dtype share their block's normed input; to stay additive the model
    # counts it once per (block, group) even where no layer of the group has an adapter.
    targets = find_targets(build_tiny("llama"))
    groups: dict[tuple[int, str], bool] = {}
    for t in targets:
        group = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}.get(t.module_type)
        if group:
            groups[t.block, group] = groups.get((t.block, group), False) or pick(t).rank > 0
    unread = sum(not used for used in groups.values()) * run.tokens * 64 * 4
    assert unread > 0
    over = b["activations"] + b["logits"] - got["saved"]
    assert abs(over - unread) <= 0.001 * got["saved"], (over, unread)


# ---------------------------------------------------------------- exact pieces
@pytest.mark.parametrize("cfg", [LayerChoice(2), LayerChoice(3), LayerChoice(4), LayerChoice(8), LayerChoice(8, method="int8"),
                                 LayerChoice(4, method="uniform"), LayerChoice(4, double_quant=True),
                                 LayerChoice(3, double_quant=True), LayerChoice(2, block_size=128, double_quant=True),
                                 LayerChoice(16)])
@pytest.mark.parametrize("shape", [(160, 64), (33, 100), (7, 1000)])
def test_backbone_bytes_equal_stored_bytes(cfg: LayerChoice, shape: tuple[int, int]) -> None:
    target = TargetLayer("x", shape, "q_proj", 0)
    w = torch.randn(*shape)
    stored = 2 * w.numel() if cfg.bits == 16 else cfg.spec.quantize(w).nbytes
    assert backbone_bytes(target, cfg) == stored


def test_double_quant_and_nf3_bytes_at_block_64() -> None:
    """A phi-2 2560 x 2560 layer (6,553,600 weights, 102,400 blocks of 64): codes + one fp32 absmax per
    block, or with double quantization one uint8 absmax code per block + one fp32 scale per 256
    blocks (400) + one fp32 offset: QLoRA's 4.127 bits/weight for NF4, 3.127 for NF3."""
    t = TargetLayer("x", (2560, 2560), "q_proj", 0)
    cases = {(4, False): 3_276_800 + 409_600, (4, True): 3_276_800 + 102_400 + 400 * 4 + 4,
             (3, False): 2_457_600 + 409_600, (3, True): 2_457_600 + 102_400 + 400 * 4 + 4,
             (2, True): 1_638_400 + 102_400 + 1604}
    for (bits, dq), want in cases.items():
        choice = LayerChoice.of(width(bits, dq), 0)
        assert (choice.bits, choice.double_quant) == (bits, dq) and backbone_bytes(t, choice) == want
    assert 8 * backbone_bytes(t, LayerChoice(4, double_quant=True)) / t.numel == pytest.approx(4.127, abs=5e-4)
    assert 8 * backbone_bytes(t, LayerChoice(3)) / t.numel == 3.5
    assert 8 * backbone_bytes(t, LayerChoice(3, double_quant=True)) / t.numel == pytest.approx(3.127, abs=5e-4)


@pytest.mark.parametrize("arch", ["llama", "phi", "gpt2"])
def test_quantized_model_resident_bytes_equal_backbone_estimate(arch: str) -> None:
    model = build_tiny(arch)
    names = [n for n, m in model.named_modules()
             if (isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")) or type(m).__name__ == "Conv1D"]
    rng = random.Random(0)
    options = [LayerChoice(2), LayerChoice(4, double_quant=True), LayerChoice(8), LayerChoice(8, method="int8"),
               LayerChoice(16), LayerChoice(3), LayerChoice(3, double_quant=True)]
    choices = {n: rng.choice(options) for n in names}
    targets = [TargetLayer(n, tuple(linear_weight(model.get_submodule(n)).shape), n.rsplit(".", 1)[1], 0)
               for n in names]
    quantize_model(model, choices, compute_dtype=torch.float32)
    assert backbone_nbytes(model) == sum(backbone_bytes(t, choices[t.name]) for t in targets)


def _phi2_like() -> tuple[ModelFacts, list[TargetLayer], int]:
    h, inter, layers = 2560, 10240, 32
    facts = ModelFacts("phi", h, inter, layers, 32, 32, 51200, False, 2048, gated_mlp=False,
                       hidden_act="gelu_new", partial_rotary_factor=0.4, resid_dropout=0.1)
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
              "self_attn.dense": (h, h), "mlp.fc1": (inter, h), "mlp.fc2": (h, inter)}
    targets = [TargetLayer(f"model.layers.{i}.{n}", s, n.rsplit(".", 1)[1], i, True)
               for i in range(layers) for n, s in shapes.items()]
    non_target = 2 * 51200 * h + 51200 + layers * 2 * h + 2 * h + sum(t.shape[0] for t in targets)
    return facts, targets, non_target


def _mistral7b_like() -> tuple[ModelFacts, list[TargetLayer], int]:
    h, inter, layers, kv = 4096, 14336, 32, 1024
    facts = ModelFacts("mistral", h, inter, layers, 32, 8, 32000, False, 32768, hidden_act="silu")
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}
    targets = [TargetLayer(f"model.layers.{i}.{n}", s, n.rsplit(".", 1)[1], i)
               for i in range(layers) for n, s in shapes.items()]
    return facts, targets, 2 * 32000 * h + layers * 2 * h + h


RUNS = [RunSettings(device="cuda"), RunSettings(device="cuda", gradient_checkpointing=True), RunSettings(device="cuda", attn_implementation="eager"),
        RunSettings(device="cuda", adapter_dtype="fp32", lora_dropout=0.1), RunSettings(device="cuda", optimizer="adamw8bit", seq_len=333),
        RunSettings(device="cuda", optimizer="sgd", batch_size=3, gradient_checkpointing=True, lora_dropout=0.05),
        RunSettings(device="cuda", mode="inference"), RunSettings(compute_dtype="fp32", device="cpu")]


@pytest.mark.parametrize("run", RUNS, ids=lambda r: "-".join(f"{k}={v}" for k, v in r.to_dict().items()
                                                              if v != RunSettings(device="cuda").to_dict()[k]) or "default")
@pytest.mark.parametrize("model", ["phi-2", "mistral-7b", "tiny-llama"])
def test_estimate_is_fixed_plus_sum_of_layer_bytes(run: RunSettings, model: str) -> None:
    if model == "tiny-llama":
        m = build_tiny("llama")
        facts, targets, nt = facts_from_config(m.config), find_targets(m), None
    else:
        facts, targets, nt = _phi2_like() if model == "phi-2" else _mistral7b_like()
    rng = random.Random(1)
    options = [LayerChoice(b, r, "nf", 64, dq) for b in (2, 4, 8, 16) for r in (0, 8, 64) for dq in (False, True)]
    for _ in range(3):
        choices = {t.name: rng.choice(options) for t in targets}
        est = estimate(facts, targets, choices, run, nt)
        layers = sum(layer_bytes(t, choices[t.name], run, facts) for t in targets)
        assert est.allocated_bytes == fixed_bytes(facts, targets, run, nt) + layers
        assert est.allocated_bytes == sum(est.breakdown.values())
        assert est.total_bytes == est.allocated_bytes + est.reserve_bytes
        assert est.reserve_bytes == reserve_bytes(est.allocated_bytes, run)


def test_slide_anchor_phi2_and_mistral7b() -> None:
    """LoftQ slides: LoRA fine-tuning at 4 bits, input 1024, batch 1: phi-2 < 11 GB, Mistral-7B < 16 GB.
    Reproduced with the defaults (NF4 everywhere, rank 64, sdpa, no checkpointing, adapters in bf16)."""
    for (facts, targets, nt), limit in ((_phi2_like(), 11e9), (_mistral7b_like(), 16e9)):
        choices = {t.name: LayerChoice(4, 64) for t in targets}
        est = estimate(facts, targets, choices, RunSettings(device="cuda"), nt)
        assert est.total_bytes < limit
        with_dropout = estimate(facts, targets, choices, RunSettings(device="cuda", lora_dropout=0.1), nt)
        assert with_dropout.total_bytes < limit  # and still with PEFT's usual 0.1 LoRA dropout
        checkpointed = estimate(facts, targets, choices, RunSettings(device="cuda", gradient_checkpointing=True), nt)
        assert checkpointed.total_bytes < limit / 2  # the slides' figures are not checkpointed runs


def test_shipped_phi2_facts_count_residual_dropout_masks(capsys: pytest.CaptureFixture) -> None:
    """phi-2's shipped config has resid_pdrop 0.1: its facts carry it, and the estimate (also the
    dry run's) holds two bf16-run bool masks [T, hidden] per block for it."""
    import json

    from planner.cli.app import main
    from planner.sources import resolve

    source = resolve("phi-2", allow_download=False)
    facts, targets = source.facts, source.targets()
    assert facts == _phi2_like()[0]  # the anchor below uses exactly the shipped facts
    assert facts.resid_dropout == 0.1
    run = RunSettings(device="cuda")
    choices = {t.name: LayerChoice(8, 64) for t in targets}
    nt = source.non_target_params(targets)
    est = estimate(facts, targets, choices, run, nt)
    without = estimate(dataclasses.replace(facts, resid_dropout=0.0), targets, choices, run, nt)
    masks = 2 * 32 * 1024 * 2560 * 1  # 2 dropouts x 32 blocks x T x hidden, bool on CUDA
    assert est.breakdown["activations"] - without.breakdown["activations"] == masks
    assert main(["--model", "phi-2", "--budget", "11GB", "--dry-run", "--json", "--device", "cuda"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max"]["breakdown"]["activations"] == est.breakdown["activations"]


def test_allocatable_bytes_is_fast_for_absurd_budgets() -> None:
    """--budget 1e30GB walked a float guess down one byte per loop for minutes."""
    import time

    run = RunSettings(device="cuda")
    for budget in (10**39, 10**39 + 7, 2**127 - 1):
        t0 = time.perf_counter()
        k = allocatable_bytes(budget, run)
        assert time.perf_counter() - t0 < 0.1
        assert k + reserve_bytes(k, run) <= budget < k + 1 + reserve_bytes(k + 1, run)


@pytest.mark.parametrize("run", [RunSettings(device="cuda"), RunSettings(device="cuda", trainer="other"), RunSettings(device="cpu", trainer="other"),
                                 RunSettings(device="cpu")], ids=["cuda", "cuda-other", "cpu-other", "cpu"])
def test_allocatable_bytes_inverts_the_reserve(run: RunSettings) -> None:
    for budget in (11_000_000_000, 16 * 2**30, run.reserve_context_bytes + 1000, 10**6):
        k = allocatable_bytes(budget, run)
        if k >= 0:
            assert k + reserve_bytes(k, run) <= budget < k + 1 + reserve_bytes(k + 1, run)
        else:
            assert budget < reserve_bytes(0, run)


def test_reserve_terms_and_their_sources() -> None:
    """The reserve is the sum of named CUDA terms; a CPU run has none, an unmeasured trainer a margin."""
    alloc = 10 * 2**30
    terms = reserve_breakdown(alloc, RunSettings(device="cuda"))
    assert terms == {"cuda_context": 512 * 2**20, "cublas_workspace": 32 * 2**20, "allocator_rounding": 22 * 2**20,
                     "fragmentation": math.ceil(alloc * 0.05), "trainer_margin": 0}
    assert reserve_bytes(alloc, RunSettings(device="cuda")) == sum(terms.values())
    assert reserve_breakdown(alloc, RunSettings(device="cuda", trainer="other"))["trainer_margin"] == math.ceil(alloc * 0.10)
    assert reserve_bytes(alloc, RunSettings(device="cpu")) == 0
    assert reserve_bytes(alloc, RunSettings(device="cpu", mode="inference", trainer="other")) == 0


def test_trl_chunked_loss_replaces_the_full_logits() -> None:
    """TRL's default loss keeps the gathered hidden states, never [T, V] logits: at 4k tokens and a
    128k vocabulary the logits term falls from 2 GiB to 2 MiB."""
    facts, targets, nt = _mistral7b_like()
    facts = dataclasses.replace(facts, vocab=128256)
    choices = {t.name: LayerChoice(4, 16) for t in targets}
    base = estimate(facts, targets, choices, RunSettings(device="cuda", seq_len=4096, gradient_checkpointing=True), nt)
    trl = estimate(facts, targets, choices, RunSettings(device="cuda", seq_len=4096, gradient_checkpointing=True, trainer="trl"), nt)
    assert base.breakdown["logits"] == 4096 * 128256 * 4 + 4096 * 8
    assert trl.breakdown["logits"] == 4096 * 4096 * 2 + 2 * 4096 * 8
    assert trl.allocated_bytes < base.allocated_bytes - 2 * 2**30


def test_estimate_names_a_missing_choice() -> None:
    facts, targets, nt = _mistral7b_like()
    with pytest.raises(KeyError, match="model.layers.0.self_attn.q_proj"):
        estimate(facts, targets, {}, RunSettings(device="cuda"), nt)


def test_run_settings_validate_and_round_trip() -> None:
    run = RunSettings(device="cuda", seq_len=2048, optimizer="paged_adamw8bit", gradient_checkpointing=True)
    assert RunSettings.from_dict(run.to_dict()) == run
    for bad, word in ((dict(seq_len=0), "seq_len"), (dict(optimizer="adam"), "'adam'"), (dict(mode="serve"), "serve"),
                      (dict(lora_dropout=1.5), "1.5"), (dict(attn_implementation="flash"), "flash")):
        with pytest.raises(ValueError, match=word):
            RunSettings(**bad)
    with pytest.raises(ValueError, match="bogus"):
        RunSettings.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="bits=5"):
        LayerChoice(5)
    with pytest.raises(ValueError, match="bits=3"):  # int8 has no 3-bit width
        LayerChoice(3, method="int8")
    with pytest.raises(ValueError, match="-1"):
        LayerChoice(4, -1)
    assert RunSettings(device="cuda").compute_bytes == 2 and RunSettings(device="cpu").compute_bytes == 4

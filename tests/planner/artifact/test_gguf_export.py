"""``materialize --format gguf``: llama.cpp's model + LoRA adapter files, checked by clients no one here
wrote: the ``gguf`` package's reader and dequantizer, and transformers' GGUF loader (whose Llama q/k
un-permutation is the one the files must undo). Two models: SmolLM2's packaged Q4_1 GGUF (blocks
0-3: the block-32 types on every projection, the four K-quants on the 1536-wide down_proj, a bf16
keep) and a tiny synthetic llama whose every row is a multiple of 256 (every layer a K-quant)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from planner import progress
from planner.build.gguf_export import Base, file_alpha, write_adapter_gguf
from planner.artifact.layout import ADAPTER, ADAPTER_WEIGHTS, peft_key, read_artifact, read_layer
from planner.files.tensors import load_tensors
from planner.build.materialize import MaterializeConfig, materialize
from planner.artifact.plan import save_plan
from planner.artifact.summary import summary_by_block
from planner.cli.app import main
from planner.settings import LayerChoice, RunSettings
from planner.sources import resolve
from planner.build.manual import plan_from_choices
from tests.conftest import smollm2_gguf
from tests.tiny_models import save_tiny_checkpoint, save_tiny_llama_gguf

gguf = pytest.importorskip("gguf")

SMOL_MODULES = {"q_proj": LayerChoice(8, 8, "q8_0", 32), "k_proj": LayerChoice(4, 8, "q4_0", 32),
                "v_proj": LayerChoice(4, 16, "iq4_nl", 32), "o_proj": LayerChoice(4, 0, "q4_0", 32),
                "gate_proj": LayerChoice(8, 4, "q8_0", 32), "up_proj": LayerChoice(16, 8)}
K_QUANTS = ("q2_k", "q3_k", "q4_k", "q6_k")


def _k(name: str, rank: int) -> LayerChoice:
    return LayerChoice(int(name[1]), rank, name, 256)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    progress.set_enabled(False)
    yield
    progress.set_enabled(True)


def _build(source_ref: str, choices_of, root: Path) -> Path:
    source = resolve(source_ref)
    choices = {t.name: c for t in source.targets() if (c := choices_of(t.name)) is not None}
    plan = save_plan(plan_from_choices(source, choices, RunSettings(device="cpu", seq_len=32)), root / "plan.json")
    # fp32 non-target weights: the same values transformers reads from the GGUF, so logits can be compared
    config = MaterializeConfig(format="gguf", device="cpu", non_target_dtype="fp32")
    return materialize(plan, root / "out", config).path


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    def choose(name: str) -> LayerChoice | None:
        block, leaf = int(name.split(".")[2]), name.rsplit(".", 1)[-1]
        if block > 3:
            return None
        return _k(K_QUANTS[block], (8, 8, 16, 0)[block]) if leaf == "down_proj" else SMOL_MODULES[leaf]

    return _build("smollm2-135m", choose, tmp_path_factory.mktemp("smol")), smollm2_gguf()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    base = save_tiny_llama_gguf(root / "base" / "tiny.gguf")
    leaves = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def choose(name: str) -> LayerChoice:
        i = 7 * int(name.split(".")[2]) + leaves.index(name.rsplit(".", 1)[-1])
        return _k(K_QUANTS[i % 4], (8, 16, 0)[i % 3])

    return _build(str(base), choose, root), base


def _unpermute(rows: np.ndarray, name: str, art) -> np.ndarray:
    """transformers' own inverse of llama.cpp's q/k row order (its LlamaTensorProcessor)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    cfg = json.loads((art.backbone / "config.json").read_text())
    proc = LlamaTensorProcessor(config={"num_attention_heads": cfg["num_attention_heads"],
                                        "num_key_value_heads": cfg["num_key_value_heads"]})
    return proc.process(rows, name).weights


def _gguf_name(layer: str) -> str:
    m = re.fullmatch(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj", layer)
    leaf = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
            "down": "ffn_down"}[m.group(3)]
    return f"blk.{m.group(1)}.{leaf}.weight"


@pytest.mark.parametrize("case", ["smol", "tiny"])
def test_gguf_reads_back_our_codes_and_adapter(case: str, request: pytest.FixtureRequest) -> None:
    """The model file is the base file with only the targets changed: every base key/value equal, every
    other tensor byte-identical in its stored type; each target in its planned type dequantizes
    (gguf.quants.dequantize, rows un-permuted by transformers) exactly to our Q. The adapter file has
    llama.cpp's metadata and per target lora_a = PEFT's lora_A [r, in], lora_b = lora_B * alpha / alpha_file
    [out, r] in llama.cpp's row order, both rounded to f16 (the default adapter dtype) from fp32."""
    out, base_path = request.getfixturevalue(case)
    art = read_artifact(out)
    model, base = gguf.GGUFReader(str(out / "gguf" / "model.gguf")), gguf.GGUFReader(str(base_path))
    for key, field in base.fields.items():
        if not key.startswith("GGUF."):
            assert model.fields[key].contents() == field.contents(), key
    ours = {_gguf_name(m.name): m for m in art.meta.layers}
    got = {t.name: t for t in model.tensors}
    assert [t.name for t in model.tensors] == [t.name for t in base.tensors]
    for t in base.tensors:
        if t.name not in ours:
            assert got[t.name].tensor_type == t.tensor_type and np.array_equal(got[t.name].data, t.data), t.name
    types = set()
    for name, meta in ours.items():
        t = got[name]
        types.add(t.tensor_type.name.lower())
        want = read_layer(art.backbone, meta)
        want = want.dequantize(torch.float32) if meta.spec is not None else want.float()
        assert t.tensor_type.name.lower() == (meta.method if meta.spec is not None else meta.dtype), name
        deq = _unpermute(gguf.quants.dequantize(t.data, t.tensor_type), name, art)
        assert deq.shape == tuple(meta.shape) and np.array_equal(deq, want.numpy()), name
    assert types >= ({"q8_0", "q4_0", "iq4_nl", "bf16", *K_QUANTS} if case == "smol" else set(K_QUANTS))
    if case == "smol":  # `show` names the GGUF type (q4_0 and iq4_nl are both 4 bits)
        cells = summary_by_block(art.plan).rows[0].cells
        assert (cells["k_proj"], cells["v_proj"], cells["down_proj"], cells["up_proj"]) == \
            (("q4_0", 8), ("iq4_nl", 16), ("q2_k", 8), (16, 8))

    adapter = gguf.GGUFReader(str(out / "gguf" / "adapter.gguf"))
    meta = {k: f.contents() for k, f in adapter.fields.items() if not k.startswith("GGUF.")}
    alpha = file_alpha(art.alphas())
    assert meta == {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora",
                    "adapter.lora.alpha": alpha}
    peft = load_tensors(out / ADAPTER / ADAPTER_WEIGHTS)
    pairs = {t.name: t for t in adapter.tensors}
    assert len(pairs) == 2 * len(art.ranks())
    for layer, r in art.ranks().items():
        a, b = pairs[_gguf_name(layer) + ".lora_a"], pairs[_gguf_name(layer) + ".lora_b"]
        assert a.tensor_type.name == b.tensor_type.name == "F16" and a.data.dtype == np.float16
        assert a.data.shape == (r, art.plan.layer(layer).shape[1]) and b.data.shape == (art.plan.layer(layer).shape[0], r)
        assert np.array_equal(a.data, peft[f"{peft_key(layer)}.lora_A.weight"].half().numpy())
        scaled = peft[f"{peft_key(layer)}.lora_B.weight"] * (art.alphas()[layer] / alpha)
        assert np.array_equal(_unpermute(b.data, _gguf_name(layer), art), scaled.half().numpy())


@pytest.mark.parametrize("case", ["smol", "tiny"])
def _write_adapter(out: Path, base_path: Path, dest: Path, dtype: str) -> Path:
    """The artifact's LoftQ adapter as llama.cpp's adapter.gguf in ``dtype``, the way materialize writes it."""
    art = read_artifact(out)
    state = load_tensors(out / ADAPTER / ADAPTER_WEIGHTS)
    return write_adapter_gguf(dest, Base(base_path), state, art.ranks(), art.alphas(), dtype)


@pytest.mark.parametrize("case", ["smol", "tiny"])
def test_transformers_loads_the_gguf_and_with_the_adapter_matches_planner_load(case: str, tmp_path: Path,
                                                                              request: pytest.FixtureRequest) -> None:
    """transformers' GGUF loader gives exactly our Q for every target; with the adapter (written in f32)
    merged the way llama.cpp applies it (W + alpha_file / r * lora_b @ lora_a, un-permuted), its fp32
    logits equal planner.load's (QuantLinear + PEFT LoRA, fp32) up to summation order: merged vs
    separate low-rank products differ by float32 rounding, ~1e-6 relative; 2e-4 absolute leaves room
    above that. The default f16 file moves them by its rounding only (checked loosely)."""
    from transformers import AutoModelForCausalLM

    import planner

    out, base_path = request.getfixturevalue(case)
    art = read_artifact(out)
    hf = AutoModelForCausalLM.from_pretrained(str(out / "gguf"), gguf_file="model.gguf", dtype=torch.float32).eval()
    weights = dict(hf.named_parameters())
    for meta in art.meta.layers:
        want = read_layer(art.backbone, meta)
        want = want.dequantize(torch.float32) if meta.spec is not None else want.float()
        assert torch.equal(weights[f"{meta.name}.weight"], want), meta.name
    alpha = file_alpha(art.alphas())
    ids = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    originals = {f"{layer}.weight": weights[f"{layer}.weight"].detach().clone() for layer in art.ranks()}
    logits = {}
    with torch.no_grad():
        bare = hf(ids).logits
        ours = planner.load(out, "cpu")(ids).logits
        for dtype, path in (("f32", _write_adapter(out, base_path, tmp_path / "f32.gguf", "f32")),
                            ("f16", out / "gguf" / "adapter.gguf")):
            adapter = {t.name: t.data for t in gguf.GGUFReader(str(path)).tensors}
            for layer, r in art.ranks().items():
                name = _gguf_name(layer)
                b = torch.from_numpy(np.array(_unpermute(adapter[name + ".lora_b"], name, art), dtype=np.float32))
                a = torch.from_numpy(np.array(adapter[name + ".lora_a"], dtype=np.float32))
                weights[f"{layer}.weight"].copy_(originals[f"{layer}.weight"] + (alpha / r) * b @ a)
            logits[dtype] = hf(ids).logits
    diff, diff16 = ((ours - logits[d]).abs().max().item() for d in ("f32", "f16"))
    without = (ours - bare).abs().max().item()
    print(f"{case}: max |logit difference| {diff:.3g} (f16 adapter {diff16:.3g}; {without:.3g} without the adapter), "
          f"max |logit| {ours.abs().max().item():.3g}")
    assert diff < 2e-4, diff
    assert without > 50 * 2e-4  # the adapter changes the logits far beyond the tolerance: not a vacuous match
    assert diff16 < 0.01 * without, (diff16, without)


def test_finetune_exports_its_trained_adapter_as_gguf(smol: tuple[Path, Path], tmp_path: Path) -> None:
    """After `finetune` on an artifact with a GGUF export, OUT/adapter.gguf holds the trained weights
    (not the LoftQ initialisation), folded and permuted as at materialize, exactly in f32 when asked."""
    out, _ = smol
    ft = tmp_path / "ft"
    assert main(["finetune", str(out), "--steps", "2", "--seq-len", "32", "--batch-size", "1", "--eval-seqs", "1",
                 "--device", "cpu", "--out", str(ft), "--gguf-adapter-dtype", "f32", "--json"]) == 0
    art = read_artifact(out)
    trained, init = load_tensors(ft / ADAPTER_WEIGHTS), load_tensors(out / ADAPTER / ADAPTER_WEIGHTS)
    pairs = {t.name: t.data for t in gguf.GGUFReader(str(ft / "adapter.gguf")).tensors}
    alpha, changed = file_alpha(art.alphas()), 0
    for layer in art.ranks():
        name, key = _gguf_name(layer), peft_key(layer)
        assert np.array_equal(pairs[name + ".lora_a"], trained[f"{key}.lora_A.weight"].float().numpy())
        scaled = trained[f"{key}.lora_B.weight"].float() * (art.alphas()[layer] / alpha)
        assert np.array_equal(_unpermute(pairs[name + ".lora_b"], name, art), scaled.numpy())
        changed += not torch.equal(trained[f"{key}.lora_A.weight"], init[f"{key}.lora_A.weight"])
    assert changed == len(art.ranks())


def test_gguf_format_refuses_plans_it_cannot_write(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before any work (no DIR.partial): a codebook (NF4) layer has no GGUF type; a model that is not a
    GGUF gives no metadata, tokenizer or other tensors to copy; a GGUF of another model (SmolLM2's for a
    plan of the tiny llama) has other shapes."""
    source = resolve(str(save_tiny_checkpoint("llama", tmp_path / "ckpt")))
    tiny_gguf = resolve(str(save_tiny_llama_gguf(tmp_path / "base" / "tiny.gguf")))
    run = RunSettings(device="cpu", seq_len=32)
    for label, src, choice, model, message in (
            ("nf4", source, LayerChoice(4, 8), [], "is nf4"),
            ("q8", source, LayerChoice(8, 8, "q8_0", 32), [], "is not one: pass --model FILE.gguf"),
            ("other", tiny_gguf, LayerChoice(8, 8, "q8_0", 32), ["--model", str(smollm2_gguf())],
             "blk.0.attn_q.weight has shape [576, 576], the plan's layer [256, 256]")):
        plan = save_plan(plan_from_choices(src, {t.name: choice for t in src.targets()}, run),
                         tmp_path / f"{label}.json")
        assert main(["materialize", str(plan), "--out", str(tmp_path / label), "--format", "gguf", *model]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / label).exists() and not (tmp_path / f"{label}.partial").exists()


def _expected_file_bytes(path: Path) -> int:
    """A GGUF's size from its own header: the data offset plus every tensor padded to the alignment."""
    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.alignment")
    align = int(field.contents()) if field is not None else 32
    return reader.data_offset + sum(-(-int(t.n_bytes) // align) * align for t in reader.tensors)


def test_adapter_dtypes_f16_halves_the_tensor_bytes_and_f32_stays_exact(smol: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    """f32: lora_a / lora_b equal PEFT's A and alpha-scaled B exactly; f16: the same rounded to f16
    (the materialized default file, byte for byte the same as writing f16 again); each file's size is
    its header plus 2 or 4 bytes per adapter value, padded per tensor."""
    out, base_path = smol
    art = read_artifact(out)
    peft, alpha = load_tensors(out / ADAPTER / ADAPTER_WEIGHTS), file_alpha(art.alphas())
    values = sum(r * sum(art.plan.layer(layer).shape) for layer, r in art.ranks().items())
    f32 = _write_adapter(out, base_path, tmp_path / "f32.gguf", "f32")
    f16 = _write_adapter(out, base_path, tmp_path / "f16.gguf", "f16")
    assert f16.read_bytes() == (out / "gguf" / "adapter.gguf").read_bytes()
    for path, dtype, size in ((f32, np.float32, 4), (f16, np.float16, 2)):
        tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
        assert sum(int(t.n_bytes) for t in tensors.values()) == size * values
        assert path.stat().st_size == _expected_file_bytes(path)
        for layer in art.ranks():
            name, key = _gguf_name(layer), peft_key(layer)
            a, b = tensors[name + ".lora_a"].data, tensors[name + ".lora_b"].data
            scaled = peft[f"{key}.lora_B.weight"] * (art.alphas()[layer] / alpha)
            assert a.dtype == b.dtype == dtype
            assert np.array_equal(a, peft[f"{key}.lora_A.weight"].numpy().astype(dtype))
            assert np.array_equal(_unpermute(b, name, art), scaled.numpy().astype(dtype))
    saved = f32.stat().st_size - f16.stat().st_size
    assert 2 * values - 32 * 2 * len(art.ranks()) <= saved <= 2 * values  # padding per tensor moves it a little
    print(f"adapter.gguf: f32 {f32.stat().st_size} B, f16 {f16.stat().st_size} B, {values} values")


def test_f16_adapter_overflow_is_one_error_line(smol: tuple[Path, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A trained lora_B value beyond f16's range after alpha folding: `finetune` exits 2 with one line
    naming the tensor and --gguf-adapter-dtype f32, writes nothing; f32 writes it."""
    import planner
    import planner.cli.build_cmd as build_cmd

    out, _ = smol
    art = read_artifact(out)
    layer = sorted(art.ranks())[0]
    model = planner.load(out, "cpu")
    with torch.no_grad():
        lora_b = dict(model.named_parameters())[f"{peft_key(layer)}.lora_B.default.weight"]
        lora_b[0, 0] = 7e4 * file_alpha(art.alphas()) / art.alphas()[layer]  # 70000 once folded
    stub = SimpleNamespace(to_dict=lambda: {})  # the training result: only the summary reads it
    monkeypatch.setattr(build_cmd, "run_finetune", lambda path, cfg: (stub, model))
    ft = tmp_path / "ft"
    assert main(["finetune", str(out), "--out", str(ft)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{_gguf_name(layer)}.lora_b" in err[0] and "--gguf-adapter-dtype f32" in err[0], err
    assert "70000" in err[0] and not ft.exists()
    assert main(["finetune", str(out), "--out", str(ft), "--gguf-adapter-dtype", "f32", "--json"]) == 0
    b = {t.name: t.data for t in gguf.GGUFReader(str(ft / "adapter.gguf")).tensors}[f"{_gguf_name(layer)}.lora_b"]
    assert b.dtype == np.float32 and float(np.abs(b).max()) == pytest.approx(7e4, rel=1e-6)

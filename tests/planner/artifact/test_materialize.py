"""materialize + load: a real SmolLM2 plan with mixed 2/3/4/8 bits (some double-quantized) and ranks
0/8/16 (built once), and
tiny checkpoints for refusal, interruption / resumption, non-finite weights and the hf-bnb format."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import planner.cli.build_cmd  # noqa: F401  registers the commands
from planner import load, progress
from planner.cli.app import main
from planner.errors import PlannerError
from planner.train.loop import eval_loss
from planner.artifact.layout import ADAPTER, ADAPTER_WEIGHTS, BACKBONE, LAYER_DIR, QUANT_META, read_artifact
from planner.build.materialize import MaterializeConfig, materialize, partial_dir
from planner.artifact.plan import load_plan, save_plan
from planner.runtime.layers import QuantLinear, backbone_nbytes
from planner.settings import LayerChoice, RunSettings
from planner.sources import resolve
from planner.runtime.load import load_backbone
from planner.build.manual import plan_from_choices
from planner.verify.report import load_dense
from tests.tiny_models import build_tiny, save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[3]
RUN = RunSettings(device="cpu", seq_len=128)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    progress.set_enabled(False)
    yield
    progress.set_enabled(True)


def smol_choice(module: str, block: int) -> LayerChoice:
    """Mixed plan: 2-bit gate/up every 5th block (rank 16), 8-bit v/down every 3rd, NF3 o_proj in odd
    blocks (double-quantized where block % 4 == 3, rank 8 where block % 8 == 1), NF4 + double quant
    on k_proj of odd blocks, NF4 elsewhere; rank 8 on q/v of even blocks. 46 of 210 layers have a
    rank (keeps the test's SVDs few)."""
    bits = 2 if module in ("gate_proj", "up_proj") and block % 5 == 2 else \
        8 if module in ("v_proj", "down_proj") and block % 3 == 0 else \
        3 if module == "o_proj" and block % 2 == 1 else 4
    rank = 16 if bits == 2 else 8 if module in ("q_proj", "v_proj") and block % 2 == 0 else \
        8 if bits == 3 and block % 8 == 1 else 0
    dq = (bits == 3 and block % 4 == 3) or (module == "k_proj" and block % 2 == 1)
    return LayerChoice(bits, rank, double_quant=dq)


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> dict:
    try:
        source = resolve("smollm2-135m")
    except PlannerError as err:
        pytest.skip(str(err))
    root = tmp_path_factory.mktemp("smol")
    plan = plan_from_choices(source, {t.name: smol_choice(t.module_type, t.block) for t in source.targets()}, RUN)
    save_plan(plan, root / "plan.json")
    t0 = time.perf_counter()
    result = materialize(root / "plan.json", root / "out")
    seconds = time.perf_counter() - t0
    model = load(root / "out", "cpu")
    return {"source": source, "plan": plan, "dir": root / "out", "result": result, "seconds": seconds, "model": model}


def test_smollm2_backbone_bytes_bits_and_ranks_match_the_plan(smol: dict) -> None:
    plan, model = load_plan(smol["dir"] / "plan.json"), smol["model"]
    assert Counter(layer.bits for layer in plan.layers).keys() == {2, 3, 4, 8}
    assert {(layer.bits, layer.double_quant) for layer in plan.layers} == {(2, False), (3, False), (3, True),
                                                                           (4, False), (4, True), (8, False)}
    assert {layer.rank for layer in plan.layers} == {0, 8, 16}
    meta = read_artifact(smol["dir"]).meta
    assert backbone_nbytes(model) == plan.estimate.breakdown["backbone"] == meta.nbytes
    stored = {m.name: (m.bits, m.double_quant, m.nbytes) for m in meta.layers}  # each layer as the plan costs it
    assert stored == {x.name: (x.bits, x.double_quant, x.stored_bytes) for x in plan.layers}
    assert {x.bits_per_weight for x in plan.layers if x.bits == 3 and not x.double_quant} == {3.5}
    assert all(round(x.bits_per_weight, 3) == 3.127 for x in plan.layers if x.bits == 3 and x.double_quant)
    assert all(round(x.bits_per_weight, 3) == 4.127 for x in plan.layers if x.bits == 4 and x.double_quant)
    layers = {layer.name: layer for layer in plan.layers}
    quant = {n.removeprefix("base_model.model.").removesuffix(".base_layer"): m
             for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(quant) == set(layers)
    assert all(quant[n].bits == layers[n].bits and quant[n].code_nbytes == layers[n].stored_bytes for n in layers)
    adapted = {n.removeprefix("base_model.model."): (m.r["default"], m.lora_alpha["default"])
               for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "r", {})}
    assert adapted == {n: (layer.rank, layer.alpha) for n, layer in layers.items() if layer.rank}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    print(f"\nSmolLM2 materialize: {smol['seconds']:.1f} s for {len(layers)} layers "
          f"({sum(1 for x in layers.values() if x.rank)} with a rank); backbone {backbone_nbytes(model)} B")


def test_smollm2_plan_records_the_residuals_reached(smol: dict) -> None:
    plan = load_plan(smol["dir"] / "plan.json")
    assert all(layer.residual is not None and layer.iters == 1 for layer in plan.layers)
    assert plan.created_with["materialize"]["backbone_bytes"] == plan.estimate.breakdown["backbone"]
    adapter = load_file(str(smol["dir"] / ADAPTER / ADAPTER_WEIGHTS))
    bare = load_backbone(smol["dir"], "cpu", torch.float32)
    picks = [next(x for x in plan.layers if x.bits == b and (x.rank > 0) == ranked and x.double_quant == dq)
             for b, ranked, dq in ((2, True, False), (3, True, False), (3, False, True), (4, True, False),
                                   (4, False, False), (4, False, True), (8, False, False))]
    weights = dict((t.name, w) for t, w in smol["source"].iter_weights(
        [t for t in smol["source"].targets() if t.name in {p.name for p in picks}]))
    for layer in picks:
        approx = bare.get_submodule(layer.name).dense_weight(torch.float32)
        if layer.rank:
            key = f"base_model.model.{layer.name}"
            approx = approx + adapter[f"{key}.lora_B.weight"] @ adapter[f"{key}.lora_A.weight"] * (layer.alpha / layer.rank)
        w = weights[layer.name]
        assert float((w - approx).norm() / w.norm()) == pytest.approx(layer.residual, abs=2e-6)


def test_smollm2_default_randomized_svd_is_within_one_percent_of_exact(smol: dict) -> None:
    """The default --svd randomized ran (fixture), and its residuals on the ranked layers wider than
    192 are within 1% of (and not below) the full-SVD ones."""
    from loftq import loftq
    from loftq.spectral import applies

    plan = load_plan(smol["dir"] / "plan.json")
    assert plan.created_with["materialize"]["svd"] == "randomized"
    picks = [x for x in plan.layers if x.rank and applies(tuple(x.shape), x.rank)][::4]
    assert {x.bits for x in picks} == {2, 4}
    names = {p.name for p in picks}
    targets = [t for t in smol["source"].targets() if t.name in names]
    weights = {t.name: w for t, w in smol["source"].iter_weights(targets)}
    for layer in picks:
        exact = loftq(weights[layer.name], layer.bits, layer.rank, svd="exact").error
        assert exact <= layer.residual * (1 + 1e-5) and layer.residual == pytest.approx(exact, rel=0.01)


def test_smollm2_forward_equals_dequantized_reference_read_by_peft(smol: dict) -> None:
    """PEFT's PeftModel.from_pretrained reads DIR/adapter onto a stock model with dequantized weights;
    its logits equal ours with and without adapters, and disable_adapter() is the bare backbone."""
    model, ref = smol["model"], load_dense(smol["dir"])
    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    bare = load_backbone(smol["dir"], "cpu")
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, ref(input_ids=ids).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        with model.disable_adapter(), ref.disable_adapter():
            ours_bare, theirs_bare = model(input_ids=ids).logits, ref(input_ids=ids).logits
        torch.testing.assert_close(ours_bare, theirs_bare, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours_bare, bare(input_ids=ids).logits, rtol=0, atol=0)
    assert (ours - ours_bare).abs().max() > 1e-2  # the adapters do something


def test_smollm2_adapters_lower_heldout_perplexity(smol: dict) -> None:
    from transformers import AutoTokenizer

    from planner.train.data import load_corpus, token_blocks

    tokenizer = AutoTokenizer.from_pretrained(str(smol["dir"] / BACKBONE))
    val = token_blocks(tokenizer, load_corpus().val, 128, max_tokens=4 * 128)
    model = smol["model"]
    with_adapters = eval_loss(model, val, batch_size=4)
    with model.disable_adapter():
        without = eval_loss(model, val, batch_size=4)
    print(f"\nSmolLM2 val ppl (4 x 128 tokens): with LoftQ adapters {torch.tensor(with_adapters).exp():.2f}, "
          f"bare quantized backbone {torch.tensor(without).exp():.2f}")
    assert with_adapters < without


# ---------------------------------------------------------------- tiny checkpoints
def _tiny_plan(root: Path, arch: str = "llama", choice=None, model=None) -> Path:
    ckpt = root / "ckpt"
    if model is None:
        save_tiny_checkpoint(arch, ckpt)
    else:
        model.save_pretrained(ckpt)
    source = resolve(str(ckpt))
    choice = choice or (lambda i, t: LayerChoice((2, 4, 8, 16)[i % 4], (0, 8, 16)[i % 3]))
    plan = plan_from_choices(source, {t.name: choice(i, t) for i, t in enumerate(source.targets())},
                             RunSettings(device="cpu", seq_len=32))
    return save_plan(plan, root / "plan.json")


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_existing_dir_is_refused_untouched_and_force_replaces_it(tmp_path: Path, capsys) -> None:
    plan = _tiny_plan(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    before = _listing(out)
    assert main(["materialize", str(plan), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--force" in err[0]
    assert _listing(out) == before and not partial_dir(out).exists()
    assert main(["materialize", str(plan), "--out", str(out), "--force"]) == 0
    assert not (out / "mine.txt").exists() and (out / BACKBONE / QUANT_META).is_file()
    assert not partial_dir(out).exists()


def test_tied_lm_head_entry_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    """A hand-added lm_head that shares the embedding used to materialize into a folder load could
    not read ("no stored value for model.embed_tokens.weight"): now one line, exit 2, nothing written."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import tiny_config

    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(ckpt)
    source = resolve(str(ckpt))
    names = [t.name for t in source.targets()] + ["lm_head"]
    plan = save_plan(plan_from_choices(source, {n: LayerChoice(4, 8) for n in names}, RunSettings(device="cpu", seq_len=32)),
                     tmp_path / "plan.json")
    out = tmp_path / "out"
    assert main(["materialize", str(plan), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lm_head: its weight is tied to model.embed_tokens.weight" in err[0], err
    assert not out.exists() and not partial_dir(out).exists()


def test_interrupted_run_leaves_no_dir_and_resumes_only_the_rest(tmp_path: Path) -> None:
    plan = _tiny_plan(tmp_path)
    clean = materialize(plan, tmp_path / "clean")
    out, k = tmp_path / "out", 5

    def crash(name: str, done: list = []) -> None:
        done.append(name)
        if len(done) == k:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        materialize(plan, out, on_layer=crash)
    assert not out.exists() and len(list((partial_dir(out) / "work").iterdir())) == k
    resumed = materialize(plan, out)
    assert len(resumed.computed) == len(clean.plan.layers) - k
    assert not partial_dir(out).exists()
    got, want = _listing(out / BACKBONE / LAYER_DIR), _listing(tmp_path / "clean" / BACKBONE / LAYER_DIR)
    assert got == want  # resumed layers and recomputed ones are the uninterrupted run's, byte for byte
    assert _listing(out / ADAPTER) == _listing(tmp_path / "clean" / ADAPTER)


def test_killed_process_leaves_no_dir_and_the_next_run_resumes(tmp_path: Path) -> None:
    plan = _tiny_plan(tmp_path)
    out, k = tmp_path / "out", 3
    child = (f"import time\nfrom planner import progress\nfrom planner.build.materialize import materialize\n"
             f"progress.set_enabled(False)\nn = []\n"
             f"def hook(name):\n    n.append(name)\n    if len(n) == {k}: time.sleep(600)\n"
             f"materialize({str(plan)!r}, {str(out)!r}, on_layer=hook)\n")
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    work = partial_dir(out) / "work"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if work.is_dir() and len([p for p in work.iterdir() if not p.name.startswith(".")]) >= k:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the child ended before it was killed"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists() and partial_dir(out).is_dir()
    resumed = materialize(plan, out)
    assert len(resumed.computed) == len(resumed.plan.layers) - k
    assert (out / BACKBONE / QUANT_META).is_file() and not partial_dir(out).exists()


def test_nonfinite_weights_exit_2_and_no_dir(tmp_path: Path, capsys) -> None:
    model = build_tiny("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    plan = _tiny_plan(tmp_path, model=model)
    out = tmp_path / "out"
    assert main(["materialize", str(plan), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.layers.1.mlp.up_proj" in err[0] and "non-finite" in err[0]
    assert not out.exists()


def test_other_jobs_partial_is_refused_and_weights_must_be_the_plans(tmp_path: Path) -> None:
    plan = _tiny_plan(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        materialize(plan, out, on_layer=lambda name: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(PlannerError, match="another plan"):
        materialize(plan, out, MaterializeConfig(iters=2))
    result = materialize(plan, out, MaterializeConfig(iters=2, force=True))
    assert {layer.iters for layer in result.plan.layers} == {2}
    data = json.loads(Path(plan).read_text())
    data["model"]["weights_sha256"] = "0" * 64
    Path(plan).write_text(json.dumps(data))
    with pytest.raises(PlannerError, match="not the ones the plan was made for"):
        materialize(plan, tmp_path / "other")


def test_more_iterations_keep_the_best_iterate(tmp_path: Path) -> None:
    plan = _tiny_plan(tmp_path)
    one = materialize(plan, tmp_path / "t1").plan
    three = materialize(plan, tmp_path / "t3", MaterializeConfig(iters=3)).plan
    for a, b in zip(one.layers, three.layers):
        assert b.iters == 3 and b.residual <= a.residual + 1e-6
    assert any(b.residual < a.residual - 1e-4 for a, b in zip(one.layers, three.layers) if a.rank)


def test_config_validation_names_the_value() -> None:
    with pytest.raises(ValueError, match="iters.*0"):
        MaterializeConfig(iters=0)
    with pytest.raises(ValueError, match="'onnx'"):
        MaterializeConfig(format="onnx")
    with pytest.raises(ValueError, match="'fast'"):
        MaterializeConfig(svd="fast")


def test_svd_method_is_part_of_the_job(tmp_path: Path) -> None:
    """A partial run with one --svd is not resumed by the other (their layers differ)."""
    from planner.build.materialize import job_key

    plan = load_plan(_tiny_plan(tmp_path))
    iters = {layer.name: 1 for layer in plan.layers}
    assert job_key(plan, "x", iters, "exact") != job_key(plan, "x", iters, "randomized")


def test_load_refuses_a_folder_that_is_not_an_artifact(tmp_path: Path) -> None:
    with pytest.raises(PlannerError, match="not a materialized model"):
        load(tmp_path)


# ---------------------------------------------------------------- interop: stock transformers + bnb NF4
def _nf4_model() -> torch.nn.Module:
    """Tiny llama whose in_features are multiples of 64 (bnb's CPU kernel needs that)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_hf_bnb_checkpoint_loads_with_transformers_and_peft(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import QuantState, dequantize_4bit
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loftq import dequantize
    from planner.artifact.layout import read_layer

    plan = _tiny_plan(tmp_path, model=_nf4_model(),
                      choice=lambda i, t: LayerChoice(16 if i % 5 == 4 else 4, (0, 8, 16)[i % 3],
                                                      double_quant=i % 2 == 0))
    out = tmp_path / "out"
    materialize(plan, out, MaterializeConfig(format="hf-bnb"))
    folder = out / "hf-bnb"
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["load_in_4bit"] and cfg["bnb_4bit_quant_type"] == "nf4"
    art = read_artifact(out)
    keeps = {m.name for m in art.meta.layers if m.bits == 16}
    assert keeps and keeps | {"lm_head"} == set(cfg["llm_int8_skip_modules"])
    state = load_file(str(folder / "model.safetensors"))
    for meta in art.meta.layers:  # the written tensors dequantize, with bnb's own kernel, to our weights
        if meta.bits == 16:
            assert state[f"{meta.name}.weight"].dtype == torch.bfloat16
            continue
        prefix = f"{meta.name}.weight."
        qs = QuantState.from_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, "cpu")
        qs.dtype = torch.float32
        ours = dequantize(read_layer(art.backbone, meta), torch.float32)
        assert torch.equal(dequantize_4bit(state[f"{meta.name}.weight"], qs), ours), meta.name
    stock = AutoModelForCausalLM.from_pretrained(str(folder), device_map="cpu")
    assert type(stock.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    peft_model = PeftModel.from_pretrained(stock, str(out / ADAPTER)).eval()
    ours = load(out, "cpu", torch.bfloat16)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = peft_model(input_ids=ids).logits.float(), ours(input_ids=ids).logits.float()
    assert (a - b).abs().max() < 0.03 * b.abs().max()  # bf16 compute in both, different kernels


def test_hf_bnb_is_refused_for_a_plan_with_2_or_8_bits(tmp_path: Path, capsys) -> None:
    plan = _tiny_plan(tmp_path)
    out = tmp_path / "out"
    assert main(["materialize", str(plan), "--out", str(out), "--format", "hf-bnb"]) == 2
    assert "NF4" in capsys.readouterr().err and not out.exists() and not partial_dir(out).exists()


def test_smollm2_finetune_and_verify_commands(smol: dict, tmp_path: Path, capsys) -> None:
    """The user-facing commands on the materialized SmolLM2 plan: a short fine-tune lowers the
    held-out loss and writes a PEFT adapter folder; verify's checked terms agree with the plan."""
    from peft import PeftConfig

    out = tmp_path / "ft"
    argv = ["finetune", str(smol["dir"]), "--steps", "6", "--seq-len", "64", "--lr", "1e-3", "--eval-seqs", "2",
            "--out", str(out), "--json", "--device", "cpu"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (s0, before), (s6, after) = summary["eval_losses"][0], summary["eval_losses"][-1]
    assert (s0, s6) == (0, 6) and after < before and len(summary["train_losses"]) == 6
    assert PeftConfig.from_pretrained(str(out)).rank_pattern == json.loads(
        (smol["dir"] / ADAPTER / "adapter_config.json").read_text())["rank_pattern"]
    assert main(argv) == 2 and "--force" in capsys.readouterr().err  # no silent overwrite

    assert main(["verify", str(smol["dir"]), "--steps", "1", "--seq-len", "64", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["term"]: r for r in report["rows"]}
    for term in ("backbone", "non_target", "adapters", "adapter_grads", "optimizer"):
        assert rows[term]["ok"], rows[term]
    assert rows["backbone"]["measured"] == load_plan(smol["dir"] / "plan.json").estimate.breakdown["backbone"]


# ---------------------------------------------------------------- untrusted input (issue 13)
def _one_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def test_unknown_quant_exits_2_and_leaves_nothing(tmp_path: Path, capsys) -> None:
    plan = _tiny_plan(tmp_path)
    data = json.loads(Path(plan).read_text())
    layer = next(x for x in data["layers"] if x["bits"] == 2)
    layer["quant"] = "foo2"
    Path(plan).write_text(json.dumps(data))
    out = tmp_path / "out"
    assert main(["materialize", str(plan), "--out", str(out)]) == 2
    _one_line(capsys, layer["name"], "unknown quantizer 'foo2'", "known: int8, nf2")
    assert not out.exists() and not partial_dir(out).exists()


@pytest.mark.parametrize("fault", ["truncated", "garbage header"])
def test_corrupt_checkpoint_exits_2_before_any_layer(tmp_path: Path, capsys, fault: str) -> None:
    plan = _tiny_plan(tmp_path)
    shard = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))[3]
    data = shard.read_bytes()
    shard.write_bytes(data[:-64] if fault == "truncated" else data[:8] + b"\x00" * 16 + data[24:])
    out = tmp_path / "out"
    assert main(["materialize", str(plan), "--out", str(out)]) == 2
    _one_line(capsys, shard.name, "safetensors")
    assert not out.exists() and not partial_dir(out).exists()


def test_materialize_follows_the_plan_commands_download_policy(tmp_path: Path, capsys,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan naming a hub id: downloads by default (as the plan command), not with --offline or
    HF_HUB_OFFLINE=1, and the refusal says which of them is set."""
    import huggingface_hub

    plan = _tiny_plan(tmp_path, arch="qwen2", choice=lambda i, t: LayerChoice(4, 0))
    data = json.loads(Path(plan).read_text())
    data["model"]["id"] = "someone/tiny-qwen"
    Path(plan).write_text(json.dumps(data))
    calls = []

    def cached_only(repo_id: str, **kwargs):  # in the local hub cache; any network use fails
        calls.append(kwargs["local_files_only"])
        if kwargs["local_files_only"]:
            return str(tmp_path / "ckpt")
        raise RuntimeError("no network here")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached_only)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["materialize", str(plan), "--out", str(tmp_path / "a"), "--offline"]) == 0
    assert calls == [True] and (tmp_path / "a" / BACKBONE / QUANT_META).is_file()
    capsys.readouterr()
    assert main(["materialize", str(plan), "--out", str(tmp_path / "b")]) == 2
    assert calls[-1] is False
    _one_line(capsys, "could not download someone/tiny-qwen")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["materialize", str(plan), "--out", str(tmp_path / "b")]) == 0 and calls[-1] is True
    capsys.readouterr()
    data["model"]["id"] = "phi-2"  # shipped shape facts only: the weights would need a download
    Path(plan).write_text(json.dumps(data))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: (_ for _ in ()).throw(
        RuntimeError("not cached")))
    assert main(["materialize", str(plan), "--out", str(tmp_path / "c")]) == 2
    _one_line(capsys, "downloads are off (HF_HUB_OFFLINE=1)")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert main(["materialize", str(plan), "--out", str(tmp_path / "c"), "--offline"]) == 2
    _one_line(capsys, "downloads are off (--offline)")
    assert not (tmp_path / "c").exists() and not partial_dir(tmp_path / "c").exists()


_MATERIALIZE = ("import sys\nfrom planner import progress\nfrom planner.build.materialize import materialize\n"
                "progress.set_enabled(False)\nmaterialize(sys.argv[1], sys.argv[2])\n")


def test_output_folder_is_byte_reproducible_across_processes(tmp_path: Path) -> None:
    """Two processes with different hash seeds (PEFT keeps target_modules in a set) write the same bytes."""
    plan = _tiny_plan(tmp_path)
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, "-c", _MATERIALIZE, str(plan), str(tmp_path / f"out{seed}")],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    first, second = _listing(tmp_path / "out1"), _listing(tmp_path / "out2")
    assert len(first) > 20 and first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    modules = json.loads(first[f"{ADAPTER}/adapter_config.json"])["target_modules"]
    assert modules == sorted(modules) and len(modules) == sum(1 for x in load_plan(plan).layers if x.rank)


def test_a_partial_folder_that_is_a_link_or_holds_one_out_is_refused(tmp_path: Path, capsys) -> None:
    """--force empties another job's DIR.partial: it must never follow a link to empty a folder elsewhere."""
    plan = _tiny_plan(tmp_path)
    out, victim = tmp_path / "out", tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    partial_dir(out).symlink_to(victim)
    assert main(["materialize", str(plan), "--out", str(out), "--force"]) == 2
    _one_line(capsys, "symbolic link")
    assert (victim / "keep.txt").read_text() == "precious" and not out.exists()
    partial_dir(out).unlink()
    with pytest.raises(KeyboardInterrupt):  # a real partial run with 2 layers committed
        materialize(plan, out, on_layer=lambda name, n=[]: n.append(name) or (len(n) == 2 and (_ for _ in ()).throw(
            KeyboardInterrupt)))
    work = sorted((partial_dir(out) / "work").iterdir())[0]
    work.unlink()
    work.symlink_to(victim / "keep.txt")
    assert main(["materialize", str(plan), "--out", str(out), "--force"]) == 2
    _one_line(capsys, "points outside")
    assert (victim / "keep.txt").read_text() == "precious" and not out.exists()

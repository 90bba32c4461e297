"""``--imatrix FILE`` end to end on a tiny local llama (real tokenizer): the imatrix's per-column
importance is the data-aware moments' diagonal in every stage (GGUF encoders' scales, the norm of
the tables and adapters), the plan records the file's sha256, materialize builds exactly that Q and
those adapters only when given the same file, and what an imatrix cannot feed is refused in one line."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loftq import loftq
from loftq.gguf_quants import gguf_quantize
from planner import progress
from planner.artifact.layout import read_artifact, read_layer
from planner.artifact.plan import load_plan, save_plan
from planner.cli.app import main
from planner.scoring.moments import imatrix_moments
from planner.search import stages
from planner.search.config import PlanConfig
from planner.search.flow import make_plan
from planner.search.prepare import extremes, fingerprint, prepare, study_name_for
from planner.settings import RunSettings
from planner.sources import resolve
from planner.sources.imatrix import write_imatrix
from tests.tiny_models import save_tiny_llama_with_real_tokenizer

RUN = RunSettings(mode="inference", seq_len=128, batch_size=1, device="cpu")
INPUTS = {"self_attn.q_proj": "attn", "self_attn.k_proj": "attn", "self_attn.v_proj": "attn", "mlp.gate_proj": "mlp",
          "mlp.up_proj": "mlp", "self_attn.o_proj": "o", "mlp.down_proj": "down"}


@pytest.fixture(autouse=True)
def _quiet() -> None:
    progress.set_enabled(False)
    yield
    progress.set_enabled(True)


def _importance(src, seed: int) -> dict[str, torch.Tensor]:
    """Skewed random importance per input (q/k/v share one vector, as one input; so do gate/up)."""
    g = torch.Generator().manual_seed(seed)
    out, shared = {}, {}
    for t in src.targets():
        block, leaf = t.name.rsplit(".", 2)[0], ".".join(t.name.rsplit(".", 2)[1:])
        key = (block, INPUTS[leaf])
        if key not in shared:
            shared[key] = torch.rand(int(t.shape[1]), generator=g) ** 4 * 10 + 1e-3
        out[t.name] = shared[key]
    return out


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("imatrix-plan")
    tiny = save_tiny_llama_with_real_tokenizer(root / "tiny")
    src = resolve(str(tiny))
    imp = _importance(src, 0)
    path = write_imatrix(root / "a.imatrix.gguf", imp)
    cfg = PlanConfig(model=str(tiny), quant="gguf", bits=(4, 8), ranks=(0, 4), calib_seqs=2, proxy_seqs=1,
                     calib_seq_len=64, search="exact", init="loftq-data", rounding="nearest", imatrix=str(path),
                     cache_dir=str(root / "cache"))
    prep = prepare(cfg, RUN)
    lo, hi = extremes(prep)
    budget = (prep.estimate(lo).total_bytes + 3 * prep.estimate(hi).total_bytes) // 4
    plan = make_plan(cfg, RUN, budget).plan
    save_plan(plan, root / "plan.json")
    return SimpleNamespace(root=root, tiny=tiny, src=src, imp=imp, path=path, cfg=cfg, prep=prep, plan=plan,
                           budget=budget)


def test_the_plan_records_the_files_sha256_and_materialize_builds_under_its_importance(planned, tmp_path: Path,
                                                                                        capsys) -> None:
    p = planned
    sha = hashlib.sha256(p.path.read_bytes()).hexdigest()
    doc = json.loads((p.root / "plan.json").read_text())
    assert doc["init"]["imatrix"] == str(p.path) and doc["init"]["imatrix_sha256"] == sha
    assert load_plan(p.root / "plan.json").init == p.plan.init
    assert {layer.quant for layer in p.plan.layers} >= {"q8_0"} and len({layer.quant for layer in p.plan.layers}) >= 2

    out = tmp_path / "built"
    assert main(["materialize", str(p.root / "plan.json"), "--out", str(out), "--device", "cpu",
                 "--imatrix", str(p.path)]) == 0
    built = load_plan(out / "plan.json")
    assert built.init.imatrix_sha256 == sha
    weights = {t.name: w.float() for t, w in p.src.iter_weights(p.src.targets())}
    art = read_artifact(out)
    from safetensors.torch import load_file

    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    checked = 0
    for meta in art.meta.layers:
        layer, w, imp = p.plan.layer(meta.name), weights[meta.name], p.imp[meta.name]
        q = read_layer(art.backbone, meta)
        # Q: the GGUF encoder under the imatrix's per-column importance, not the plain one
        assert torch.equal(q.data, gguf_quantize(w, layer.quant, importance=imp).data), meta.name
        if not layer.rank:
            continue
        want = loftq(w, layer.quant, layer.rank, calibration=torch.diag(imp), damp=0.01, svd="randomized")
        a = next(v for k, v in adapter.items() if meta.name in k and "lora_A" in k)
        assert torch.equal(a.float(), want.lora_a), meta.name
        # the residual in the norm L = diag(sqrt(imp + 0.01 mean(imp))), from the plan's own tables too
        l_diag = (imp.double() + 0.01 * imp.double().mean()).sqrt()
        deq = want.quantized.dequantize(torch.float32).double()
        res = ((w.double() - deq - want.lora_b.double() @ want.lora_a.double()) * l_diag).norm()
        assert float(res / (w.double() * l_diag).norm()) == pytest.approx(want.weighted_errors[0], rel=1e-6)
        assert layer.residual == pytest.approx(want.weighted_errors[0], abs=2e-6), meta.name
        checked += 1
    assert checked >= 3
    plain = [meta for meta in art.meta.layers if not torch.equal(
        read_layer(art.backbone, meta).data, gguf_quantize(weights[meta.name], p.plan.layer(meta.name).quant).data)]
    assert len(plain) >= len(art.meta.layers) - 2  # the importance changed (nearly) every layer's codes


def test_materialize_refuses_a_missing_or_other_imatrix_in_one_line(planned, tmp_path: Path, capsys) -> None:
    p = planned
    plan = str(p.root / "plan.json")
    capsys.readouterr()
    assert main(["materialize", plan, "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == f"error: this plan was made with the importance matrix {p.path} (sha256 " \
                                      f"{p.plan.init.imatrix_sha256[:12]}...): pass --imatrix {p.path}\n"
    other = write_imatrix(tmp_path / "b.gguf", _importance(p.src, 1))
    assert main(["materialize", plan, "--out", str(tmp_path / "x"), "--imatrix", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not the plan's" in err and "re-plan with this one" in err
    assert main(["materialize", plan, "--out", str(tmp_path / "x"), "--imatrix", str(p.path),
                 "--rounding", "feedback"]) == 2
    assert "drop --rounding feedback" in capsys.readouterr().err
    holder = tmp_path / "holder"
    holder.mkdir()
    (holder / "a.gguf").write_bytes(p.path.read_bytes())  # the same bytes: the plan's matrix, in --out's way
    assert main(["materialize", plan, "--out", str(holder), "--imatrix", str(holder / "a.gguf"), "--force"]) == 2
    assert "importance matrix (--imatrix)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and (holder / "a.gguf").is_file()
    plain = dataclasses.replace(p.plan, init=dataclasses.replace(p.plan.init, imatrix=None, imatrix_sha256=None))
    save_plan(plain, tmp_path / "plain.json")
    assert main(["materialize", str(tmp_path / "plain.json"), "--out", str(tmp_path / "x"), "--imatrix",
                 str(p.path)]) == 2
    assert "uses no importance matrix; drop --imatrix" in capsys.readouterr().err


def test_what_an_imatrix_cannot_feed_is_refused_in_one_line(planned, tmp_path: Path, capsys) -> None:
    p = planned
    base = ["--model", str(p.tiny), "--budget", str(p.budget), "--calib-seqs", "2", "--calib-seq-len", "64",
            "--mode", "inference", "--seq-len", "128", "--device", "cpu", "--bits", "4,8", "--ranks", "0,4",
            "--search", "exact", "--cache-dir", str(p.root / "cache"), "--out", str(tmp_path / "p.json"),
            "--imatrix", str(p.path)]
    capsys.readouterr()
    for extra, says in ((["--quant", "nf"], "pass --rounding nearest with --imatrix"),
                        (["--quant", "gguf", "--rounding", "nearest", "--init", "loftq"], "it needs --init loftq-data"),
                        (["--quant", "gguf", "--quick"], "with --quick, pass --init loftq-data")):
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    partial = {k: v for k, v in p.imp.items() if "layers.2.mlp.down_proj" not in k}
    write_imatrix(tmp_path / "partial.gguf", partial)
    assert main(base[:-1] + [str(tmp_path / "partial.gguf"), "--quant", "gguf", "--rounding", "nearest"]) == 2
    assert capsys.readouterr().err == f"error: imatrix {tmp_path / 'partial.gguf'} has no entry for target " \
        "model.layers.2.mlp.down_proj (blk.2.ffn_down.weight): it covers 20 of 21 target layers (an imatrix of " \
        "another model?)\n"
    assert not (tmp_path / "p.json").exists()


def test_every_key_the_importance_reaches_changes_with_the_files_sha256(planned, tmp_path: Path) -> None:
    p = planned
    names = [t.name for t in p.prep.targets]
    other = write_imatrix(tmp_path / "b.gguf", _importance(p.src, 1))
    corpus = SimpleNamespace(fingerprint="f")
    train, val = torch.zeros(2, 64, dtype=torch.long), torch.zeros(1, 64, dtype=torch.long)

    def keys(moments):
        ctx = stages.Context(p.prep, corpus, train, val, moments=moments)
        return stages.tables_key(ctx), stages.fisher_key(ctx), stages._data_key(ctx)["moments"]

    a, b = keys(imatrix_moments(p.path, names)), keys(imatrix_moments(other, names))
    assert all(x != y for x, y in zip(a, b))
    assert keys(imatrix_moments(p.path, names)) == a  # and only with it
    prep_b = dataclasses.replace(p.prep, imatrix_sha256=hashlib.sha256(other.read_bytes()).hexdigest())
    assert fingerprint(prep_b, p.budget, "f") != fingerprint(p.prep, p.budget, "f")
    assert fingerprint(p.prep, p.budget, "f")["space"]["imatrix"] == p.plan.init.imatrix_sha256
    assert study_name_for(prep_b, p.budget) != study_name_for(p.prep, p.budget)
    # materialize's resume key: the matrix by its digest, not by the path it was given under
    from planner.build.materialize import job_key

    iters = {layer.name: 1 for layer in p.plan.layers}
    moved = dataclasses.replace(p.plan, init=dataclasses.replace(p.plan.init, imatrix="elsewhere.gguf"))
    changed = dataclasses.replace(p.plan, init=dataclasses.replace(p.plan.init, imatrix_sha256="0" * 64))
    assert job_key(moved, "w", iters) == job_key(p.plan, "w", iters) != job_key(changed, "w", iters)

"""The memory of a llama.cpp server (``--engine llama.cpp``, the default for ``--quant gguf`` inference
plans): its f16 KV cache, compute and output buffers against the sizes llama.cpp itself logs."""
from __future__ import annotations

import dataclasses

import pytest

from planner.memory import estimate, llamacpp_breakdown, llamacpp_compute_bytes
from planner.settings import LayerChoice, RunSettings, resolve_engine
from planner.sources import resolve

MIB = 2**20
# (ubatch, n_ctx) -> (KV buffer, compute buffer) in MiB, as llama.cpp 0.3.36 (llama-cpp-python, CPU
# backend, flash attention off) logs them for the packaged SmolLM2 ("llama_kv_cache: CPU KV buffer
# size", "sched_reserve: CPU compute buffer size"); its output buffer was 0.19 MiB every time.
LOGGED = {(128, 512): (11.25, 24.56), (128, 2048): (45.00, 24.84), (128, 4096): (90.00, 24.84),
          (128, 8192): (180.00, 41.60), (128, 16384): (360.00, 81.60),
          (512, 512): (11.25, 98.25), (512, 2048): (45.00, 99.38), (512, 4096): (90.00, 99.38),
          (512, 8192): (180.00, 166.38), (512, 16384): (360.00, 326.38)}


@pytest.fixture(scope="module")
def smol():
    return resolve("smollm2-135m")


@pytest.mark.parametrize("ub,ctx", sorted(LOGGED))
def test_kv_compute_and_output_buffers_match_llamacpp(smol, ub: int, ctx: int) -> None:
    run = RunSettings(device="cuda", mode="inference", engine="llama.cpp", seq_len=ctx, ubatch=ub)
    kv, compute = LOGGED[ub, ctx]
    b = llamacpp_breakdown(smol.facts, run, 0)
    assert b["kv_cache"] == kv * MIB  # exact: 2 x layers x ctx x kv_dim x 2 bytes
    assert b["output_buffer"] == 49152 * 4  # 0.19 MiB
    est = llamacpp_compute_bytes(smol.facts, run)
    assert compute * MIB * 0.999 <= est <= compute * MIB * 1.015, (est / MIB, compute)  # never under


def test_a_llamacpp_estimate_counts_its_buffers_and_keeps_the_embedding_on_the_host(smol) -> None:
    targets = smol.targets()
    choices = {t.name: LayerChoice(4, 0, "q4_0", 32) for t in targets}
    llama = RunSettings(device="cuda", mode="inference", engine="llama.cpp", seq_len=4096)
    torch_run = dataclasses.replace(llama, engine="torch")
    n = sum(int(p) for p in smol.non_target_params(targets))
    a = estimate(smol.facts, targets, choices, llama, n).breakdown
    t = estimate(smol.facts, targets, choices, torch_run, n).breakdown
    assert a["backbone"] == t["backbone"] == sum(t_.numel for t_ in targets) // 32 * 18
    assert a["kv_cache"] == 90 * MIB and "compute_buffer" in a and "transient" not in a
    assert a["non_target"] == t["non_target"]  # SmolLM2 ties its head: the device holds the copy
    untied = dataclasses.replace(smol.facts, tied_embeddings=False)
    assert llamacpp_breakdown(untied, llama, n)["non_target"] == (n - 49152 * 576) * 2


def test_engine_resolution_and_what_a_plan_records() -> None:
    run = RunSettings(device="cuda", mode="inference")
    assert resolve_engine(run, "gguf").engine == "llama.cpp"
    assert resolve_engine(run, "nf").engine == "auto"  # torch
    assert resolve_engine(RunSettings(device="cuda"), "gguf").engine == "auto"  # a fine-tune runs in torch
    assert resolve_engine(dataclasses.replace(run, engine="torch"), "nf").engine == "auto"
    assert resolve_engine(dataclasses.replace(run, engine="torch"), "gguf").to_dict()["engine"] == "torch"
    with pytest.raises(ValueError, match="--quant gguf"):
        resolve_engine(dataclasses.replace(run, engine="llama.cpp"), "nf")
    assert "engine" not in resolve_engine(run, "nf").to_dict()  # earlier plans' run dicts unchanged
    d = resolve_engine(run, "gguf").to_dict()
    assert (d["engine"], d["ubatch"]) == ("llama.cpp", 512) and RunSettings.from_dict(d).llamacpp
    with pytest.raises(ValueError, match="ubatch"):
        RunSettings(device="cuda", ubatch=0)


def test_a_llamacpp_plan_is_written_as_schema_v6_and_older_readers_are_told(smol, tmp_path) -> None:
    import json

    from planner.artifact.plan import load_plan, save_plan
    from planner.errors import PlannerError
    from planner.build.manual import plan_from_choices

    run = RunSettings(device="cuda", mode="inference", engine="llama.cpp", seq_len=2048)
    choices = {t.name: LayerChoice(4, 8, "q4_0", 32) for t in smol.targets()}
    plan = plan_from_choices(smol, choices, run)
    doc = json.loads(save_plan(plan, tmp_path / "p.json").read_text())
    assert doc["schema_version"] == 6 and (doc["run"]["engine"], doc["run"]["ubatch"]) == ("llama.cpp", 512)
    assert doc["estimate"]["breakdown"]["kv_cache"] == 45 * MIB and "compute_buffer" in doc["estimate"]["breakdown"]
    assert load_plan(tmp_path / "p.json") == plan
    (tmp_path / "v5.json").write_text(json.dumps(dict(doc, schema_version=5)))
    with pytest.raises(PlannerError, match="came with v6"):
        load_plan(tmp_path / "v5.json")
    torch_plan = plan_from_choices(smol, choices, dataclasses.replace(run, engine="auto"))
    assert json.loads(save_plan(torch_plan, tmp_path / "t.json").read_text())["schema_version"] == 4

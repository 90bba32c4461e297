"""Issue 25: never destroy an input, never ship a temp file, never trust a stale cache.

Each test here failed on the code before it: an output that is (or holds) the command's own input,
a FIFO read as input, a fingerprint blind to the middle of a file, a killed run's temp files in the
published folder, a full disk as a traceback, an edited plan or quantization.json taken at its word.
FIFOs and device nodes are made inside tmp_path only; faults are injected (tests run as root)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from planner.cli.app import main
from planner.errors import PlannerError


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    from planner import progress

    monkeypatch.setattr(progress, "_enabled", False)


def _one_line(capsys: pytest.CaptureFixture, argv: list[str], *needles: str) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: "), (rc, out, err)
    assert "Traceback" not in err and all(n in err for n in needles), err
    return err


def _tiny(root: Path, ranks=(0, 8)) -> tuple[Path, Path]:
    """A tiny llama checkpoint and a hand-made plan for it (NF4, alternate ranks)."""
    from planner.artifact.plan import save_plan
    from planner.settings import LayerChoice, RunSettings
    from planner.sources import resolve
    from planner.build.manual import plan_from_choices
    from tests.tiny_models import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint("llama", root / "ckpt")
    source = resolve(str(ckpt), cache_dir=root / "cache")
    choices = {t.name: LayerChoice(4, ranks[i % len(ranks)]) for i, t in enumerate(source.targets())}
    plan = save_plan(plan_from_choices(source, choices, RunSettings(device="cpu", seq_len=32)), root / "plan.json")
    return ckpt, plan


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- outputs never replace inputs
def test_plan_out_equal_to_the_pareto_files_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    """`--out o/pp.json --pareto o/pp` wrote the front over the plan and said "plan written"."""
    out = tmp_path / "pp.json"
    _one_line(capsys, ["--model", "phi-2", "--budget", "11GB", "--out", str(out), "--pareto", str(tmp_path / "pp"),
                       "--cache-dir", str(tmp_path / "cache")], "--pareto", "different paths")
    assert not out.exists()


def test_plan_out_equal_to_the_calibration_text_is_refused(tmp_path: Path, capsys) -> None:
    data = tmp_path / "calib.txt"
    data.write_text("some text\n\n" * 200)
    before = data.read_bytes()
    _one_line(capsys, ["--model", "phi-2", "--budget", "11GB", "--data", str(data), "--out", str(data),
                       "--cache-dir", str(tmp_path / "cache")], "calibration text", "destroy the input")
    assert data.read_bytes() == before


def test_plan_out_over_a_file_of_the_model_folder_is_refused_and_a_new_file_there_is_not(tmp_path: Path,
                                                                                          capsys) -> None:
    from planner.cli import preflight
    from planner.search.config import PlanConfig

    ckpt, _ = _tiny(tmp_path)
    config = ckpt / "config.json"
    before = config.read_bytes()
    _one_line(capsys, ["--model", str(ckpt), "--budget", "1GB", "--out", str(config),
                       "--cache-dir", str(tmp_path / "cache")], "part of the model")
    assert config.read_bytes() == before
    preflight.plan_outputs(PlanConfig(model=str(ckpt), budget="1GB", out=str(ckpt / "plan.json"),
                                      cache_dir=str(tmp_path / "cache")))  # a new file inside: allowed


def test_materialize_force_into_the_model_folder_is_refused_and_the_model_kept(tmp_path: Path, capsys) -> None:
    """`materialize plan.json --model M --out M --force` replaced the source model with the artifact."""
    ckpt, plan = _tiny(tmp_path)
    before = _tree(ckpt)
    _one_line(capsys, ["materialize", str(plan), "--model", str(ckpt), "--out", str(ckpt), "--force"],
              "is the model")
    assert _tree(ckpt) == before
    parent = ckpt.parent  # a folder holding the model is refused too
    _one_line(capsys, ["materialize", str(plan), "--model", str(ckpt), "--out", str(parent), "--force"],
              "holds the")
    assert _tree(ckpt) == before and plan.is_file()


def test_finetune_force_over_its_own_folder_is_refused(tmp_path: Path, capsys) -> None:
    """`finetune DIR --out DIR --force` replaced the built folder (backbone, plan) with a bare adapter."""
    from planner import materialize

    _, plan = _tiny(tmp_path)
    built = materialize(plan, tmp_path / "built").path
    before = _tree(built)
    for out, needle in ((built, "holds the materialized folder"), (built / "backbone", "part of the materialized")):
        _one_line(capsys, ["finetune", str(built), "--out", str(out), "--force", "--steps", "1"], needle)
        assert _tree(built) == before
    data = tmp_path / "train.txt"
    data.write_text("text\n\n" * 100)
    before_data = data.read_bytes()
    _one_line(capsys, ["finetune", str(built), "--data", str(data), "--out", str(data), "--force"],
              "refusing to replace it")  # a file is never an adapter folder's place
    assert data.read_bytes() == before_data


def test_the_path_rule_allows_a_new_output_inside_an_input_folder(tmp_path: Path) -> None:
    from planner.files.paths import Input, Output, check_outputs

    model = tmp_path / "model"
    model.mkdir()
    (model / "w.safetensors").write_bytes(b"x")
    check_outputs([Output(model / "new", "--out")], [Input(model, "model")])
    built = tmp_path / "built"
    (built / "adapter").mkdir(parents=True)
    (built / "finetuned-adapter").mkdir()  # an earlier output, not part of the input: may be replaced
    check_outputs([Output(built / "finetuned-adapter", "--out")], [Input(built, "built folder", ("adapter",))])
    with pytest.raises(PlannerError, match="part of the model"):
        check_outputs([Output(model / "w.safetensors", "--out")], [Input(model, "model")])
    link = tmp_path / "link"
    link.symlink_to(model)
    with pytest.raises(PlannerError, match="is the model"):
        check_outputs([Output(link, "--out")], [Input(model, "model")])


# ---------------------------------------------------------------- inputs are regular files
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_device_given_as_input_is_refused_not_read(tmp_path: Path, capsys, kind: str) -> None:
    """`show NODE` read until a MemoryError; `--data FIFO` blocked for ever."""
    import stat

    node = tmp_path / f"node.{kind}"
    if kind == "fifo":
        os.mkfifo(node)
    else:
        try:
            os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's numbers, inside tmp_path
        except PermissionError:
            pytest.skip("creating a device node needs root")
    _one_line(capsys, ["show", str(node)], "plan file", "a FIFO" if kind == "fifo" else "a device")
    _one_line(capsys, ["--model", "phi-2", "--budget", "11GB", "--data", str(node), "--out", str(tmp_path / "p.json"),
                       "--cache-dir", str(tmp_path / "cache")], "data file", "give a regular file")


# ---------------------------------------------------------------- fingerprints cover every byte
def test_the_fingerprint_sees_an_edit_in_the_middle_of_a_large_file(tmp_path: Path) -> None:
    from planner.files.fingerprint import Memo, content_fingerprint, partial_fingerprint
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(3, 1 << 20)}, str(path))  # 12 MiB: hashed whole only by the content fingerprint
    assert path.stat().st_size > 2 * (1 << 20)
    memo = Memo(tmp_path / "memo")
    content, partial = content_fingerprint([path], tmp_path, memo), partial_fingerprint([path], tmp_path)
    assert content_fingerprint([path], tmp_path, memo) == content  # memoised: same answer
    with open(path, "r+b") as f:  # one finite value in the middle, same size
        f.seek(path.stat().st_size // 2)
        f.write(b"\x01\x02\x03\x04")
    assert partial_fingerprint([path], tmp_path) == partial  # what plans recorded before: blind to it
    assert content_fingerprint([path], tmp_path, memo) != content


def test_a_nan_in_the_middle_of_a_cached_gguf_is_refused_and_a_renamed_copy_is_the_same_model(tmp_path: Path) -> None:
    """With its conversion cached, a NaN written into the middle of the base GGUF reached model.gguf
    (exit 0); a renamed copy of it was "not the ones the plan was made for"."""
    import gguf

    from planner.sources import check_weights, model_record, resolve
    from tests.tiny_models import save_tiny_llama_gguf

    path = save_tiny_llama_gguf(tmp_path / "tiny.gguf")
    assert path.stat().st_size > 2 * (1 << 20)
    cache = tmp_path / "cache"
    first = resolve(str(path), cache_dir=cache)
    record = model_record(first, str(path))
    copy = tmp_path / "renamed-copy.gguf"
    shutil.copyfile(path, copy)
    check_weights(resolve(str(copy), cache_dir=cache), record)  # the same weights, another name
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    offset = int(t.data_offset) + t.n_bytes // 2
    del reader
    size = path.stat().st_size
    assert 1 << 20 < offset < size - (1 << 20)  # beyond the first and last MiB the old fingerprint read
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(torch.tensor([float("nan")], dtype=torch.float32).numpy().tobytes())
    with pytest.raises(PlannerError, match="non-finite"):  # a new conversion, whose weights are checked
        list(resolve(str(path), cache_dir=cache).iter_weights())


def test_plans_record_both_fingerprints_and_old_plans_still_check(tmp_path: Path) -> None:
    from planner.artifact.plan import load_plan
    from planner.sources import check_weights, resolve

    ckpt, plan_path = _tiny(tmp_path)
    plan = load_plan(plan_path)
    source = resolve(str(ckpt), cache_dir=tmp_path / "cache")
    assert plan.model["weights_content_sha256"] == source.weights_sha256()
    assert plan.model["weights_sha256"] == source.partial_sha256()
    old = {k: v for k, v in plan.model.items() if k != "weights_content_sha256"}  # a plan of the v2 fingerprint
    check_weights(source, old)
    with pytest.raises(PlannerError, match="not the ones"):
        check_weights(source, {**plan.model, "weights_content_sha256": "0" * 64})


# ---------------------------------------------------------------- temp files never published
def _dead_tag() -> str:
    return f"{socket.gethostname().replace('.', '_')}-999999"


def test_a_killed_materialize_leaves_temps_the_resume_never_publishes(tmp_path: Path) -> None:
    """After kill -9 the resumed run shipped `.model.gguf.*.tmp` and `.non_target.safetensors.*.tmp`."""
    from planner import materialize
    from planner.build.materialize import partial_dir

    _, plan = _tiny(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        materialize(plan, out, on_layer=lambda name: (_ for _ in ()).throw(KeyboardInterrupt))
    artifact = partial_dir(out) / "artifact"
    (artifact / "gguf").mkdir(parents=True, exist_ok=True)
    leftovers = [artifact / "gguf" / f".model.gguf.{_dead_tag()}.abc.tmp",
                 artifact / "backbone" / f".non_target.safetensors.{_dead_tag()}.abc.tmp",
                 artifact / "backbone" / ".non_target.safetensors.legacy123.tmp"]
    for p in leftovers:
        p.write_bytes(b"half")
    materialize(plan, out)
    assert not out.with_name("out.partial").exists()
    assert [p for p in out.rglob("*") if p.name.startswith(".")] == []


def test_a_sweep_keeps_a_live_writers_temps_and_removes_a_dead_ones(tmp_path: Path) -> None:
    from planner.files.atomic import _tag, sweep_temps

    live = tmp_path / "moments" / f".block-0001.safetensors.{_tag()}.x.tmp"
    dead = tmp_path / "moments" / f".block-0002.safetensors.{_dead_tag()}.x.tmp"
    kept = tmp_path / "moments" / "block-0000.safetensors"
    live.parent.mkdir()
    for p in (live, dead, kept):
        p.write_bytes(b"x")
    assert sweep_temps(tmp_path) == 1
    assert live.exists() and kept.exists() and not dead.exists()


# ---------------------------------------------------------------- a full disk is one line
def test_a_full_disk_in_safetensors_or_the_gguf_writer_is_one_line(tmp_path: Path, monkeypatch) -> None:
    """safetensors raises SafetensorError("... os error 28"), numpy's tofile OSError("N requested and 0
    written") without an errno: both were tracebacks (bank, moments, materialize, GGUF export)."""
    import safetensors.torch as st
    from safetensors import SafetensorError

    from planner.files.atomic import atomic_save_tensors, atomic_write_path

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(st, "save_file", full)
    with pytest.raises(PlannerError, match="No space left on device"):
        atomic_save_tensors(tmp_path / "bank" / "x.safetensors", {"a": torch.zeros(2)})

    def short(tmp: Path) -> None:
        raise OSError("1048576 requested and 0 written")

    with pytest.raises(PlannerError, match="No space left on device"):
        atomic_write_path(tmp_path / "gguf" / "model.gguf", short)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_materialize_on_a_disk_that_fills_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    import planner.build.materialize as mat

    _, plan = _tiny(tmp_path)

    def copy_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "config.json")

    monkeypatch.setattr(mat, "copy_config_files", copy_full)
    _one_line(capsys, ["materialize", str(plan), "--out", str(tmp_path / "out")], "No space left on device")


# ---------------------------------------------------------------- plans and folders are checked
def _plan_doc(tmp_path: Path) -> tuple[Path, dict]:
    _, plan = _tiny(tmp_path)
    return plan, json.loads(plan.read_text())


def test_a_deeply_nested_plan_is_one_line(tmp_path: Path, capsys) -> None:
    plan, doc = _plan_doc(tmp_path)
    deep: dict = {}
    node = deep
    for _ in range(5000):
        node["x"] = {}
        node = node["x"]
    doc["search"]["extra"] = deep
    plan.write_text(_dump_deep(doc))
    _one_line(capsys, ["show", str(plan)], "nested")
    _one_line(capsys, ["materialize", str(plan), "--out", str(tmp_path / "out")], "nested")
    assert not (tmp_path / "out").exists()


def _dump_deep(doc: dict) -> str:
    """json.dumps recurses and would itself hit the limit: splice the deep part in as text."""
    deep = doc["search"].pop("extra")
    depth = 0
    while deep:
        deep, depth = deep["x"], depth + 1
    doc["search"]["extra"] = "@@DEEP@@"
    return json.dumps(doc).replace('"@@DEEP@@"', '{"x": ' * depth + "{}" + "}" * depth)


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["layers"][0].__setitem__("iters", 1000000), "iters must be at most 100"),
    (lambda d: d["model"].__setitem__("weights_sha256", None), "weights_sha256 must be a non-empty string"),
    (lambda d: d["layers"][0].__setitem__("rank", 10**6), "exceeds min(shape)"),
])
def test_hand_edited_plan_fields_are_bounded(tmp_path: Path, capsys, edit, needle: str) -> None:
    plan, doc = _plan_doc(tmp_path)
    edit(doc)
    plan.write_text(json.dumps(doc))
    _one_line(capsys, ["materialize", str(plan), "--out", str(tmp_path / "out")], needle)
    assert not (tmp_path / "out").exists()


def test_a_seq_len_beyond_the_model_is_refused_at_materialize_and_verify(tmp_path: Path, capsys) -> None:
    """`run.seq_len: 1e9` loaded, and verify died on a 256 GB allocation."""
    from planner import materialize

    plan, doc = _plan_doc(tmp_path)
    built = materialize(plan, tmp_path / "built").path
    doc["run"]["seq_len"] = 100000  # the tiny llama has 256 positions
    plan.write_text(json.dumps(doc))
    _one_line(capsys, ["materialize", str(plan), "--out", str(tmp_path / "out")], "exceeds the 256 positions")
    inner = json.loads((built / "plan.json").read_text())
    inner["run"]["seq_len"] = 100000
    (built / "plan.json").write_text(json.dumps(inner))
    _one_line(capsys, ["verify", str(built)], "exceeds the 256 positions")
    _one_line(capsys, ["finetune", str(built), "--steps", "1"], "exceeds the 256 positions")


def test_an_edited_width_in_quantization_json_is_refused(tmp_path: Path, capsys) -> None:
    """NF8 codes edited to say 4 bits were decoded as 4-bit and verify said all terms agree."""
    from planner import materialize
    from planner.artifact.layout import read_artifact
    from planner.settings import LayerChoice

    _, plan = _tiny(tmp_path)
    doc = json.loads(plan.read_text())
    built = materialize(plan, tmp_path / "built").path
    meta = built / "backbone" / "quantization.json"
    q = json.loads(meta.read_text())
    assert q["layers"][0]["bits"] == 4
    q["layers"][0]["bits"] = 2
    meta.write_text(json.dumps(q))
    with pytest.raises(PlannerError, match="nbytes"):
        read_artifact(built)
    _one_line(capsys, ["verify", str(built)], "nbytes")
    assert doc  # the plan itself is unchanged


# ---------------------------------------------------------------- caches hold valid values
def test_a_cached_fisher_error_below_zero_is_recomputed(tmp_path: Path) -> None:
    from planner.files.cache import load_cached, non_negative, save_cached
    from planner.scoring.tables import valid_tables

    path = tmp_path / "fisher.safetensors"
    save_cached(path, "k", {"fisher_err": torch.tensor([[0.5, -1.0]])})
    assert load_cached(path, "k") is not None  # finite, so the old check took it
    assert load_cached(path, "k", non_negative("fisher_err")) is None
    save_cached(path, "k", {"fisher_err": torch.tensor([[0.5, 0.0]])})
    assert load_cached(path, "k", non_negative("fisher_err")) is not None
    table = torch.tensor([[[0.4, 0.3, 0.2]]])
    assert valid_tables({"table": table, "sq_norm": torch.tensor([1.0])}) is None
    assert valid_tables({"table": table.flip(-1), "sq_norm": torch.tensor([1.0])}) == "residuals rise with the rank"
    assert "negative" in valid_tables({"table": -table, "sq_norm": torch.tensor([1.0])})
    # a NaN cell (a residual table once held one at rank 64 of an exact fit) is not a valid cache
    assert "NaN" in valid_tables({"table": torch.tensor([[[0.4, 0.0, float("nan")]]]), "sq_norm": torch.tensor([1.0])})


def test_collect_on_a_malformed_study_config_is_one_line(tmp_path: Path, capsys) -> None:
    import optuna

    from planner.search.drivers import CONFIG
    from planner.search.study import FINGERPRINT

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=url, study_name="s")
    study.set_user_attr(CONFIG, {"run": {}, "budget": 1})  # no "plan"
    study.set_user_attr(FINGERPRINT, {"weights": "0" * 64})
    _one_line(capsys, ["collect", "--storage", url, "--study-name", "s", "--out", str(tmp_path / "p.json")],
              "malformed")


# ---------------------------------------------------------------- smaller things a new user hit
def test_option_values_that_start_with_a_dash_reach_their_own_check(tmp_path: Path, capsys) -> None:
    _one_line(capsys, ["--model", "phi-2", "--budget", "-1GB", "--dry-run"], "budget must be positive")
    for bad in ("-5", "nan", "inf"):
        _one_line(capsys, ["--model", "phi-2", "--budget", "1GB", "--timeout", bad, "--dry-run"], "timeout")
    _one_line(capsys, ["--model", "phi-2", "--budget", "1GB", "--adapter-margin", "inf", "--dry-run"],
              "adapter_margin must be a finite number")
    _one_line(capsys, ["--model", "phi-2", "--budget", "1e30GB", "--dry-run"], "beyond any machine")


def test_the_api_config_raises_the_one_line_error_type(tmp_path: Path) -> None:
    from planner.search.config import PlanConfig

    with pytest.raises(PlannerError, match=r"bits must be a tuple of integers.*'2,4'") as err:
        PlanConfig(bits="2,4")
    assert isinstance(err.value, ValueError)  # still what dataclass validation raises
    with pytest.raises(PlannerError, match="bits must be a non-empty subset"):
        PlanConfig(bits=(5,))
    assert PlanConfig(bits=[8, 2, 4]).bits == (2, 4, 8)


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import planner.cli.plan_cmd as plan_cmd

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plan_cmd, "dry_run", interrupted)
    assert main(["--model", "phi-2", "--budget", "1GB", "--dry-run"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err


def test_a_corrupt_default_study_database_names_the_file(tmp_path: Path) -> None:
    from planner.search.study import DEFAULT_DB, open_storage

    db = tmp_path / DEFAULT_DB
    db.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(PlannerError) as err:
        open_storage(f"sqlite:///{db}")
    message = str(err.value)
    assert "--storage" not in message.split(":")[0] and str(db) in message and "delete it" in message, message


def test_a_layer_name_in_an_error_is_not_regex_escaped(tmp_path: Path, capsys) -> None:
    plan, doc = _plan_doc(tmp_path)
    doc["layers"][0]["name"] = "model.layers.99.self_attn.q_proj"
    plan.write_text(json.dumps(doc))
    err = _one_line(capsys, ["materialize", str(plan), "--out", str(tmp_path / "out")], "model.layers.99")
    assert "\\." not in err


def test_a_nan_adapter_is_named_not_blamed_on_the_learning_rate(tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    from planner import materialize

    _, plan = _tiny(tmp_path)
    built = materialize(plan, tmp_path / "built").path
    weights = built / "adapter" / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = sorted(state)[0]
    state[key][0, 0] = float("nan")
    save_file(state, str(weights))
    err = _one_line(capsys, ["verify", str(built)], "non-finite", key)
    assert "learning rate" not in err


def test_default_ranks_are_clipped_on_a_small_model_and_chosen_ones_say_what_fits(tmp_path: Path) -> None:
    """The default --ranks include 64: a small model failed with "rank 64 exceeds layer"."""
    from planner.search.config import PlanConfig
    from planner.sources import resolve
    from tests.tiny_models import save_tiny_checkpoint

    source = resolve(str(save_tiny_checkpoint("llama", tmp_path / "ckpt")))
    targets = source.targets()  # the smallest side is 32 (k/v: 32 x 64)
    assert PlanConfig().fitted_to(targets).ranks == (0, 8, 16, 32)
    with pytest.raises(PlannerError, match="ranks that fit every layer are at most 32"):
        PlanConfig(ranks=(0, 64)).fitted_to(targets)


def test_uniform_gguf_rows_say_which_types_the_layers_store() -> None:
    from planner.cli.fit import uniform_plans
    from planner.sources import resolve
    from search_spaces.choices import SearchSpace

    source = resolve("smollm2-135m", allow_download=False)
    labels = list(uniform_plans(source.targets(), SearchSpace(bits=(2,), ranks=(0,), quant="gguf")))
    assert len(labels) == 1 and "q2_k on 30" in labels[0], labels


def test_load_of_a_plan_without_adapters_warns_it_has_nothing_to_train(tmp_path: Path, caplog) -> None:
    import planner

    _, plan = _tiny(tmp_path, ranks=(0,))
    built = planner.materialize(plan, tmp_path / "built").path
    with caplog.at_level("WARNING"):
        model = planner.load(built, "cpu")
    assert not any(p.requires_grad for p in model.parameters())
    assert "nothing to train" in caplog.text


def test_the_run_device_defaults_to_this_machine() -> None:
    from planner.settings import RunSettings

    assert RunSettings().device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert RunSettings(device="cuda").device == "cuda"

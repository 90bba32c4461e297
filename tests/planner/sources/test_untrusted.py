"""Model folders a user (or an attacker) hands the planner: every fault is one line and exit 2, no
pickle is ever loaded, and nothing outside the folder is read. Fixtures are tiny random llamas."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import planner.cli.plan_cmd  # noqa: F401  registers the plan command
from planner import progress
from planner.cli.app import main
from planner.errors import PlannerError
from planner.sources import resolve
from tests.tiny_models import build_tiny, save_tiny_checkpoint


@pytest.fixture(autouse=True)
def _quiet() -> None:
    progress.set_enabled(False)  # progress bars go to stderr, where the one error line is checked
    yield
    progress.set_enabled(True)


def _one_line_error(capsys: pytest.CaptureFixture, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def _plan_argv(folder: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--model", str(folder), "--budget", "1GB", "--ranks", "0,8", "--trials", "1", "--calib-seqs", "1",
            "--proxy-seqs", "1", "--calib-seq-len", "32", "--seq-len", "64", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "plan.json"), *extra]


# ---------------------------------------------------------------- never a pickle
def test_model_is_built_from_the_fingerprinted_safetensors_never_the_pickle_beside_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """weights.safetensors (seed 0) + pytorch_model.bin (seed 1): the fingerprint covers the
    safetensors file, so the full model, the streamed layers and the fingerprint must all be it."""
    good, other = build_tiny("llama", seed=0), build_tiny("llama", seed=1)
    folder = tmp_path / "mixed"
    good.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in good.state_dict().items()}, str(folder / "weights.safetensors"))
    torch.save(other.state_dict(), folder / "pytorch_model.bin")

    def refuse(*args, **kwargs):
        raise AssertionError("something unpickled a file")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    source = resolve(str(folder))
    model = source.load_model()
    loaded, want = model.state_dict(), good.state_dict()
    assert loaded.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(loaded[name], tensor), name
    assert not torch.equal(loaded["model.layers.0.mlp.up_proj.weight"], other.state_dict()["model.layers.0.mlp.up_proj.weight"])
    for target, weight in source.iter_weights():
        assert torch.equal(weight, want[f"{target.name}.weight"])
    assert [p.name for p in source.index.files] == ["weights.safetensors"]


# ---------------------------------------------------------------- malformed config.json
def _edit(data: dict, **changes) -> str:
    return json.dumps({**data, **changes})


CONFIG_FAULTS = {
    "not JSON": lambda d: "{not json",
    "a JSON list": lambda d: "[1, 2]",
    "a string size": lambda d: _edit(d, hidden_size="sixty-four"),
    "no model_type": lambda d: json.dumps({k: v for k, v in d.items() if k != "model_type"}),
    "zero heads": lambda d: _edit(d, num_attention_heads=0),
    "negative layers": lambda d: _edit(d, num_hidden_layers=-3),
}


@pytest.mark.parametrize("fault", sorted(CONFIG_FAULTS))
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "plan"])
def test_malformed_config_json_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, fault: str,
                                           dry_run: bool) -> None:
    folder = save_tiny_checkpoint("llama", tmp_path / "ckpt")
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(CONFIG_FAULTS[fault](data))
    argv = _plan_argv(folder, tmp_path, *(["--dry-run"] if dry_run else []))
    assert main(argv) == 2
    _one_line_error(capsys, "config.json")
    assert not (tmp_path / "plan.json").exists()


# ---------------------------------------------------------------- corrupt or truncated safetensors
def _truncate_data(b: bytes) -> bytes:
    return b[:len(b) - 100]


def _garbage_header(b: bytes) -> bytes:
    return b[:8] + b"\xff" * 24 + b[32:]


def _huge_header_length(b: bytes) -> bytes:
    return (10 ** 12).to_bytes(8, "little") + b[8:]


def _bad_offsets(b: bytes) -> bytes:
    n = int.from_bytes(b[:8], "little")
    header = json.loads(b[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 4
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b[8 + n:]


SAFETENSORS_FAULTS = {"truncated data": _truncate_data, "garbage header": _garbage_header,
                      "huge header length": _huge_header_length, "offsets past the data": _bad_offsets,
                      "empty file": lambda b: b""}


@pytest.mark.parametrize("fault", sorted(SAFETENSORS_FAULTS))
@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single"])
def test_corrupt_safetensors_is_one_line_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         fault: str, sharded: bool) -> None:
    folder = save_tiny_checkpoint("llama", tmp_path / "ckpt", max_shard_size="40KB" if sharded else "50MB")
    shard = sorted(folder.glob("*.safetensors"))[-1]
    shard.write_bytes(SAFETENSORS_FAULTS[fault](shard.read_bytes()))
    for dry in ([], ["--dry-run"]):
        assert main(_plan_argv(folder, tmp_path, *dry)) == 2
        _one_line_error(capsys, shard.name)
    assert not (tmp_path / "plan.json").exists() and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- nothing outside the folder
def test_shard_index_entries_outside_the_folder_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = save_tiny_checkpoint("llama", tmp_path / "ckpt")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    victim, shard = next(iter(index["weight_map"].items()))
    os.replace(folder / shard, outside / shard)
    for name in (f"../elsewhere/{shard}", str(outside / shard)):  # relative escape, absolute path
        index["weight_map"] = {k: (name if v == shard else v) for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index))
        with pytest.raises(PlannerError, match="refusing"):
            resolve(str(folder))
        assert main(_plan_argv(folder, tmp_path, "--dry-run")) == 2
        _one_line_error(capsys, "refusing")
    index["weight_map"][victim] = "pytorch_model.bin"  # an index cannot smuggle a pickle in either
    index_path.write_text(json.dumps(index))
    with pytest.raises(PlannerError, match="not a .safetensors file"):
        resolve(str(folder))


@pytest.mark.parametrize("name", ["model-00001-of-00016.safetensors", "config.json", "tokenizer.json",
                                  "model.safetensors.index.json"])
def test_symlinks_out_of_the_model_folder_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      name: str) -> None:
    folder = save_tiny_checkpoint("llama", tmp_path / "ckpt")
    assert len(list(folder.glob("model-*-of-00016.safetensors"))) == 16
    secret = tmp_path / "secret" / name
    secret.parent.mkdir()
    if (folder / name).exists():
        os.replace(folder / name, secret)
    else:
        secret.write_text('{"a secret": 1}')
    (folder / name).symlink_to(secret)
    with pytest.raises(PlannerError, match=f"{name} points outside"):
        resolve(str(folder))
    assert main(_plan_argv(folder, tmp_path, "--dry-run")) == 2
    _one_line_error(capsys, "points outside")
    (folder / name).unlink()  # a link that stays inside the folder is fine
    os.replace(secret, folder / f"real-{name}")
    (folder / name).symlink_to(f"real-{name}")
    assert len(resolve(str(folder)).targets()) == 21


def test_hub_snapshot_links_into_its_blobs_are_accepted(tmp_path: Path) -> None:
    """The Hugging Face cache keeps files in blobs/ and links them from snapshots/REV/."""
    folder = save_tiny_checkpoint("llama", tmp_path / "plain", max_shard_size="50MB")
    repo = tmp_path / "hub" / "models--someone--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, path in enumerate(sorted(folder.iterdir())):
        os.replace(path, blobs / f"blob{i}")
        (snap / path.name).symlink_to(Path("../../blobs") / f"blob{i}")
    source = resolve(str(snap))
    assert len(source.targets()) == 21 and source.load_model() is not None


# ---------------------------------------------------------------- non-finite weights are named
@pytest.mark.parametrize("tensor", ["model.layers.1.input_layernorm.weight", "model.embed_tokens.weight",
                                    "model.layers.2.mlp.down_proj.weight"])
def test_nan_in_any_weight_is_named(tmp_path: Path, capsys: pytest.CaptureFixture, tensor: str) -> None:
    """A NaN in a non-target weight used to end the plan with 'group 0 has no options'."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import save_tiny_llama_with_real_tokenizer

    folder = save_tiny_llama_with_real_tokenizer(tmp_path / "ckpt")  # planning calibrates first: a tokenizer
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.get_parameter(tensor).view(-1)[7] = float("nan")
    for old in folder.glob("model*.safetensors*"):  # the shards and their index: written again below
        old.unlink()
    model.save_pretrained(folder)
    assert main(_plan_argv(folder, tmp_path)) == 2
    _one_line_error(capsys, tensor, "non-finite")
    assert not (tmp_path / "plan.json").exists()
    with pytest.raises(PlannerError, match=tensor.replace(".", r"\.")):
        resolve(str(folder)).load_model()

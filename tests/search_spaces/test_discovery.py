"""Target discovery on in-memory models: rules, Conv1D, heads, overrides, blocks; facts from configs."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from search_spaces import (ARCHITECTURES, ArchRule, ModelFacts, block_path, facts_from_config, find_targets, rule_for,
                           type_path)
from tests.tiny_models import build_tiny, tiny_config


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {arch: build_tiny(arch) for arch in ("llama", "gpt2", "bert", "t5", "qwen2")}


def test_gpt2_conv1d_reported_out_in(models: dict[str, nn.Module]) -> None:
    targets = {t.name: t for t in find_targets(models["gpt2"])}
    c_attn = targets["transformer.h.0.attn.c_attn"]
    assert c_attn.shape == (192, 64) and c_attn.transposed and c_attn.has_bias
    assert tuple(models["gpt2"].transformer.h[0].attn.c_attn.weight.shape) == (64, 192)  # stored (in, out)
    assert targets["transformer.h.2.mlp.c_proj"].shape == (64, 256)
    assert "lm_head" not in targets


def test_bert_pooler_excluded_unless_asked(models: dict[str, nn.Module]) -> None:
    names = [t.name for t in find_targets(models["bert"])]
    assert len(names) == 18 and not any(n.startswith("pooler") for n in names)
    override = [t.name for t in find_targets(models["bert"], target_modules=["dense"])]
    assert "pooler.dense" in override and len(override) == 3 * 3 + 1


def test_head_only_with_include_head(models: dict[str, nn.Module]) -> None:
    llama = models["llama"]
    assert "lm_head" not in {t.name for t in find_targets(llama)}
    with_head = find_targets(llama, include_head=True)
    head = [t for t in with_head if t.name == "lm_head"]
    assert len(with_head) == 22 and head[0].shape == (320, 64) and head[0].block == -1


def test_override_leaf_suffix_regex(models: dict[str, nn.Module]) -> None:
    llama = models["llama"]
    assert [t.name for t in find_targets(llama, target_modules=["q_proj", "v_proj"])] == [
        f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "v_proj")]
    assert len(find_targets(llama, target_modules=["mlp.down_proj"])) == 3
    regex = find_targets(llama, target_modules=[r"model\.layers\.[12]\.mlp\..*"])
    assert [t.name for t in regex] == [f"model.layers.{i}.mlp.{p}" for i in (1, 2)
                                       for p in ("gate_proj", "up_proj", "down_proj")]


def test_override_unknown_name_lists_leaves(models: dict[str, nn.Module]) -> None:
    with pytest.raises(ValueError) as err:
        find_targets(models["llama"], target_modules=["qproj"])
    msg = str(err.value)
    assert "'qproj'" in msg and "q_proj" in msg and "down_proj" in msg
    with pytest.raises(ValueError, match="not a valid regex"):
        find_targets(models["llama"], target_modules=["(q_proj"])


def test_t5_blocks_numbered_encoder_then_decoder(models: dict[str, nn.Module]) -> None:
    targets = find_targets(models["t5"])
    blocks = {t.name: t.block for t in targets}
    assert blocks["encoder.block.1.layer.1.DenseReluDense.wo"] == 1
    assert blocks["decoder.block.0.layer.1.EncDecAttention.q"] == 2
    assert blocks["decoder.block.1.layer.2.DenseReluDense.wi"] == 3


def test_generic_fallback_on_plain_torch() -> None:
    """A model without a config: every nn.Linear, in module order."""
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4, bias=False))
    targets = find_targets(model)
    assert [(t.name, t.shape, t.has_bias, t.block) for t in targets] == [("1", (16, 8), True, -1),
                                                                          ("3", (4, 16), False, -1)]


def test_rule_with_no_match_falls_back(models: dict[str, nn.Module], caplog: pytest.LogCaptureFixture) -> None:
    model = build_tiny("llama")
    model.config.model_type = "bert"  # wrong rule: no query/key/value/dense layers
    assert len(find_targets(model)) == 21 and "every linear layer" in caplog.text


def test_block_and_type_paths() -> None:
    assert block_path("model.layers.12.mlp.up_proj") == "model.layers.12"
    assert block_path("encoder.block.1.layer.0.SelfAttention.q") == "encoder.block.1"
    assert block_path("lm_head") is None
    assert type_path("model.layers.12.mlp.up_proj") == "model.layers.*.mlp.up_proj"
    assert type_path("decoder.block.1.layer.1.EncDecAttention.q") == "decoder.block.*.layer.1.EncDecAttention.q"
    assert type_path("lm_head") == "lm_head"


def test_registry() -> None:
    assert rule_for("llama").targets == rule_for("mistral").targets == rule_for("qwen2").targets
    assert rule_for("something-new") is ARCHITECTURES.get("generic")
    with pytest.raises(KeyError, match="known:"):
        ARCHITECTURES.get("nope")
    with pytest.raises(ValueError, match="ArchRule.targets"):
        ArchRule(())


@pytest.mark.parametrize("arch,expected", [
    ("llama", dict(hidden=64, intermediate=160, layers=3, heads=4, kv_heads=2, vocab=320, gated_mlp=True,
                   is_decoder=True, tied_embeddings=False, max_positions=256)),
    ("phi", dict(hidden=64, intermediate=160, layers=3, heads=4, kv_heads=4, gated_mlp=False, is_decoder=True)),
    ("gpt2", dict(hidden=64, intermediate=256, layers=3, heads=4, kv_heads=4, gated_mlp=False, tied_embeddings=True,
                  max_positions=256)),
    ("bert", dict(hidden=64, intermediate=160, layers=3, heads=4, is_decoder=False, gated_mlp=False)),
    ("t5", dict(hidden=64, intermediate=160, layers=4, heads=4, head_dim=16, is_decoder=True, gated_mlp=False)),
    ("bart", dict(hidden=64, intermediate=160, layers=4, heads=4, is_decoder=True)),
])
def test_facts_from_config(arch: str, expected: dict) -> None:
    facts = facts_from_config(tiny_config(arch))
    assert facts.architecture == arch
    for key, value in expected.items():
        assert getattr(facts, key) == value, key


def test_facts_typed_fields() -> None:
    t5 = facts_from_config(tiny_config("t5"))
    assert t5.encoder_layers == 2 and t5.decoder_layers == 2 and t5.hidden_act == "relu"
    gpt2 = facts_from_config(tiny_config("gpt2"))
    assert gpt2.hidden_act == "gelu_new" and gpt2.resid_dropout == tiny_config("gpt2").resid_pdrop
    llama = facts_from_config(tiny_config("llama"))
    assert llama.kv_dim == 32 and llama.resid_dropout == 0.0 and llama.encoder_layers is None
    assert llama.partial_rotary_factor == 1.0
    assert ModelFacts.from_dict(t5.to_dict()) == t5
    with pytest.raises(ValueError, match="unknown model fact"):
        ModelFacts.from_dict({**t5.to_dict(), "extra": {}})
    with pytest.raises(ValueError, match="resid_dropout must be in \\[0, 1\\), got 1.5"):
        dataclasses.replace(t5, resid_dropout=1.5)


def test_targets_on_meta_match_real(models: dict[str, nn.Module]) -> None:
    """Discovery reads no weight values: a meta-device build gives the same targets."""
    with torch.device("meta"):
        meta = type(models["qwen2"])(models["qwen2"].config)
    assert find_targets(meta) == find_targets(models["qwen2"])

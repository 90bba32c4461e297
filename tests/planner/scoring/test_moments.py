"""Input second moments, collected block by block, equal X^T X / n taken on the whole model."""
from __future__ import annotations

import torch

from planner.scoring.moments import MomentStore, collect_moments, input_moments, moments_key
from planner.scoring.stream import BlockStream
from planner.sources import resolve
from tests.tiny_models import save_tiny_checkpoint


def _direct(model: torch.nn.Module, names: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """X^T X / n of every named Linear's input on the whole model, in float64."""
    acc: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: acc.__setitem__(n, acc.get(n, 0) + args[0].reshape(-1, args[0].shape[-1]).double().T
                                             @ args[0].reshape(-1, args[0].shape[-1]).double()))
        for n in names]
    with torch.no_grad():
        for s in range(len(ids)):
            model(input_ids=ids[s:s + 1])
    for h in hooks:
        h.remove()
    return {n: v / ids.numel() for n, v in acc.items()}


def test_moments_equal_direct_xtx_on_a_tiny_llama(tmp_path):
    src = resolve(str(save_tiny_checkpoint("llama", tmp_path / "ckpt")))
    names = [t.name for t in src.targets()]
    ids = torch.randint(0, 320, (3, 17), generator=torch.Generator().manual_seed(0))
    key = moments_key(src.weights_sha256(), names, "test", ids.shape)
    store = collect_moments(BlockStream(src, names), ids, tmp_path / "m", key)
    want = _direct(src.load_model(torch.float32), names, ids)
    assert set(store) == set(names) and len(names) == 21
    for n in names:
        got = store[n].double()
        assert got.shape == want[n].shape
        assert torch.allclose(got, want[n], rtol=1e-5, atol=1e-6 * float(want[n].abs().max())), n
    # q/k/v and gate/up receive one tensor: one moment each (3 blocks x 4 groups: qkv, o, gate/up, down)
    assert store.group("model.layers.1.self_attn.q_proj") == store.group("model.layers.1.self_attn.v_proj")
    assert store.group("model.layers.1.mlp.gate_proj") == store.group("model.layers.1.mlp.up_proj")
    assert store.group("model.layers.1.mlp.up_proj") != store.group("model.layers.1.mlp.down_proj")
    assert len({store.group(n) for n in names}) == 12 and len(list((tmp_path / "m").glob("block-*"))) == 3
    # read back from the cache by key, memory-mapped; another key finds nothing
    again = input_moments(src, names, ids, "test", cache_dir=tmp_path / "none")  # other folder: computes
    assert torch.equal(again["model.layers.2.mlp.down_proj"], store["model.layers.2.mlp.down_proj"])
    assert MomentStore(tmp_path / "m", key).complete() and not MomentStore(tmp_path / "m", "other").complete()


def test_a_torn_or_foreign_moment_file_is_computed_again(tmp_path):
    src = resolve(str(save_tiny_checkpoint("llama", tmp_path / "ckpt")))
    names = [t.name for t in src.targets()]
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))
    first = input_moments(src, names, ids, "c", cache_dir=tmp_path / "cache")
    want = first["model.layers.1.mlp.up_proj"].clone()
    block = first.folder / "block-0001.safetensors"
    block.write_bytes(block.read_bytes()[:100])  # torn
    assert not MomentStore(first.folder, first.key).complete()
    again = input_moments(src, names, ids, "c", cache_dir=tmp_path / "cache")
    assert again.complete() and torch.equal(again["model.layers.1.mlp.up_proj"], want)


def _imatrix_file(path, importance, tokens=512):
    from planner.sources.imatrix import write_imatrix

    return write_imatrix(path, importance, tokens=tokens)


def test_an_imatrix_is_a_diagonal_moment_every_consumer_takes_as_it_takes_h(tmp_path):
    """DiagonalMoments: H = diag(importance) per target; q/k/v (one input, one vector) share a group; the
    data-aware factor is diag(sqrt(imp + damp mean(imp))); a GGUF spec's encoder given that H searches
    its scales under exactly the imatrix's importance; the key changes with the file's sha256."""
    import hashlib

    import pytest

    from loftq.formats import spec_from_fields
    from loftq.gguf_quants import gguf_quantize
    from loftq.solver import calibration_factor
    from planner.errors import PlannerError
    from planner.scoring.moments import imatrix_moments
    from tests.tiny_models import build_tiny

    model = build_tiny("llama")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"]
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(64, generator=g) ** 4 * 10 + 1e-3  # skewed: a few columns dominate
    imp = {names[0]: attn, names[1]: attn.clone(), names[2]: torch.rand(160, generator=g) + 0.5}
    path = _imatrix_file(tmp_path / "a.gguf", imp)
    widths = {n: int(model.get_submodule(n).in_features) for n in names}
    store = imatrix_moments(path, names, widths)
    assert store.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and store.complete() and len(store) == 3
    for n in names:
        assert torch.equal(store[n], torch.diag(imp[n]))  # bit-exact: 512 tokens, a power of two
    assert store.group(names[0]) == store.group(names[1]) != store.group(names[2])
    factor = calibration_factor(store[names[2]].double(), 0.01)
    want = torch.diag((imp[names[2]].double() + 0.01 * imp[names[2]].double().mean()).sqrt())
    assert torch.allclose(factor, want, rtol=1e-12, atol=0)

    w = model.get_submodule(names[0]).weight.detach().float()
    spec = spec_from_fields("iq4_nl", None)
    q = spec.quantize(w, moment=store[names[0]])
    assert torch.equal(q.data, gguf_quantize(w, "iq4_nl", importance=attn).data)
    plain = gguf_quantize(w, "iq4_nl").dequantize(torch.float32)
    weighted = q.dequantize(torch.float32)
    col_err = lambda deq: float((((w - deq) ** 2).sum(0) * attn).sum())  # noqa: E731
    assert col_err(weighted) < 0.9 * col_err(plain)  # the importance-weighted error drops by > 10 %

    from planner.sources.imatrix import write_imatrix

    legacy = imatrix_moments(write_imatrix(tmp_path / "a.dat", imp, tokens=512, fmt="dat"), names, widths)
    assert all(torch.equal(legacy[n], store[n]) for n in names) and legacy.key != store.key  # same values, other file

    other = _imatrix_file(tmp_path / "b.gguf", {**imp, names[2]: imp[names[2]] * 2})
    assert imatrix_moments(other, names).key != store.key
    assert imatrix_moments(path, names[:2]).key != store.key  # and with the targets
    with pytest.raises(PlannerError, match="not the expected"):
        imatrix_moments(other, names, sha256=store.sha256)
    with pytest.raises(PlannerError, match="no entry for target model.layers.0.mlp.up_proj .blk.0.ffn_up.weight.: "
                                           "it covers 3 of 4"):
        imatrix_moments(path, names + ["model.layers.0.mlp.up_proj"])
    with pytest.raises(PlannerError, match="transformer.h.0.attn.c_attn has no llama.cpp tensor name"):
        imatrix_moments(path, ["transformer.h.0.attn.c_attn"])
    with pytest.raises(PlannerError, match="has 160 values, the layer takes 64"):
        imatrix_moments(path, names, {**widths, names[2]: 64})
    zero = _imatrix_file(tmp_path / "z.gguf", {**imp, names[2]: torch.zeros(160)})
    with pytest.raises(PlannerError, match="blk.0.ffn_down.weight is all zero"):
        imatrix_moments(zero, names)

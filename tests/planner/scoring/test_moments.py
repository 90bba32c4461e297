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

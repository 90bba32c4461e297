"""The model one transformer block at a time: embeddings -> block 0 -> ... -> block n-1 -> head.

Planning must fit the machine it plans for, so scoring never holds the model in full precision. A
:class:`BlockStream` keeps a *frame*: the model's skeleton with every parameter on the meta device,
except those outside the blocks (embeddings, final norm, head), which are read from the checkpoint.
Block ``i`` gets its parameters only inside ``with stream.block(i)``: read tensor by tensor from
safetensors (or, for a candidate, its target weights from the caller), and back on the meta device
when the block ends. The way GPTQ-style quantizers run block-sequentially:

- :meth:`BlockStream.capture` runs the frame up to block 0 and keeps what block 0 receives
  (hidden states and the keyword arguments the model hands every block: rotary tables, masks);
- :meth:`BlockStream.run` runs one block on hidden states;
- :meth:`BlockStream.head` runs the frame's tail (final norm, head, loss) on the last block's
  output: the frame's block list is swapped for one stand-in that returns the given hidden states,
  so the model's own forward computes the outputs and losses it computes for a full model.

Architectures whose blocks do not all take the same inputs (mixed sliding/full attention), models
with target layers outside the blocks, and encoder-decoders are refused with
:class:`StreamUnsupported`; :mod:`planner.scoring.scorer` then falls back to the full model.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence, TYPE_CHECKING

import torch
from torch import nn

from search_spaces.discovery import weight_out_in

if TYPE_CHECKING:  # annotations only
    from planner.sources import ModelSource


class StreamUnsupported(Exception):
    """This model cannot be run block by block (see the module docstring); the message says why."""


class _Stop(Exception):
    pass


@dataclass
class BlockInputs:
    """What block 0 receives for one batch: ``hidden`` [b, seq, hidden] and the other arguments."""

    hidden: torch.Tensor
    kwargs: dict[str, Any] = field(default_factory=dict)
    args: tuple = ()  # positional arguments after the hidden states (gpt2 passes its mask so)


def _block_list(model: nn.Module, targets: Sequence[str]) -> tuple[str, nn.ModuleList]:
    """The ModuleList of numbered blocks that holds every target layer."""
    lists = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) > 0]
    for name, mod in sorted(lists, key=lambda nm: -len(nm[1])):
        inside = [t for t in targets if any(t.startswith(f"{name}.{i}.") for i in range(len(mod)))]
        if len(inside) == len(targets):
            return name, mod
    outside = [t for t in targets if not any(t.startswith(f"{n}.") for n, _ in lists)]
    raise StreamUnsupported(f"the target layers are not all inside one list of blocks (e.g. {(outside or targets)[0]})")


def _meta_params(module: nn.Module) -> None:
    """Every parameter of ``module`` back on the meta device (buffers stay): frees the block."""
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and not p.is_meta:
                mod._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


class _StandIn(nn.Module):
    """Takes the place of the block list in :meth:`BlockStream.head`: returns the given hidden states
    in the shape of a real block's output (a tensor, or a tuple whose first item is the hidden states)."""

    def __init__(self, hidden: torch.Tensor, template: Any, attrs: Mapping[str, Any]) -> None:
        super().__init__()
        self.hidden, self.template = hidden, template
        for k, v in attrs.items():
            setattr(self, k, v)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self.template, tuple):
            return (self.hidden,) + tuple(self.template[1:])
        return self.hidden


class BlockStream:
    """One model's blocks, materialized one at a time from ``source`` (a :class:`planner.sources.ModelSource`).

    ``targets``: the target layer names (each must lie inside a block). Computation runs in ``dtype``
    on ``device``; the frame (embeddings, final norm, head) stays resident there.
    """

    def __init__(self, source: ModelSource, targets: Sequence[str], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        from planner.runtime.load import parameters_on_meta
        from planner.sources import model_class

        config = copy.deepcopy(source.config)
        if getattr(config, "is_encoder_decoder", False):
            raise StreamUnsupported("encoder-decoder models are scored as a whole")
        kinds = set(getattr(config, "layer_types", None) or [])
        if len(kinds) > 1:
            raise StreamUnsupported(f"blocks of different kinds ({', '.join(sorted(map(str, kinds)))})")
        self.source, self.dtype, self.device = source, dtype, torch.device(device)
        self.targets = list(targets)
        cls = model_class(config, source.trust_remote_code)
        build = getattr(cls, "_from_config", None) or cls.from_config
        with parameters_on_meta():
            frame = build(config)
        self.frame = frame.eval()
        self.path, self.blocks = _block_list(frame, self.targets)
        self.block_targets = [[t for t in self.targets if t.startswith(f"{self.path}.{i}.")]
                              for i in range(len(self.blocks))]
        inside = {id(p) for p in self.blocks.parameters()}
        state = {name: source.read_tensor(name).to(dtype) for name, p in frame.named_parameters() if id(p) not in inside}
        frame.load_state_dict(state, strict=False, assign=True)
        if hasattr(frame, "tie_weights"):
            frame.tie_weights()
        left = [n for n, p in frame.named_parameters() if p.is_meta and id(p) not in inside]
        if left:
            raise StreamUnsupported(f"no checkpoint value for {left[0]}")
        if self.device.type != "cpu":  # the blocks' parameters stay on meta; everything else moves
            frame._apply(lambda t: t if t.is_meta else t.to(self.device))
        for p in frame.parameters():
            p.requires_grad_(False)
        self._template: Any = None  # a real block's output, to shape the stand-in's
        self._attrs = {k: v for k, v in vars(self.blocks[0]).items()
                       if not k.startswith("_") and isinstance(v, (str, int, float, bool, type(None)))}

    def __len__(self) -> int:
        return len(self.blocks)

    # -- entering and leaving the blocks ----------------------------------------------------------

    @torch.no_grad()
    def capture(self, ids: torch.Tensor) -> BlockInputs:
        """Run the frame on ``ids`` [b, seq] up to block 0; what block 0 receives."""
        got: dict[str, Any] = {}

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            got["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            got["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            got["extra"] = args[1:]
            raise _Stop

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.frame(input_ids=ids.to(self.device), **self._call_kwargs())
        except _Stop:
            pass
        finally:
            handle.remove()
        if "hidden" not in got:
            raise StreamUnsupported("the model's forward never reached its first block")
        return BlockInputs(got["hidden"].detach(), got["kwargs"], tuple(got["extra"]))

    def _call_kwargs(self) -> dict[str, Any]:
        return {"use_cache": False} if getattr(self.frame.config, "use_cache", None) is not None else {}

    @contextlib.contextmanager
    def block(self, i: int, weights: Mapping[str, torch.Tensor] | None = None,
              grad: Sequence[str] = ()) -> Iterator[nn.Module]:
        """Block ``i`` with its parameters: target weights from ``weights`` ([out, in] by layer name)
        where given, everything else read from the checkpoint. ``grad``: layer names whose weight
        requires grad inside the block. On exit the block is back on the meta device."""
        blk = self.blocks[i]
        prefix = f"{self.path}.{i}."
        weights = weights or {}
        state = {}
        for pname, _ in blk.named_parameters():
            owner, _, leaf = pname.rpartition(".")
            layer = prefix + owner
            if leaf == "weight" and layer in weights:
                t = weight_out_in(blk.get_submodule(owner), weights[layer])
            else:
                t = self.source.read_tensor(prefix + pname)
            state[pname] = t.to(device=self.device, dtype=self.dtype)
        blk.load_state_dict(state, strict=False, assign=True)
        for pname, p in blk.named_parameters():
            p.requires_grad_(pname.endswith(".weight") and prefix + pname[:-len(".weight")] in grad)
        try:
            yield blk
        finally:
            blk.zero_grad(set_to_none=True)
            _meta_params(blk)

    def run(self, blk: nn.Module, hidden: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        """One block on ``hidden`` (the arguments ``inputs`` captured for the same batch)."""
        out = blk(hidden, *inputs.args, **inputs.kwargs)
        if self._template is None:
            self._template = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in out) \
                if isinstance(out, tuple) else out.detach()
        return out[0] if isinstance(out, tuple) else out

    def head(self, hidden: torch.Tensor, fn: Callable[[nn.Module], Any]) -> Any:
        """``fn(frame)`` with the blocks replaced by a stand-in returning ``hidden``: e.g.
        ``lambda m: m(input_ids=ids, labels=ids).loss`` is the loss of a model whose last block output
        ``hidden``. Run at least one block first (its output shapes the stand-in's)."""
        if self._template is None:
            raise RuntimeError("run a block before the head")
        parent_name, _, leaf = self.path.rpartition(".")
        parent = self.frame.get_submodule(parent_name) if parent_name else self.frame
        blocks = getattr(parent, leaf)
        setattr(parent, leaf, nn.ModuleList([_StandIn(hidden, self._template, self._attrs)]))
        try:
            return fn(self.frame)
        finally:
            setattr(parent, leaf, blocks)


def stream_or_none(source: ModelSource, targets: Sequence[str], dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> tuple[BlockStream | None, str]:
    """A :class:`BlockStream`, or None and the reason this model cannot stream."""
    try:
        return BlockStream(source, targets, dtype, device), ""
    except StreamUnsupported as err:
        return None, str(err)


class Boundaries:
    """Hidden states at every block boundary: ``[n_blocks + 1, n_seqs, seq, hidden]``.

    They grow with depth (phi-2, 16 x 256 tokens: ~1.4 GB in fp32), so with ``folder`` they live in
    a file there, memory-mapped (pages the kernel can write back and drop: file-backed, not
    anonymous memory); the file is unlinked at once and vanishes with the process. Without
    ``folder``: in RAM.
    """

    def __init__(self, shape: Sequence[int], dtype: torch.dtype = torch.float32, folder: Any = None) -> None:
        import os
        import tempfile

        numel = 1
        for d in shape:
            numel *= int(d)
        if folder is None:
            self.tensor = torch.empty(tuple(shape), dtype=dtype)
            return
        os.makedirs(folder, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=folder, prefix=".boundaries-", suffix=".bin")
        try:
            os.ftruncate(fd, numel * torch.empty(0, dtype=dtype).element_size())
            self.tensor = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(tuple(shape))
        finally:
            os.close(fd)
            os.unlink(path)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tensor[i]

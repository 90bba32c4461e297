"""A GGUF file -> an fp32 safetensors folder in the cache, one tensor at a time.

The values are exactly those of ``AutoModelForCausalLM.from_pretrained(gguf_file=..., dtype=float32)``:
the conversion calls transformers' own GGUF pieces (the config it builds, the architecture's
``TENSOR_PROCESSORS`` entry, e.g. Llama's q/k un-permutation, and ``get_gguf_hf_weights_map`` on a
skeleton on the meta device for the names) and gguf's ``dequantize``, tensor by tensor. Each tensor
is dequantized in row chunks into one array, fixed up by the processor and appended to the shard
being written, whose header goes in last (a space-padded region reserved at its start): peak memory
is about the largest tensor (twice for one the processor copies), plus the memory-mapped GGUF
file's pages, never the model. Shards of at most ``shard_bytes`` and ``model.safetensors.index.json``;
tied duplicates (a head sharing the embedding) are stored once, under the first name.

Two cases still hold the whole model: tensors a processor merges across GGUF tensors (the MoE
experts of qwen2moe, gpt-oss, minimax-m2) are kept until the end, and the architectures transformers
reads with its newer GGUF loader (lfm2, qwen3.5: :func:`_read_whole`) are converted by loading the
model, because that loader, not the legacy one used here, defines their values.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from planner import progress
from planner.files.atomic import atomic_dir, atomic_save_tensors, atomic_write_bytes, atomic_write_path
from planner.files.fingerprint import Memo, file_digest
from planner.files.paths import check_input_file, one_line
from planner.errors import PlannerError
from planner.sources.files import INDEX_NAME

log = logging.getLogger(__name__)

GGUF_CONVERSION = "gguf-v3"  # bump when convert_gguf's output (layout or values) changes
SHARD_BYTES = 1 << 30
CHUNK_BYTES = 16 << 20  # dequantized rows per gguf.dequantize call: bounds its temporaries
ENTRY_BYTES = 256  # header bytes reserved per tensor beyond its JSON name: dtype, 8 dims, offsets


def gguf_folder(gguf: Path, cache_dir: Path) -> Path:
    """The converted folder of ``gguf`` in ``cache_dir/models``, converting it on first use.

    Keyed by :func:`conversion_key` (the file's whole content, not its name): an updated file,
    converter or transformers converts again, and the same file reached as a packaged id, as a path
    or as a renamed copy shares one conversion.
    """
    check_input_file(gguf, "GGUF file")
    final = cache_dir / "models" / f"gguf-{GGUF_CONVERSION}-{conversion_key(gguf, Memo(cache_dir / 'fingerprints'))}"
    return atomic_dir(final, lambda tmp: _convert_or_explain(gguf, tmp))


def _convert_or_explain(gguf: Path, out: Path) -> None:
    """:func:`convert_gguf`; a file gguf or transformers cannot read is one PlannerError line."""
    if importlib.util.find_spec("gguf") is None:
        raise PlannerError(f"converting {gguf.name} needs the gguf package: pip install gguf")
    try:
        convert_gguf(gguf, out)
    # not a GGUF, a truncated one, or an architecture transformers lacks
    except (ValueError, NotImplementedError, KeyError, IndexError, struct.error) as err:
        raise PlannerError(f"{gguf}: cannot convert it ({type(err).__name__}: {one_line(err)})") from None


def conversion_key(gguf: Path, memo: Memo | None = None) -> str:
    """The file's content digest and the code that converts it: GGUF_CONVERSION and transformers'
    version (its GGUF code names and fixes up the tensors). Not loftq's: none of it runs here."""
    from importlib.metadata import version

    blob = json.dumps({"file": file_digest(gguf, memo), "producer": GGUF_CONVERSION,
                       "transformers": version("transformers")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def convert_gguf(gguf: Path, out: Path, shard_bytes: int | None = None) -> None:
    """Write ``gguf`` into the folder ``out``: config.json (no quantization_config, with
    ``architectures``), fp32 safetensors shards + index, the tokenizer. Weights carry the GGUF's
    quantization error: they are its blocks dequantized. ``shard_bytes``: default SHARD_BYTES."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import read_field

    log.info("converting %s to safetensors in %s (once)", gguf.name, out.parent)
    # the tokenizer first: parsing the GGUF's vocabulary is a transient peak of its own
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    # the name is information only: the content fingerprint leaves a header's metadata out
    metadata = {"format": "pt", "converted_from": gguf.name, "conversion": GGUF_CONVERSION}
    reader = GGUFReader(str(gguf))
    arch = str(read_field(reader, "general.architecture")[0])
    tensors = list(reader.tensors)  # views of the memory-mapped file; they do not keep the reader
    del reader  # its parsed metadata, the vocabulary as small arrays: ~140 MB for SmolLM2's 49 k tokens
    if _read_whole(arch):
        log.info("%s: transformers reads %s GGUFs with its newer loader; converting the whole model at once",
                 gguf.name, arch)
        del tensors
        config, weight_map = _convert_whole(gguf, out, metadata)
    else:
        config, weight_map = _convert_streamed(gguf, tensors, arch, out, shard_bytes or SHARD_BYTES, metadata)
    total = sum(_shard_data_bytes(out / name) for name in sorted(set(weight_map.values())))
    index = {"metadata": {**metadata, "total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_bytes(out / INDEX_NAME, (json.dumps(index, indent=1) + "\n").encode())
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = [_causal_lm_class(config).__name__]
    config.dtype = torch.float32
    config.save_pretrained(out)


def _causal_lm_class(config: Any) -> type:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise PlannerError(f"GGUF model type {config.model_type!r} has no causal-LM class in transformers") from None


def _read_whole(arch: str) -> bool:
    """Whether transformers loads this GGUF architecture with its newer loader (not the legacy
    ``load_gguf_checkpoint`` whose pieces the streamed conversion calls)."""
    try:
        from transformers.integrations.gguf import is_gguf_arch_supported
    except ImportError:  # a transformers without the newer loader
        return False
    return bool(is_gguf_arch_supported(arch))


def _model_names(gguf: Path, arch: str) -> tuple[Any, Any, dict[str, str], dict[str, str], dict[str, tuple]]:
    """What transformers' legacy GGUF loader builds before it reads a tensor: the config (from the
    GGUF's metadata), the architecture's tensor processor, GGUF name -> model name (from a skeleton
    on the meta device); plus model name -> first name of its tensor (tied aliases) and shapes."""
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, load_gguf_checkpoint)

    from planner.sources import config_from_dict, meta_skeleton  # here: planner.sources imports this module

    parsed = load_gguf_checkpoint(str(gguf), return_tensors=False)["config"]
    config = config_from_dict(parsed)
    config.architectures = [_causal_lm_class(config).__name__]
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed)
    skeleton = meta_skeleton(config)
    names = get_gguf_hf_weights_map(skeleton, processor)
    state = skeleton.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    canonical = {name: first.setdefault(id(t), name) for name, t in state.items()}
    return config, processor, names, canonical, {name: tuple(t.shape) for name, t in state.items()}


def _convert_streamed(gguf: Path, tensors: list[Any], arch: str, out: Path, shard_bytes: int,
                      metadata: dict[str, str]) -> tuple[Any, dict[str, str]]:
    """Stream the GGUF's ``tensors`` (a GGUFReader's) into shards; return the config and the
    weight map (name -> shard file)."""
    config, processor, names, canonical, shapes = _model_names(gguf, arch)
    stash: dict[str, Any] = {"tensors": {}}  # what processors that merge tensors fill (MoE experts)
    written: set[str] = set()
    name_bytes = max(len(json.dumps(v)) for v in names.values())
    planned = [t for t in tensors if t.name in names]
    shards: list[tuple[Path, list[str]]] = []

    def arrays(group: list[Any]) -> Iterator[tuple[str, np.ndarray]]:
        for tensor in group:
            result = processor.process(weights=_dequantized(tensor), name=tensor.name,
                                       tensor_key_mapping=names, parsed_parameters=stash)
            advance(1)
            if result.name not in names:
                continue  # merged into the stash, or a tensor the model does not use
            hf = names[result.name]
            array = np.ascontiguousarray(result.weights, dtype="<f4")
            if hf in shapes and tuple(array.shape) != shapes[hf]:
                raise PlannerError(f"{gguf}: {tensor.name} -> {hf} is {tuple(array.shape)}, the model "
                                   f"expects {shapes[hf]}")
            key = canonical.get(hf, hf)  # a tied alias is stored once, under the first name
            if key not in written:
                written.add(key)
                yield key, array

    with progress.task(f"converting {gguf.name}", len(tensors)) as advance:
        for i, group in enumerate(_groups(planned, shard_bytes)):
            path = out / f".shard-{i:05d}.safetensors"
            reserve = _round8(len(json.dumps(metadata)) + 64 + len(group) * (name_bytes + ENTRY_BYTES))
            keys: list[str] = []
            atomic_write_path(path, lambda tmp: keys.extend(_write_shard(tmp, arrays(group), reserve, metadata)))
            if keys:
                shards.append((path, keys))
            else:  # every tensor of the group went to the stash
                path.unlink()
        advance(len(tensors) - len(planned))
    extra = {canonical.get(k, k): v.to(torch.float32) for k, v in stash["tensors"].items()
             if canonical.get(k, k) not in written}
    if extra:
        path = out / ".shard-extra.safetensors"
        atomic_save_tensors(path, extra, metadata)
        shards.append((path, sorted(extra)))
        written.update(extra)
    missing = sorted(set(canonical.values()) - written)
    if missing:
        log.warning("%s has no tensor for %d of the model's: %s%s; transformers initialises them on load",
                    gguf.name, len(missing), ", ".join(missing[:3]), ", ..." if len(missing) > 3 else "")
    return config, _name_shards(out, shards)


def _groups(tensors: list[Any], shard_bytes: int) -> list[list[Any]]:
    """GGUF tensors in file order, cut into groups of at most ``shard_bytes`` in fp32 (a larger
    tensor gets a group of its own)."""
    groups: list[list[Any]] = [[]]
    size = 0
    for tensor in tensors:
        n = 4 * int(tensor.n_elements)
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += n
    return [g for g in groups if g]


def _dequantized(tensor: Any) -> np.ndarray:
    """gguf's ``dequantize`` of a reader tensor (the shape transformers sees), called on slices of
    rows so that its temporaries stay at CHUNK_BYTES: GGML blocks never cross a row, so the values
    are those of one call on the whole tensor. F32 data is returned as a view of the mapped file."""
    from gguf import GGMLQuantizationType, dequantize

    data = tensor.data
    if data.ndim < 2 or tensor.tensor_type == GGMLQuantizationType.F32:
        return dequantize(data, tensor.tensor_type)
    head = dequantize(data[:1], tensor.tensor_type)
    out = np.empty((data.shape[0], *head.shape[1:]), dtype=head.dtype)
    step = max(1, CHUNK_BYTES // max(1, head.nbytes))
    for start in range(0, data.shape[0], step):
        out[start:start + step] = dequantize(data[start:start + step], tensor.tensor_type)
    return out


def _write_shard(path: Path, arrays: Iterator[tuple[str, np.ndarray]], reserve: int,
                 metadata: dict[str, str]) -> list[str]:
    """A safetensors file written one array at a time: the data first, after ``reserve`` bytes
    kept for the header, then the header padded with spaces (the format allows it). Returns the
    names written."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    with open(path, "wb") as fh:
        fh.seek(8 + reserve)
        for name, array in arrays:
            fh.write(memoryview(array).cast("B"))
            header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
            offset += array.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        if len(blob) > reserve:  # ENTRY_BYTES bounds every entry: a bug, not the user's input
            raise RuntimeError(f"{path.name}: safetensors header of {len(blob)} B exceeds the {reserve} B reserved")
        fh.seek(0)
        fh.write(struct.pack("<Q", reserve) + blob.ljust(reserve, b" "))
    return [k for k in header if k != "__metadata__"]


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


def _shard_data_bytes(path: Path) -> int:
    with open(path, "rb") as fh:
        return path.stat().st_size - 8 - struct.unpack("<Q", fh.read(8))[0]


def _name_shards(out: Path, shards: list[tuple[Path, list[str]]]) -> dict[str, str]:
    """Rename the finished shards to ``model-0000i-of-0000n.safetensors``; the weight map."""
    weight_map = {}
    for i, (path, keys) in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(path, out / name)
        weight_map.update((key, name) for key in keys)
    return weight_map


def _unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tied duplicates (lm_head sharing the embedding): safetensors refuses shared storage and
    transformers re-ties them from ``tie_word_embeddings`` on load. The first name is kept."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor.contiguous()
    return out


def _convert_whole(gguf: Path, out: Path, metadata: dict[str, str]) -> tuple[Any, dict[str, str]]:
    """The model as transformers loads it, saved as one shard: the whole model in memory."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    state = _unique_tensors(model.state_dict())
    name = "model-00001-of-00001.safetensors"
    atomic_save_tensors(out / name, state, metadata)
    return model.config, {key: name for key in state}
